//! Abuse against a real `chat-server` process: each test asserts the error the abuser gets and
//! that a well-behaved client keeps being served meanwhile, with a generous latency bound
//! (a fresh TLS connection, `Hello`, and a `Ping`/`Pong` round trip under [`BOUND`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chat_core::identity::DeviceKeys;
use chat_core::wire::{ClientFrame, ErrorCode, MAX_FRAME_BYTES, ServerFrame};
use chat_tests::{
    Keys, NatsServer, ServerProcess, World, answer, error_code, error_code_of, register_frame,
};
use chatctl::client::Client;
use chatctl::client::conn::Connection;
use tempfile::TempDir;

/// What "keeps being served" means here: generous, so that it is not a timing test.
const BOUND: Duration = Duration::from_secs(2);

/// A server started with `limits` as its `[limits]` config.
struct Abused {
    _keys: Keys,
    work: TempDir,
    server: ServerProcess,
}

impl Abused {
    fn start(limits: &str) -> Self {
        let keys = Keys::new().expect("keys");
        let work = tempfile::tempdir().expect("tmp");
        let config = work.path().join("server.toml");
        std::fs::write(&config, format!("[limits]\n{limits}\n")).expect("config");
        let config = config.to_string_lossy().into_owned();
        let server =
            ServerProcess::start_with_args(keys.path(), work.path(), &["--config", &config])
                .expect("server");
        Self {
            _keys: keys,
            work,
            server,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }

    async fn register(&self, name: &str) -> Client {
        Client::register(
            &self
                .server
                .client_options(&self.work.path().join("clients")),
            name,
        )
        .await
        .expect("register")
    }

    /// A well-behaved client's round trip: connect (TLS, WebSocket, Hello), then Ping/Pong.
    async fn probe(&self) -> Duration {
        let start = Instant::now();
        let mut conn = Connection::connect(&self.server.url(), &self.server.ca())
            .await
            .expect("a well-behaved client connects");
        conn.send(&ClientFrame::Ping { nonce: 42 })
            .await
            .expect("ping");
        let pong = conn
            .wait_for(|f| matches!(f, ServerFrame::Pong { nonce: 42 }), |_| false)
            .await
            .expect("pong");
        assert!(matches!(pong, ServerFrame::Pong { .. }));
        conn.close().await;
        start.elapsed()
    }

    async fn assert_served(&self, during: &str) {
        let took = self.probe().await;
        assert!(
            took < BOUND,
            "a well-behaved client waited {took:?} {during}"
        );
        eprintln!("probe {during}: {took:?}");
    }
}

/// A Ping/Pong round trip on an established connection.
async fn ping(conn: &mut Connection) -> Duration {
    let start = Instant::now();
    conn.send(&ClientFrame::Ping { nonce: 7 })
        .await
        .expect("ping");
    conn.wait_for(|f| matches!(f, ServerFrame::Pong { nonce: 7 }), |_| false)
        .await
        .expect("pong");
    start.elapsed()
}

/// The next `Error` frame's code, skipping pushed frames.
async fn next_error(conn: &mut Connection) -> Option<ErrorCode> {
    loop {
        match conn.next_frame(Duration::from_secs(5)).await {
            Ok(ServerFrame::Error { code, .. }) => return Some(code),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Waits until the peer closes `tcp` (read returns 0 or fails); the time it took.
fn wait_closed(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match tcp.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_that_socket_not_the_server() {
    let abused = Abused::start("");
    let mut conn = Connection::connect(&abused.server.url(), &abused.server.ca())
        .await
        .expect("connect");
    // The server may close the socket while the frame is still being written (the send then
    // fails with a reset) or right after reading its header: either way that socket is gone.
    let got = match conn.send_raw(vec![0u8; MAX_FRAME_BYTES + 1]).await {
        Err(e) => Err(format!("{e:#}")),
        Ok(()) => answer(&mut conn).await,
    };
    assert!(
        got.as_ref().is_err_and(|e| e.contains("closed")
            || e.contains("connection")
            || e.contains("reset")),
        "the oversized socket must be closed: {got:?}"
    );
    abused.assert_served("after an oversized frame").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off_after_the_header_timeout() {
    let abused = Abused::start("handshake_timeout_secs = 2");
    // A TLS client (the openssl CLI) that dribbles header lines forever.
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &abused.addr()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client (Debian package openssl) must be installed");
    let mut stdin = child.stdin.take().expect("stdin");
    let start = Instant::now();
    let _ = stdin.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n");
    let closed = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break Some(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(15) {
            break None;
        }
        let _ = stdin.write_all(b"X-Slow: 1\r\n");
        let _ = stdin.flush();
        abused.assert_served("during a slowloris").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let closed = closed.expect("the server must close a connection whose headers never end");
    eprintln!("slowloris closed after {closed:?} (header timeout 2 s)");
    assert!(
        closed >= Duration::from_secs(2) && closed < Duration::from_secs(8),
        "{closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_tls_is_closed_after_the_handshake_timeout() {
    let abused = Abused::start("handshake_timeout_secs = 2");
    let mut silent: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(abused.addr()).expect("tcp connect"))
        .collect();
    abused.assert_served("with 50 silent TCP connections").await;
    for tcp in &mut silent {
        let closed = wait_closed(tcp, Duration::from_secs(10))
            .expect("a silent connection must be closed after the handshake timeout");
        assert!(closed < Duration::from_secs(8), "{closed:?}");
    }
    abused.assert_served("after the silent connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_thousand_connections_is_refused_beyond_the_limit_and_others_are_served() {
    const BURST: usize = 10_000;
    const LIMIT: usize = 1000;
    let abused = Abused::start(&format!(
        "max_connections = {LIMIT}\nhandshake_timeout_secs = 60"
    ));
    // A well-behaved client connected before the burst.
    let mut steady = Connection::connect(&abused.server.url(), &abused.server.ca())
        .await
        .expect("connect");
    let mut open = Vec::with_capacity(BURST);
    let mut failed_connects = 0usize;
    let mut worst = Duration::ZERO;
    let start = Instant::now();
    for batch in 0..BURST / 500 {
        for _ in 0..500 {
            match TcpStream::connect(abused.addr()) {
                Ok(tcp) => open.push(tcp),
                Err(_) => failed_connects += 1,
            }
        }
        let took = ping(&mut steady).await;
        worst = worst.max(took);
        assert!(
            took < BOUND,
            "the connected client waited {took:?} during the burst"
        );
        if batch % 5 == 4 {
            // A new client while the abuser holds every slot: refused at once, not left hanging.
            let probe_start = Instant::now();
            let outcome = Connection::connect(&abused.server.url(), &abused.server.ca()).await;
            let took = probe_start.elapsed();
            eprintln!(
                "new client after {} abusive connections: {} in {took:?}",
                open.len(),
                if outcome.is_ok() { "served" } else { "refused" }
            );
            assert!(took < BOUND, "a refused client must not hang: {took:?}");
        }
    }
    eprintln!("worst ping of the connected client during the burst: {worst:?}");
    eprintln!(
        "opened {} TCP connections in {:?} ({failed_connects} connects failed)",
        open.len(),
        start.elapsed()
    );
    // The server holds at most LIMIT of them; every other one is closed at once.
    let mut refused = 0usize;
    for tcp in &mut open {
        if wait_closed(tcp, Duration::from_millis(1)).is_some() {
            refused += 1;
        }
    }
    let mut kept = open.len() - refused;
    // Sockets may still be in flight: give the server a moment and count again.
    if kept > LIMIT {
        tokio::time::sleep(Duration::from_secs(1)).await;
        refused = 0;
        for tcp in &mut open {
            if wait_closed(tcp, Duration::from_millis(1)).is_some() {
                refused += 1;
            }
        }
        kept = open.len() - refused;
    }
    eprintln!(
        "burst: {} open, {refused} refused by the server, {kept} held",
        open.len()
    );
    assert_eq!(open.len() + failed_connects, BURST);
    assert!(
        kept <= LIMIT,
        "the server held {kept} connections, over its limit of {LIMIT}"
    );
    assert!(
        refused >= BURST - LIMIT - failed_connects,
        "{refused} refused"
    );
    // At the limit, a new client is refused too; once the abuser goes, it is served again.
    drop(open);
    tokio::time::sleep(Duration::from_millis(500)).await;
    abused.assert_served("after the burst").await;
    let metrics = reqwest_metrics(&abused).await;
    assert!(metrics.contains("connection"), "{metrics}");
}

/// The `/metrics` text through a raw HTTPS request with the openssl CLI (no HTTP client dependency).
async fn reqwest_metrics(abused: &Abused) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &abused.addr()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                );
            }
            child.wait_with_output()
        })
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_login_proof_is_refused_and_others_are_served() {
    let abused = Abused::start("");
    abused.register("alice").await.conn.close().await;
    let keys_bytes =
        std::fs::read(abused.work.path().join("clients/alice/device.key")).expect("keys");
    let keys = DeviceKeys::decode(&keys_bytes).expect("decode");
    // A genuine login, whose proof an eavesdropper records.
    let mut first = Connection::connect(&abused.server.url(), &abused.server.ca())
        .await
        .expect("c");
    first
        .send(&ClientFrame::Login {
            username: "alice".into(),
            device_id: 1,
        })
        .await
        .expect("login");
    let Ok(ServerFrame::Challenge { nonce }) = answer(&mut first).await else {
        panic!("expected a challenge");
    };
    let signature = keys.identity().sign_login(&nonce, "alice", 1);
    first
        .send(&ClientFrame::LoginProof { signature })
        .await
        .expect("proof");
    assert!(matches!(
        answer(&mut first).await,
        Ok(ServerFrame::Welcome { .. })
    ));
    // Replayed on the same connection: the challenge is spent.
    first
        .send(&ClientFrame::LoginProof { signature })
        .await
        .expect("replay");
    assert_eq!(
        next_error(&mut first).await,
        Some(ErrorCode::ChallengeExpiredOrReplayed)
    );
    // Replayed on a new connection: a new challenge, which the old proof does not sign.
    let mut second = Connection::connect(&abused.server.url(), &abused.server.ca())
        .await
        .expect("c");
    second
        .send(&ClientFrame::Login {
            username: "alice".into(),
            device_id: 1,
        })
        .await
        .expect("login");
    assert!(matches!(
        answer(&mut second).await,
        Ok(ServerFrame::Challenge { .. })
    ));
    second
        .send(&ClientFrame::LoginProof { signature })
        .await
        .expect("replay");
    assert_eq!(error_code(&mut second).await, Some(ErrorCode::BadSignature));
    abused.assert_served("after login replays").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_flood_is_rate_limited_and_others_are_served() {
    let abused = Abused::start("registrations_per_minute = 10");
    let mut conn = Connection::connect(&abused.server.url(), &abused.server.ca())
        .await
        .expect("c");
    let mut limited = 0;
    let mut registered = 0;
    let keys = DeviceKeys::generate(&mut rand_core::OsRng);
    for i in 0..200 {
        conn.send(&register_frame(&format!("flood{i}"), &keys))
            .await
            .expect("send");
        match answer(&mut conn).await {
            Ok(ServerFrame::Registered { .. }) => registered += 1,
            other if error_code_of(&other) == Some(ErrorCode::RateLimited) => limited += 1,
            other => panic!("unexpected answer {other:?}"),
        }
        if i % 50 == 0 {
            abused.assert_served("during a registration flood").await;
        }
    }
    eprintln!("registration flood: {registered} registered, {limited} rate limited");
    assert_eq!((registered, limited), (10, 190));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_usernames_are_refused_each_with_its_reason() {
    let abused = Abused::start("");
    let mut conn = Connection::connect(&abused.server.url(), &abused.server.ca())
        .await
        .expect("c");
    let keys = DeviceKeys::generate(&mut rand_core::OsRng);
    let long = "a".repeat(33);
    let wire_max = "a".repeat(64);
    for name in [
        "",
        "ab",
        "Alice",
        "1abc",
        "al ice",
        "al\u{0}ice",
        "ålice",
        "аlice",
        long.as_str(),
        wire_max.as_str(),
        "a/b",
        "a\\b",
    ] {
        conn.send(&register_frame(name, &keys)).await.expect("send");
        assert_eq!(
            error_code(&mut conn).await,
            Some(ErrorCode::UsernameInvalid),
            "{name:?}"
        );
    }
    // Longer than the wire allows: the frame itself is malformed and the socket is closed.
    conn.send(&register_frame(&"a".repeat(65), &keys))
        .await
        .expect("send");
    assert_eq!(error_code(&mut conn).await, Some(ErrorCode::MalformedFrame));
    abused.assert_served("after invalid usernames").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses_more_and_takes_again_once_drained() {
    let abused = Abused::start("max_mailbox_depth = 5");
    let mut alice = abused.register("alice").await;
    abused.register("bob").await.conn.close().await;
    for i in 0..5 {
        alice
            .send_text("bob", &format!("m{i}"))
            .await
            .expect("within the limit");
    }
    let err = alice
        .send_text("bob", "one too many")
        .await
        .expect_err("mailbox full");
    assert!(
        format!("{err:#}").contains("mailbox_full") || format!("{err:#}").contains("undelivered"),
        "{err:#}"
    );
    abused.assert_served("with a full mailbox").await;
    let mut bob = Client::open(
        &abused
            .server
            .client_options(&abused.work.path().join("clients")),
        "bob",
    )
    .await
    .expect("bob");
    assert_eq!(
        bob.receive(Duration::from_millis(800))
            .await
            .expect("receive")
            .len(),
        5
    );
    alice
        .send_text("bob", "room again")
        .await
        .expect("drained mailbox takes more");
}

/// Four clients send to bob as fast as they can; the server is killed with SIGKILL in the middle
/// of it and started again on the same store: every message that got its `SendAck` must reach
/// bob after the restart.
async fn kill_9_during_concurrent_sends(world: &mut World) {
    world.register("bob").await.expect("bob").conn.close().await;
    let mut senders = Vec::new();
    for i in 0..4 {
        let mut client = world.register(&format!("sender{i}")).await.expect("sender");
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                let text = format!("sender{i} message {n}");
                match client.send_text("bob", &text).await {
                    Ok(_) => acked.push(text),
                    Err(_) => break, // the server died mid-send: not acknowledged
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    world.server.kill9().expect("kill -9");
    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.expect("sender task"));
    }
    assert!(
        acked.len() > 10,
        "the burst was too small to mean anything: {}",
        acked.len()
    );
    world.server.restart().expect("restart");
    let mut bob = world.open("bob").await.expect("bob");
    let mut got = std::collections::HashSet::new();
    loop {
        let batch = bob.receive(Duration::from_secs(2)).await.expect("receive");
        if batch.is_empty() {
            break;
        }
        got.extend(batch.into_iter().map(|m| m.text));
    }
    let lost: Vec<&String> = acked.iter().filter(|t| !got.contains(*t)).collect();
    eprintln!(
        "kill -9 after a burst: {} acknowledged, {} delivered after restart, {} lost",
        acked.len(),
        got.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_of_concurrent_sends_loses_no_acknowledged_message() {
    let mut world = World::new().expect("world");
    kill_9_during_concurrent_sends(&mut world).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_of_concurrent_sends_loses_no_acknowledged_message_on_nats() {
    // nats-server keeps running: only chat-server dies, as a crashed instance of a cluster does.
    let nats = NatsServer::start().expect("nats-server");
    let keys = Keys::new().expect("keys");
    let work = tempfile::tempdir().expect("tmp");
    let server =
        ServerProcess::start_with_args(keys.path(), work.path(), &["--store", &nats.url()])
            .expect("chat-server on the NATS store");
    let mut world = World { keys, work, server };
    kill_9_during_concurrent_sends(&mut world).await;
    assert!(
        world.server.log_text().contains("store=nats://"),
        "the server did not use the NATS store"
    );
}
