//! `chatctl up`: run ChatApp locally. With a Docker engine: a project (network, NATS with
//! JetStream on a named volume, N chat-server containers, the gateway publishing PORT) built from
//! offline images and converged idempotently. Without one (or with `--runtime process`): one
//! chat-server in this process with the embedded store. Dev keys are provisioned when none exist.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chatctl::runtime::cluster::{self, ClusterConfig};
use chatctl::runtime::docker::DockerRuntime;
use chatctl::runtime::image;
use chatctl::runtime::process::{EmbeddedCluster, EmbeddedOptions};
use chatctl::runtime::{ContainerStatus, ImageBuild, Runtime, Service};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::cmd::keys;

/// Default project name.
pub const DEFAULT_PROJECT: &str = "chatapp";
/// The config file read when present and no `--config` is given.
pub const DEFAULT_CONFIG: &str = "chatctl.toml";

/// No Docker engine answered: exit status 3, so scripts can tell it from other failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoEngine(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// Docker if an engine answers, else one local process.
    Auto,
    /// Containers through the Docker Engine API.
    Docker,
    /// One embedded server in this process.
    Process,
}

/// `--project`, shared by every cluster subcommand.
#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// Project name: prefix of every container, network and volume, and their label.
    #[arg(long, short = 'p', env = "CHATCTL_PROJECT", default_value = DEFAULT_PROJECT)]
    pub project: String,
}

impl ProjectArgs {
    pub fn name(&self) -> Result<&str> {
        validate_project(&self.project)?;
        Ok(&self.project)
    }
}

/// A project name is lowercase letters, digits, `-` and `_`, starting with a letter or digit.
pub fn validate_project(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!("bad project name {name:?}: use lowercase letters, digits, '-' and '_' (at most 48)");
    }
    Ok(())
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl up                      # Docker: NATS, 1 server, gateway on https://localhost:8443\n  \
    chatctl up --replicas 3 --detach --project demo\n  \
    chatctl up --runtime process    # no Docker: one embedded server\n  \
    chatctl up --port 9443 --keys /etc/chatapp/keys\n\n\
    Then, in another terminal:\n  \
    chatctl chat register alice && chatctl chat register bob\n  \
    chatctl chat send --as alice bob hello && chatctl chat recv --as bob\n\n\
    Settings come from the flags, then chatctl.toml ([cluster] project, replicas, port, keys,\n\
    bind, server_binary; [autoscale] for the supervisor), then defaults. A supervisor heals and\n\
    autoscales the cluster: in the foreground here, or detached with --detach (`chatctl status`). Running `up` again with the same settings changes\n\
    nothing; changed settings or a new binary are rolled out one container at a time.\n\
    Exit status: 0 all healthy, 1 failed, 2 usage error, 3 no Docker engine (--runtime docker).")]
pub struct UpArgs {
    /// Project name (Docker runtime).
    #[arg(long, short = 'p', env = "CHATCTL_PROJECT")]
    pub project: Option<String>,
    /// Port to serve HTTPS and WebSockets on (localhost). Default 8443.
    #[arg(long)]
    pub port: Option<u16>,
    /// Key directory; dev keys are created there when it holds none. Default .chatctl/keys.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Number of chat-server containers (Docker runtime). Default: as many as run now, else 1.
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Return once everything is healthy and leave the cluster running.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Settings file (TOML, `[cluster]` table). Default: ./chatctl.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Host address the gateway port is published on. Default 127.0.0.1.
    #[arg(long)]
    pub bind: Option<String>,
    /// The chat-server binary to package (default: the static musl build under target/).
    #[arg(long)]
    pub server_binary: Option<PathBuf>,
    /// Seconds to wait until every container is healthy.
    #[arg(long, default_value_t = 120)]
    pub wait_timeout: u64,
    /// Where the embedded store keeps its data (process runtime).
    #[arg(long, default_value = ".chatctl/data")]
    pub data: PathBuf,
    /// Serve this signed browser client (a `chatctl bundle` + `chatctl sign` directory) at
    /// https://localhost:PORT/. Default: KEYS/../bundle when it holds a signed release.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// How to run the servers.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Auto)]
    pub runtime: RuntimeKind,
    /// Run no supervisor (nothing heals or autoscales the cluster).
    #[arg(long)]
    pub no_supervisor: bool,
    /// Where the supervisor writes its status, pid and log files.
    #[arg(long, default_value = chatctl::supervisor::status::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// `chatctl.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub cluster: ClusterSection,
    /// The supervisor's policy (`[autoscale]`), defaults in docs/OPERATIONS.md.
    #[serde(default)]
    pub autoscale: chatctl::supervisor::policy::Policy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub project: Option<String>,
    pub replicas: Option<u32>,
    pub port: Option<u16>,
    pub keys: Option<PathBuf>,
    pub bind: Option<String>,
    pub server_binary: Option<PathBuf>,
    /// The signed browser client to serve (see `--bundle`).
    pub bundle: Option<PathBuf>,
}

impl ConfigFile {
    pub fn load(explicit: Option<&Path>) -> Result<Self> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None if Path::new(DEFAULT_CONFIG).is_file() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid chatctl config (see docs/OPERATIONS.md)",
                path.display()
            )
        })
    }
}

pub fn run(args: UpArgs) -> Result<()> {
    let file = ConfigFile::load(args.config.as_deref())?;
    let keys_dir = args
        .keys
        .clone()
        .or(file.cluster.keys.clone())
        .unwrap_or_else(|| PathBuf::from(keys::DEFAULT_DIR));
    let port = args.port.or(file.cluster.port).unwrap_or(8443);
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match args.runtime {
        RuntimeKind::Process => run_process(&rt, &args, &file, &keys_dir, port),
        RuntimeKind::Docker => {
            let docker = rt
                .block_on(DockerRuntime::connect())
                .map_err(|e| NoEngine(format!("{e:#}")))?;
            run_docker(&rt, &docker, &args, &file, &keys_dir, port)
        }
        RuntimeKind::Auto => match rt.block_on(DockerRuntime::connect()) {
            Ok(docker) => run_docker(&rt, &docker, &args, &file, &keys_dir, port),
            Err(e) => {
                eprintln!(
                    "No Docker engine answers ({}): running one embedded server instead.",
                    e.root_cause()
                );
                run_process(&rt, &args, &file, &keys_dir, port)
            }
        },
    }
}

fn ensure_keys(keys_dir: &Path) -> Result<()> {
    if keys_dir.join(keys::DIRECTORY_KEY).exists() {
        return Ok(());
    }
    keys::init(keys_dir, None, false)?;
    std::fs::write(
        keys_dir.join("DEV-KEYS.txt"),
        "These keys were made by `chatctl up` for local development. They are unencrypted.\n\
         Do not use them for a deployment: run `chatctl keys init` instead.\n",
    )
    .with_context(|| format!("cannot write {}", keys_dir.display()))?;
    eprintln!(
        "Created DEV keys (unencrypted, for local use only) in {}",
        keys_dir.display()
    );
    Ok(())
}

fn run_process(
    rt: &tokio::runtime::Runtime,
    args: &UpArgs,
    file: &ConfigFile,
    keys_dir: &Path,
    port: u16,
) -> Result<()> {
    ensure_keys(keys_dir)?;
    let options = EmbeddedOptions {
        port,
        keys: keys_dir.to_owned(),
        data: args.data.clone(),
        bundle: super::bundle::bundle_for_up(
            keys_dir,
            args.bundle.as_deref().or(file.cluster.bundle.as_deref()),
        ),
        servers: 1,
    };
    rt.block_on(async move {
        let cluster = EmbeddedCluster::start(&options).await?;
        let port = cluster
            .servers
            .first()
            .map_or(port, |s| s.local_addr.port());
        println!(
            "ChatApp is running at https://localhost:{port} (one embedded server, data in {})\n\
             CA certificate: {}\nPress Ctrl-C to stop.",
            options.data.display(),
            options.keys.join(keys::TLS_CA).display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")?;
        eprintln!("Stopping…");
        cluster.shutdown().await;
        eprintln!("Stopped.");
        Ok(())
    })
}

/// Whether `chat-server serve` of this binary knows `--store` (the NATS store), remembered in
/// the cache for an unchanged binary.
fn server_has_nats_store(binary: &Path, cache: &mut image::TagCache) -> bool {
    let key = image::fingerprint(&[binary], "serve --help: --store")
        .ok()
        .map(|f| format!("nats-store:{f}"));
    if let Some(known) = key.as_deref().and_then(|k| cache.get(k)) {
        return known == "true";
    }
    let has = std::process::Command::new(binary)
        .args(["serve", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--store"))
        .unwrap_or(false);
    if let Some(key) = key {
        cache.put(key, has.to_string());
    }
    has
}

/// Prints how long each phase of `up` took when `CHATCTL_TIMINGS` is set (profiling).
struct Phases {
    started: Instant,
    on: bool,
}

impl Phases {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            on: std::env::var_os("CHATCTL_TIMINGS").is_some_and(|v| !v.is_empty() && v != "0"),
        }
    }

    fn mark(&self, what: &str) {
        if self.on {
            eprintln!(
                "[timing] {:>7.3}s {what}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// The signed browser client the cluster's servers serve, if any: `explicit` (`--bundle` or
/// `bundle` in chatctl.toml) must verify with the release key of `keys_dir`; the default,
/// `KEYS/../bundle`, is served when it holds a release that verifies, and skipped (saying why)
/// otherwise.
fn cluster_bundle(
    keys_dir: &Path,
    explicit: Option<&Path>,
) -> Result<Option<cluster::BundleMount>> {
    let (dir, required) = match explicit {
        Some(dir) => (dir.to_owned(), true),
        None => (
            keys_dir
                .parent()
                .map_or_else(|| keys_dir.join(".."), Path::to_path_buf)
                .join("bundle"),
            false,
        ),
    };
    let signature = dir.join(chat_signing::manifest::SIGNATURE_FILE);
    if !required && !signature.is_file() {
        eprintln!(
            "No browser client: {} holds no signed release (`chatctl bundle --keys {k} --out {d}` \
             then `chatctl sign --key {k}/release.key --version X.Y.Z {d}`, or --bundle DIR).",
            dir.display(),
            k = keys_dir.display(),
            d = dir.display()
        );
        return Ok(None);
    }
    let check = || -> Result<cluster::BundleMount> {
        let pub_path = keys_dir.join(keys::RELEASE_PUB);
        let key = chat_signing::release::ReleasePublicKey::from_file_string(
            &chatctl::files::read_text(&pub_path)?,
        )
        .with_context(|| pub_path.display().to_string())?;
        let policy = chat_signing::manifest::VerifyPolicy {
            now_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            min_version: None,
        };
        super::release::verify_dir(&key, &policy, &dir)?;
        cluster::BundleMount::of(&dir)
    };
    match check() {
        Ok(mount) => Ok(Some(mount)),
        Err(e) if required => Err(e.context(format!(
            "not serving the browser client in {}: it does not verify with {}",
            dir.display(),
            keys_dir.join(keys::RELEASE_PUB).display()
        ))),
        Err(e) => {
            eprintln!("Not serving the browser client in {}: {e:#}", dir.display());
            Ok(None)
        }
    }
}

/// Builds the image `tag` of `recipe` unless the engine has it (`build`: its context, when it
/// was already made); shows a spinner meanwhile.
pub async fn ensure_image(
    runtime: &impl Runtime,
    recipe: &image::ImageRecipe,
    tag: &str,
    build: Option<ImageBuild>,
) -> Result<()> {
    if runtime.image_exists(tag).await? {
        eprintln!(" \u{2714} Image {tag:<40} Present");
        return Ok(());
    }
    let build = match build {
        Some(b) => b,
        // The cached tag's image is gone: make the context (its tag is the same unless a file
        // changed in a way its stamp did not show, and then the new tag is the right one).
        None => recipe.build()?,
    };
    let started = Instant::now();
    let bar = chatctl::progress::spinner(format!(
        "Building image {} ({} MB context)",
        build.tag,
        build.context.len() / 1_000_000
    ));
    let label = build.tag.clone();
    let mut on_line = |line: &str| bar.set_message(format!("Building {label}: {line}"));
    let result = runtime.build_image(&build, &mut on_line).await;
    bar.finish_and_clear();
    result?;
    if build.tag != tag {
        bail!(
            "image {tag} is missing and its files changed meanwhile (now {}): run `chatctl up` again",
            build.tag
        );
    }
    eprintln!(
        " \u{2714} Image {:<40} Built in {:.1}s",
        build.tag,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_docker(
    rt: &tokio::runtime::Runtime,
    docker: &DockerRuntime,
    args: &UpArgs,
    file: &ConfigFile,
    keys_dir: &Path,
    port: u16,
) -> Result<()> {
    let phases = Phases::new();
    let project = args
        .project
        .clone()
        .or(file.cluster.project.clone())
        .unwrap_or_else(|| DEFAULT_PROJECT.to_owned());
    validate_project(&project)?;
    ensure_keys(keys_dir)?;
    let keys_abs = std::fs::canonicalize(keys_dir)
        .with_context(|| format!("cannot resolve {}", keys_dir.display()))?;
    let binary = image::find_server_binary(
        args.server_binary
            .as_deref()
            .or(file.cluster.server_binary.as_deref()),
    )?;
    let mut cache = image::TagCache::load();
    let libs = image::shared_libraries_cached(&binary, &mut cache)?;
    if !libs.is_empty() {
        eprintln!(
            "Note: {} is not static; packaging it with {} libraries from this host \
             (build the static one: `cargo build --release --target {} -p chat-server`).",
            binary.display(),
            libs.len(),
            image::MUSL_TARGET
        );
    }
    let policy = super::supervise::policy(file)?;
    let bundle = cluster_bundle(
        &keys_abs,
        args.bundle.as_deref().or(file.cluster.bundle.as_deref()),
    )?;
    let nats_store = server_has_nats_store(&binary, &mut cache);
    let server_recipe = image::server_recipe(&binary, &mut cache)?;
    let nats_binary = image::find_nats_server();
    phases.mark("settings, keys, bundle");
    let started = Instant::now();
    rt.block_on(async {
        // What the engine has, asked all at once.
        let (nats_base, existing) = tokio::join!(
            docker.find_local_image("nats"),
            docker.list_containers(&project)
        );
        let (nats_base, existing) = (nats_base?, existing?);
        let nats_recipe = image::nats_recipe(
            nats_base.as_deref(),
            nats_binary.as_deref(),
            &binary,
            &mut cache,
        )?;
        let (server_tag, server_build) = server_recipe.resolve(&mut cache)?;
        let (nats_tag, nats_build) = nats_recipe.resolve(&mut cache)?;
        cache.save();
        phases.mark("image tags");
        let (server_ok, nats_ok) = tokio::join!(
            ensure_image(docker, &server_recipe, &server_tag, server_build),
            ensure_image(docker, &nats_recipe, &nats_tag, nats_build)
        );
        server_ok?;
        nats_ok?;
        phases.mark("images present");
        let running_servers = existing
            .iter()
            .filter(|c| c.service == Service::Server)
            .count();
        let replicas = args
            .replicas
            .or(file.cluster.replicas)
            .or_else(|| u32::try_from(running_servers).ok().filter(|n| *n > 0))
            .unwrap_or(1);
        if replicas == 0 {
            bail!("--replicas must be at least 1 (use `chatctl down` to stop everything)");
        }
        if !nats_store {
            eprintln!(
                "Note: this chat-server has no NATS store yet (`serve --store`); each server keeps \
                 an embedded store, so servers do not share users or mailboxes."
            );
        }
        let config = ClusterConfig {
            project: project.clone(),
            replicas,
            port,
            bind: args
                .bind
                .clone()
                .or(file.cluster.bind.clone())
                .unwrap_or_else(|| "127.0.0.1".to_owned()),
            keys: keys_abs.clone(),
            server_image: server_tag.clone(),
            nats_image: nats_tag.clone(),
            nats_store,
            bundle: bundle.clone(),
        };
        // With --detach the supervisor is started once every container is (its start-up check
        // overlaps the wait for health); it heals nothing that is merely starting.
        let detached_supervisor = args.detach && !args.no_supervisor;
        let state_dir = args.state_dir.clone();
        let config_path = args.config.clone();
        let supervisor_project = project.clone();
        let (changed, supervisor) = cluster::converge_then(
            docker,
            &config,
            Duration::from_secs(args.wait_timeout),
            || async move {
                if !detached_supervisor {
                    return None;
                }
                let spawned = tokio::task::spawn_blocking(move || {
                    super::supervise::spawn_detached(
                        &supervisor_project,
                        config_path.as_deref(),
                        &state_dir,
                    )
                })
                .await;
                Some(match spawned {
                    Ok(result) => result,
                    Err(e) => Err(anyhow::anyhow!("the supervisor's start failed: {e}")),
                })
            },
        )
        .await?;
        phases.mark("all healthy");
        let all = docker.list_containers(&project).await?;
        print_running(&all);
        let web = if config.bundle.is_some() {
            " (browser client at /)"
        } else {
            ""
        };
        eprintln!(
            "{} in {:.1}s: https://localhost:{port}{web} (CA certificate {})",
            if changed == 0 { "Up to date" } else { "Ready" },
            started.elapsed().as_secs_f64(),
            keys_abs.join(keys::TLS_CA).display()
        );
        if args.no_supervisor {
            if args.detach {
                return Ok(());
            }
            return foreground(docker, &project).await;
        }
        if let Some(spawned) = supervisor {
            let pid = spawned?;
            eprintln!(
                "Supervisor running (pid {pid}): heals and autoscales the project; \
                 `chatctl status --project {project}` shows what it does, log in {}.",
                chatctl::supervisor::status::log_file(&args.state_dir, &project).display()
            );
            return Ok(());
        }
        if let Some(pid) = super::supervise::running_supervisor(&args.state_dir, &project) {
            eprintln!(
                "A detached supervisor (pid {pid}) already heals and scales project {project}; \
                 not starting a second one here."
            );
            return foreground(docker, &project).await;
        }
        supervise_foreground(docker, &project, policy, &args.state_dir).await
    })
}

/// `[+] Running 4/4` and a line per container.
pub fn print_running(all: &[ContainerStatus]) {
    let ready = all.iter().filter(|c| c.is_ready()).count();
    eprintln!("[+] Running {ready}/{}", all.len());
    for c in all {
        let what = match c.health {
            chatctl::runtime::Health::None => c.state.clone(),
            h => format!("{} ({})", c.state, h.as_str()),
        };
        eprintln!(" \u{2714} Container {:<28} {what}", c.name);
    }
}

/// Live status until Ctrl-C, then stops the project's containers (gateway first).
async fn foreground(docker: &DockerRuntime, project: &str) -> Result<()> {
    eprintln!("Press Ctrl-C to stop (or run `chatctl up --detach` next time).");
    let tty = std::io::stderr().is_terminal();
    let bar = chatctl::progress::spinner(String::new());
    let mut last = String::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            r = &mut ctrl_c => {
                r.context("cannot wait for Ctrl-C")?;
                break;
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let all = docker.list_containers(project).await?;
        let line = all
            .iter()
            .map(|c| format!("{}:{}", c.name, short_state(c)))
            .collect::<Vec<_>>()
            .join("  ");
        if tty {
            bar.set_message(line);
        } else if line != last {
            eprintln!("{line}");
            last = line;
        }
    }
    bar.finish_and_clear();
    eprintln!("Stopping…");
    let mut all = docker.list_containers(project).await?;
    all.sort_by_key(|c| std::cmp::Reverse((c.service, c.instance)));
    for c in all {
        docker
            .stop_container(&c.container_id, cluster::STOP_GRACE_SECS)
            .await?;
        cluster::report(&c.name, "Stopped");
    }
    eprintln!("Stopped (containers kept; `chatctl down` removes them).");
    Ok(())
}

/// The supervisor in the foreground until Ctrl-C (events printed as they happen), then stops
/// the project's containers like [`foreground`] does.
async fn supervise_foreground(
    docker: &DockerRuntime,
    project: &str,
    policy: chatctl::supervisor::policy::Policy,
    state_dir: &Path,
) -> Result<()> {
    eprintln!(
        "Supervising (heal{}); `chatctl status --project {project}` in another terminal. \
         Press Ctrl-C to stop (or run `chatctl up --detach` next time).",
        if policy.enabled { ", autoscale" } else { "" }
    );
    let options = chatctl::supervisor::SupervisorOptions {
        project: project.to_owned(),
        policy,
        state_dir: state_dir.to_owned(),
        print_events: true,
    };
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    chatctl::supervisor::run(docker.clone(), options, ctrl_c).await?;
    eprintln!("Stopping…");
    let mut all = docker.list_containers(project).await?;
    all.sort_by_key(|c| std::cmp::Reverse((c.service, c.instance)));
    for c in all {
        docker
            .stop_container(&c.container_id, cluster::STOP_GRACE_SECS)
            .await?;
        cluster::report(&c.name, "Stopped");
    }
    eprintln!("Stopped (containers kept; `chatctl down` removes them).");
    Ok(())
}

fn short_state(c: &ContainerStatus) -> String {
    if c.is_running() && c.health != chatctl::runtime::Health::None {
        c.health.as_str().to_owned()
    } else {
        c.state.clone()
    }
}

/// Connects to Docker for the cluster subcommands (`down`, `ps`, `logs`, `scale`).
pub fn connect(rt: &tokio::runtime::Runtime) -> Result<DockerRuntime> {
    rt.block_on(DockerRuntime::connect())
        .map_err(|e| NoEngine(format!("{e:#}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_docker_safe() {
        assert!(validate_project("chatapp").is_ok());
        assert!(validate_project("ci-42_x").is_ok());
        assert!(validate_project("").is_err());
        assert!(validate_project("Caps").is_err());
        assert!(validate_project("-lead").is_err());
        assert!(validate_project("a/b").is_err());
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let ok: ConfigFile = toml::from_str("[cluster]\nreplicas = 3\nport = 9443\n").expect("ok");
        assert_eq!(ok.cluster.replicas, Some(3));
        assert!(toml::from_str::<ConfigFile>("[cluster]\nreplica = 3\n").is_err());
    }
}
