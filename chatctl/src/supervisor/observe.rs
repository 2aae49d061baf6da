//! Observation, every tick: the project's containers from the Engine API (state, health, OOM
//! kills, restarts, address on the project network), CPU% and memory of each from its stats (the
//! docker CLI's formula), the gateway's `/gateway/metrics` (its view of each upstream: ready,
//! breaker, ejection, and the server's own counters it scraped), and the host (sysinfo).
//!
//! Why the gateway: the servers publish no port, and the gateway already probes every one of
//! them on the project network, so it scrapes their `/metrics` in the same request and shows
//! the counters per upstream; one HTTPS request from the supervisor reads the whole cluster.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::query_parameters::{InspectContainerOptions, StatsOptions};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::policy::HostResources;
use crate::runtime::cluster::network_name;
use crate::runtime::{ContainerStatus, Runtime, docker::DockerRuntime};

/// One container as the supervisor sees it.
#[derive(Debug, Clone)]
pub struct ContainerObservation {
    pub status: ContainerStatus,
    pub oom_killed: bool,
    pub exit_code: i64,
    pub restart_count: i64,
    /// Address on the project network (how the gateway names it).
    pub ip: Option<IpAddr>,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
}

/// The gateway's view of one upstream (`/gateway/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UpstreamObservation {
    /// Eligible for new connections.
    pub ready: bool,
    /// 0 closed, 1 open (ejected), 2 half-open.
    pub breaker: u8,
    pub ejected_secs: f64,
    pub ejections: u64,
    pub active: u64,
    /// The server's own counters, when the gateway's last probe got them.
    pub server_connections: Option<i64>,
    pub server_ready: Option<bool>,
    pub envelopes_stored: Option<u64>,
    pub envelopes_delivered: Option<u64>,
}

/// Everything seen in one tick.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub at: Option<Instant>,
    pub containers: Vec<ContainerObservation>,
    /// By upstream IP.
    pub upstreams: HashMap<IpAddr, UpstreamObservation>,
    /// Why the gateway could not be read, if it could not.
    pub gateway_error: Option<String>,
    pub host: Option<HostResources>,
}

impl Snapshot {
    pub fn upstream_of(&self, c: &ContainerObservation) -> Option<&UpstreamObservation> {
        c.ip.and_then(|ip| self.upstreams.get(&ip))
    }
}

/// Reads the engine, the gateway and the host.
pub struct Observer {
    docker: Docker,
    runtime: DockerRuntime,
    project: String,
    gateway: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    host: Option<sysinfo::System>,
    previous_cpu: HashMap<String, (u64, u64)>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("project", &self.project)
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// `gateway` is where `/gateway/metrics` answers (the published port on this host); `ca`
    /// is the project CA (`KEYS/tls/ca.pem`).
    pub fn new(
        runtime: DockerRuntime,
        project: &str,
        gateway: SocketAddr,
        ca: &std::path::Path,
    ) -> Result<Self> {
        let docker = Docker::connect_with_local_defaults()
            .context("cannot reach the Docker engine (is DOCKER_HOST right?)")?
            .with_timeout(Duration::from_secs(30));
        let tls = tls_connector(ca)?;
        let mut host = sysinfo::System::new().ok();
        if let Some(h) = host.as_mut() {
            h.refresh_cpu_usage();
            h.refresh_memory();
        }
        Ok(Self {
            docker,
            runtime,
            project: project.to_owned(),
            gateway,
            tls,
            host,
            previous_cpu: HashMap::new(),
        })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    pub fn runtime(&self) -> &DockerRuntime {
        &self.runtime
    }

    /// One observation.
    pub async fn observe(&mut self) -> Result<Snapshot> {
        let listed = self.runtime.list_containers(&self.project).await?;
        let network = network_name(&self.project);
        let details = futures_util::future::join_all(
            listed
                .iter()
                .map(|c| inspect_and_stats(&self.docker, c, &network)),
        )
        .await;
        let mut containers = Vec::with_capacity(listed.len());
        for (status, (inspect, stats)) in listed.into_iter().zip(details) {
            let (cpu_percent, memory_bytes) = match stats {
                Some(s) => {
                    let previous = self.previous_cpu.insert(status.container_id.clone(), s.cpu);
                    let percent = previous.and_then(|p| cpu_percent(p, s.cpu, s.online_cpus));
                    (percent, Some(s.memory))
                }
                None => (None, None),
            };
            containers.push(ContainerObservation {
                status,
                oom_killed: inspect.oom_killed,
                exit_code: inspect.exit_code,
                restart_count: inspect.restart_count,
                ip: inspect.ip,
                cpu_percent,
                memory_bytes,
            });
        }
        self.previous_cpu
            .retain(|id, _| containers.iter().any(|c| &c.status.container_id == id));
        let (upstreams, gateway_error) = match self.gateway_metrics().await {
            Ok(text) => (parse_gateway_metrics(&text), None),
            Err(e) => (HashMap::new(), Some(format!("{e:#}"))),
        };
        Ok(Snapshot {
            at: Some(Instant::now()),
            containers,
            upstreams,
            gateway_error,
            host: self.host_resources(),
        })
    }

    fn host_resources(&mut self) -> Option<HostResources> {
        let host = self.host.as_mut()?;
        host.refresh_cpu_usage();
        host.refresh_memory();
        Some(HostResources {
            available_memory_bytes: host.available_memory(),
            cpu_percent: f64::from(host.global_cpu_usage()),
            cpus: u32::try_from(host.cpus().len()).unwrap_or(u32::MAX),
            load_average_1m: sysinfo::System::load_average().map_or(0.0, |l| l.one),
        })
    }

    async fn gateway_metrics(&self) -> Result<String> {
        https_get(&self.tls, self.gateway, "/gateway/metrics").await
    }
}

/// A TLS connector trusting the project CA `ca` (for [`https_get`]).
pub fn tls_connector(ca: &std::path::Path) -> Result<tokio_rustls::TlsConnector> {
    Ok(tokio_rustls::TlsConnector::from(
        crate::client::conn::tls_config(ca)?,
    ))
}

/// `GET path` over TLS (server name `localhost`, the name of every certificate `chatctl keys
/// init` makes) to `addr`; the body of a 200 answer.
pub async fn https_get(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    path: &str,
) -> Result<String> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to the gateway at {addr}"))?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let mut stream = tls
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with the gateway at {addr} failed"))?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(_) if !bytes.is_empty() => break,
                Err(e) => return Err(e.into()),
            }
            if bytes.len() > 1 << 20 {
                bail!("the answer of {addr}{path} is larger than 1 MiB");
            }
        }
        anyhow::Ok(bytes)
    };
    let bytes = tokio::time::timeout(Duration::from_secs(3), work)
        .await
        .with_context(|| format!("the gateway at {addr} did not answer {path} within 3 s"))??;
    let text = String::from_utf8_lossy(&bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("the gateway at {addr} sent no HTTP answer to {path}");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "the gateway at {addr} answered {path} with {:?}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

#[derive(Debug, Default)]
struct Inspected {
    oom_killed: bool,
    exit_code: i64,
    restart_count: i64,
    ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    /// (container total CPU ns, system CPU ns).
    cpu: (u64, u64),
    online_cpus: u32,
    memory: u64,
}

async fn inspect_and_stats(
    docker: &Docker,
    c: &ContainerStatus,
    network: &str,
) -> (Inspected, Option<Stats>) {
    let inspect = async {
        let Ok(info) = docker
            .inspect_container(&c.container_id, None::<InspectContainerOptions>)
            .await
        else {
            return Inspected::default();
        };
        let state = info.state.unwrap_or_default();
        Inspected {
            oom_killed: state.oom_killed.unwrap_or(false),
            exit_code: state.exit_code.unwrap_or(0),
            restart_count: info.restart_count.unwrap_or(0),
            ip: info
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|mut n| n.remove(network))
                .and_then(|e| e.ip_address)
                .and_then(|ip| ip.parse().ok()),
        }
    };
    let stats = async {
        if !c.is_running() {
            return None;
        }
        let options = StatsOptions {
            stream: false,
            one_shot: true,
        };
        let mut stream = docker.stats(&c.container_id, Some(options));
        let s = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .ok()??
            .ok()?;
        let cpu = s.cpu_stats?;
        let total = cpu.cpu_usage.as_ref()?.total_usage?;
        let system = cpu.system_cpu_usage?;
        let online = cpu.online_cpus.filter(|n| *n > 0).unwrap_or_else(|| {
            cpu.cpu_usage
                .as_ref()
                .and_then(|u| u.percpu_usage.as_ref())
                .map_or(1, |p| u32::try_from(p.len()).unwrap_or(1))
        });
        let memory = s.memory_stats.map_or(0, memory_used);
        Some(Stats {
            cpu: (total, system),
            online_cpus: online,
            memory,
        })
    };
    tokio::join!(inspect, stats)
}

/// Memory as `docker stats` shows it: usage less the page cache (`inactive_file` on cgroup v2,
/// `cache` on v1).
fn memory_used(m: bollard::models::ContainerMemoryStats) -> u64 {
    let usage = m.usage.unwrap_or(0);
    let cache = m
        .stats
        .as_ref()
        .and_then(|s| s.get("inactive_file").or_else(|| s.get("cache")).copied())
        .unwrap_or(0);
    usage.saturating_sub(cache)
}

/// The docker CLI's CPU%: container CPU time over system CPU time between two samples, times
/// the number of CPUs, in percent (100 = one core busy).
pub fn cpu_percent(previous: (u64, u64), now: (u64, u64), online_cpus: u32) -> Option<f64> {
    let cpu_delta = now.0.checked_sub(previous.0)? as f64;
    let system_delta = now.1.checked_sub(previous.1)? as f64;
    (system_delta > 0.0).then(|| cpu_delta / system_delta * f64::from(online_cpus) * 100.0)
}

/// Reads `/gateway/metrics`: per upstream IP, what the gateway knows.
pub fn parse_gateway_metrics(text: &str) -> HashMap<IpAddr, UpstreamObservation> {
    let mut out: HashMap<IpAddr, UpstreamObservation> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once("{upstream=\"") else {
            continue;
        };
        let Some((upstream, value)) = rest.split_once("\"} ") else {
            continue;
        };
        let Ok(addr) = upstream.parse::<SocketAddr>() else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let whole = v.max(0.0) as u64;
        let u = out.entry(addr.ip()).or_default();
        match name {
            "chat_gateway_upstream_ready" => u.ready = v >= 1.0,
            "chat_gateway_upstream_active" => u.active = whole,
            "chat_gateway_upstream_breaker" => u.breaker = u8::try_from(whole).unwrap_or(1),
            "chat_gateway_upstream_ejected_seconds" => u.ejected_secs = v,
            "chat_gateway_upstream_ejections_total" => u.ejections = whole,
            "chat_gateway_upstream_server_connections" => u.server_connections = Some(v as i64),
            "chat_gateway_upstream_server_ready" => u.server_ready = Some(v >= 1.0),
            "chat_gateway_upstream_server_envelopes_stored_total" => {
                u.envelopes_stored = Some(whole);
            }
            "chat_gateway_upstream_server_envelopes_delivered_total" => {
                u.envelopes_delivered = Some(whole);
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_follows_the_docker_cli_formula() {
        // 0.5 s of container CPU in 2 s of system time (all CPUs) on 4 CPUs: 100%.
        let p = cpu_percent((1_000, 10_000), (501_000, 2_010_000), 4).expect("percent");
        assert!((p - 100.0).abs() < 1e-9, "{p}");
        assert_eq!(cpu_percent((5, 5), (4, 6), 1), None);
        assert_eq!(cpu_percent((5, 5), (6, 5), 1), None);
    }

    #[test]
    fn gateway_metrics_are_read_per_upstream() {
        let text = "# TYPE x gauge\n\
            chat_gateway_upstream_active{upstream=\"172.18.0.3:8443\"} 4\n\
            chat_gateway_upstream_ready{upstream=\"172.18.0.3:8443\"} 1\n\
            chat_gateway_upstream_breaker{upstream=\"172.18.0.3:8443\"} 0\n\
            chat_gateway_upstream_server_connections{upstream=\"172.18.0.3:8443\"} 5\n\
            chat_gateway_upstream_server_envelopes_stored_total{upstream=\"172.18.0.3:8443\"} 77\n\
            chat_gateway_upstream_breaker{upstream=\"172.18.0.4:8443\"} 1\n\
            chat_gateway_upstream_ejected_seconds{upstream=\"172.18.0.4:8443\"} 3.5\n\
            chat_gateway_clients 9\n";
        let m = parse_gateway_metrics(text);
        let a = m[&"172.18.0.3".parse::<IpAddr>().expect("ip")];
        assert!(a.ready);
        assert_eq!(
            (a.active, a.server_connections, a.envelopes_stored),
            (4, Some(5), Some(77))
        );
        let b = m[&"172.18.0.4".parse::<IpAddr>().expect("ip")];
        assert_eq!((b.breaker, b.ejected_secs, b.ready), (1, 3.5, false));
    }
}
