//! `chatctl down`: stop and remove a project's containers and network (and, with `--volumes`,
//! its volumes). Only objects carrying the project's `io.chatapp.project` label are touched;
//! images are shared by projects and kept.

use anyhow::{Context, Result};
use chatctl::runtime::cluster;
use clap::Args;

use crate::cmd::up::{ProjectArgs, connect};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl down                    # project `chatapp`: containers and network\n  \
    chatctl down --project demo --volumes   # also NATS data and server volumes\n\n\
    Exit status: 0 removed (or nothing to remove), 1 failed, 3 no Docker engine.")]
pub struct DownArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// Also remove the project's named volumes (NATS JetStream data: every message is lost).
    #[arg(long, short = 'v')]
    pub volumes: bool,
}

pub fn run(args: DownArgs) -> Result<()> {
    let project = args.project.name()?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let docker = connect(&rt)?;
    let removed = rt.block_on(cluster::down(&docker, project, args.volumes))?;
    if removed.is_empty() {
        eprintln!("Nothing to remove for project {project}.");
    } else {
        eprintln!("[+] Removed {} objects of project {project}", removed.len());
    }
    Ok(())
}
