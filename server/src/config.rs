//! Server configuration: the command line (`chat-server serve`) plus an optional TOML file for
//! limits. Every limit has a documented default; unknown keys in the file are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Limits that protect the server and its users; `[limits]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest envelope accepted (`envelope_too_large` above). Default 64 KiB.
    pub max_envelope_bytes: u32,
    /// Undelivered envelopes per device mailbox (`mailbox_full` at the limit). Default 10 000.
    pub max_mailbox_depth: u64,
    /// Registrations per client address per minute (`rate_limited` above). Default 10.
    pub registrations_per_minute: u32,
    /// Seconds a login challenge stays valid. Default 30.
    pub challenge_ttl_secs: u64,
    /// Seconds to read a request's headers or finish a TLS handshake (slowloris, half-open TLS). Default 10.
    pub handshake_timeout_secs: u64,
    /// Seconds without any frame before an unauthenticated socket is closed. Default 30.
    pub unauthenticated_idle_secs: u64,
    /// Most concurrent connections; more are refused at accept. Default 20 000.
    pub max_connections: usize,
    /// Seconds a graceful shutdown may take before the process exits anyway. Default 10.
    pub shutdown_deadline_secs: u64,
    /// Sockets closed with the reconnect code per batch while draining. Default 200.
    pub drain_batch: usize,
    /// Frames already received on one socket that are handled as one batch, so that a client
    /// pipelining its sends gets them stored with one durable commit. 1 handles every frame
    /// alone (one commit per send). Default 64.
    pub pipelined_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_envelope_bytes: chat_core::wire::DEFAULT_MAX_ENVELOPE_BYTES,
            max_mailbox_depth: 10_000,
            registrations_per_minute: 10,
            challenge_ttl_secs: 30,
            handshake_timeout_secs: 10,
            unauthenticated_idle_secs: 30,
            max_connections: 20_000,
            shutdown_deadline_secs: 10,
            drain_batch: 200,
            pipelined_frames: 64,
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs(self.shutdown_deadline_secs)
    }
}

/// The config file (`--config FILE`), TOML.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    pub limits: Limits,
    /// Name announced in `ServerHello` and in logs; defaults to the host name.
    pub server_name: Option<String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid chat-server config", path.display()))
    }
}

/// Where the server keeps its data (`--store`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreLocation {
    /// The embedded store in the data directory (redb and the mailbox log): one instance.
    #[default]
    Embedded,
    /// NATS JetStream at this URL (`nats://host:port`), shared by many instances.
    Nats(String),
}

impl std::str::FromStr for StoreLocation {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s == "embedded" {
            Ok(StoreLocation::Embedded)
        } else if s.starts_with("nats://") && s.len() > "nats://".len() {
            Ok(StoreLocation::Nats(s.to_owned()))
        } else {
            Err(format!(
                "expected `embedded` or `nats://host:port`, got {s:?}"
            ))
        }
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Embedded => f.write_str("embedded"),
            StoreLocation::Nats(url) => f.write_str(url),
        }
    }
}

/// Everything a running server needs to know.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The embedded store (in `data_dir`) or a NATS server.
    pub store: StoreLocation,
    pub keys_dir: PathBuf,
    pub bundle_dir: Option<PathBuf>,
    /// Plain HTTP instead of TLS; only allowed on a loopback address.
    pub plain_http: bool,
    pub server_name: String,
    pub limits: Limits,
    /// Test-only attack mode (binary `chat-server-hostile`).
    #[cfg(feature = "hostile")]
    pub hostile: Option<crate::hostile::HostileMode>,
}

impl ServerConfig {
    /// TLS on `listen`, default limits, no bundle.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, keys_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            store: StoreLocation::Embedded,
            keys_dir,
            bundle_dir: None,
            plain_http: false,
            server_name: "chat-server".into(),
            limits: Limits::default(),
            #[cfg(feature = "hostile")]
            hostile: None,
        }
    }

    /// Checks the combinations the command line cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.plain_http && !self.listen.ip().is_loopback() {
            bail!(
                "--plain-http is only allowed on a loopback address (got {}); use TLS for anything reachable",
                self.listen
            );
        }
        if self.limits.max_envelope_bytes as usize > chat_core::wire::MAX_ENVELOPE_BYTES {
            bail!(
                "limits.max_envelope_bytes may be at most {}",
                chat_core::wire::MAX_ENVELOPE_BYTES
            );
        }
        Ok(())
    }
}
