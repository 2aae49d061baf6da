//! `chatctl scale N`: set the number of chat-server containers of a running project. New
//! servers are made exactly like `up` made the others (the gateway carries that config); extra
//! ones get SIGTERM (they close sockets with the reconnect code) and are removed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chatctl::runtime::Runtime;
use chatctl::runtime::cluster::{self, ClusterConfig};
use clap::Args;

use crate::cmd::up::{ProjectArgs, connect, print_running};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl scale 3\n  \
    chatctl scale --project demo 1\n\n\
    The gateway finds servers by DNS on the project network, so it follows at once.\n\
    Exit status: 0 converged and healthy, 1 failed or project not running, 3 no Docker engine.")]
pub struct ScaleArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// How many chat-server containers to run (at least 1).
    pub replicas: u32,
    /// Seconds to wait until every container is healthy.
    #[arg(long, default_value_t = 120)]
    pub wait_timeout: u64,
}

pub fn run(args: ScaleArgs) -> Result<()> {
    let project = args.project.name()?.to_owned();
    if args.replicas == 0 {
        bail!("scale needs at least 1 server (use `chatctl down` to stop everything)");
    }
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let docker = connect(&rt)?;
    let started = Instant::now();
    rt.block_on(async {
        let all = docker.list_containers(&project).await?;
        let label = all.iter().find_map(|c| c.cluster.clone()).with_context(|| {
            format!("project {project} is not running: start it with `chatctl up --project {project}`")
        })?;
        let mut config: ClusterConfig = serde_json::from_str(&label).with_context(|| {
            format!(
                "the gateway of project {project} carries an unreadable {} label; \
                 run `chatctl up --project {project}` again",
                cluster::LABEL_CLUSTER
            )
        })?;
        config.replicas = args.replicas;
        cluster::converge(&docker, &config, Duration::from_secs(args.wait_timeout)).await?;
        print_running(&docker.list_containers(&project).await?);
        eprintln!(
            "Scaled to {} servers in {:.1}s",
            args.replicas,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
