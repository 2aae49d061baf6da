//! The process runtime: chat-servers inside this process (the embedded store, no Docker), for
//! machines without an engine and for fast tests. `chatctl up --runtime process` runs one; the
//! servers stop cleanly on Ctrl-C. Several servers on consecutive ports are possible, but each
//! has its own embedded store (they share nothing), so `up` runs exactly one.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use chat_server::config::ServerConfig;
use chat_server::server::RunningServer;

/// What to run.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Port of the first server; server `i` (from 0) listens on `port + i` (0: any free port).
    pub port: u16,
    pub keys: PathBuf,
    /// Data directory; server `i > 0` uses `DATA-i`.
    pub data: PathBuf,
    pub bundle: Option<PathBuf>,
    pub servers: u16,
}

/// Servers running in this process.
#[derive(Debug)]
pub struct EmbeddedCluster {
    pub servers: Vec<RunningServer>,
}

impl EmbeddedCluster {
    /// Starts the servers; returns once all listen.
    pub async fn start(options: &EmbeddedOptions) -> Result<Self> {
        let mut servers = Vec::new();
        for i in 0..options.servers.max(1) {
            let port = if options.port == 0 {
                0
            } else {
                options
                    .port
                    .checked_add(i)
                    .context("port out of range for this many servers")?
            };
            let data = if i == 0 {
                options.data.clone()
            } else {
                PathBuf::from(format!("{}-{i}", options.data.display()))
            };
            let mut config = ServerConfig::new(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                data,
                options.keys.clone(),
            );
            config.bundle_dir = options.bundle.clone();
            config.server_name = format!("chatctl-up-{}", i + 1);
            servers.push(chat_server::server::start(config).await?);
        }
        Ok(Self { servers })
    }

    /// Shuts every server down gracefully.
    pub async fn shutdown(self) {
        for s in self.servers {
            s.shutdown().await;
        }
    }
}
