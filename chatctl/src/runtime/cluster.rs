//! A project's desired state and how to reach it: [`desired`] turns a [`ClusterConfig`] into
//! container specs (NATS, N servers, the gateway), [`plan`] compares them with what runs (a pure
//! function, unit-tested), and [`converge`] applies the plan through a [`Runtime`]: create what
//! is missing, replace out-of-date containers one at a time (rolling), remove extra servers
//! (SIGTERM first, so they drain), then wait until everything is healthy.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::image::{KEYS_MOUNT, NATS_MONITOR_PORT, NATS_PORT, SERVER_PORT};
use super::{
    ContainerSpec, ContainerStatus, HealthCheck, Mount, MountSource, PublishedPort, Runtime,
    Service, Watch,
};

/// Label (on the gateway) holding the [`ClusterConfig`] as JSON, so `scale` can add servers
/// exactly like `up` made them.
pub const LABEL_CLUSTER: &str = "io.chatapp.cluster";

/// Seconds a stopping server gets to close its sockets with the reconnect code.
pub const STOP_GRACE_SECS: u32 = 12;

/// What `chatctl up` was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub project: String,
    pub replicas: u32,
    /// Host port of the gateway.
    pub port: u16,
    /// Host address the gateway port is published on.
    pub bind: String,
    /// Absolute path of the key directory (bind-mounted read-only at `/keys`).
    pub keys: PathBuf,
    pub server_image: String,
    pub nats_image: String,
    /// Whether the servers run on the NATS store (`serve --store nats://nats:4222`); when the
    /// server binary predates that flag each server keeps an embedded store in its own volume.
    pub nats_store: bool,
    /// The signed browser client the servers serve at `/` (bind-mounted read-only at
    /// [`BUNDLE_MOUNT`]), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleMount>,
}

/// A signed client bundle directory on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleMount {
    /// Absolute path.
    pub dir: PathBuf,
    /// Device and inode of the directory (see [`crate::runtime::Mount::identity`]).
    pub identity: String,
}

impl BundleMount {
    /// The directory at `dir` (made absolute) and its identity.
    pub fn of(dir: &std::path::Path) -> Result<Self> {
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", dir.display()))?;
        let meta = std::fs::metadata(&dir)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        #[cfg(unix)]
        let identity = {
            use std::os::unix::fs::MetadataExt;
            format!("{}:{}", meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let identity = String::new();
        Ok(Self { dir, identity })
    }
}

/// Where the client bundle is mounted in server containers.
pub const BUNDLE_MOUNT: &str = "/bundle";

pub fn network_name(project: &str) -> String {
    format!("{project}-net")
}

pub fn nats_volume(project: &str) -> String {
    format!("{project}-nats-data")
}

pub fn server_volume(project: &str, instance: u32) -> String {
    format!("{project}-server-{instance}-data")
}

pub fn container_name(project: &str, service: Service, instance: u32) -> String {
    format!("{project}-{service}-{instance}")
}

fn health(url: &str, ca: bool) -> HealthCheck {
    let mut command = vec![
        "/chat-server".to_owned(),
        "healthcheck".to_owned(),
        "--url".to_owned(),
        url.to_owned(),
    ];
    if ca {
        command.extend(["--ca".to_owned(), format!("{KEYS_MOUNT}/tls/ca.pem")]);
    }
    HealthCheck {
        command,
        interval_ms: 1000,
        timeout_ms: 3000,
        retries: 3,
        start_period_ms: 30_000,
    }
}

fn keys_mount(config: &ClusterConfig) -> Mount {
    Mount {
        source: MountSource::Host(config.keys.clone()),
        target: KEYS_MOUNT.to_owned(),
        read_only: true,
        identity: None,
    }
}

/// The spec of one container of the project.
pub fn spec_for(config: &ClusterConfig, service: Service, instance: u32) -> ContainerSpec {
    let project = &config.project;
    let base = ContainerSpec {
        name: container_name(project, service, instance),
        project: project.clone(),
        service,
        instance,
        image: String::new(),
        command: Vec::new(),
        env: vec!["NO_COLOR=1".to_owned()],
        network: network_name(project),
        aliases: vec![service.as_str().to_owned()],
        mounts: Vec::new(),
        ports: Vec::new(),
        health: None,
        annotations: Default::default(),
    };
    match service {
        Service::Nats => ContainerSpec {
            image: config.nats_image.clone(),
            command: [
                "-js",
                "-sd",
                "/data",
                "-p",
                &NATS_PORT.to_string(),
                "-m",
                &NATS_MONITOR_PORT.to_string(),
                "--server_name",
                &format!("{project}-nats-1"),
            ]
            .map(str::to_owned)
            .to_vec(),
            mounts: vec![Mount {
                source: MountSource::Volume(nats_volume(project)),
                target: "/data".to_owned(),
                read_only: false,
                identity: None,
            }],
            health: Some(health(
                &format!("http://localhost:{NATS_MONITOR_PORT}/healthz"),
                false,
            )),
            ..base
        },
        Service::Server => {
            let mut command: Vec<String> = [
                "serve",
                "--listen",
                &format!("0.0.0.0:{SERVER_PORT}"),
                "--data",
                "/data",
                "--keys",
                KEYS_MOUNT,
            ]
            .map(str::to_owned)
            .to_vec();
            let mut mounts = vec![keys_mount(config)];
            if config.nats_store {
                command.extend(["--store".to_owned(), format!("nats://nats:{NATS_PORT}")]);
            } else {
                mounts.push(Mount {
                    source: MountSource::Volume(server_volume(project, instance)),
                    target: "/data".to_owned(),
                    read_only: false,
                    identity: None,
                });
            }
            if let Some(bundle) = &config.bundle {
                command.extend(["--bundle".to_owned(), BUNDLE_MOUNT.to_owned()]);
                mounts.push(Mount {
                    source: MountSource::Host(bundle.dir.clone()),
                    target: BUNDLE_MOUNT.to_owned(),
                    read_only: true,
                    identity: Some(bundle.identity.clone()),
                });
            }
            ContainerSpec {
                image: config.server_image.clone(),
                command,
                mounts,
                env: vec!["NO_COLOR=1".to_owned(), "RUST_LOG=info".to_owned()],
                health: Some(health(
                    &format!("https://localhost:{SERVER_PORT}/healthz"),
                    true,
                )),
                ..base
            }
        }
        Service::Gateway => ContainerSpec {
            image: config.server_image.clone(),
            command: [
                "gateway",
                "--listen",
                &format!("0.0.0.0:{SERVER_PORT}"),
                "--keys",
                KEYS_MOUNT,
                "--upstream",
                &format!("server:{SERVER_PORT}"),
            ]
            .map(str::to_owned)
            .to_vec(),
            mounts: vec![keys_mount(config)],
            ports: vec![PublishedPort {
                host_ip: config.bind.clone(),
                host_port: config.port,
                container_port: SERVER_PORT,
            }],
            health: Some(health(
                &format!("https://localhost:{SERVER_PORT}/readyz"),
                true,
            )),
            annotations: serde_json::to_string(config)
                .map(|json| [(LABEL_CLUSTER.to_owned(), json)].into())
                .unwrap_or_default(),
            ..base
        },
    }
}

/// Every container the project should have, in start order.
pub fn desired(config: &ClusterConfig) -> Vec<ContainerSpec> {
    let mut specs = vec![spec_for(config, Service::Nats, 1)];
    specs.extend((1..=config.replicas).map(|i| spec_for(config, Service::Server, i)));
    specs.push(spec_for(config, Service::Gateway, 1));
    specs
}

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and start a missing container.
    Create(ContainerSpec),
    /// Start a stopped container that is up to date.
    Start(ContainerStatus),
    /// Replace an out-of-date container (stop, remove, create, wait until healthy).
    Replace(ContainerStatus, ContainerSpec),
    /// Stop (gracefully) and remove a container no longer wanted.
    Remove(ContainerStatus),
}

/// What to do to get from `actual` to `desired`: nothing at all when they agree.
pub fn plan(desired: &[ContainerSpec], actual: &[ContainerStatus]) -> Vec<Action> {
    let mut actions = Vec::new();
    for spec in desired {
        let existing = actual.iter().find(|c| c.name == spec.name);
        match existing {
            None => actions.push(Action::Create(spec.clone())),
            Some(c) if c.config_hash != spec.config_hash() => {
                actions.push(Action::Replace(c.clone(), spec.clone()));
            }
            Some(c) if !c.is_running() => actions.push(Action::Start(c.clone())),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&ContainerStatus> = actual
        .iter()
        .filter(|c| !desired.iter().any(|s| s.name == c.name))
        .collect();
    // Highest instance first, like a scale-down would pick them.
    extra.sort_by_key(|c| std::cmp::Reverse((c.service, c.instance)));
    actions.extend(extra.into_iter().cloned().map(Action::Remove));
    actions
}

/// Prints compose-style progress lines (` ✔ Container p-server-1  Started`).
pub fn report(name: &str, what: &str) {
    eprintln!(" \u{2714} Container {name:<28} {what}");
}

async fn ensure_volumes(runtime: &impl Runtime, spec: &ContainerSpec) -> Result<()> {
    for m in &spec.mounts {
        if let MountSource::Volume(v) = &m.source {
            runtime.ensure_volume(&spec.project, v).await?;
        }
    }
    Ok(())
}

/// Creates (not starts) a container with its volumes; returns its id.
async fn create(runtime: &impl Runtime, spec: &ContainerSpec) -> Result<String> {
    ensure_volumes(runtime, spec).await?;
    let id = runtime.create_container(spec).await?;
    report(&spec.name, "Created");
    Ok(id)
}

async fn start(runtime: &impl Runtime, id: &str, name: &str) -> Result<()> {
    runtime.start_container(id).await?;
    report(name, "Started");
    Ok(())
}

async fn create_and_start(runtime: &impl Runtime, spec: &ContainerSpec) -> Result<()> {
    let id = create(runtime, spec).await?;
    start(runtime, &id, &spec.name).await
}

/// Runs `jobs` concurrently; the first error (in order) wins, after all have finished.
async fn all<F: std::future::Future<Output = Result<()>>>(jobs: Vec<F>) -> Result<()> {
    futures_util::future::join_all(jobs)
        .await
        .into_iter()
        .collect()
}

/// Applies the plan for `config`; returns the number of actions taken (0: nothing changed).
///
/// Like `docker compose up --wait`, with the same dependency: NATS first, and the servers and
/// the gateway started once it is healthy. Their containers are created meanwhile, and they are
/// started together; out-of-date containers are then replaced one at a time (rolling), extra
/// servers removed, and everything waited for (on engine events, not by sleeping).
pub async fn converge(
    runtime: &impl Runtime,
    config: &ClusterConfig,
    timeout: Duration,
) -> Result<usize> {
    converge_then(runtime, config, timeout, || async {})
        .await
        .map(|(count, ())| count)
}

/// [`converge`], running `meanwhile()` once every container is started (the supervisor's
/// start, for `up --detach`), concurrently with the wait until all are healthy.
pub async fn converge_then<F, Fut>(
    runtime: &impl Runtime,
    config: &ClusterConfig,
    timeout: Duration,
    meanwhile: F,
) -> Result<(usize, Fut::Output)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future,
{
    let project = &config.project;
    let network_name = network_name(project);
    let (network, actual) = tokio::join!(
        runtime.ensure_network(project, &network_name),
        runtime.list_containers(project)
    );
    network?;
    let specs = desired(config);
    let actions = plan(&specs, &actual?);
    let count = actions.len();
    let nats_name = container_name(project, Service::Nats, 1);
    let (mut nats, mut others): (Vec<Action>, Vec<Action>) = actions
        .into_iter()
        .partition(|a| action_name(a) == nats_name);
    let nats_action = nats.pop();
    let creates: Vec<ContainerSpec> = others
        .iter()
        .filter_map(|a| match a {
            Action::Create(spec) => Some(spec.clone()),
            _ => None,
        })
        .collect();
    others.retain(|a| !matches!(a, Action::Create(_)));

    // NATS (and waiting for it) while the other containers are created.
    let nats_step = async {
        match nats_action {
            None => return Ok(()),
            Some(Action::Create(spec)) => create_and_start(runtime, &spec).await?,
            Some(Action::Start(c)) => start(runtime, &c.container_id, &c.name).await?,
            Some(Action::Replace(old, spec)) => replace(runtime, &old, &spec).await?,
            Some(Action::Remove(c)) => return remove(runtime, &c).await,
        }
        wait_ready(runtime, project, std::slice::from_ref(&nats_name), timeout)
            .await
            .map(drop)
    };
    let create_step = async {
        let mut ids = Vec::with_capacity(creates.len());
        for result in
            futures_util::future::join_all(creates.iter().map(|spec| create(runtime, spec))).await
        {
            ids.push(result?);
        }
        Ok::<_, anyhow::Error>(ids)
    };
    let (nats_done, created) = tokio::join!(nats_step, create_step);
    nats_done?;
    let created = created?;

    // Everything that only needs starting, together.
    let mut starts: Vec<(String, String)> = creates
        .iter()
        .zip(created)
        .map(|(spec, id)| (id, spec.name.clone()))
        .collect();
    others.retain(|a| match a {
        Action::Start(c) => {
            starts.push((c.container_id.clone(), c.name.clone()));
            false
        }
        _ => true,
    });
    all(starts
        .iter()
        .map(|(id, name)| start(runtime, id, name))
        .collect())
    .await?;

    // Rolling replacement, then removals (highest instances first), as planned.
    for action in others {
        match action {
            Action::Replace(old, spec) => {
                replace(runtime, &old, &spec).await?;
                wait_ready(runtime, project, std::slice::from_ref(&spec.name), timeout).await?;
                report(&spec.name, "Healthy");
            }
            Action::Remove(c) => remove(runtime, &c).await?,
            Action::Create(_) | Action::Start(_) => {}
        }
    }
    let names: Vec<String> = specs.into_iter().map(|s| s.name).collect();
    let (ready, output) = tokio::join!(wait_ready(runtime, project, &names, timeout), meanwhile());
    ready?;
    Ok((count, output))
}

fn action_name(action: &Action) -> &str {
    match action {
        Action::Create(spec) => &spec.name,
        Action::Start(c) | Action::Replace(c, _) | Action::Remove(c) => &c.name,
    }
}

async fn replace(
    runtime: &impl Runtime,
    old: &ContainerStatus,
    spec: &ContainerSpec,
) -> Result<()> {
    runtime
        .stop_container(&old.container_id, STOP_GRACE_SECS)
        .await?;
    runtime.remove_container(&old.container_id).await?;
    report(&old.name, "Recreate");
    create_and_start(runtime, spec).await
}

async fn remove(runtime: &impl Runtime, c: &ContainerStatus) -> Result<()> {
    runtime
        .stop_container(&c.container_id, STOP_GRACE_SECS)
        .await?;
    runtime.remove_container(&c.container_id).await?;
    report(&c.name, "Removed");
    Ok(())
}

/// Waits until every named container is running and healthy (or has no health check).
/// Fails at once when one has exited, naming it and the next step.
///
/// The state is re-read at each engine event of the project ([`Runtime::watch`]: start, die,
/// health status) and at least every [`RECHECK`]; without events, every [`POLL`].
pub async fn wait_ready(
    runtime: &impl Runtime,
    project: &str,
    names: &[String],
    timeout: Duration,
) -> Result<Vec<ContainerStatus>> {
    let mut watch: Option<Watch> = runtime.watch(project).await.ok();
    let started = Instant::now();
    loop {
        let all = runtime.list_containers(project).await?;
        let wanted: Vec<&ContainerStatus> =
            all.iter().filter(|c| names.contains(&c.name)).collect();
        if let Some(dead) = wanted
            .iter()
            .find(|c| matches!(c.state.as_str(), "exited" | "dead"))
        {
            bail!(
                "container {} stopped ({}); see `chatctl logs --project {project} {}`",
                dead.name,
                dead.status,
                dead.name
            );
        }
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !wanted.iter().any(|c| &&c.name == n))
            .collect();
        let not_ready: Vec<String> = wanted
            .iter()
            .filter(|c| !c.is_ready())
            .map(|c| format!("{} ({}, {})", c.name, c.state, c.health.as_str()))
            .collect();
        if missing.is_empty() && not_ready.is_empty() {
            return Ok(all);
        }
        let elapsed = started.elapsed();
        if elapsed > timeout {
            bail!(
                "not healthy within {}s: {}{}; see `chatctl logs --project {project} NAME`",
                timeout.as_secs(),
                not_ready.join(", "),
                if missing.is_empty() {
                    String::new()
                } else {
                    format!(" missing: {missing:?}")
                }
            );
        }
        let pause = RECHECK.min(timeout.saturating_sub(elapsed) + Duration::from_millis(10));
        match watch.as_mut() {
            Some(events) => {
                use futures_util::StreamExt;
                // `Ok(None)`: the stream ended, poll from now on.
                if let Ok(None) = tokio::time::timeout(pause, events.next()).await {
                    watch = None;
                }
            }
            None => tokio::time::sleep(POLL).await,
        }
    }
}

/// How often the state is re-read while waiting on engine events anyway.
const RECHECK: Duration = Duration::from_secs(1);
/// How often it is polled when the engine's event stream is not available.
const POLL: Duration = Duration::from_millis(100);

/// Stops (gracefully, gateway first, NATS last) and removes every container of the project,
/// then its networks and, with `volumes`, its volumes. Returns what was removed.
pub async fn down(runtime: &impl Runtime, project: &str, volumes: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut containers = runtime.list_containers(project).await?;
    containers.sort_by_key(|c| std::cmp::Reverse((c.service, c.instance)));
    for c in containers {
        runtime
            .stop_container(&c.container_id, STOP_GRACE_SECS)
            .await?;
        runtime.remove_container(&c.container_id).await?;
        report(&c.name, "Removed");
        removed.push(format!("container {}", c.name));
    }
    for n in runtime.list_networks(project).await? {
        runtime.remove_network(&n).await?;
        eprintln!(" \u{2714} Network {n:<30} Removed");
        removed.push(format!("network {n}"));
    }
    if volumes {
        for v in runtime.list_volumes(project).await? {
            runtime.remove_volume(&v).await?;
            eprintln!(" \u{2714} Volume {v:<31} Removed");
            removed.push(format!("volume {v}"));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Health;

    fn config(replicas: u32) -> ClusterConfig {
        ClusterConfig {
            project: "t".into(),
            replicas,
            port: 8443,
            bind: "127.0.0.1".into(),
            keys: "/keys".into(),
            server_image: "chatapp/chat-server:1".into(),
            nats_image: "chatapp/nats:1".into(),
            nats_store: true,
            bundle: None,
        }
    }

    fn running(spec: &ContainerSpec) -> ContainerStatus {
        ContainerStatus {
            service: spec.service,
            instance: spec.instance,
            name: spec.name.clone(),
            container_id: format!("id-{}", spec.name),
            image: spec.image.clone(),
            state: "running".into(),
            health: Health::Healthy,
            ports: vec![],
            config_hash: spec.config_hash(),
            status: "Up (healthy)".into(),
            cluster: None,
        }
    }

    #[test]
    fn desired_state_is_nats_then_servers_then_gateway() {
        let names: Vec<String> = desired(&config(2)).into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["t-nats-1", "t-server-1", "t-server-2", "t-gateway-1"]
        );
    }

    #[test]
    fn unchanged_config_plans_nothing() {
        let specs = desired(&config(2));
        let actual: Vec<ContainerStatus> = specs.iter().map(running).collect();
        assert_eq!(plan(&specs, &actual), vec![]);
    }

    #[test]
    fn from_nothing_everything_is_created_in_order() {
        let specs = desired(&config(1));
        let actions = plan(&specs, &[]);
        assert_eq!(actions.len(), 3);
        assert!(matches!(&actions[0], Action::Create(s) if s.service == Service::Nats));
        assert!(matches!(&actions[2], Action::Create(s) if s.service == Service::Gateway));
    }

    #[test]
    fn a_new_image_replaces_servers_and_gateway_but_not_nats() {
        let old = desired(&config(2));
        let actual: Vec<ContainerStatus> = old.iter().map(running).collect();
        let mut new_config = config(2);
        new_config.server_image = "chatapp/chat-server:2".into();
        let actions = plan(&desired(&new_config), &actual);
        let replaced: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Action::Replace(old, _) => old.name.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(replaced, ["t-server-1", "t-server-2", "t-gateway-1"]);
    }

    #[test]
    fn scaling_down_removes_the_highest_instances() {
        let actual: Vec<ContainerStatus> = desired(&config(3)).iter().map(running).collect();
        let actions = plan(&desired(&config(1)), &actual);
        let removed: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Action::Remove(c) => c.name.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(removed, ["t-server-3", "t-server-2"]);
    }

    #[test]
    fn a_stopped_up_to_date_container_is_started_not_recreated() {
        let specs = desired(&config(1));
        let mut actual: Vec<ContainerStatus> = specs.iter().map(running).collect();
        actual[1].state = "exited".into();
        assert_eq!(
            plan(&specs, &actual),
            vec![Action::Start(actual[1].clone())]
        );
    }

    #[test]
    fn servers_use_the_nats_store_when_the_binary_has_it() {
        let with = spec_for(&config(1), Service::Server, 1);
        assert!(
            with.command
                .windows(2)
                .any(|w| w == ["--store", "nats://nats:4222"])
        );
        let mut old = config(1);
        old.nats_store = false;
        let without = spec_for(&old, Service::Server, 1);
        assert!(!without.command.iter().any(|c| c == "--store"));
        assert!(without.mounts.iter().any(|m| m.target == "/data"));
    }

    #[test]
    fn a_bundle_is_mounted_read_only_into_the_servers_only_and_its_identity_counts() {
        let mut with = config(2);
        with.bundle = Some(BundleMount {
            dir: "/srv/bundle".into(),
            identity: "1:2".into(),
        });
        let server = spec_for(&with, Service::Server, 1);
        assert!(
            server
                .command
                .windows(2)
                .any(|w| w == ["--bundle", BUNDLE_MOUNT])
        );
        let mount = server
            .mounts
            .iter()
            .find(|m| m.target == BUNDLE_MOUNT)
            .expect("bundle mount");
        assert!(mount.read_only);
        let gateway = spec_for(&with, Service::Gateway, 1);
        assert!(!gateway.mounts.iter().any(|m| m.target == BUNDLE_MOUNT));
        // The same path replaced by a new directory is a new container config.
        let mut replaced = with.clone();
        replaced.bundle = Some(BundleMount {
            dir: "/srv/bundle".into(),
            identity: "1:3".into(),
        });
        assert_ne!(
            spec_for(&replaced, Service::Server, 1).config_hash(),
            server.config_hash()
        );
        // Without a bundle nothing changes for existing clusters.
        assert!(
            !serde_json::to_string(&spec_for(&config(1), Service::Server, 1))
                .expect("json")
                .contains("identity")
        );
        // Older gateway labels (no `bundle`) still parse, for `scale` and the supervisor.
        let old: ClusterConfig =
            serde_json::from_str(&serde_json::to_string(&config(1)).expect("json")).expect("parse");
        assert_eq!(old.bundle, None);
    }

    #[test]
    fn only_the_gateway_publishes_a_port() {
        for spec in desired(&config(2)) {
            assert_eq!(spec.ports.is_empty(), spec.service != Service::Gateway);
        }
    }
}
