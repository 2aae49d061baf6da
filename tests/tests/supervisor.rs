//! The supervisor against the real Docker engine, counting every message id end to end.
//!
//! Each test starts a project with `chatctl up --detach` (which starts the detached supervisor
//! with the `[autoscale]` policy of the test's `chatctl.toml`), runs steady traffic through the
//! gateway with native clients that reconnect (full-jitter backoff) and resend what was not
//! acknowledged under the same message id, breaks something (`docker kill`, `docker pause`, a
//! stopped server process whose health check fails, load from `chatctl bench`), and checks
//! that the supervisor and the gateway put it right and that every acknowledged message was
//! delivered, none stored twice. Without a Docker engine these tests fail; they never skip.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use chat_core::wire::{ClientFrame, Envelope, MessageId, ServerFrame};
use chat_tests::docker::{free_port, musl_server, require_docker};
use chat_tests::{Keys, binaries, workspace_root};
use chatctl::client::reconnect::{Backoff, is_transient};
use chatctl::client::{Client, ClientOptions, DEVICE_ID};
use chatctl::runtime::ContainerStatus;
use chatctl::supervisor::status::SupervisorStatus;
use rand_core::{OsRng, RngCore};

fn docker(args: &[&str]) -> Output {
    let out = Command::new("docker").args(args).output().expect("docker");
    eprintln!(
        "$ docker {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A project under test with its supervisor; `down --volumes` when dropped.
struct Project {
    name: String,
    keys: Keys,
    work: tempfile::TempDir,
    port: u16,
}

/// The Docker tests run one at a time (their time limits assume a machine not shared with a
/// second cluster of this suite), whatever `--test-threads` says.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static DOCKER: Mutex<()> = Mutex::new(());
    DOCKER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Project {
    fn new(tag: &str, autoscale: &str) -> Self {
        require_docker("supervisor");
        let work = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            work.path().join("chatctl.toml"),
            format!("[autoscale]\n{autoscale}\n"),
        )
        .expect("chatctl.toml");
        Self {
            name: format!("sv-{tag}-{}", std::process::id()),
            keys: Keys::new().expect("keys"),
            work,
            port: free_port(),
        }
    }

    fn chatctl(&self, args: &[&str]) -> Output {
        Command::new(&binaries().chatctl)
            .current_dir(self.work.path())
            .env("NO_COLOR", "1")
            .env_remove("CHATCTL_PROJECT")
            .args(args)
            .args(["--project", &self.name])
            .output()
            .expect("cannot run chatctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.chatctl(args);
        assert!(
            out.status.success(),
            "chatctl {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn up(&self, replicas: u32) {
        let server = musl_server().display().to_string();
        let keys = self.keys.path().display().to_string();
        let out = self.chatctl(&[
            "up",
            "--detach",
            "--runtime",
            "docker",
            "--replicas",
            &replicas.to_string(),
            "--port",
            &self.port.to_string(),
            "--keys",
            &keys,
            "--server-binary",
            &server,
        ]);
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "chatctl up failed");
    }

    fn ps(&self) -> Vec<ContainerStatus> {
        ContainerStatus::parse_list(&self.ok(&["ps", "--json"])).expect("ps --json")
    }

    fn status(&self) -> Option<SupervisorStatus> {
        SupervisorStatus::read(&self.work.path().join(".chatctl/supervisor"), &self.name).ok()
    }

    fn server(&self, instance: u32) -> String {
        format!("{}-server-{instance}", self.name)
    }

    fn servers(&self) -> Vec<ContainerStatus> {
        self.ps()
            .into_iter()
            .filter(|c| c.service.as_str() == "server")
            .collect()
    }

    fn options(&self, home: &Path) -> ClientOptions {
        ClientOptions {
            server: format!("https://localhost:{}", self.port),
            ca: self.keys.path().join("tls/ca.pem"),
            home: home.to_owned(),
            directory_key: self.keys.path().join("directory.pub"),
        }
    }

    /// Waits until `check` holds, polling; returns how long it took.
    fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&Self) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if check(self) {
                return started.elapsed();
            }
            if started.elapsed() > limit {
                self.dump();
                panic!("{what}: not within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn dump(&self) {
        if let Some(s) = self.status() {
            eprintln!("{}", s.render(chatctl::client::unix_now()));
        }
        let log = self
            .work
            .path()
            .join(format!(".chatctl/supervisor/{}.log", self.name));
        eprintln!(
            "supervisor log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// Upstreams the gateway has probed ready (it resolves and probes every second).
    fn gateway_ready_upstreams(&self, rt: &tokio::runtime::Runtime) -> usize {
        let Ok(tls) =
            chatctl::supervisor::observe::tls_connector(&self.keys.path().join("tls/ca.pem"))
        else {
            return 0;
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        rt.block_on(chatctl::supervisor::observe::https_get(
            &tls,
            addr,
            "/gateway/metrics",
        ))
        .map(|text| {
            chatctl::supervisor::observe::parse_gateway_metrics(&text)
                .values()
                .filter(|u| u.ready)
                .count()
        })
        .unwrap_or(0)
    }

    fn events(&self) -> Vec<String> {
        self.status()
            .map(|s| {
                s.events
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {} {}",
                            e.kind,
                            e.container.clone().unwrap_or_default(),
                            e.message
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = self.chatctl(&["down", "--volumes"]);
    }
}

fn ready(c: &ContainerStatus) -> bool {
    c.is_running() && c.health.as_str() == "healthy"
}

/// What the traffic saw; every id is a client-generated message id.
#[derive(Debug, Default)]
struct Ledger {
    /// Acknowledged by the server (durably stored), with the send time (ns since origin).
    acked: HashMap<MessageId, u64>,
    /// Every delivery: id -> the mailbox sequences it came with.
    delivered: HashMap<MessageId, Vec<u64>>,
    /// Send-to-first-delivery latencies (ns).
    latencies: Vec<u64>,
    reconnects: u64,
    /// Reconnects after the server closed with 4001 (a drain or a shutdown).
    reconnect_code: u64,
    attempts: u64,
}

/// The outcome the tests assert on and the soak reports.
#[derive(Debug)]
struct Tally {
    sent: usize,
    delivered: usize,
    lost: usize,
    /// Ids stored twice (delivered under two different sequences).
    duplicates: usize,
    /// Deliveries of an id already delivered under the same sequence (at-least-once
    /// redelivery after a reconnect; the client shows them once).
    redelivered: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    reconnects: u64,
    reconnect_code: u64,
}

/// Steady traffic: `pairs` senders sending raw envelopes at a fixed pace to their receivers,
/// through the gateway; both sides reconnect on any transient failure.
struct Traffic {
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    senders: Vec<tokio::task::JoinHandle<Result<()>>>,
    receivers: Vec<tokio::task::JoinHandle<Result<()>>>,
    _home: tempfile::TempDir,
}

const ACK_TIMEOUT: Duration = Duration::from_secs(4);
const IDLE_PING: Duration = Duration::from_secs(3);
/// How long a stopped sender may go on retrying its last message before it is aborted.
const SENDER_STOP: Duration = Duration::from_secs(20);

fn backoff() -> Backoff {
    Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(2),
        max_attempts: 60,
    }
}

impl Traffic {
    async fn start(project: &Project, pairs: usize, per_sender_rate: f64) -> Result<Self> {
        let home = tempfile::tempdir()?;
        let opts = project.options(home.path());
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let origin = Instant::now();
        let mut tag = [0u8; 3];
        OsRng.fill_bytes(&mut tag);
        let tag = hex::encode(tag);
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for i in 0..pairs {
            let s_name = format!("s{tag}{i}");
            let r_name = format!("r{tag}{i}");
            let sender = Client::register(&opts, &s_name).await?;
            let receiver = Client::register(&opts, &r_name).await?;
            senders.push(tokio::spawn(send_loop(
                sender,
                r_name,
                per_sender_rate,
                origin,
                ledger.clone(),
                stop.clone(),
            )));
            receivers.push(tokio::spawn(receive_loop(
                receiver,
                origin,
                ledger.clone(),
                stop.clone(),
            )));
        }
        Ok(Self {
            ledger,
            stop,
            senders,
            receivers,
            _home: home,
        })
    }

    fn acked(&self) -> usize {
        self.ledger.lock().map(|l| l.acked.len()).unwrap_or(0)
    }

    /// Stops sending, waits until every acknowledged message was delivered (or `settle`
    /// passes), stops the receivers and counts.
    ///
    /// The senders are finished first, so the set of acknowledged ids is final before the
    /// wait: a sender finishes the message it has in flight after `stop`, and an ack that
    /// landed after the wait (with its receiver already stopped) would be counted as lost.
    async fn finish(self, settle: Duration) -> Result<Tally> {
        self.stop.store(true, Relaxed);
        for mut sender in self.senders {
            let ended = match tokio::time::timeout(SENDER_STOP, &mut sender).await {
                Ok(ended) => ended,
                // Still retrying its last message, never acknowledged: it does not count.
                Err(_) => {
                    sender.abort();
                    sender.await
                }
            };
            match ended {
                Ok(Err(e)) => bail!("a traffic sender failed: {e:#}"),
                Err(e) if e.is_panic() => bail!("a traffic sender panicked"),
                _ => {}
            }
        }
        let deadline = Instant::now() + settle;
        loop {
            let missing = {
                let l = self.ledger.lock().map_err(|_| anyhow!("ledger poisoned"))?;
                l.acked
                    .keys()
                    .filter(|id| !l.delivered.contains_key(*id))
                    .count()
            };
            if missing == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for t in self.receivers {
            t.abort();
            match t.await {
                Ok(Err(e)) => bail!("a traffic receiver failed: {e:#}"),
                Err(e) if e.is_panic() => bail!("a traffic receiver panicked"),
                _ => {}
            }
        }
        let l = self.ledger.lock().map_err(|_| anyhow!("ledger poisoned"))?;
        let mut latencies = l.latencies.clone();
        latencies.sort_unstable();
        let pct = |p: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
            latencies[i.min(latencies.len() - 1)] as f64 / 1e6
        };
        let duplicates = l
            .delivered
            .values()
            .filter(|seqs| seqs.iter().collect::<HashSet<_>>().len() > 1)
            .count();
        let redelivered = l
            .delivered
            .values()
            .map(|seqs| seqs.len() - seqs.iter().collect::<HashSet<_>>().len())
            .sum();
        Ok(Tally {
            sent: l.acked.len(),
            delivered: l
                .acked
                .keys()
                .filter(|id| l.delivered.contains_key(*id))
                .count(),
            lost: l
                .acked
                .keys()
                .filter(|id| !l.delivered.contains_key(*id))
                .count(),
            duplicates,
            redelivered,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            reconnects: l.reconnects,
            reconnect_code: l.reconnect_code,
        })
    }
}

async fn reconnect(client: &mut Client, ledger: &Mutex<Ledger>, why: &anyhow::Error) -> Result<()> {
    if !is_transient(why) {
        bail!("{} failed for good: {why:#}", client.name);
    }
    let code = why
        .downcast_ref::<chatctl::client::conn::Closed>()
        .and_then(|c| c.code)
        .is_some_and(|c| c == chat_core::wire::CloseCode::Reconnect);
    let attempts = client.reconnect(&backoff()).await?;
    if let Ok(mut l) = ledger.lock() {
        l.reconnects += 1;
        l.reconnect_code += u64::from(code);
        l.attempts += u64::from(attempts);
    }
    Ok(())
}

/// Sends one message at a time and waits for its acknowledgement; after a failure, reconnects
/// and sends the same message id again (the server stores it once).
async fn send_loop(
    mut client: Client,
    to: String,
    rate: f64,
    origin: Instant,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut next = tokio::time::Instant::now();
    let mut counter = 0u64;
    while !stop.load(Relaxed) {
        tokio::time::sleep_until(next).await;
        next += interval;
        counter += 1;
        let mut message_id = [0u8; 16];
        OsRng.fill_bytes(&mut message_id);
        let sent_nanos = origin.elapsed().as_nanos() as u64;
        let mut body = vec![0u8; 64];
        body[..8].copy_from_slice(&counter.to_be_bytes());
        body[8..16].copy_from_slice(&sent_nanos.to_be_bytes());
        let frame = ClientFrame::Send {
            message_id,
            to_user: to.clone(),
            to_device: DEVICE_ID,
            envelope: Envelope::RatchetMessage { message: body }.encode(),
        };
        loop {
            let attempt = async {
                client.conn.send(&frame).await?;
                let deadline = Instant::now() + ACK_TIMEOUT;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match client.conn.next_frame(left).await? {
                        ServerFrame::SendAck { message_id: m, .. } if m == message_id => {
                            return anyhow::Ok(());
                        }
                        ServerFrame::Error { code, message, .. } => {
                            bail!("server error {code}: {message}")
                        }
                        _ => {}
                    }
                }
            };
            match attempt.await {
                Ok(()) => {
                    if let Ok(mut l) = ledger.lock() {
                        l.acked.insert(message_id, sent_nanos);
                    }
                    break;
                }
                Err(e) => reconnect(&mut client, &ledger, &e).await?,
            }
        }
    }
    Ok(())
}

/// Receives, records and acknowledges every delivery; pings when idle so a hung connection is
/// noticed; reconnects on any transient failure (delivery resumes after the last ack).
async fn receive_loop(
    mut client: Client,
    origin: Instant,
    ledger: Arc<Mutex<Ledger>>,
    _stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut awaiting_pong = false;
    loop {
        let result = async {
            match client.conn.next_frame(IDLE_PING).await {
                Ok(ServerFrame::Deliver {
                    seq,
                    message_id,
                    envelope,
                    ..
                }) => {
                    awaiting_pong = false;
                    let now = origin.elapsed().as_nanos() as u64;
                    if let Ok(mut l) = ledger.lock() {
                        let seqs = l.delivered.entry(message_id).or_default();
                        let first = seqs.is_empty();
                        seqs.push(seq);
                        if first {
                            if let Ok(Envelope::RatchetMessage { message }) =
                                Envelope::decode(&envelope)
                            {
                                let sent = message
                                    .get(8..16)
                                    .and_then(|b| b.try_into().ok())
                                    .map(u64::from_be_bytes)
                                    .unwrap_or(now);
                                l.latencies.push(now.saturating_sub(sent));
                            }
                        }
                    }
                    client
                        .conn
                        .send(&ClientFrame::Ack { up_to_seq: seq })
                        .await?;
                    anyhow::Ok(())
                }
                Ok(_) => {
                    awaiting_pong = false;
                    Ok(())
                }
                Err(e) if e.to_string().starts_with("no answer") => {
                    if awaiting_pong {
                        bail!("no answer to a ping within {IDLE_PING:?}: connection hung");
                    }
                    let id = client.conn.request_id();
                    client
                        .conn
                        .send(&ClientFrame::GetTreeHead {
                            request_id: id,
                            known_size: None,
                        })
                        .await?;
                    awaiting_pong = true;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        .await;
        if let Err(e) = result {
            awaiting_pong = false;
            reconnect(&mut client, &ledger, &e).await?;
        }
    }
}

fn assert_nothing_lost(tally: &Tally) {
    eprintln!("{tally:?}");
    assert!(tally.sent > 0, "no traffic was acknowledged");
    assert_eq!(tally.lost, 0, "acknowledged messages were lost: {tally:?}");
    assert_eq!(tally.duplicates, 0, "messages were stored twice: {tally:?}");
    assert_eq!(tally.delivered, tally.sent);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Heal-only policy: autoscaling off, a test-short tick.
const HEAL_ONLY: &str = "enabled = false\ninterval_secs = 1\nejected_replace_secs = 15\n";

#[test]
fn a_killed_server_is_replaced_and_healthy_within_10s_with_nothing_lost() {
    let _serial = serial();
    let project = Project::new("kill", HEAL_ONLY);
    project.up(2);
    let rt = runtime();
    let traffic = rt
        .block_on(Traffic::start(&project, 2, 20.0))
        .expect("traffic");
    std::thread::sleep(Duration::from_secs(3));
    let victim = project.server(1);
    assert!(docker(&["kill", &victim]).status.success());
    let killed = Instant::now();
    project.wait_until(
        "the killed server is running and healthy again",
        Duration::from_secs(10),
        |p| p.servers().iter().any(|c| c.name == victim && ready(c)),
    );
    let took = killed.elapsed();
    eprintln!("server-1 healthy again {took:?} after docker kill");
    assert!(
        project
            .events()
            .iter()
            .any(|e| e.starts_with("heal") && e.contains(&victim)),
        "the supervisor logged no heal of {victim}: {:?}",
        project.events()
    );
    std::thread::sleep(Duration::from_secs(3));
    let table = project.ok(&["status"]);
    assert!(table.contains(&victim) && table.contains("heal"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&project.ok(&["status", "--json"])).expect("status --json");
    assert_eq!(
        json["instances"].as_array().map(Vec::len),
        Some(4),
        "{json}"
    );
    assert!(project.ok(&["top", "--count", "1"]).contains("NAME"));
    let tally = rt
        .block_on(traffic.finish(Duration::from_secs(15)))
        .expect("tally");
    assert_nothing_lost(&tally);
}

#[test]
fn a_paused_server_is_ejected_within_5s_its_clients_move_and_it_is_restored_after_unpause() {
    let _serial = serial();
    let project = Project::new("pause", HEAL_ONLY);
    project.up(2);
    let rt = runtime();
    let traffic = rt
        .block_on(Traffic::start(&project, 2, 20.0))
        .expect("traffic");
    std::thread::sleep(Duration::from_secs(3));
    let victim = project.server(1);
    assert!(docker(&["pause", &victim]).status.success());
    let took = project.wait_until(
        "the gateway ejects the paused server",
        Duration::from_secs(5),
        |p| {
            p.status().is_some_and(|s| {
                s.instances
                    .iter()
                    .any(|i| i.name == victim && i.breaker.as_deref() == Some("open"))
            })
        },
    );
    eprintln!("ejected {took:?} after docker pause");
    let acked_at_pause = traffic.acked();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        traffic.acked() > acked_at_pause + 20,
        "traffic did not go on through the other server while {victim} was paused"
    );
    assert!(docker(&["unpause", &victim]).status.success());
    project.wait_until(
        "the unpaused server is routed again (restored) or replaced",
        Duration::from_secs(40),
        |p| {
            p.status().is_some_and(|s| {
                s.instances.iter().any(|i| {
                    i.name == victim
                        && i.routed == Some(true)
                        && i.breaker.as_deref() == Some("closed")
                })
            })
        },
    );
    let tally = rt
        .block_on(traffic.finish(Duration::from_secs(15)))
        .expect("tally");
    assert_nothing_lost(&tally);
}

#[test]
fn a_server_whose_health_check_fails_is_restarted() {
    // Ejection alone does not replace it here: only the failing health check can.
    let _serial = serial();
    let project = Project::new(
        "health",
        "enabled = false\ninterval_secs = 1\nejected_replace_secs = 600\n",
    );
    project.up(2);
    let rt = runtime();
    let traffic = rt
        .block_on(Traffic::start(&project, 2, 10.0))
        .expect("traffic");
    let victim = project.server(2);
    // The server process stops (SIGSTOP): the container runs on, its health check times out.
    assert!(
        docker(&["kill", "--signal", "STOP", &victim])
            .status
            .success()
    );
    project.wait_until("the health check fails", Duration::from_secs(30), |p| {
        p.servers()
            .iter()
            .any(|c| c.name == victim && c.health.as_str() == "unhealthy")
            || p.events()
                .iter()
                .any(|e| e.starts_with("heal") && e.contains(&victim))
    });
    project.wait_until(
        "the unhealthy server is restarted",
        Duration::from_secs(20),
        |p| {
            p.events()
                .iter()
                .any(|e| e.starts_with("heal") && e.contains(&victim) && e.contains("unhealthy"))
        },
    );
    project.wait_until(
        "the restarted server is healthy",
        Duration::from_secs(20),
        |p| p.servers().iter().any(|c| c.name == victim && ready(c)),
    );
    let tally = rt
        .block_on(traffic.finish(Duration::from_secs(15)))
        .expect("tally");
    assert_nothing_lost(&tally);
}

#[test]
fn load_above_target_scales_up_within_15s_and_back_down_to_min_draining_with_nothing_lost() {
    let _serial = serial();
    let project = Project::new(
        "scale",
        "enabled = true\nmin_replicas = 2\nmax_replicas = 4\ntarget_connections = 3\n\
         target_cpu_percent = 0\nstabilization_secs = 8\ninterval_secs = 1\n\
         drain_deadline_secs = 20\nhost_memory_reserve_mib = 0\nhost_cpu_ceiling_percent = 101\n",
    );
    project.up(2);
    let rt = runtime();
    // 4 connections on 2 servers: below the target, at the minimum.
    let traffic = rt
        .block_on(Traffic::start(&project, 2, 10.0))
        .expect("traffic");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(project.servers().len(), 2, "{:?}", project.events());
    let keys = project.keys.path().to_owned();
    let url = format!("https://localhost:{}", project.port);
    let bench_started = Instant::now();
    let bench = Command::new(&binaries().chatctl)
        .current_dir(project.work.path())
        .env("NO_COLOR", "1")
        .args(["bench", "--raw", "--server", &url, "--ca"])
        .arg(keys.join("tls/ca.pem"))
        .arg("--directory-key")
        .arg(keys.join("directory.pub"))
        .args([
            "--duration",
            "20s",
            "pairs",
            "--pairs",
            "4",
            "--rate",
            "100",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chatctl bench");
    // Measured from the start of the bench (its registrations included), so it is an upper
    // bound of the time from the load being there to a third server.
    project.wait_until("scale-up under bench load", Duration::from_secs(20), |p| {
        p.servers().len() >= 3
    });
    let took = bench_started.elapsed();
    assert!(took <= Duration::from_secs(15), "scale-up took {took:?}");
    eprintln!("scaled up {took:?} after the bench started");
    project.wait_until(
        "the scale-up decision in the status",
        Duration::from_secs(10),
        |p| {
            p.status()
                .is_some_and(|s| s.decisions.iter().any(|d| d.desired > d.current))
        },
    );
    let decided = project
        .status()
        .and_then(|s| s.decisions.iter().find(|d| d.desired > d.current).cloned())
        .expect("a scale-up decision");
    eprintln!("decision: {}", decided.reason);
    assert!(took <= Duration::from_secs(15), "scale-up took {took:?}");
    // Clients that arrive once the gateway routes to the new, empty servers land there: on the
    // ones a scale-down drains (the highest instances). Before the gateway has probed them
    // ready, they would land on the old servers and never be drained.
    let servers = project.servers().len();
    project.wait_until(
        "the gateway routes to every new server",
        Duration::from_secs(20),
        |p| p.gateway_ready_upstreams(&rt) >= servers,
    );
    let late = rt
        .block_on(Traffic::start(&project, 1, 10.0))
        .expect("late traffic");
    let out = bench.wait_with_output().expect("bench");
    eprintln!(
        "bench: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the bench lost messages or failed");
    let down = project.wait_until(
        "scale-down to min after the load",
        Duration::from_secs(60),
        |p| {
            p.servers().len() == 2
                && p.status()
                    .is_some_and(|s| s.instances.iter().all(|i| !i.draining))
        },
    );
    eprintln!("back to 2 servers {down:?} after the bench ended");
    let events = project.events();
    assert!(events.iter().any(|e| e.starts_with("drain")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("remove")), "{events:?}");
    std::thread::sleep(Duration::from_secs(2));
    let tally = rt
        .block_on(traffic.finish(Duration::from_secs(15)))
        .expect("tally");
    assert_nothing_lost(&tally);
    let late = rt
        .block_on(late.finish(Duration::from_secs(15)))
        .expect("tally");
    assert_nothing_lost(&late);
    assert!(
        late.reconnect_code >= 1,
        "the clients on the drained servers were not asked to reconnect (4001): {late:?}"
    );
}

#[test]
fn chaos_soak_kills_and_pauses_servers_under_load_and_loses_nothing() {
    let secs: u64 = std::env::var("CHATAPP_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let _serial = serial();
    let project = Project::new("soak", HEAL_ONLY);
    project.up(3);
    let rt = runtime();
    let traffic = rt
        .block_on(Traffic::start(&project, 4, 25.0))
        .expect("traffic");
    let started = Instant::now();
    let mut faults = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        let wait = 10 + OsRng.next_u32() as u64 % 11;
        std::thread::sleep(Duration::from_secs(wait));
        if started.elapsed() >= Duration::from_secs(secs) {
            break;
        }
        let victim = project.server(1 + OsRng.next_u32() % 3);
        if OsRng.next_u32() % 2 == 0 {
            docker(&["kill", &victim]);
            faults.push(format!("kill {victim}"));
        } else {
            docker(&["pause", &victim]);
            std::thread::sleep(Duration::from_secs(4 + OsRng.next_u32() as u64 % 5));
            docker(&["unpause", &victim]);
            faults.push(format!("pause {victim}"));
        }
    }
    let elapsed = started.elapsed();
    // Let the last fault heal before counting.
    std::thread::sleep(Duration::from_secs(5));
    let tally = rt
        .block_on(traffic.finish(Duration::from_secs(30)))
        .expect("tally");
    let report = format!(
        "{{\"duration_secs\":{:.0},\"faults\":{},\"sent\":{},\"delivered\":{},\"lost\":{},\
         \"duplicates\":{},\"redelivered\":{},\"reconnects\":{},\"reconnects_4001\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\
         \"max_ms\":{:.1}}}",
        elapsed.as_secs_f64(),
        faults.len(),
        tally.sent,
        tally.delivered,
        tally.lost,
        tally.duplicates,
        tally.redelivered,
        tally.reconnects,
        tally.reconnect_code,
        tally.p50_ms,
        tally.p99_ms,
        tally.max_ms
    );
    eprintln!("faults: {faults:?}\nSOAK {report}");
    let _ = std::fs::write(workspace_root().join("target/soak.json"), &report);
    assert!(!faults.is_empty());
    assert_nothing_lost(&tally);
}

/// No Docker here: the server's loopback-only drain closes sessions with 4001 in batches.
#[test]
fn a_gradual_drain_closes_sessions_with_4001_in_batches() {
    let world = chat_tests::World::new().expect("server");
    let rt = runtime();
    rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..6 {
            clients.push(
                world
                    .register(&format!("drain{i}"))
                    .await
                    .expect("register"),
            );
        }
        let tls = chatctl::supervisor::observe::tls_connector(&world.server.ca()).expect("tls");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], world.server.port));
        let started = Instant::now();
        chatctl::supervisor::observe::https_get(
            &tls,
            addr,
            "/admin/drain?batch=2&every_ms=400&delay_ms=0",
        )
        .await
        .expect("drain accepted from loopback");
        let ready = chatctl::supervisor::observe::https_get(&tls, addr, "/readyz").await;
        assert!(ready.is_err(), "a draining server is not ready");
        let mut closed_at = Vec::new();
        for client in &mut clients {
            // Frames queued since login (prekey status and the like) come first.
            let err = loop {
                match client.conn.next_frame(Duration::from_secs(10)).await {
                    Ok(_) => continue,
                    Err(e) => break e,
                }
            };
            let closed = err
                .downcast_ref::<chatctl::client::conn::Closed>()
                .unwrap_or_else(|| panic!("not a close: {err:#}"));
            assert_eq!(closed.code, Some(chat_core::wire::CloseCode::Reconnect));
            closed_at.push(started.elapsed());
        }
        closed_at.sort();
        eprintln!("closed at {closed_at:?}");
        // 6 sessions, 2 per batch, 400 ms apart: the last close comes at least 800 ms later.
        let first = closed_at.first().copied().unwrap_or_default();
        let last = closed_at.last().copied().unwrap_or_default();
        assert!(last - first >= Duration::from_millis(700), "{closed_at:?}");
    });
}
