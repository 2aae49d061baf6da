//! `chatctl supervise`: the supervisor of a running Docker project in the foreground (what
//! `chatctl up` runs in its own foreground, and what `chatctl up --detach` starts as a detached
//! process with a pid file). See `chatctl::supervisor`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use chatctl::supervisor::status::{self, DEFAULT_STATE_DIR};
use chatctl::supervisor::{SupervisorOptions, policy::Policy};
use clap::Args;

use crate::cmd::up::{ConfigFile, ProjectArgs, connect};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl supervise --project demo          # heal and autoscale a project started with `up --detach --no-supervisor`\n  \
    chatctl status --project demo             # what it sees and did\n\n\
    The policy is the [autoscale] table of chatctl.toml (see docs/OPERATIONS.md). The loop ends\n\
    when the project has no gateway container any more (`chatctl down`), or on Ctrl-C/SIGTERM.\n\
    Exit status: 0 stopped, 1 failed, 3 no Docker engine.")]
pub struct SuperviseArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// Settings file (`[autoscale]` table). Default: ./chatctl.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the status, pid and log files go.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

pub fn run(args: SuperviseArgs) -> Result<()> {
    let project = args.project.name()?.to_owned();
    let file = ConfigFile::load(args.config.as_deref())?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let docker = connect(&rt)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let pid_path = status::pid_file(&args.state_dir, &project);
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write {}", pid_path.display()))?;
    let options = SupervisorOptions {
        project,
        policy: file.autoscale,
        state_dir: args.state_dir.clone(),
        print_events: true,
    };
    let result = rt.block_on(chatctl::supervisor::run(docker, options, stop_signal()));
    // Leave the pid file only if another supervisor has not taken it over meanwhile.
    if std::fs::read_to_string(&pid_path).is_ok_and(|t| t.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(&pid_path);
    }
    result
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The pid of a live supervisor of `project` recorded in `state_dir`, if any.
pub fn running_supervisor(state_dir: &Path, project: &str) -> Option<u32> {
    let text = std::fs::read_to_string(status::pid_file(state_dir, project)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("supervise") && cmdline.contains(project)).then_some(pid)
}

/// Starts `chatctl supervise` for `project` as a detached process (own process group, output
/// to `STATE_DIR/PROJECT.log`), unless one is running already; returns its pid.
pub fn spawn_detached(project: &str, config: Option<&Path>, state_dir: &Path) -> Result<u32> {
    if let Some(pid) = running_supervisor(state_dir, project) {
        return Ok(pid);
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let log_path = status::log_file(state_dir, project);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the chatctl binary to run")?;
    let mut command = Command::new(exe);
    command
        .args(["supervise", "--project", project, "--state-dir"])
        .arg(state_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("NO_COLOR", "1");
    if let Some(config) = config {
        let absolute = std::fs::canonicalize(config)
            .with_context(|| format!("cannot resolve {}", config.display()))?;
        command.arg("--config").arg(absolute);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command
        .spawn()
        .context("cannot start the detached supervisor (`chatctl supervise`)")?;
    // Give it a moment to fail on a bad config, so `up` can say so.
    std::thread::sleep(std::time::Duration::from_millis(300));
    if let Some(exit) = child.try_wait()? {
        bail!(
            "the detached supervisor exited at once ({exit}); see {}",
            log_path.display()
        );
    }
    Ok(child.id())
}

/// Loads the policy of `chatctl.toml` (for `up`, which validates it before starting anything).
pub fn policy(file: &ConfigFile) -> Result<Policy> {
    file.autoscale
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (chatctl.toml, see docs/OPERATIONS.md)"))?;
    Ok(file.autoscale.clone())
}
