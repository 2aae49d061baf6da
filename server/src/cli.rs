//! The `chat-server` command line: `serve` runs a node, `gateway` runs the cluster's entry (TLS,
//! least connections over the servers), `healthcheck` probes one (for container health checks,
//! no shell needed). Shared by the `chat-server` binary and the test-only
//! `chat-server-hostile`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{ConfigFile, ServerConfig, StoreLocation};
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "chat-server",
    version,
    about = "The ChatApp server: relays and stores only ciphertext."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server.
    #[command(after_help = "Examples:\n  \
        chat-server serve --listen 0.0.0.0:8443 --data /var/lib/chatapp --keys /etc/chatapp/keys\n  \
        chat-server serve --listen 127.0.0.1:8080 --plain-http --data ./data --keys .chatctl/keys --bundle dist/\n  \
        chat-server serve --listen 0.0.0.0:8443 --data /tmp/unused --keys /keys --store nats://nats:4222\n\n\
        Keys are those written by `chatctl keys init`. Logs go to stderr; set RUST_LOG (e.g. debug).\n\
        SIGTERM or Ctrl-C shut down gracefully: sockets are closed with the reconnect code.")]
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Directory of the embedded store.
        #[arg(long)]
        data: PathBuf,
        /// `embedded` (in --data, one instance) or `nats://host:port` (JetStream, shared by
        /// many instances, which then also notify each other of deliveries through NATS).
        #[arg(long, default_value = "embedded")]
        store: StoreLocation,
        /// Key directory (from `chatctl keys init`).
        #[arg(long)]
        keys: PathBuf,
        /// Serve this signed client bundle at `/`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Limits and names (TOML); see docs/OPERATIONS.md.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Plain HTTP instead of TLS; only on a loopback address.
        #[arg(long)]
        plain_http: bool,
        /// TEST ONLY: attack the clients this way.
        #[cfg(feature = "hostile")]
        #[arg(long, value_enum)]
        hostile: Option<crate::hostile::HostileMode>,
    },
    /// Run the gateway: TLS termination and least-connections over upstream servers.
    #[command(after_help = "Examples:\n  \
        chat-server gateway --listen 0.0.0.0:8443 --keys /keys --upstream server:8443\n  \
        chat-server gateway --listen 127.0.0.1:9443 --keys .chatctl/keys \\\n      \
        --upstream 127.0.0.1:8443 --upstream 127.0.0.1:8444\n\n\
        Each --upstream HOST:PORT is resolved again every second and every address it has is\n\
        an upstream (a Docker network alias names all servers). Upstreams are reached over TLS\n\
        and must present a certificate from the key directory's CA for --upstream-name.\n\
        The gateway answers /healthz, /readyz (200 when an upstream is ready) and\n\
        /gateway/metrics itself; everything else, WebSockets included, is relayed.")]
    Gateway {
        /// Address to listen on (TLS).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Key directory (from `chatctl keys init`).
        #[arg(long)]
        keys: PathBuf,
        /// Upstream chat-server, HOST:PORT; repeat for more.
        #[arg(long, required = true)]
        upstream: Vec<String>,
        /// Name the upstream certificates are checked against.
        #[arg(long, default_value = "localhost")]
        upstream_name: String,
        /// Milliseconds between upstream discovery and readiness probes.
        #[arg(long, default_value_t = 1000)]
        probe_interval_ms: u64,
    },
    /// Exit 0 when GET URL answers 200 (a container HEALTHCHECK).
    #[command(
        after_help = "Example:\n  chat-server healthcheck --url https://localhost:8443/healthz --ca /keys/tls/ca.pem"
    )]
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
        /// CA certificate to trust for https URLs.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Seconds before giving up.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

/// Runs the command line; the binaries' `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-server: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                listen,
                data,
                store,
                keys,
                bundle,
                config,
                plain_http,
                #[cfg(feature = "hostile")]
                hostile,
            } => {
                let options = ServeOptions {
                    listen,
                    data,
                    store,
                    keys,
                    bundle,
                    config,
                    plain_http,
                    #[cfg(feature = "hostile")]
                    hostile,
                };
                serve(options).await
            }
            Command::Gateway {
                listen,
                keys,
                upstream,
                upstream_name,
                probe_interval_ms,
            } => {
                let mut config = crate::gateway::GatewayConfig::new(listen, keys, upstream);
                config.upstream_name = upstream_name;
                config.probe_interval =
                    std::time::Duration::from_millis(probe_interval_ms.max(100));
                gateway(config).await
            }
            Command::Healthcheck { url, ca, timeout } => {
                crate::healthcheck::probe(
                    &url,
                    ca.as_deref(),
                    std::time::Duration::from_secs(timeout),
                )
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct ServeOptions {
    listen: SocketAddr,
    data: PathBuf,
    store: StoreLocation,
    keys: PathBuf,
    bundle: Option<PathBuf>,
    config: Option<PathBuf>,
    plain_http: bool,
    #[cfg(feature = "hostile")]
    hostile: Option<crate::hostile::HostileMode>,
}

async fn gateway(config: crate::gateway::GatewayConfig) -> Result<()> {
    init_logging();
    let gateway = crate::gateway::start(config).await?;
    let stopper = gateway.stopper();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down");
        stopper.send_replace(true);
    });
    gateway.wait().await;
    Ok(())
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
}

async fn serve(o: ServeOptions) -> Result<()> {
    init_logging();
    let file = match o.config {
        Some(path) => ConfigFile::load(&path)?,
        None => ConfigFile::default(),
    };
    let server_name = file
        .server_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "chat-server".into());
    let mut config = ServerConfig::new(o.listen, o.data, o.keys);
    config.store = o.store;
    config.bundle_dir = o.bundle;
    config.plain_http = o.plain_http;
    config.server_name = server_name;
    config.limits = file.limits;
    #[cfg(feature = "hostile")]
    {
        config.hostile = o.hostile;
    }
    let server = crate::server::start(config).await?;
    let stopper = server.stopper();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down");
        stopper.send_replace(true);
    });
    server.wait().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
