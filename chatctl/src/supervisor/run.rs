//! The supervisor loop: every tick (and at once on an engine event of the project: `die`,
//! `oom`, `health_status`, `kill`, `pause`) observe, then act, and write the status file.
//!
//! - **Heal** (always on): a server or NATS container that has exited (crashed, `docker kill`,
//!   OOM-killed) is started again once it has stayed down for [`EXITED_GRACE`] (so containers that
//!   `chatctl scale`/`up` are stopping to remove are left alone), and recreated from its spec if
//!   it cannot start; one that is `unhealthy` is restarted; one the gateway keeps ejected (hung,
//!   or paused) for `ejected_replace_secs` is recreated. A crash loop backs off: 0 s, then 2, 4,
//!   ... up to 60 s between heals of the same container within 5 minutes.
//! - **Scale** (when `[autoscale] enabled`): [`decide`] on connections per server (from the
//!   gateway) and CPU% (from stats); new servers are created like `up` makes them; extra ones
//!   are drained (the server's loopback `/admin/drain`: not ready at once, sockets closed with the
//!   reconnect code in batches), then stopped and removed once their connections reach zero or
//!   `drain_deadline_secs` passes.
//! - A project whose gateway is not running is being stopped by its operator: nothing is healed.
//!   A project without a gateway container is gone: the loop ends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{EventsOptions, RestartContainerOptions};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::observe::{ContainerObservation, Observer, Snapshot};
use super::policy::{History, Limit, Observations, Policy, ScaleDecision, decide};
use super::status::{
    DECISIONS_KEPT, DecisionRecord, EVENTS_KEPT, Event, InstanceStatus, SupervisorStatus,
};
use crate::runtime::cluster::{self, ClusterConfig, LABEL_CLUSTER};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::image::{KEYS_MOUNT, SERVER_PORT};
use crate::runtime::{MountSource, Runtime, Service};

/// How long a container must have been down before it is started again.
pub const EXITED_GRACE: Duration = Duration::from_millis(1500);
/// Seconds a stopping drained server gets (its sockets are already closed).
const DRAINED_STOP_GRACE: u32 = 5;
/// Seconds an unhealthy container gets to stop before it is killed and started again.
const RESTART_GRACE: i32 = 2;

/// What the loop needs.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    pub project: String,
    pub policy: Policy,
    /// Where the status file goes.
    pub state_dir: PathBuf,
    /// Print every event to stderr as it happens.
    pub print_events: bool,
}

#[derive(Debug, Default)]
struct HealTracker {
    recent: VecDeque<Instant>,
    next_allowed: Option<Instant>,
}

#[derive(Debug)]
struct Drain {
    started: Instant,
    container_id: String,
}

/// The supervisor's memory between ticks.
struct Supervisor {
    options: SupervisorOptions,
    observer: Observer,
    history: History,
    origin: Instant,
    status: SupervisorStatus,
    /// First time each container was seen down (exited, dead, created), by id.
    down_since: HashMap<String, Instant>,
    heals: HashMap<String, HealTracker>,
    draining: HashMap<String, Drain>,
    /// (time, envelopes stored) per server name, for msgs/s.
    last_stored: HashMap<String, (Instant, u64)>,
    stopped_noted: bool,
}

fn unix_now() -> u64 {
    crate::client::unix_now()
}

/// Reads the cluster config the gateway carries (how `up` made the servers).
pub fn cluster_config(snapshot: &Snapshot) -> Option<ClusterConfig> {
    snapshot
        .containers
        .iter()
        .find_map(|c| c.status.cluster.as_deref())
        .and_then(|label| serde_json::from_str(label).ok())
}

/// Where the supervisor reaches the gateway: its published port on this host.
pub fn gateway_address(config: &ClusterConfig) -> SocketAddr {
    let ip = match config.bind.parse::<std::net::IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => ip,
        _ => std::net::IpAddr::from([127, 0, 0, 1]),
    };
    SocketAddr::new(ip, config.port)
}

/// Runs the supervisor of `options.project` until `stop` resolves or the project is gone.
pub async fn run(
    runtime: DockerRuntime,
    options: SupervisorOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    options
        .policy
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (chatctl.toml)"))?;
    let project = options.project.clone();
    let all = runtime.list_containers(&project).await?;
    let label = all
        .iter()
        .find_map(|c| c.cluster.clone())
        .with_context(|| {
            format!(
                "project {project} is not running: start it with `chatctl up --project {project}`"
            )
        })?;
    let config: ClusterConfig = serde_json::from_str(&label).with_context(|| {
        format!(
            "the gateway of project {project} carries an unreadable {LABEL_CLUSTER} label; \
             run `chatctl up --project {project}` again"
        )
    })?;
    let observer = Observer::new(
        runtime,
        &project,
        gateway_address(&config),
        &config.keys.join("tls/ca.pem"),
    )?;
    let (events_tx, mut events_rx) = mpsc::channel::<Event>(64);
    let watcher = tokio::spawn(watch_engine_events(
        observer.docker().clone(),
        project.clone(),
        events_tx,
    ));
    let mut sup = Supervisor {
        status: SupervisorStatus {
            project: project.clone(),
            pid: std::process::id(),
            updated: unix_now(),
            interval_secs: options.policy.interval_secs,
            current_replicas: config.replicas,
            desired_replicas: config.replicas,
            host_limited: false,
            host: None,
            policy: options.policy.clone(),
            instances: Vec::new(),
            last_decision: None,
            decisions: VecDeque::new(),
            events: VecDeque::new(),
            gateway_error: None,
        },
        options,
        observer,
        history: History::new(0),
        origin: Instant::now(),
        down_since: HashMap::new(),
        heals: HashMap::new(),
        draining: HashMap::new(),
        last_stored: HashMap::new(),
        stopped_noted: false,
    };
    sup.event("start", None, format!("supervising project {project}"));
    let interval = Duration::from_secs_f64(sup.options.policy.interval_secs);
    let mut stop = std::pin::pin!(stop);
    let result = loop {
        match sup.tick().await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => sup.event("error", None, format!("{e:#}")),
        }
        if let Err(e) = sup.status.write(&sup.options.state_dir) {
            sup.print(&format!("cannot write the status file: {e:#}"));
        }
        let sleep = tokio::time::sleep(interval);
        tokio::select! {
            () = &mut stop => break Ok(()),
            () = sleep => {}
            Some(event) = events_rx.recv() => {
                sup.push_event(event);
                // Let the engine settle a moment, then look at once.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    watcher.abort();
    result
}

/// Forwards the project's container events that matter (`die`, `oom`, `kill`, `pause`,
/// `unpause`, `health_status: ...`) until the stream ends; reconnects after an error.
async fn watch_engine_events(docker: bollard::Docker, project: String, tx: mpsc::Sender<Event>) {
    loop {
        let options = EventsOptions {
            filters: Some(HashMap::from([
                ("type".to_owned(), vec!["container".to_owned()]),
                (
                    "label".to_owned(),
                    vec![format!("{}={project}", crate::runtime::LABEL_PROJECT)],
                ),
            ])),
            ..Default::default()
        };
        let mut stream = docker.events(Some(options));
        while let Some(item) = stream.next().await {
            let Ok(message) = item else {
                break;
            };
            let action = message.action.unwrap_or_default();
            let interesting = action == "die"
                || action == "oom"
                || action == "pause"
                || action == "unpause"
                || action.starts_with("health_status")
                || action.starts_with("kill");
            if !interesting {
                continue;
            }
            let attributes = message.actor.and_then(|a| a.attributes).unwrap_or_default();
            let name = attributes.get("name").cloned();
            let detail = match (action.as_str(), attributes.get("exitCode")) {
                ("die", Some(code)) => format!("died (exit code {code})"),
                (a, _) if a.starts_with("kill") => format!(
                    "{a} (signal {})",
                    attributes.get("signal").map_or("?", String::as_str)
                ),
                (a, _) => a.to_owned(),
            };
            let event = Event {
                time: unix_now(),
                kind: "engine".into(),
                container: name,
                message: detail,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn breaker_name(b: u8) -> &'static str {
    match b {
        0 => "closed",
        1 => "open",
        _ => "half-open",
    }
}

impl Supervisor {
    fn print(&self, line: &str) {
        if self.options.print_events {
            eprintln!("{line}");
        }
    }

    fn push_event(&mut self, event: Event) {
        self.print(&format!(
            "[supervisor] {:<7} {}{}",
            event.kind,
            event
                .container
                .as_deref()
                .map(|c| format!("{c}: "))
                .unwrap_or_default(),
            event.message
        ));
        self.status.events.push_back(event);
        while self.status.events.len() > EVENTS_KEPT {
            self.status.events.pop_front();
        }
    }

    fn event(&mut self, kind: &str, container: Option<&str>, message: String) {
        self.push_event(Event {
            time: unix_now(),
            kind: kind.to_owned(),
            container: container.map(str::to_owned),
            message,
        });
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One round; `Ok(false)` when the project is gone.
    async fn tick(&mut self) -> Result<bool> {
        let snapshot = self.observer.observe().await?;
        let gateway = snapshot
            .containers
            .iter()
            .find(|c| c.status.service == Service::Gateway);
        let Some(gateway) = gateway else {
            self.event(
                "stop",
                None,
                "the project has no gateway any more (`chatctl down`?): supervisor exits".into(),
            );
            return Ok(false);
        };
        let config = cluster_config(&snapshot);
        self.update_status(&snapshot);
        if !gateway.status.is_running() {
            if !self.stopped_noted {
                self.event(
                    "pause",
                    Some(&gateway.status.name.clone()),
                    "the gateway is not running: the project is being stopped, nothing is healed \
                     until it runs again"
                        .into(),
                );
                self.stopped_noted = true;
            }
            return Ok(true);
        }
        self.stopped_noted = false;
        let Some(config) = config else {
            self.event(
                "error",
                Some(&gateway.status.name.clone()),
                format!(
                    "the gateway carries no readable {LABEL_CLUSTER} label; run `chatctl up` again"
                ),
            );
            return Ok(true);
        };
        self.heal(&snapshot, &config).await;
        self.finish_drains(&snapshot).await;
        if self.options.policy.enabled {
            self.scale(&snapshot, &config).await;
        }
        Ok(true)
    }

    fn update_status(&mut self, snapshot: &Snapshot) {
        let now = Instant::now();
        let mut instances = Vec::new();
        for c in &snapshot.containers {
            let upstream = snapshot.upstream_of(c);
            let stored = upstream.and_then(|u| u.envelopes_stored);
            let msgs_per_sec = match (stored, self.last_stored.get(&c.status.name)) {
                (Some(now_count), Some((then, before))) => {
                    let secs = now.duration_since(*then).as_secs_f64();
                    (secs > 0.0).then(|| now_count.saturating_sub(*before) as f64 / secs)
                }
                _ => None,
            };
            if let Some(s) = stored {
                self.last_stored.insert(c.status.name.clone(), (now, s));
            }
            instances.push(InstanceStatus {
                name: c.status.name.clone(),
                service: c.status.service.to_string(),
                instance: c.status.instance,
                container_id: c.status.container_id.chars().take(12).collect(),
                state: c.status.state.clone(),
                health: c.status.health.as_str().to_owned(),
                routed: upstream.map(|u| u.ready),
                breaker: upstream.map(|u| breaker_name(u.breaker).to_owned()),
                connections: upstream.and_then(|u| u.server_connections),
                cpu_percent: c.cpu_percent,
                memory_bytes: c.memory_bytes,
                msgs_per_sec,
                draining: self.draining.contains_key(&c.status.name),
                restarts: c.restart_count,
            });
        }
        self.status.instances = instances;
        self.status.updated = unix_now();
        self.status.host = snapshot.host;
        self.status.gateway_error = snapshot.gateway_error.clone();
    }

    /// Whether a heal of `name` may happen now; records it when so.
    fn heal_allowed(&mut self, name: &str) -> Option<Duration> {
        let now = Instant::now();
        let tracker = self.heals.entry(name.to_owned()).or_default();
        if tracker.next_allowed.is_some_and(|t| now < t) {
            return None;
        }
        while tracker
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(300))
        {
            tracker.recent.pop_front();
        }
        tracker.recent.push_back(now);
        let n = u32::try_from(tracker.recent.len()).unwrap_or(u32::MAX);
        let backoff = if n <= 1 {
            Duration::ZERO
        } else {
            Duration::from_secs(1u64 << (n - 1).min(6)).min(Duration::from_secs(60))
        };
        tracker.next_allowed = Some(now + backoff);
        Some(backoff)
    }

    async fn heal(&mut self, snapshot: &Snapshot, config: &ClusterConfig) {
        let now = Instant::now();
        let ids: HashSet<&str> = snapshot
            .containers
            .iter()
            .map(|c| c.status.container_id.as_str())
            .collect();
        self.down_since.retain(|id, _| ids.contains(id.as_str()));
        for c in &snapshot.containers {
            let s = &c.status;
            if s.service == Service::Gateway || self.draining.contains_key(&s.name) {
                continue;
            }
            let down = matches!(s.state.as_str(), "exited" | "dead" | "created");
            if !down {
                self.down_since.remove(&s.container_id);
            }
            let reason = if down {
                let since = *self.down_since.entry(s.container_id.clone()).or_insert(now);
                if now.duration_since(since) < EXITED_GRACE {
                    continue;
                }
                Some(if c.oom_killed {
                    format!("was OOM-killed (exit code {})", c.exit_code)
                } else {
                    format!("had exited (exit code {})", c.exit_code)
                })
            } else if s.is_running() && s.health == crate::runtime::Health::Unhealthy {
                Some("turned unhealthy (its health check fails)".to_owned())
            } else {
                let ejected = snapshot.upstream_of(c).filter(|u| u.breaker != 0);
                match ejected {
                    Some(u)
                        if u.ejected_secs >= self.options.policy.ejected_replace_secs as f64 =>
                    {
                        Some(format!(
                            "stayed ejected by the gateway for {:.0} s{}",
                            u.ejected_secs,
                            if s.state == "paused" { " (paused)" } else { "" }
                        ))
                    }
                    _ => None,
                }
            };
            let Some(reason) = reason else {
                continue;
            };
            let Some(backoff) = self.heal_allowed(&s.name) else {
                continue;
            };
            let name = s.name.clone();
            let outcome = if down {
                self.start_or_recreate(c, config).await
            } else if s.health == crate::runtime::Health::Unhealthy && s.state != "paused" {
                self.restart(c).await
            } else {
                self.recreate(c, config).await
            };
            let next = if backoff.is_zero() {
                String::new()
            } else {
                format!(
                    " (crash loop: next heal no sooner than {} s)",
                    backoff.as_secs()
                )
            };
            match outcome {
                Ok(what) => self.event("heal", Some(&name), format!("{reason}: {what}{next}")),
                Err(e) => self.event(
                    "error",
                    Some(&name),
                    format!(
                        "{reason}, and healing failed: {e:#}; see `chatctl logs --project {} {name}`",
                        self.options.project
                    ),
                ),
            }
        }
    }

    async fn start_or_recreate(
        &self,
        c: &ContainerObservation,
        config: &ClusterConfig,
    ) -> Result<String> {
        let runtime = self.observer.runtime();
        match runtime.start_container(&c.status.container_id).await {
            Ok(()) => Ok("started again".into()),
            Err(start_error) => {
                let what = self.recreate(c, config).await.with_context(|| {
                    format!("start failed ({start_error:#}), and so did recreating it")
                })?;
                Ok(format!("could not start ({start_error:#}): {what}"))
            }
        }
    }

    async fn restart(&self, c: &ContainerObservation) -> Result<String> {
        self.observer
            .docker()
            .restart_container(
                &c.status.container_id,
                Some(RestartContainerOptions {
                    t: Some(RESTART_GRACE),
                    signal: None,
                }),
            )
            .await
            .with_context(|| format!("cannot restart container {}", c.status.name))?;
        Ok("restarted".into())
    }

    /// Removes the container (forcefully) and creates it again from the project's spec.
    async fn recreate(&self, c: &ContainerObservation, config: &ClusterConfig) -> Result<String> {
        let runtime = self.observer.runtime();
        let spec = cluster::spec_for(config, c.status.service, c.status.instance);
        runtime.remove_container(&c.status.container_id).await?;
        create_and_start(runtime, &spec).await?;
        Ok("replaced by a new container".into())
    }

    fn observations(&self, snapshot: &Snapshot) -> Observations {
        let counted: Vec<&ContainerObservation> = snapshot
            .containers
            .iter()
            .filter(|c| {
                c.status.service == Service::Server
                    && !self.draining.contains_key(&c.status.name)
                    && matches!(c.status.state.as_str(), "running" | "restarting" | "paused")
            })
            .collect();
        Observations {
            now_ms: self.now_ms(),
            current: u32::try_from(counted.len()).unwrap_or(u32::MAX),
            connections: counted
                .iter()
                .filter_map(|c| snapshot.upstream_of(c).and_then(|u| u.server_connections))
                .map(|n| n.max(0) as f64)
                .collect(),
            cpu_percent: counted.iter().filter_map(|c| c.cpu_percent).collect(),
            memory_bytes: counted.iter().filter_map(|c| c.memory_bytes).collect(),
            host: snapshot.host,
        }
    }

    async fn scale(&mut self, snapshot: &Snapshot, config: &ClusterConfig) {
        if snapshot.gateway_error.is_some() {
            return; // no connection counts: decide nothing rather than on half the picture
        }
        let obs = self.observations(snapshot);
        let decision = decide(&obs, &self.options.policy, &self.history);
        self.history
            .record(&decision, self.options.policy.stabilization());
        self.status.current_replicas = decision.current;
        self.status.desired_replicas = decision.desired;
        self.status.host_limited =
            decision.limited_by(Limit::HostMemory) || decision.limited_by(Limit::HostCpu);
        let changed = decision.is_change();
        let noteworthy = changed || self.status.host_limited;
        let repeated = self
            .status
            .decisions
            .back()
            .is_some_and(|d| d.reason == decision.reason);
        if noteworthy && !repeated {
            self.status.decisions.push_back(DecisionRecord {
                time: unix_now(),
                current: decision.current,
                desired: decision.desired,
                reason: decision.reason.clone(),
            });
            while self.status.decisions.len() > DECISIONS_KEPT {
                self.status.decisions.pop_front();
            }
        }
        self.status.last_decision = Some(decision.clone());
        if !changed {
            return;
        }
        self.event("scale", None, decision.reason.clone());
        if decision.desired > decision.current {
            self.scale_up(snapshot, config, &decision).await;
        } else {
            self.scale_down(snapshot, &decision).await;
        }
    }

    async fn scale_up(&mut self, snapshot: &Snapshot, config: &ClusterConfig, d: &ScaleDecision) {
        let taken: HashSet<u32> = snapshot
            .containers
            .iter()
            .filter(|c| c.status.service == Service::Server)
            .map(|c| c.status.instance)
            .collect();
        let mut free = (1u32..).filter(|i| !taken.contains(i));
        for _ in d.current..d.desired {
            let Some(instance) = free.next() else {
                break;
            };
            let spec = cluster::spec_for(config, Service::Server, instance);
            match create_and_start(self.observer.runtime(), &spec).await {
                Ok(()) => self.event("scale", Some(&spec.name), "created and started".into()),
                Err(e) => self.event(
                    "error",
                    Some(&spec.name),
                    format!("cannot create it: {e:#}; see `docker logs {}`", spec.name),
                ),
            }
        }
    }

    async fn scale_down(&mut self, snapshot: &Snapshot, d: &ScaleDecision) {
        let mut candidates: Vec<&ContainerObservation> = snapshot
            .containers
            .iter()
            .filter(|c| {
                c.status.service == Service::Server
                    && c.status.is_running()
                    && !self.draining.contains_key(&c.status.name)
            })
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.status.instance));
        let n = usize::try_from(d.current.saturating_sub(d.desired)).unwrap_or(0);
        for c in candidates.into_iter().take(n) {
            let name = c.status.name.clone();
            let message = match drain(self.observer.docker(), &c.status.container_id).await {
                Ok(answer) => format!("draining: {answer}"),
                Err(e) => format!(
                    "cannot start a gradual drain ({e:#}); it will be stopped with SIGTERM, \
                     which closes every socket with the reconnect code at once"
                ),
            };
            self.draining.insert(
                name.clone(),
                Drain {
                    started: Instant::now(),
                    container_id: c.status.container_id.clone(),
                },
            );
            self.event("drain", Some(&name), message);
        }
    }

    /// Removes drained servers: no connections left, gone already, or past the deadline.
    async fn finish_drains(&mut self, snapshot: &Snapshot) {
        let deadline = Duration::from_secs(self.options.policy.drain_deadline_secs);
        let mut done = Vec::new();
        for (name, drain) in &self.draining {
            let container = snapshot
                .containers
                .iter()
                .find(|c| c.status.container_id == drain.container_id);
            let Some(c) = container else {
                done.push((
                    name.clone(),
                    drain.container_id.clone(),
                    "it is gone".to_owned(),
                ));
                continue;
            };
            let left = snapshot.upstream_of(c).and_then(|u| u.server_connections);
            let elapsed = drain.started.elapsed();
            // The drain closes the first batch after 1.5 s: give it at least that.
            if elapsed < Duration::from_secs(2) {
                continue;
            }
            if left == Some(0) || !c.status.is_running() {
                done.push((
                    name.clone(),
                    drain.container_id.clone(),
                    format!("drained in {:.1} s", elapsed.as_secs_f64()),
                ));
            } else if elapsed > deadline {
                done.push((
                    name.clone(),
                    drain.container_id.clone(),
                    format!(
                        "drain deadline of {} s passed with {} connections left",
                        deadline.as_secs(),
                        left.map_or("unknown".to_owned(), |n| n.to_string())
                    ),
                ));
            }
        }
        for (name, id, why) in done {
            self.draining.remove(&name);
            let runtime = self.observer.runtime();
            let result = async {
                runtime.stop_container(&id, DRAINED_STOP_GRACE).await?;
                runtime.remove_container(&id).await
            }
            .await;
            match result {
                Ok(()) => self.event("remove", Some(&name), format!("removed: {why}")),
                Err(e) => self.event(
                    "error",
                    Some(&name),
                    format!(
                        "cannot remove it after the drain ({why}): {e:#}; `docker rm -f {name}`"
                    ),
                ),
            }
        }
    }
}

/// Creates the volumes a spec mounts, then the container, and starts it.
async fn create_and_start(
    runtime: &DockerRuntime,
    spec: &crate::runtime::ContainerSpec,
) -> Result<()> {
    for m in &spec.mounts {
        if let MountSource::Volume(v) = &m.source {
            runtime.ensure_volume(&spec.project, v).await?;
        }
    }
    let id = runtime.create_container(spec).await?;
    runtime.start_container(&id).await
}

/// Asks the server in `container` to drain gradually through its loopback-only
/// `/admin/drain` (run inside the container with `chat-server healthcheck`); returns its answer.
pub async fn drain(docker: &bollard::Docker, container: &str) -> Result<String> {
    let url =
        format!("https://localhost:{SERVER_PORT}/admin/drain?batch=20&every_ms=200&delay_ms=1500");
    let ca = format!("{KEYS_MOUNT}/tls/ca.pem");
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                cmd: Some(vec![
                    "/chat-server",
                    "healthcheck",
                    "--url",
                    &url,
                    "--ca",
                    &ca,
                ]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("cannot exec in container {container}"))?;
    let mut output = String::new();
    if let StartExecResults::Attached {
        output: mut stream, ..
    } = docker
        .start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: false,
                ..Default::default()
            }),
        )
        .await
        .with_context(|| format!("cannot exec in container {container}"))?
    {
        let read = async {
            while let Some(Ok(chunk)) = stream.next().await {
                output.push_str(&chunk.to_string());
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    }
    let inspected = docker
        .inspect_exec(&exec.id)
        .await
        .with_context(|| format!("cannot read the drain's exit status in {container}"))?;
    match inspected.exit_code {
        Some(0) => Ok(if output.trim().is_empty() {
            "asked to drain".to_owned()
        } else {
            output.trim().to_owned()
        }),
        code => anyhow::bail!(
            "`/admin/drain` failed in {container} (exit {code:?}): {} (a chat-server older than the drain endpoint?)",
            output.trim()
        ),
    }
}
