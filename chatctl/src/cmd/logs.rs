//! `chatctl logs`: the logs of a project's containers, each line prefixed by the container,
//! optionally following (`-f`) all of them at once.

use anyhow::{Context, Result, bail};
use chatctl::runtime::{ContainerStatus, Runtime};
use clap::Args;

use crate::cmd::up::{ProjectArgs, connect};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl logs                    # every container of project `chatapp`\n  \
    chatctl logs server -f          # follow all servers\n  \
    chatctl logs server-2 --tail 50 # one instance (or its full name, chatapp-server-2)\n\n\
    Exit status: 0 done, 1 failed or no such container, 3 no Docker engine.")]
pub struct LogsArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// A service (`nats`, `server`, `gateway`), an instance (`server-2`) or a container name;
    /// all containers when omitted.
    pub target: Option<String>,
    /// Keep printing new lines until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N lines of each container.
    #[arg(long)]
    pub tail: Option<usize>,
}

/// Whether `target` names this container (service, `service-instance`, or full name).
pub fn matches_target(c: &ContainerStatus, target: &str) -> bool {
    target == c.service.as_str()
        || target == c.name
        || target == format!("{}-{}", c.service, c.instance)
}

pub fn run(args: LogsArgs) -> Result<()> {
    let project = args.project.name()?.to_owned();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let docker = connect(&rt)?;
    rt.block_on(async {
        let all = docker.list_containers(&project).await?;
        let chosen: Vec<ContainerStatus> = all
            .into_iter()
            .filter(|c| args.target.as_deref().is_none_or(|t| matches_target(c, t)))
            .collect();
        if chosen.is_empty() {
            bail!(
                "no container in project {project} matches {}; see `chatctl ps --project {project}`",
                args.target.as_deref().unwrap_or("(any)")
            );
        }
        let width = chosen.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let streams = chosen.iter().map(|c| {
            let docker = docker.clone();
            let name = c.name.clone();
            let id = c.container_id.clone();
            async move {
                let mut print = |line: &str| println!("{name:<width$} | {line}");
                docker.logs(&id, args.tail, args.follow, &mut print).await
            }
        });
        let all = futures_util::future::join_all(streams);
        tokio::select! {
            results = all => {
                for r in results {
                    r?;
                }
            }
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatctl::runtime::{Health, Service};

    #[test]
    fn a_target_is_a_service_an_instance_or_a_name() {
        let c = ContainerStatus {
            service: Service::Server,
            instance: 2,
            name: "p-server-2".into(),
            container_id: "id".into(),
            image: "i".into(),
            state: "running".into(),
            health: Health::Healthy,
            ports: vec![],
            config_hash: "h".into(),
            status: "Up".into(),
            cluster: None,
        };
        assert!(matches_target(&c, "server"));
        assert!(matches_target(&c, "server-2"));
        assert!(matches_target(&c, "p-server-2"));
        assert!(!matches_target(&c, "server-1"));
        assert!(!matches_target(&c, "gateway"));
    }
}
