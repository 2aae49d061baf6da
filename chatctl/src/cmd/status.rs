//! `chatctl status`: what the supervisor of a project sees and did: every instance with its
//! health, whether the gateway routes to it, its breaker, connections, CPU, memory and msgs/s;
//! current and desired replicas; recent decisions and why; recent events. Read from the status
//! file the supervisor writes after every tick.

use std::path::PathBuf;

use anyhow::{Result, bail};
use chatctl::supervisor::status::{DEFAULT_STATE_DIR, SupervisorStatus};
use clap::Args;

use crate::cmd::up::ProjectArgs;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl status\n  \
    chatctl status --project demo --json | jq '.instances[] | {name, connections, cpu_percent}'\n\n\
    JSON: project, pid, updated, current_replicas, desired_replicas, host_limited, host, policy,\n\
    instances[] (name, state, health, routed, breaker, connections, cpu_percent, memory_bytes,\n\
    msgs_per_sec, draining, restarts), last_decision, decisions[], events[].\n\
    Exit status: 0 shown, 1 no supervisor state (or a stale one, older than 5 ticks).")]
pub struct StatusArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// Print the supervisor's status as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the supervisor writes its status.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let project = args.project.name()?;
    let status = SupervisorStatus::read(&args.state_dir, project)?;
    let now = chatctl::client::unix_now();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render(now));
    }
    if status.age(now) as f64 > 5.0 * status.interval_secs.max(1.0) {
        bail!(
            "the supervisor of project {project} last reported {} s ago: is it running? \
             (`chatctl up --detach --project {project}` starts one)",
            status.age(now)
        );
    }
    Ok(())
}
