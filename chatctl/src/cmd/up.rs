//! `chatctl up`: run ChatApp locally. Without a Docker engine (or with `--runtime process`) it
//! runs one chat-server in this process with the embedded store, provisioning dev keys when none
//! exist, and stops cleanly on Ctrl-C.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use chat_server::config::ServerConfig;
use clap::{Args, ValueEnum};

use crate::cmd::keys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// Docker if an engine answers, else one local process.
    Auto,
    /// Containers through the Docker Engine API.
    Docker,
    /// One embedded server in this process.
    Process,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl up                      # https://localhost:8443, dev keys in .chatctl/keys\n  \
    chatctl up --port 9443 --keys /etc/chatapp/keys\n\n\
    Then, in another terminal:\n  \
    chatctl chat register alice && chatctl chat register bob\n  \
    chatctl chat send --as alice bob hello && chatctl chat recv --as bob")]
pub struct UpArgs {
    /// Port to serve HTTPS and WebSockets on (localhost).
    #[arg(long, default_value_t = 8443)]
    pub port: u16,
    /// Key directory; dev keys are created there when it holds none.
    #[arg(long, default_value = keys::DEFAULT_DIR)]
    pub keys: PathBuf,
    /// Where the embedded store keeps its data.
    #[arg(long, default_value = ".chatctl/data")]
    pub data: PathBuf,
    /// Serve this signed client bundle at the root URL.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// How to run the servers.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Auto)]
    pub runtime: RuntimeKind,
}

pub fn run(args: UpArgs) -> Result<()> {
    match args.runtime {
        RuntimeKind::Docker => bail!(
            "the Docker runtime is not available in this build yet; run `chatctl up --runtime process`"
        ),
        RuntimeKind::Auto | RuntimeKind::Process => run_process(args),
    }
}

fn run_process(args: UpArgs) -> Result<()> {
    if !args.keys.join(keys::DIRECTORY_KEY).exists() {
        keys::init(&args.keys, None, false)?;
        std::fs::write(
            args.keys.join("DEV-KEYS.txt"),
            "These keys were made by `chatctl up` for local development. They are unencrypted.\n\
             Do not use them for a deployment: run `chatctl keys init` instead.\n",
        )
        .with_context(|| format!("cannot write {}", args.keys.display()))?;
        eprintln!(
            "Created DEV keys (unencrypted, for local use only) in {}",
            args.keys.display()
        );
    }
    let mut config = ServerConfig::new(
        SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)),
        args.data.clone(),
        args.keys.clone(),
    );
    config.bundle_dir = args.bundle.clone();
    config.server_name = "chatctl-up".into();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = chat_server::server::start(config).await?;
        println!(
            "ChatApp is running at https://localhost:{} (one embedded server, data in {})\n\
             CA certificate: {}\nPress Ctrl-C to stop.",
            server.local_addr.port(),
            args.data.display(),
            args.keys.join(keys::TLS_CA).display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")?;
        eprintln!("Stopping…");
        server.shutdown().await;
        eprintln!("Stopped.");
        Ok(())
    })
}
