//! The `chat-server` binary: `serve` runs a node, `healthcheck` probes one (for container
//! health checks, no shell needed).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use chat_server::config::{ConfigFile, ServerConfig};
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
        chat-server serve --listen 127.0.0.1:8080 --plain-http --data ./data --keys .chatctl/keys --bundle dist/\n\n\
        Keys are those written by `chatctl keys init`. Logs go to stderr; set RUST_LOG (e.g. debug).\n\
        SIGTERM or Ctrl-C shut down gracefully: sockets are closed with the reconnect code.")]
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Directory of the embedded store.
        #[arg(long)]
        data: PathBuf,
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

fn main() -> ExitCode {
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
                keys,
                bundle,
                config,
                plain_http,
            } => serve(listen, data, keys, bundle, config, plain_http).await,
            Command::Healthcheck { url, ca, timeout } => {
                chat_server::healthcheck::probe(
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

async fn serve(
    listen: SocketAddr,
    data: PathBuf,
    keys: PathBuf,
    bundle: Option<PathBuf>,
    config: Option<PathBuf>,
    plain_http: bool,
) -> Result<()> {
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
    let file = match config {
        Some(path) => ConfigFile::load(&path)?,
        None => ConfigFile::default(),
    };
    let server_name = file
        .server_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "chat-server".into());
    let config = ServerConfig {
        listen,
        data_dir: data,
        keys_dir: keys,
        bundle_dir: bundle,
        plain_http,
        server_name,
        limits: file.limits,
    };
    let server = chat_server::server::start(config).await?;
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
