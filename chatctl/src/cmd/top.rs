//! `chatctl top`: `chatctl status`, refreshed every interval until Ctrl-C (the screen is
//! redrawn on a terminal; elsewhere each refresh is printed after the last).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use chatctl::supervisor::status::{DEFAULT_STATE_DIR, SupervisorStatus};
use clap::Args;

use crate::cmd::up::ProjectArgs;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl top\n  \
    chatctl top --project demo --every 1s\n\n\
    Exit status: 0 after Ctrl-C, 1 no supervisor state.")]
pub struct TopArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// Time between refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub every: Duration,
    /// Stop after this many refreshes (scripts and tests).
    #[arg(long)]
    pub count: Option<u64>,
    /// Where the supervisor writes its status.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

pub fn run(args: TopArgs) -> Result<()> {
    let project = args.project.name()?.to_owned();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let tty = std::io::stdout().is_terminal();
    rt.block_on(async {
        let mut shown = 0u64;
        let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            let status = SupervisorStatus::read(&args.state_dir, &project)?;
            let text = status.render(chatctl::client::unix_now());
            let mut out = std::io::stdout().lock();
            if tty {
                // Clear the screen and go home, then draw.
                write!(out, "\x1b[2J\x1b[H{text}")?;
            } else {
                writeln!(out, "{text}")?;
            }
            out.flush()?;
            drop(out);
            shown += 1;
            if args.count.is_some_and(|n| shown >= n) {
                return Ok(());
            }
            tokio::select! {
                r = &mut ctrl_c => {
                    r.context("cannot wait for Ctrl-C")?;
                    return Ok(());
                }
                () = tokio::time::sleep(args.every) => {}
            }
        }
    })
}
