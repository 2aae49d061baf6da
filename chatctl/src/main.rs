//! chatctl: the ChatApp operator CLI.
//!
//! Parses the command line (clap), runs the subcommand, and turns errors into one readable
//! message on stderr and an exit status: 0 success, 1 refused or failed, 2 usage error, 3 no
//! Docker engine (cluster subcommands).
#![forbid(unsafe_code)]

mod cmd;

pub(crate) use chatctl::{files, passphrase, progress};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "chatctl",
    version,
    about = "Operate ChatApp: keys, signed client releases, servers and clusters.",
    after_help = "Start here:\n  \
        chatctl keys init           create the release, directory, TLS and data-at-rest keys\n  \
        chatctl sign --version 1.0.0 DIR   sign a client bundle (minisign-compatible)\n  \
        chatctl verify DIR          check a signed bundle as a client would\n  \
        chatctl verify-site URL --pubkey release.pub   check a deployed site the same way\n  \
        chatctl up --replicas 3     a local cluster in Docker (ps, logs, scale, down)\n\n\
        Run `chatctl <command> --help` for examples."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and show keys (release signing, key directory, TLS, data at rest).
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Sign a client bundle directory: writes manifest.json and manifest.json.minisig.
    Sign(cmd::release::SignArgs),
    /// Verify a signed bundle directory: signature, expiry, version and every file.
    Verify(cmd::release::VerifyArgs),
    /// Fetch a deployed browser client as a browser would and check the loader hash, the
    /// manifest signature and every file (exit 1 naming the file and the reason).
    VerifySite(cmd::verify_site::VerifySiteArgs),
    /// Chat from the command line (native end-to-end encrypted client), for scripts and tests.
    Chat(cmd::chat::ChatArgs),
    /// Load a running server with real clients and measure throughput and latency.
    #[command(subcommand_value_name = "SCENARIO")]
    Bench(cmd::bench::BenchArgs),
    /// Assemble the browser client (loader, app, wasm) with the keys baked in, ready to sign.
    Bundle(cmd::bundle::BundleArgs),
    /// Replay a server's key directory and report every problem (exit 1 if any).
    Audit(cmd::audit::AuditArgs),
    /// Run a local chat server (Docker cluster, or one embedded process without Docker).
    Up(cmd::up::UpArgs),
    /// Stop and remove a project's containers and network (and volumes with --volumes).
    Down(cmd::down::DownArgs),
    /// List a project's containers: service, instance, state, health, ports.
    Ps(cmd::ps::PsArgs),
    /// Show (or follow) the logs of a project's containers.
    Logs(cmd::logs::LogsArgs),
    /// Set the number of chat-server containers of a running project.
    Scale(cmd::scale::ScaleArgs),
    /// Heal and autoscale a running project (what `up` runs; `up --detach` starts it detached).
    Supervise(cmd::supervise::SuperviseArgs),
    /// Show what the supervisor sees and did: instances, load, replicas, decisions, events.
    Status(cmd::status::StatusArgs),
    /// `status`, refreshing until Ctrl-C.
    Top(cmd::top::TopArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keys(cmd) => cmd::keys::run(cmd),
        Command::Sign(args) => cmd::release::run_sign(args),
        Command::Verify(args) => cmd::release::run_verify(args),
        Command::VerifySite(args) => cmd::verify_site::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Bundle(args) => cmd::bundle::run(args),
        Command::Audit(args) => cmd::audit::run(args),
        Command::Up(args) => cmd::up::run(args),
        Command::Down(args) => cmd::down::run(args),
        Command::Ps(args) => cmd::ps::run(args),
        Command::Logs(args) => cmd::logs::run(args),
        Command::Scale(args) => cmd::scale::run(args),
        Command::Supervise(args) => cmd::supervise::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Top(args) => cmd::top::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(no_engine) = err.downcast_ref::<cmd::up::NoEngine>() {
                eprintln!("chatctl: error: no Docker engine: {no_engine}");
                return ExitCode::from(3);
            }
            if let Some(refused) = err.downcast_ref::<cmd::release::Refused>() {
                eprintln!("chatctl: refused: {refused}");
            } else {
                eprintln!("chatctl: error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}
