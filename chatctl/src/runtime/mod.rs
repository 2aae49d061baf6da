//! Where ChatApp's services run: the [`Runtime`] trait (networks, volumes, images, labelled
//! containers, their state, health and logs) and its implementations, [`docker`] (the Docker
//! Engine API through bollard) and [`process`] (one embedded server in this process, for machines
//! without Docker). [`image`] builds the offline images, [`cluster`] plans and converges a project.

pub mod cluster;
pub mod docker;
pub mod image;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Label naming the project (`chatctl up --project`); carried by containers, networks, volumes.
pub const LABEL_PROJECT: &str = "io.chatapp.project";
/// Label naming the service of a container: `nats`, `gateway` or `server`.
pub const LABEL_SERVICE: &str = "io.chatapp.service";
/// Label numbering a container within its service, from 1.
pub const LABEL_INSTANCE: &str = "io.chatapp.instance";
/// Label holding the hash of everything a container was created from; a change means replace.
pub const LABEL_CONFIG_HASH: &str = "io.chatapp.config-hash";

/// The services of a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Nats,
    Server,
    Gateway,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Nats, Service::Server, Service::Gateway];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Nats => "nats",
            Service::Server => "server",
            Service::Gateway => "gateway",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health as `docker ps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    Starting,
    /// The container has no health check.
    None,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Starting => "starting",
            Health::None => "none",
        }
    }

    /// Reads the health from a `docker ps` status text such as `Up 3 seconds (health: starting)`
    /// (engines before API 1.50 give health only there).
    pub fn from_status_text(status: &str) -> Self {
        if status.contains("(unhealthy)") {
            Health::Unhealthy
        } else if status.contains("(healthy)") {
            Health::Healthy
        } else if status.contains("(health: starting)") {
            Health::Starting
        } else {
            Health::None
        }
    }
}

/// A mount of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum MountSource {
    /// A host directory (bind mount).
    Host(PathBuf),
    /// A named volume.
    Volume(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub source: MountSource,
    pub target: String,
    pub read_only: bool,
    /// Which host directory this is beyond its path (device and inode): a directory replaced at
    /// the same path (as `chatctl bundle` does) is a different mount, so the container that still
    /// sees the old one is out of date. Part of the config hash only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// A container health check, run inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub command: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
    pub start_period_ms: u64,
}

/// A port published on the host: `host_ip:host_port -> container_port/tcp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishedPort {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
}

/// Everything needed to create one container. Its [`ContainerSpec::config_hash`] covers every
/// field, so a container whose label differs from the spec's hash is out of date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerSpec {
    pub name: String,
    pub project: String,
    pub service: Service,
    pub instance: u32,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub network: String,
    /// Extra DNS names on the project network (all servers answer to `server`).
    pub aliases: Vec<String>,
    pub mounts: Vec<Mount>,
    pub ports: Vec<PublishedPort>,
    pub health: Option<HealthCheck>,
    /// Extra labels that are not part of the config hash (the gateway's copy of the cluster
    /// config, for `scale`).
    #[serde(skip)]
    pub annotations: BTreeMap<String, String>,
}

impl ContainerSpec {
    /// SHA-256 (hex, 16 chars) of the canonical JSON of the spec.
    pub fn config_hash(&self) -> String {
        use sha2::Digest;
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&sha2::Sha256::digest(&json)[..8])
    }

    /// The labels the container carries.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.annotations.clone();
        labels.extend([
            (LABEL_PROJECT.to_owned(), self.project.clone()),
            (LABEL_SERVICE.to_owned(), self.service.as_str().to_owned()),
            (LABEL_INSTANCE.to_owned(), self.instance.to_string()),
            (LABEL_CONFIG_HASH.to_owned(), self.config_hash()),
        ]);
        labels
    }
}

/// A container as observed; `chatctl ps --json` prints a list of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub service: Service,
    pub instance: u32,
    pub name: String,
    pub container_id: String,
    pub image: String,
    /// `created`, `running`, `exited`, `paused`, ...
    pub state: String,
    pub health: Health,
    /// Published ports, `127.0.0.1:8443->8443/tcp`.
    pub ports: Vec<String>,
    pub config_hash: String,
    /// Human status text from the engine (`Up 5 seconds (healthy)`).
    pub status: String,
    /// The cluster config label (`io.chatapp.cluster`), on the gateway.
    #[serde(skip)]
    pub cluster: Option<String>,
}

impl ContainerStatus {
    /// Reads the output of `chatctl ps --json`.
    pub fn parse_list(json: &str) -> Result<Vec<Self>> {
        serde_json::from_str(json)
            .map_err(|e| anyhow::anyhow!("not `chatctl ps --json` output: {e}"))
    }

    pub fn is_running(&self) -> bool {
        self.state == "running"
    }

    /// Running and, when it has a health check, healthy.
    pub fn is_ready(&self) -> bool {
        self.is_running() && matches!(self.health, Health::Healthy | Health::None)
    }
}

/// An image to build from files (a tar context with a Dockerfile).
#[derive(Debug, Clone)]
pub struct ImageBuild {
    /// `repository:tag`.
    pub tag: String,
    /// The build context (a tar archive holding `Dockerfile`).
    pub context: Vec<u8>,
}

/// Wakes up whenever something happened to a container of a project (engine events: start,
/// die, health status, ...). It may also wake for nothing; listeners re-read the state.
pub type Watch = Pin<Box<dyn futures_util::Stream<Item = ()> + Send>>;

/// Where containers run. Every object it creates carries the project label, and every listing
/// is filtered by it, so two projects never touch each other.
#[allow(async_fn_in_trait)]
pub trait Runtime {
    /// Whether an image with this exact tag exists locally.
    async fn image_exists(&self, tag: &str) -> Result<bool>;
    /// The first local image of `repository` (`nats` -> `nats:2.10`), if any.
    async fn find_local_image(&self, repository: &str) -> Result<Option<String>>;
    /// Builds an image (classic builder, nothing pulled); `on_line` sees the build output.
    async fn build_image(&self, build: &ImageBuild, on_line: &mut dyn FnMut(&str)) -> Result<()>;
    /// Creates the project network if missing.
    async fn ensure_network(&self, project: &str, name: &str) -> Result<()>;
    /// Creates a named volume if missing.
    async fn ensure_volume(&self, project: &str, name: &str) -> Result<()>;
    /// Creates (not starts) a container; returns its id.
    async fn create_container(&self, spec: &ContainerSpec) -> Result<String>;
    async fn start_container(&self, id: &str) -> Result<()>;
    /// Stops with SIGTERM, then SIGKILL after `grace_secs`.
    async fn stop_container(&self, id: &str, grace_secs: u32) -> Result<()>;
    /// Removes a container (forcefully, with its anonymous volumes).
    async fn remove_container(&self, id: &str) -> Result<()>;
    /// Events of the project's containers from (at the latest) now on; see [`Watch`].
    async fn watch(&self, project: &str) -> Result<Watch>;
    /// Every container of the project, running or not, sorted by service and instance.
    async fn list_containers(&self, project: &str) -> Result<Vec<ContainerStatus>>;
    /// Networks and volumes carrying the project label (names).
    async fn list_networks(&self, project: &str) -> Result<Vec<String>>;
    async fn list_volumes(&self, project: &str) -> Result<Vec<String>>;
    async fn remove_network(&self, name: &str) -> Result<()>;
    async fn remove_volume(&self, name: &str) -> Result<()>;
    /// Streams the container's log lines (stdout and stderr) to `on_line`; with `follow` until
    /// the container stops or the future is dropped.
    async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_read_from_docker_status_text() {
        assert_eq!(
            Health::from_status_text("Up 3 seconds (health: starting)"),
            Health::Starting
        );
        assert_eq!(
            Health::from_status_text("Up 1 minute (healthy)"),
            Health::Healthy
        );
        assert_eq!(
            Health::from_status_text("Up 1 minute (unhealthy)"),
            Health::Unhealthy
        );
        assert_eq!(
            Health::from_status_text("Exited (0) 2 seconds ago"),
            Health::None
        );
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "p-server-1".into(),
            project: "p".into(),
            service: Service::Server,
            instance: 1,
            image: "chatapp/chat-server:abc".into(),
            command: vec!["serve".into()],
            env: vec![],
            network: "p".into(),
            aliases: vec!["server".into()],
            mounts: vec![],
            ports: vec![],
            health: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn config_hash_changes_with_any_field_and_only_then() {
        let a = spec();
        assert_eq!(a.config_hash(), spec().config_hash());
        let mut b = spec();
        b.image = "chatapp/chat-server:def".into();
        assert_ne!(a.config_hash(), b.config_hash());
        let mut c = spec();
        c.command.push("--store".into());
        assert_ne!(a.config_hash(), c.config_hash());
    }

    #[test]
    fn labels_name_project_service_instance_and_hash() {
        let labels = spec().labels();
        assert_eq!(labels[LABEL_PROJECT], "p");
        assert_eq!(labels[LABEL_SERVICE], "server");
        assert_eq!(labels[LABEL_INSTANCE], "1");
        assert_eq!(labels[LABEL_CONFIG_HASH], spec().config_hash());
    }

    #[test]
    fn ps_json_round_trips() {
        let c = ContainerStatus {
            service: Service::Nats,
            instance: 1,
            name: "p-nats-1".into(),
            container_id: "abc".into(),
            image: "chatapp/nats:1".into(),
            state: "running".into(),
            health: Health::Starting,
            ports: vec![],
            config_hash: "h".into(),
            status: "Up".into(),
            cluster: None,
        };
        let json = serde_json::to_string(&vec![c.clone()]).expect("json");
        assert!(json.contains("\"health\":\"starting\""));
        assert!(json.contains("\"service\":\"nats\""));
        assert_eq!(ContainerStatus::parse_list(&json).expect("parse"), vec![c]);
    }
}
