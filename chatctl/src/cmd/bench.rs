//! `chatctl bench`: load against a running server with real clients and real chat-core
//! encryption (`--raw` measures the relay alone).
//!
//! `pairs`: N sender/receiver pairs; each sender keeps up to `--window` envelopes unacknowledged
//! (or paces to `--rate` msgs/s in total); receivers decrypt and timestamp every message. The
//! send time travels inside the encrypted 256-byte payload, so latency is send-to-deliver as
//! the receiving user sees it. All clients run in this process, so one monotonic clock serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chat_core::wire::{ClientFrame, Envelope, ServerFrame};
use chatctl::client::{Client, ClientOptions, DEVICE_ID};
use clap::{Args, Subcommand};
use rand_core::{OsRng, RngCore};
use serde::Serialize;

/// Payload size of every benchmark message (before padding and encryption).
const PAYLOAD: usize = 256;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl bench pairs --pairs 8 --duration 10s\n  \
    chatctl bench pairs --pairs 4 --rate 2000 --json\n  \
    chatctl bench pairs --raw --server https://localhost:9443 --ca keys/tls/ca.pem\n\n\
    The server must allow the registrations the run makes (limits.registrations_per_minute).")]
pub struct BenchArgs {
    #[arg(long, env = "CHATCTL_SERVER", default_value = "https://localhost:8443", global = true)]
    pub server: String,
    #[arg(long, default_value = ".chatctl/keys/tls/ca.pem", global = true)]
    pub ca: PathBuf,
    #[arg(long, default_value = ".chatctl/keys/directory.pub", global = true)]
    pub directory_key: PathBuf,
    /// How long to measure (after warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub duration: Duration,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Skip end-to-end encryption: measure the relay alone.
    #[arg(long, global = true)]
    pub raw: bool,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// 1:1 traffic between N pairs of clients, 256-byte messages.
    Pairs {
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        /// Total messages per second across all pairs; as fast as acks allow when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Unacknowledged sends allowed per sender (when no --rate).
        #[arg(long, default_value_t = 16)]
        window: usize,
    },
}

/// The result of one run; `--json` prints it.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub scenario: &'static str,
    pub raw: bool,
    pub pairs: usize,
    pub duration_secs: f64,
    pub sent: u64,
    pub delivered: u64,
    pub msgs_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(async {
        match args.scenario {
            Scenario::Pairs { pairs, rate, window } => pairs_scenario(&args, pairs, rate, window.max(1)).await,
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "scenario  pairs  mode        sent   delivered  msgs/s    p50 ms  p99 ms  max ms\n\
             {:<9} {:<6} {:<11} {:<6} {:<10} {:<9.0} {:<7.2} {:<7.2} {:.2}",
            report.scenario,
            report.pairs,
            if report.raw { "raw relay" } else { "e2e" },
            report.sent,
            report.delivered,
            report.msgs_per_sec,
            report.p50_ms,
            report.p99_ms,
            report.max_ms
        );
    }
    if report.sent != report.delivered {
        bail!("lost messages: sent {} but delivered {}", report.sent, report.delivered);
    }
    Ok(())
}

struct Pair {
    sender: Client,
    receiver: Client,
    receiver_name: String,
}

async fn setup_pairs(args: &BenchArgs, n: usize) -> Result<(Vec<Pair>, tempfile::TempDir)> {
    let home = tempfile::tempdir()?;
    let opts = ClientOptions {
        server: args.server.clone(),
        ca: args.ca.clone(),
        home: home.path().to_owned(),
        directory_key: args.directory_key.clone(),
    };
    let mut tag = [0u8; 3];
    OsRng.fill_bytes(&mut tag);
    let tag = hex::encode(tag);
    let bar = crate::progress::spinner(format!("registering {} clients", 2 * n));
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let s_name = format!("bench{tag}s{i}");
        let r_name = format!("bench{tag}r{i}");
        let mut sender = Client::register(&opts, &s_name).await.with_context(|| format!("register {s_name}"))?;
        let mut receiver = Client::register(&opts, &r_name).await.with_context(|| format!("register {r_name}"))?;
        // Full, directory-checked session set-up once; the measured loop reuses the sessions.
        sender.send_text(&r_name, "warm-up").await?;
        let got = receiver.receive(Duration::from_millis(300)).await?;
        if got.len() != 1 {
            bail!("warm-up message to {r_name} did not arrive");
        }
        bar.set_message(format!("registered {} of {} clients", 2 * (i + 1), 2 * n));
        pairs.push(Pair {
            sender,
            receiver,
            receiver_name: r_name,
        });
    }
    bar.finish_and_clear();
    Ok((pairs, home))
}

fn payload(seq: u64, sent_nanos: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&sent_nanos.to_be_bytes());
    p
}

async fn pairs_scenario(args: &BenchArgs, n: usize, rate: Option<f64>, window: usize) -> Result<BenchReport> {
    let (pairs, _home) = setup_pairs(args, n).await?;
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sent_total = Arc::new(AtomicU64::new(0));
    let delivered_total = Arc::new(AtomicU64::new(0));
    let per_sender_interval = rate.map(|r| Duration::from_secs_f64(n as f64 / r.max(0.001)));
    let raw = args.raw;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for pair in pairs {
        let Pair {
            mut sender,
            mut receiver,
            receiver_name,
        } = pair;
        let sender_name = sender.name.clone();
        let mut send_session = sender
            .load_session(&receiver_name, DEVICE_ID)?
            .ok_or_else(|| anyhow!("no session after warm-up"))?;
        let mut recv_session = receiver
            .load_session(&sender_name, DEVICE_ID)?
            .ok_or_else(|| anyhow!("no session after warm-up"))?;
        let (stop_s, sent) = (stop.clone(), sent_total.clone());
        senders.push(tokio::spawn(async move {
            let mut in_flight = 0usize;
            let mut seq = 0u64;
            let mut next_at = tokio::time::Instant::now();
            loop {
                let stopping = stop_s.load(Relaxed);
                if !stopping && (in_flight < window || per_sender_interval.is_some()) {
                    if let Some(interval) = per_sender_interval {
                        tokio::time::sleep_until(next_at).await;
                        next_at += interval;
                    }
                    seq += 1;
                    let body = payload(seq, origin.elapsed().as_nanos() as u64);
                    let message = if raw { body } else { send_session.encrypt(&body, &mut OsRng)? };
                    let mut message_id = [0u8; 16];
                    OsRng.fill_bytes(&mut message_id);
                    sender
                        .conn
                        .send(&ClientFrame::Send {
                            message_id,
                            to_user: receiver_name.clone(),
                            to_device: DEVICE_ID,
                            envelope: Envelope::RatchetMessage { message }.encode(),
                        })
                        .await?;
                    in_flight += 1;
                    if per_sender_interval.is_some() || in_flight < window {
                        // Collect acks that already arrived without waiting.
                        while let Ok(frame) = sender.conn.next_frame(Duration::from_millis(0)).await {
                            let acked = ack_count(&frame)?;
                            in_flight -= acked;
                            sent.fetch_add(acked as u64, Relaxed);
                        }
                        continue;
                    }
                }
                if stopping && in_flight == 0 {
                    break;
                }
                let frame = sender.conn.next_frame(Duration::from_secs(10)).await?;
                let acked = ack_count(&frame)?;
                in_flight -= acked;
                sent.fetch_add(acked as u64, Relaxed);
            }
            anyhow::Ok(())
        }));
        let delivered = delivered_total.clone();
        let stop_r = stop.clone();
        receivers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut last_seq = 0;
            loop {
                let frame = match receiver.conn.next_frame(Duration::from_millis(1500)).await {
                    Ok(f) => f,
                    Err(_) if stop_r.load(Relaxed) => break,
                    Err(e) => return Err(e),
                };
                let ServerFrame::Deliver { seq, envelope, .. } = frame else {
                    continue;
                };
                let Ok(Envelope::RatchetMessage { message }) = Envelope::decode(&envelope) else {
                    bail!("unexpected envelope");
                };
                let body = if raw { message } else { recv_session.decrypt(&message)? };
                let sent_nanos = u64::from_be_bytes(body.get(8..16).and_then(|b| b.try_into().ok()).unwrap_or_default());
                let now = origin.elapsed().as_nanos() as u64;
                latencies.push(now.saturating_sub(sent_nanos));
                delivered.fetch_add(1, Relaxed);
                if seq - last_seq >= 32 {
                    receiver.conn.send(&ClientFrame::Ack { up_to_seq: seq }).await?;
                    last_seq = seq;
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let bar = crate::progress::spinner("measuring".into());
    let start = Instant::now();
    while start.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_message(format!(
            "{:.0}s: {} acknowledged, {} delivered",
            start.elapsed().as_secs_f64(),
            sent_total.load(Relaxed),
            delivered_total.load(Relaxed)
        ));
    }
    stop.store(true, Relaxed);
    let elapsed = start.elapsed();
    for s in senders {
        s.await??;
    }
    let mut latencies = Vec::new();
    for r in receivers {
        latencies.extend(r.await??);
    }
    bar.finish_and_clear();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i.min(latencies.len() - 1)] as f64 / 1e6
    };
    let sent = sent_total.load(Relaxed);
    Ok(BenchReport {
        scenario: "pairs",
        raw,
        pairs: n,
        duration_secs: elapsed.as_secs_f64(),
        sent,
        delivered: delivered_total.load(Relaxed),
        msgs_per_sec: sent as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

/// 1 for a `SendAck`, 0 for other frames; a server error ends the run.
fn ack_count(frame: &ServerFrame) -> Result<usize> {
    match frame {
        ServerFrame::SendAck { .. } => Ok(1),
        ServerFrame::Error { code, message, .. } => bail!("server error {code}: {message}"),
        _ => Ok(0),
    }
}
