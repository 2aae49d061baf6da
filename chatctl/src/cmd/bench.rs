//! `chatctl bench`: load against a running server with real clients and real chat-core
//! encryption (`--raw` measures the relay alone), and the same load against the systems users
//! would pick instead (`--peer nats|xmpp|matrix|relay`), measured by the same generator.
//! Matrix (Synapse) is driven over its HTTP client-server API: sends are `PUT`s, receipt is
//! `/sync` long-polling, an idle client is a pending long-poll.
//!
//! Scenarios: `pairs` (1:1 traffic), `group` (one sender fanning out to M members), `idle` (C
//! logged-in idle sockets, server RSS per socket with `--server-pid`), `connect` (new
//! connection + login per second). `bench relay` runs the bare relay that is the limit. The
//! send time travels inside the (encrypted) 256-byte payload, so latency is send-to-deliver as
//! the receiving user sees it; all clients run in this process, so one monotonic clock serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chatctl::client::ClientOptions;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

#[path = "../bench/mod.rs"]
mod drivers;

use drivers::load::{self, LoadConfig, LoadResult, OpenResult};
use drivers::{chat, matrix, nats, relay, xmpp};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl bench pairs --pairs 8 --duration 10s\n  \
    chatctl bench pairs --pairs 4 --rate 2000 --json\n  \
    chatctl bench pairs --pairs 16 --rate 40000 --server-pid 4242   # with the server's CPU per message\n  \
    chatctl bench group --members 16 --raw --server https://localhost:9443 --ca keys/tls/ca.pem\n  \
    chatctl bench idle --connections 10000 --server http://127.0.0.1:8080 --server-pid 4242\n  \
    chatctl bench connect --duration 5s\n  \
    chatctl bench --peer nats --server ws://127.0.0.1:9222 pairs --pairs 4\n  \
    chatctl bench --peer matrix --server http://127.0.0.1:8008 group --members 8 --duration 5s\n  \
    chatctl bench relay --listen 127.0.0.1:9700\n\n\
    The chat server must allow the registrations the run makes (limits.registrations_per_minute);\n\
    a Matrix homeserver needs open registration without verification and its rc_* rate limits\n\
    raised.\n\
    `cargo xtask bench-peers` starts every peer and runs every scenario against each.")]
pub struct BenchArgs {
    /// What to measure: chat-server, or a peer driven by the same load generator.
    #[arg(long, value_enum, default_value_t = Peer::Chat, global = true)]
    pub peer: Peer,
    /// The chat server (https://, or http:// on loopback), the peer's ws:// URL, or the Matrix
    /// homeserver's http:// URL.
    #[arg(
        long,
        env = "CHATCTL_SERVER",
        default_value = "https://localhost:8443",
        global = true
    )]
    pub server: String,
    #[arg(long, default_value = ".chatctl/keys/tls/ca.pem", global = true)]
    pub ca: PathBuf,
    #[arg(long, default_value = ".chatctl/keys/directory.pub", global = true)]
    pub directory_key: PathBuf,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub duration: Duration,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Skip end-to-end encryption: measure the chat relay alone.
    #[arg(long, global = true)]
    pub raw: bool,
    /// The server's process id: its RSS is read from /proc before and after (idle), and its CPU
    /// time over the measured window (pairs, group: server CPU per message).
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Also report latency per slice of this length (e.g. 100ms), grouped by send time, to
    /// see when the slow messages were sent (pairs and group).
    #[arg(long, value_parser = slice_width, global = true)]
    pub timeline: Option<Duration>,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// chat-server (durable mailboxes, end-to-end encryption unless --raw).
    Chat,
    /// NATS core over nats-server's WebSocket listener.
    Nats,
    /// XMPP over WebSocket (RFC 7395), e.g. ejabberd.
    Xmpp,
    /// A Matrix homeserver (Synapse) over its HTTP client-server API: PUT + /sync long-poll.
    Matrix,
    /// The bare relay of `chatctl bench relay` (the limit).
    Relay,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// 1:1 traffic between N pairs of clients, 256-byte messages.
    Pairs {
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        /// Deliveries per second in total; as fast as the window allows when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Messages per sender sent but not yet delivered (when no --rate).
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Most messages a sender writes with one syscall when the window allows several
        /// (with --rate: when several are due); 1 writes each message alone, as a person's
        /// client does.
        #[arg(long, default_value_t = 16, value_parser = at_least_one)]
        batch: usize,
    },
    /// Fan-out: one sender, every message to M members (pairwise sessions for chat).
    Group {
        #[arg(long, default_value_t = 8)]
        members: usize,
        /// Deliveries per second in total; as fast as the window allows when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Group messages sent but not yet delivered to every member (when no --rate).
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Most messages a sender writes with one syscall when the window allows several
        /// (with --rate: when several are due); 1 writes each message alone, as a person's
        /// client does.
        #[arg(long, default_value_t = 16, value_parser = at_least_one)]
        batch: usize,
    },
    /// Open C logged-in idle connections (one user, many sockets; matrix: one user per socket,
    /// each with a pending /sync long-poll) and report server RSS per connection (needs
    /// --server-pid).
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
    /// New connection (TLS when https) + login, closed again, as fast as possible.
    Connect {
        /// Connections being opened at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Run the bare WebSocket relay (the limit) until stopped.
    Relay {
        #[arg(long, default_value = "127.0.0.1:9700")]
        listen: SocketAddr,
    },
}

/// The result of one run; `--json` prints it.
#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    pub scenario: &'static str,
    pub peer: &'static str,
    pub raw: bool,
    pub tls: bool,
    /// Senders (pairs) or 1 (group); connections for idle and connect.
    pub flows: usize,
    /// Receivers per sender.
    pub fanout: usize,
    pub rate: Option<f64>,
    pub duration_secs: f64,
    /// Deliveries the server accepted (chat: acknowledged as stored); connections attempted.
    pub sent: u64,
    /// Deliveries received; connections opened and logged in.
    pub delivered: u64,
    /// Deliveries per second; connections per second for idle and connect.
    pub msgs_per_sec: f64,
    /// Send-to-deliver latency; connect + login time for idle and connect.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_connection: Option<f64>,
    /// 1-minute load average at the end (the machine is shared).
    pub load_average: Option<f64>,
    /// Share of all cores busy over the measured window, 0 to 100 (pairs, group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_busy_pct: Option<f64>,
    /// Server CPU time per delivery in the window, in microseconds (with `--server-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_msg: Option<f64>,
    /// This process's (the load generator's) CPU time per delivery in the window, in
    /// microseconds: with end-to-end encryption, the clients' sealing and opening.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_generator_cpu_us_per_msg: Option<f64>,
    /// Latency per slice of the run, by send time (`--timeline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<load::Slice>>,
    /// When the run began (RFC 3339, UTC), with `--timeline`: slices count from it, so they
    /// can be set beside the server's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub began_at: Option<String>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Scenario::Relay { listen } = args.scenario {
        return runtime.block_on(relay::serve(listen));
    }
    let report = runtime.block_on(scenario(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if matches!(report.scenario, "pairs" | "group") && report.sent != report.delivered {
        bail!(
            "lost messages: sent {} but delivered {}",
            report.sent,
            report.delivered
        );
    }
    Ok(())
}

fn print_table(r: &BenchReport) {
    let mode = match (r.peer, r.raw, r.tls) {
        ("chat", true, _) => "raw relay",
        ("chat", false, true) => "e2e, TLS",
        ("chat", false, false) => "e2e",
        (peer, ..) => peer,
    };
    let unit = if matches!(r.scenario, "idle" | "connect") {
        "conn/s"
    } else {
        "msgs/s"
    };
    println!(
        "{:<9} {:<10} {:<6} {:<7} {:<9} {:<10} {:<10} {:<8} {:<8} {:<8}",
        "scenario",
        "mode",
        "flows",
        "fanout",
        "sent",
        "delivered",
        unit,
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    println!(
        "{:<9} {:<10} {:<6} {:<7} {:<9} {:<10} {:<10.0} {:<8.2} {:<8.2} {:<8.2}",
        r.scenario,
        mode,
        r.flows,
        r.fanout,
        r.sent,
        r.delivered,
        r.msgs_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.max_ms
    );
    if let (Some(before), Some(after), Some(per)) = (
        r.server_rss_before,
        r.server_rss_after,
        r.rss_per_connection,
    ) {
        println!(
            "server RSS {:.1} MiB -> {:.1} MiB: {:.1} KiB per connection",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            per / 1024.0
        );
    }
    if let Some(busy) = r.machine_busy_pct {
        let us = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} µs"));
        let server = match r.server_cpu_us_per_msg {
            Some(v) => format!("server {v:.1} µs, "),
            None => "server: give --server-pid; ".to_owned(),
        };
        println!(
            "CPU over the window: machine {busy:.0}% busy; per message: {server}load generator {}",
            us(r.load_generator_cpu_us_per_msg)
        );
    }
    if let Some(load) = r.load_average {
        println!("load average {load:.2}");
    }
    if let Some(slices) = &r.timeline {
        println!();
        if let Some(began) = &r.began_at {
            println!("began at {began}; slices by send time, from then:");
        }
        println!(
            "{:<9} {:<10} {:<8} {:<8} {:<8}",
            "sent at", "delivered", "p50 ms", "p99 ms", "max ms"
        );
        for s in slices {
            println!(
                "{:<9} {:<10} {:<8.2} {:<8.2} {:<8.2}",
                format!("{:.2}s", s.from_ms as f64 / 1000.0),
                s.delivered,
                s.p50_ms,
                s.p99_ms,
                s.max_ms
            );
        }
    }
}

fn chat_options(args: &BenchArgs, home: &tempfile::TempDir) -> ClientOptions {
    ClientOptions {
        server: args.server.clone(),
        ca: args.ca.clone(),
        home: home.path().to_owned(),
        directory_key: args.directory_key.clone(),
    }
}

/// A count that must be at least 1 (`--batch`).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

/// A `--timeline` slice: a duration of at least a millisecond.
fn slice_width(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_millis(1) => Ok(d),
        Ok(_) => Err(format!("{s:?} is shorter than a slice can be (1ms)")),
        Err(e) => Err(format!("{s:?} is not a duration like 100ms or 1s: {e}")),
    }
}

async fn scenario(args: &BenchArgs) -> Result<BenchReport> {
    let tls = args.peer == Peer::Chat && args.server.starts_with("https://");
    let peer = match args.peer {
        Peer::Chat => "chat",
        Peer::Nats => "nats",
        Peer::Xmpp => "xmpp",
        Peer::Matrix => "matrix",
        Peer::Relay => "relay",
    };
    let base = BenchReport {
        peer,
        raw: args.raw,
        tls,
        ..BenchReport::default()
    };
    let report = match args.scenario {
        Scenario::Pairs {
            pairs,
            rate,
            window,
            batch,
        } => {
            let result = traffic(
                args,
                pairs,
                1,
                LoadConfig {
                    duration: args.duration,
                    rate,
                    window,
                    batch,
                    server_pid: args.server_pid,
                },
            )
            .await?;
            traffic_report(
                BenchReport {
                    scenario: "pairs",
                    flows: pairs,
                    fanout: 1,
                    rate,
                    ..base
                },
                result,
                args.timeline,
            )
        }
        Scenario::Group {
            members,
            rate,
            window,
            batch,
        } => {
            let result = traffic(
                args,
                1,
                members,
                LoadConfig {
                    duration: args.duration,
                    rate,
                    window,
                    batch,
                    server_pid: args.server_pid,
                },
            )
            .await?;
            traffic_report(
                BenchReport {
                    scenario: "group",
                    flows: 1,
                    fanout: members,
                    rate,
                    ..base
                },
                result,
                args.timeline,
            )
        }
        Scenario::Idle { connections } => {
            let result = idle(args, connections).await?;
            open_report(
                BenchReport {
                    scenario: "idle",
                    flows: connections,
                    ..base
                },
                result,
            )
        }
        Scenario::Connect { concurrency } => {
            let result = connect(args, concurrency).await?;
            open_report(
                BenchReport {
                    scenario: "connect",
                    flows: concurrency,
                    ..base
                },
                result,
            )
        }
        Scenario::Relay { .. } => bail!("`bench relay` is a server, not a scenario"),
    };
    Ok(report)
}

async fn traffic(
    args: &BenchArgs,
    senders: usize,
    fanout: usize,
    config: LoadConfig,
) -> Result<LoadResult> {
    let url = args.server.as_str();
    match args.peer {
        Peer::Chat => {
            let home = tempfile::tempdir()?;
            let flows = chat::flows(&chat_options(args, &home), senders, fanout, args.raw).await?;
            load::run(flows, config).await
        }
        Peer::Nats => load::run(nats::flows(url, senders, fanout).await?, config).await,
        Peer::Xmpp => load::run(xmpp::flows(url, senders, fanout).await?, config).await,
        Peer::Matrix => load::run(matrix::flows(url, senders, fanout).await?, config).await,
        Peer::Relay => load::run(relay::flows(url, senders, fanout).await?, config).await,
    }
}

fn traffic_report(base: BenchReport, r: LoadResult, slice: Option<Duration>) -> BenchReport {
    let per_message = |ms| drivers::cpu::CpuUse::per_message_us(ms, r.delivered_in_window);
    BenchReport {
        machine_busy_pct: r.cpu.map(|c| c.machine_busy_pct),
        server_cpu_us_per_msg: r.cpu.and_then(|c| per_message(c.server_ms)),
        load_generator_cpu_us_per_msg: r.cpu.and_then(|c| per_message(c.load_generator_ms)),
        timeline: slice.map(|width| load::timeline(&r.samples, width)),
        began_at: slice
            .and(r.began)
            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        duration_secs: r.elapsed.as_secs_f64(),
        sent: r.sent,
        delivered: r.delivered,
        msgs_per_sec: r.delivered as f64 / r.elapsed.as_secs_f64().max(1e-9),
        p50_ms: r.latencies.ms(0.5),
        p99_ms: r.latencies.ms(0.99),
        max_ms: r.latencies.ms(1.0),
        load_average: load::load_average(),
        ..base
    }
}

fn open_report(base: BenchReport, r: OpenResult) -> BenchReport {
    let rss_per_connection = match (r.rss_before, r.rss_after) {
        (Some(b), Some(a)) if r.opened > 0 => Some(a.saturating_sub(b) as f64 / r.opened as f64),
        _ => None,
    };
    BenchReport {
        duration_secs: r.elapsed.as_secs_f64(),
        sent: r.attempted,
        delivered: r.opened,
        msgs_per_sec: r.opened as f64 / r.elapsed.as_secs_f64().max(1e-9),
        p50_ms: r.latencies.ms(0.5),
        p99_ms: r.latencies.ms(0.99),
        max_ms: r.latencies.ms(1.0),
        server_rss_before: r.rss_before,
        server_rss_after: r.rss_after,
        rss_per_connection,
        load_average: load::load_average(),
        ..base
    }
}

async fn idle(args: &BenchArgs, count: usize) -> Result<OpenResult> {
    let (url, pid) = (args.server.as_str(), args.server_pid);
    match args.peer {
        Peer::Chat => {
            let home = tempfile::tempdir()?;
            let who = chat::LoginIdentity::register(&chat_options(args, &home)).await?;
            let (who, ca) = (&who, args.ca.as_path());
            load::idle(count, pid, move |_| who.login(url, ca)).await
        }
        Peer::Nats => load::idle(count, pid, move |_| nats::NatsConn::connect(url)).await,
        Peer::Xmpp => {
            // Each idle connection is its own user, as on a real server. Thousands of
            // resources of one user cost ejabberd megabytes per session (12 GB RSS at 5000).
            let tag = load::run_tag();
            let tag = tag.as_str();
            load::idle(count, pid, move |i| async move {
                let user = xmpp::user_name(tag, &format!("i{i}"));
                xmpp::XmppConn::login(url, &user, "r0", true).await
            })
            .await
        }
        Peer::Matrix => {
            // Each idle connection is its own user: devices of one user wake each other's
            // syncs with device-list changes.
            let tag = load::run_tag();
            let tag = tag.as_str();
            load::idle(count, pid, move |i| async move {
                matrix::idle_client(url, &matrix::user_name(tag, &format!("i{i}"))).await
            })
            .await
        }
        Peer::Relay => {
            let tag = load::run_tag();
            let tag = tag.as_str();
            load::idle(count, pid, move |i| async move {
                relay::RelayConn::connect(url, &format!("{tag}i{i}")).await
            })
            .await
        }
    }
}

async fn connect(args: &BenchArgs, concurrency: usize) -> Result<OpenResult> {
    let (url, duration) = (args.server.as_str(), args.duration);
    match args.peer {
        Peer::Chat => {
            let home = tempfile::tempdir()?;
            let who = chat::LoginIdentity::register(&chat_options(args, &home)).await?;
            let (who, ca) = (&who, args.ca.as_path());
            load::connect(duration, concurrency, move |_| async move {
                who.login(url, ca).await?.close().await;
                anyhow::Ok(())
            })
            .await
        }
        Peer::Nats => {
            load::connect(duration, concurrency, move |_| nats::NatsConn::connect(url)).await
        }
        Peer::Xmpp => {
            let user = xmpp::user_name(&load::run_tag(), "conn");
            xmpp::XmppConn::login(url, &user, "r0", true).await?;
            let user = user.as_str();
            load::connect(duration, concurrency, move |i| async move {
                xmpp::XmppConn::login(url, user, &format!("c{i}"), false).await
            })
            .await
        }
        Peer::Matrix => {
            let user = matrix::user_name(&load::run_tag(), "conn");
            matrix::MatrixConn::connect(url)
                .await?
                .register(&user)
                .await?;
            let user = user.as_str();
            load::connect(duration, concurrency, move |_| {
                matrix::connect_and_login(url, user)
            })
            .await
        }
        Peer::Relay => {
            let tag = load::run_tag();
            let tag = tag.as_str();
            load::connect(duration, concurrency, move |i| async move {
                relay::RelayConn::connect(url, &format!("{tag}c{i}")).await
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{at_least_one, slice_width};
    use std::time::Duration;

    #[test]
    fn a_timeline_slice_is_a_duration_of_at_least_a_millisecond() {
        assert_eq!(slice_width("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(slice_width("1s"), Ok(Duration::from_secs(1)));
        for bad in ["0s", "500us", "fast", ""] {
            assert!(slice_width(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn batch_must_be_a_whole_number_of_at_least_one() {
        assert_eq!(at_least_one("16"), Ok(16));
        assert_eq!(at_least_one("1"), Ok(1));
        for bad in ["0", "-1", "x", ""] {
            assert!(at_least_one(bad).is_err(), "{bad:?} accepted");
        }
    }
}
