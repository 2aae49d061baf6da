//! `chatctl chat`: the native end-to-end encrypted client from the command line, for scripts,
//! tests and operators. Every key is checked against the key directory before use.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chatctl::client::{Client, ClientOptions};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl chat register alice\n  \
    chatctl chat send --as alice bob 'hello'\n  \
    echo hello | chatctl chat send --as alice bob -\n  \
    chatctl chat recv --as bob --wait 5s --json\n  \
    chatctl chat safety-number --as alice bob")]
pub struct ChatArgs {
    /// The server to talk to.
    #[arg(
        long,
        global = true,
        env = "CHATCTL_SERVER",
        default_value = "https://localhost:8443"
    )]
    pub server: String,
    /// The CA certificate that issued the server's certificate.
    #[arg(long, global = true, default_value = ".chatctl/keys/tls/ca.pem")]
    pub ca: PathBuf,
    /// Where client keys and sessions are kept (one folder per user).
    #[arg(long, global = true, default_value = ".chatctl/clients")]
    pub home: PathBuf,
    /// The key directory's public key; every tree head must be signed with it.
    #[arg(long, global = true, default_value = ".chatctl/keys/directory.pub")]
    pub directory_key: PathBuf,
    #[command(subcommand)]
    pub command: ChatCommand,
}

#[derive(Debug, Subcommand)]
pub enum ChatCommand {
    /// Create keys for a new user on this machine and register them.
    Register { name: String },
    /// Encrypt a message to every device of PEER and store it on the server.
    Send {
        /// The sending user (registered on this machine).
        #[arg(long = "as")]
        as_user: String,
        /// Use a peer identity that changed since last time (after comparing safety numbers).
        #[arg(long)]
        accept_key_change: bool,
        peer: String,
        /// The message; `-` reads standard input.
        text: String,
    },
    /// Receive, decrypt and acknowledge waiting messages.
    Recv {
        #[arg(long = "as")]
        as_user: String,
        /// Stop after this long without a new message.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// One JSON object per line: from, text, id, time.
        #[arg(long)]
        json: bool,
    },
    /// Show the 60-digit safety number shared with PEER (compare it out of band).
    SafetyNumber {
        #[arg(long = "as")]
        as_user: String,
        peer: String,
    },
}

pub fn run(args: ChatArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: ChatArgs) -> Result<()> {
    let opts = ClientOptions {
        server: args.server,
        ca: args.ca,
        home: args.home,
        directory_key: args.directory_key,
    };
    match args.command {
        ChatCommand::Register { name } => {
            let client = Client::register(&opts, &name).await?;
            println!(
                "registered {name} on {} (keys in {})",
                opts.server,
                opts.home.join(&name).display()
            );
            client.conn.close().await;
        }
        ChatCommand::Send {
            as_user,
            accept_key_change,
            peer,
            text,
        } => {
            let text = if text == "-" {
                let mut buf = String::new();
                std::io::stdin()
                    .read_to_string(&mut buf)
                    .context("cannot read the message from stdin")?;
                buf.trim_end_matches('\n').to_owned()
            } else {
                text
            };
            if text.is_empty() {
                bail!("the message is empty");
            }
            let mut client = Client::open(&opts, &as_user).await?;
            client.accept_key_change = accept_key_change;
            let report = client.send_text(&peer, &text).await?;
            println!(
                "sent to {peer} ({} device{}){}",
                report.devices,
                if report.devices == 1 { "" } else { "s" },
                if report.duplicate {
                    " [already stored]"
                } else {
                    ""
                }
            );
            client.conn.close().await;
        }
        ChatCommand::Recv {
            as_user,
            wait,
            json,
        } => {
            let mut client = Client::open(&opts, &as_user).await?;
            let messages = client.receive(wait).await?;
            for m in &messages {
                if json {
                    println!("{}", serde_json::to_string(m)?);
                } else {
                    println!("{} (device {}): {}", m.from, m.from_device, m.text);
                }
            }
            client.conn.close().await;
        }
        ChatCommand::SafetyNumber { as_user, peer } => {
            let mut client = Client::open(&opts, &as_user).await?;
            println!("{}", client.safety_number(&peer).await?);
            client.conn.close().await;
        }
    }
    Ok(())
}
