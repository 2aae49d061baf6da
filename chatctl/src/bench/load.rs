//! The load generator every driver shares, so chat-server, NATS, ejabberd and the bare relay
//! are measured by the same code: flows of one sender and one or more receivers, 256-byte
//! payloads carrying `[seq u64][sent-at ns u64]`, a window of undelivered messages per flow (or
//! an open-loop `--rate`), send-to-deliver latency on one monotonic clock.
//!
//! Senders pipeline: what the window allows goes out in one write (up to `batch` messages), as
//! a client library with a buffered connection sends. Writing each message alone cost the load
//! generator a `sendto` per message, which on two shared cores capped every system near the
//! same figure and hid how far each server batches on its own side.
//!
//! A driver supplies an [`Outbox`] (one sending connection) and [`Inbox`]es (receiving
//! connections); the idle and connect scenarios only need a function that opens one logged-in
//! connection ([`idle`], [`connect`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

/// Payload size of every benchmark message.
pub const PAYLOAD: usize = 256;
/// Handshakes in flight at once while opening idle connections.
const OPEN_CONCURRENCY: usize = 64;

/// One sending connection of a flow.
pub trait Outbox: Send + 'static {
    /// Queues one payload for every receiver of the flow; it may wait in the socket's write
    /// buffer until [`Outbox::flush`].
    fn send(&mut self, body: Vec<u8>) -> impl Future<Output = Result<()>> + Send;
    /// Writes out everything [`Outbox::send`] queued.
    fn flush(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// After the last send: waits until the peer confirmed everything (chat: every `SendAck`,
    /// i.e. durably stored; the others: a round trip behind the last send) and returns how
    /// many deliveries (message x receiver) the peer accepted.
    fn finish(&mut self) -> impl Future<Output = Result<u64>> + Send;
}

/// One receiving connection.
pub trait Inbox: Send + 'static {
    /// The next payload, `None` when nothing arrived within `timeout`.
    fn recv(&mut self, timeout: Duration) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
}

/// A sender and the receivers every one of its messages goes to.
pub struct Flow<O, I> {
    pub outbox: O,
    pub inboxes: Vec<I>,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    pub duration: Duration,
    /// Deliveries per second in total (open loop); `None`: as fast as the window allows.
    pub rate: Option<f64>,
    /// Messages per flow sent but not yet delivered to every receiver.
    pub window: usize,
    /// Most messages a sender writes in one go when the window allows several (or, with
    /// `rate`, when several are due); 1 is one write per message.
    pub batch: usize,
    /// The server's process, whose CPU time over the window is measured ([`LoadResult::cpu`]).
    pub server_pid: Option<u32>,
}

/// What a load run measured.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Wall-clock time at which the run began (samples count from it).
    pub began: Option<std::time::SystemTime>,
    pub elapsed: Duration,
    /// Deliveries the peer accepted (chat: acknowledged as stored).
    pub sent: u64,
    pub delivered: u64,
    pub latencies: Latencies,
    /// Every delivery's send time and latency, in the order the receivers saw them, for
    /// [`timeline`].
    pub samples: Vec<Sample>,
    /// CPU used over the window (not the drain after it), where the platform tells.
    pub cpu: Option<super::cpu::CpuUse>,
    /// Deliveries within the window, the messages [`LoadResult::cpu`] was spent on.
    pub delivered_in_window: u64,
}

/// One delivery: when it was sent (nanoseconds since the run began) and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub sent_ns: u64,
    pub latency_ns: u64,
}

/// Latency of the messages sent within one slice of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Slice {
    /// Start of the slice, milliseconds since the run began.
    pub from_ms: u64,
    pub delivered: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Groups deliveries by send time into slices of `width`, so a latency spike can be placed in
/// the run (one stall delays every message sent in a slice; queueing spreads over many). Slices
/// in which nothing was sent are left out.
pub fn timeline(samples: &[Sample], width: Duration) -> Vec<Slice> {
    let width_ns = (width.as_nanos() as u64).max(1);
    let mut by_slice: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for s in samples {
        by_slice
            .entry(s.sent_ns / width_ns)
            .or_default()
            .push(s.latency_ns);
    }
    by_slice
        .into_iter()
        .map(|(i, ns)| {
            let l = Latencies::new(ns);
            Slice {
                from_ms: i * width_ns / 1_000_000,
                delivered: l.0.len() as u64,
                p50_ms: l.ms(0.5),
                p99_ms: l.ms(0.99),
                max_ms: l.ms(1.0),
            }
        })
        .collect()
}

/// Latencies in nanoseconds, sorted.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn new(mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        Self(ns)
    }

    /// The `p` quantile (0..=1) in milliseconds; 0 without samples.
    pub fn ms(&self, p: f64) -> f64 {
        let Some(last) = self.0.len().checked_sub(1) else {
            return 0.0;
        };
        let i = ((last as f64) * p).round() as usize;
        self.0[i.min(last)] as f64 / 1e6
    }
}

/// `[seq][sent_nanos]` then zeros, `PAYLOAD` bytes.
pub fn payload(seq: u64, sent_nanos: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&sent_nanos.to_be_bytes());
    p
}

/// The send time inside a payload (0 for a short one).
pub fn sent_nanos(body: &[u8]) -> u64 {
    body.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or_default()
}

/// Six hex digits, fresh per run, that make the user names of a run unique (the peers keep
/// their accounts between runs).
pub fn run_tag() -> String {
    let mut tag = [0u8; 3];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut tag);
    hex::encode(tag)
}

/// Runs the flows for `config.duration` and waits for the tail to drain.
pub async fn run<O: Outbox, I: Inbox>(
    flows: Vec<Flow<O, I>>,
    config: LoadConfig,
) -> Result<LoadResult> {
    let origin = Instant::now();
    let began = std::time::SystemTime::now();
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let total_fanout: usize = flows.iter().map(|f| f.inboxes.len()).sum();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for flow in flows {
        let fanout = flow.inboxes.len().max(1);
        let window = Arc::new(Semaphore::new(config.window.max(1) * fanout));
        let flow_sent = Arc::new(AtomicU64::new(0));
        let flow_done = Arc::new(AtomicBool::new(false));
        // Each sender sends its share of the total rate, counted in deliveries.
        let max_batch = config.batch.max(1);
        let interval = config
            .rate
            .map(|r| Duration::from_secs_f64(total_fanout as f64 / r.max(0.001)));
        let mut outbox = flow.outbox;
        let (stop_s, window_s, sent_s, done_s) = (
            stop.clone(),
            window.clone(),
            flow_sent.clone(),
            flow_done.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut next_at = tokio::time::Instant::now();
            let permits = u32::try_from(fanout).unwrap_or(u32::MAX);
            while !stop_s.load(Relaxed) {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next_at).await;
                    next_at += interval;
                } else {
                    match tokio::time::timeout(
                        Duration::from_millis(50),
                        window_s.acquire_many(permits),
                    )
                    .await
                    {
                        Ok(Ok(p)) => p.forget(),
                        Ok(Err(_)) => break,
                        Err(_) => continue,
                    }
                }
                // One message, and every further one already allowed (by the window, or due
                // by the rate); they leave in one write, as a pipelining client sends them.
                let mut batch = 0;
                loop {
                    seq += 1;
                    outbox
                        .send(payload(seq, origin.elapsed().as_nanos() as u64))
                        .await?;
                    sent_s.fetch_add(1, Relaxed);
                    batch += 1;
                    if batch >= max_batch {
                        break;
                    }
                    if let Some(interval) = interval {
                        if next_at > tokio::time::Instant::now() {
                            break;
                        }
                        next_at += interval;
                    } else {
                        match window_s.try_acquire_many(permits) {
                            Ok(p) => p.forget(),
                            Err(_) => break,
                        }
                    }
                }
                outbox.flush().await?;
            }
            let confirmed = outbox.finish().await?;
            done_s.store(true, Relaxed);
            anyhow::Ok(confirmed)
        }));
        for mut inbox in flow.inboxes {
            let (stop_r, window_r, sent_r, done_r, delivered_r) = (
                stop.clone(),
                window.clone(),
                flow_sent.clone(),
                flow_done.clone(),
                delivered.clone(),
            );
            receivers.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut received = 0u64;
                let mut idle_after_stop = 0;
                loop {
                    if done_r.load(Relaxed) && received >= sent_r.load(Relaxed) {
                        break;
                    }
                    match inbox.recv(Duration::from_millis(500)).await? {
                        Some(body) => {
                            let now = origin.elapsed().as_nanos() as u64;
                            let sent_ns = sent_nanos(&body);
                            samples.push(Sample {
                                sent_ns,
                                latency_ns: now.saturating_sub(sent_ns),
                            });
                            received += 1;
                            delivered_r.fetch_add(1, Relaxed);
                            window_r.add_permits(1);
                        }
                        None if stop_r.load(Relaxed) => {
                            idle_after_stop += 1;
                            // 10 s of silence after the end: what is missing is lost.
                            if idle_after_stop > 20 {
                                break;
                            }
                        }
                        None => {}
                    }
                }
                anyhow::Ok(samples)
            }));
        }
    }
    let bar = chatctl::progress::spinner("measuring".into());
    let cpu = super::cpu::CpuMeter::start(config.server_pid);
    let delivered_before = delivered.load(Relaxed);
    let start = Instant::now();
    while start.elapsed() < config.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_message(format!(
            "{:.0}s: {} delivered",
            start.elapsed().as_secs_f64(),
            delivered.load(Relaxed)
        ));
    }
    stop.store(true, Relaxed);
    let elapsed = start.elapsed();
    let delivered_in_window = delivered.load(Relaxed) - delivered_before;
    let cpu = cpu.map(super::cpu::CpuMeter::stop);
    bar.set_message("draining");
    let mut sent = 0;
    for s in senders {
        sent += s.await.context("a sender panicked")??;
    }
    let mut samples = Vec::new();
    for r in receivers {
        samples.extend(r.await.context("a receiver panicked")??);
    }
    bar.finish_and_clear();
    Ok(LoadResult {
        began: Some(began),
        elapsed,
        sent,
        delivered: delivered.load(Relaxed),
        latencies: Latencies::new(samples.iter().map(|s| s.latency_ns).collect()),
        samples,
        cpu,
        delivered_in_window,
    })
}

/// What opening many connections measured.
#[derive(Debug, Default)]
pub struct OpenResult {
    pub attempted: u64,
    pub opened: u64,
    pub elapsed: Duration,
    /// Time to open one connection (handshakes and login).
    pub latencies: Latencies,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
}

/// Opens `count` connections with `open` (64 at a time), keeps them all open, and reads the
/// RSS of `server_pid` before and after (after a 2 s settle).
pub async fn idle<T, F, Fut>(count: usize, server_pid: Option<u32>, open: F) -> Result<OpenResult>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    check_fd_limit(count)?;
    let rss_before = server_pid.map(rss_bytes).transpose()?;
    let bar = chatctl::progress::spinner(format!("opening {count} connections"));
    let start = Instant::now();
    let mut held = Vec::with_capacity(count);
    let mut latencies = Vec::with_capacity(count);
    let mut opening = futures_util::stream::iter(0..count)
        .map(|i| {
            let fut = open(i);
            async move {
                let t = Instant::now();
                fut.await.map(|c| (c, t.elapsed()))
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY);
    let mut first_error = None;
    while let Some(result) = opening.next().await {
        match result {
            Ok((conn, took)) => {
                held.push(conn);
                latencies.push(took.as_nanos() as u64);
                if held.len() % 500 == 0 {
                    bar.set_message(format!("{} of {count} connections open", held.len()));
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    drop(opening);
    let elapsed = start.elapsed();
    if let Some(e) = first_error {
        if held.is_empty() {
            return Err(e.context("no connection could be opened"));
        }
        eprintln!(
            "chatctl: warning: {} of {count} connections failed, the first: {e:#}",
            count - held.len()
        );
    }
    bar.set_message(format!("{} connections open, settling", held.len()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = server_pid.map(rss_bytes).transpose()?;
    bar.finish_and_clear();
    let opened = held.len() as u64;
    drop(held);
    Ok(OpenResult {
        attempted: count as u64,
        opened,
        elapsed,
        latencies: Latencies::new(latencies),
        rss_before,
        rss_after,
    })
}

/// Opens and drops connections with `concurrency` workers for `duration`. An attempt still
/// under way when `duration` is up is cut and not counted, so one that hangs (ejabberd now and
/// then leaves a new WebSocket unanswered) costs the run that worker, not 15 s more of elapsed
/// time; one that had waited over a second is reported.
pub async fn connect<T, F, Fut>(
    duration: Duration,
    concurrency: usize,
    open: F,
) -> Result<OpenResult>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let bar = chatctl::progress::spinner("connecting".into());
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + duration);
    let attempted = AtomicU64::new(0);
    let hung = AtomicU64::new(0);
    let open = &open;
    let (attempted_ref, hung_ref) = (&attempted, &hung);
    let workers = (0..concurrency.max(1)).map(|w| async move {
        let mut latencies = Vec::new();
        let mut first_error = None;
        let mut i = w;
        while start.elapsed() < duration {
            let t = Instant::now();
            let Ok(outcome) = tokio::time::timeout_at(deadline, open(i)).await else {
                // Cut by the end of the run; one this old is a connection the server left hanging.
                if t.elapsed() > Duration::from_secs(1) {
                    hung_ref.fetch_add(1, Relaxed);
                }
                break;
            };
            attempted_ref.fetch_add(1, Relaxed);
            match outcome {
                Ok(conn) => {
                    latencies.push(t.elapsed().as_nanos() as u64);
                    drop(conn);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            i += concurrency;
        }
        (latencies, first_error)
    });
    let results = futures_util::future::join_all(workers).await;
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut latencies = Vec::new();
    for (l, e) in results {
        latencies.extend(l);
        if let Some(e) = e {
            eprintln!("chatctl: warning: a connection failed: {e:#}");
        }
    }
    let hung = hung.load(Relaxed);
    if hung > 0 {
        eprintln!(
            "chatctl: warning: {hung} connection attempt(s) unanswered for over 1 s at the end of \
             the run, not counted"
        );
    }
    Ok(OpenResult {
        attempted: attempted.load(Relaxed),
        opened: latencies.len() as u64,
        elapsed,
        latencies: Latencies::new(latencies),
        rss_before: None,
        rss_after: None,
    })
}

/// Resident set size of a process, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: is --server-pid {pid} running here?"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("{path} has no VmRSS line"))?;
    Ok(kib * 1024)
}

/// The 1-minute load average (the machine is shared: every figure carries it).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Refuses to start when this process may not hold `count` sockets (`ulimit -n`).
fn check_fd_limit(count: usize) -> Result<()> {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return Ok(());
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft {
        if soft < count + 64 {
            bail!(
                "{count} connections need more file descriptors than this process may open ({soft}): \
                 raise it with `ulimit -n {}` (cargo xtask bench-peers does)",
                count + 1024
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_nearest_rank_in_milliseconds() {
        let l = Latencies::new((1..=100).rev().map(|ms| ms * 1_000_000).collect());
        assert_eq!(l.ms(0.5), 51.0);
        assert_eq!(l.ms(0.99), 99.0);
        assert_eq!(l.ms(1.0), 100.0);
        assert_eq!(Latencies::default().ms(0.5), 0.0);
    }

    #[test]
    fn the_timeline_places_each_delivery_by_its_send_time() {
        let ms = |sent: u64, took: u64| Sample {
            sent_ns: sent * 1_000_000,
            latency_ns: took * 1_000_000,
        };
        // A stall at 250-300 ms: what was sent then took long, whenever it arrived.
        let mut samples: Vec<Sample> = (0..100).map(|i| ms(i, 1)).collect();
        samples.extend((250..300).map(|i| ms(i, 80)));
        samples.push(ms(299, 120));
        samples.reverse();
        let t = timeline(&samples, Duration::from_millis(100));
        assert_eq!(t.len(), 2, "no slice for the quiet 100-250 ms: {t:?}");
        assert_eq!(
            t[0],
            Slice {
                from_ms: 0,
                delivered: 100,
                p50_ms: 1.0,
                p99_ms: 1.0,
                max_ms: 1.0
            }
        );
        assert_eq!((t[1].from_ms, t[1].delivered), (200, 51));
        assert_eq!((t[1].p50_ms, t[1].max_ms), (80.0, 120.0));
        assert!(timeline(&[], Duration::from_millis(100)).is_empty());
    }

    #[test]
    fn payload_carries_its_send_time() {
        let p = payload(7, 123_456);
        assert_eq!(p.len(), PAYLOAD);
        assert_eq!(sent_nanos(&p), 123_456);
        assert_eq!(sent_nanos(&[1, 2]), 0);
    }

    /// An in-memory flow that records how many messages each flush wrote.
    struct MemOutbox {
        queued: Vec<Vec<u8>>,
        tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
        flushes: Arc<std::sync::Mutex<Vec<usize>>>,
        sent: u64,
    }

    struct MemInbox(tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>);

    impl Outbox for MemOutbox {
        async fn send(&mut self, body: Vec<u8>) -> Result<()> {
            self.queued.push(body);
            Ok(())
        }

        async fn flush(&mut self) -> Result<()> {
            self.flushes
                .lock()
                .expect("flush log")
                .push(self.queued.len());
            for body in self.queued.drain(..) {
                self.tx.send(body)?;
                self.sent += 1;
            }
            Ok(())
        }

        async fn finish(&mut self) -> Result<u64> {
            assert!(self.queued.is_empty(), "finish before the last flush");
            Ok(self.sent)
        }
    }

    impl Inbox for MemInbox {
        async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
            Ok(tokio::time::timeout(timeout, self.0.recv())
                .await
                .ok()
                .flatten())
        }
    }

    /// Runs one in-memory flow; returns the result and the size of every write.
    async fn mem_run(rate: Option<f64>, batch: usize) -> (LoadResult, Vec<usize>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let flushes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let flow = Flow {
            outbox: MemOutbox {
                queued: Vec::new(),
                tx,
                flushes: flushes.clone(),
                sent: 0,
            },
            inboxes: vec![MemInbox(rx)],
        };
        let config = LoadConfig {
            duration: Duration::from_millis(300),
            rate,
            window: 16,
            batch,
            server_pid: None,
        };
        let result = run(vec![flow], config).await.expect("run");
        let sizes = flushes.lock().expect("flush log").clone();
        (result, sizes)
    }

    #[tokio::test]
    async fn senders_write_what_the_window_allows_in_one_go_up_to_the_batch() {
        let (r, sizes) = mem_run(None, 16).await;
        assert_eq!(r.sent, r.delivered);
        assert_eq!(sizes.iter().sum::<usize>() as u64, r.sent);
        // The CPU figures cover the window only: what was delivered in it, not the drain.
        assert!(r.cpu.is_some(), "no CPU figures on Linux");
        assert!(
            r.delivered_in_window > 0 && r.delivered_in_window <= r.delivered,
            "{} in the window of {}",
            r.delivered_in_window,
            r.delivered
        );
        // The window starts with 16 free places: the first write carries all of them.
        assert_eq!(sizes.first(), Some(&16), "{sizes:?}");
        assert!(sizes.iter().all(|&n| (1..=16).contains(&n)), "{sizes:?}");

        let (r, sizes) = mem_run(None, 1).await;
        assert_eq!(r.sent, r.delivered);
        assert!(r.sent > 16);
        assert!(sizes.iter().all(|&n| n == 1), "--batch 1 wrote {sizes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_rate_writes_every_message_due_together() {
        // 100 000/s against tokio's 1 ms timer: about a hundred are due at each wake-up, and
        // a write carries at most `batch` of them.
        let (r, sizes) = mem_run(Some(100_000.0), 8).await;
        assert_eq!(r.sent, r.delivered);
        assert!(sizes.iter().all(|&n| (1..=8).contains(&n)), "{sizes:?}");
        assert!(sizes.contains(&8), "{sizes:?}");
        // At 100/s one message is due at a time.
        let (_, sizes) = mem_run(Some(100.0), 8).await;
        assert!(
            !sizes.is_empty() && sizes.iter().all(|&n| n == 1),
            "{sizes:?}"
        );
    }

    #[tokio::test]
    async fn connect_abandons_an_attempt_that_hangs_past_the_duration() {
        // Worker 0's second attempt never answers, as ejabberd sometimes does; worker 1 keeps
        // opening. The run must end at its duration, counting only finished attempts.
        let run = connect(Duration::from_millis(300), 2, |i| async move {
            if i == 2 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            anyhow::Ok(())
        });
        let r = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("connect waited for the hung attempt")
            .expect("connect");
        assert!(r.opened > 2, "worker 1 kept opening: {}", r.opened);
        assert_eq!(r.attempted, r.opened, "the hung attempt is not counted");
        assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    }
}
