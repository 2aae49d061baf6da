//! Two `chat-server` processes sharing one real `nats-server -js` (`--store nats://...`), with
//! the same keys: messages pushed across instances, offline delivery, a crashed instance losing
//! nothing, and a key registered on one instance proven through the other under heads
//! consistent with those of the first.

use std::path::Path;
use std::time::{Duration, Instant};

use chat_tests::{Keys, NatsServer, ServerProcess};
use chatctl::client::Client;
use tempfile::TempDir;

const IDLE: Duration = Duration::from_millis(800);

/// One NATS, two servers on it, and a home for client state.
struct Cluster {
    _nats: NatsServer,
    _keys: Keys,
    _work: (TempDir, TempDir),
    home: TempDir,
    a: ServerProcess,
    b: ServerProcess,
}

impl Cluster {
    fn new() -> Self {
        let nats = NatsServer::start().expect("nats-server");
        let keys = Keys::new().expect("keys");
        let work = (
            tempfile::tempdir().expect("tmp"),
            tempfile::tempdir().expect("tmp"),
        );
        let url = nats.url();
        let args = ["--store", url.as_str()];
        let a = ServerProcess::start_with_args(keys.path(), work.0.path(), &args).expect("a");
        let b = ServerProcess::start_with_args(keys.path(), work.1.path(), &args).expect("b");
        Self {
            _nats: nats,
            _keys: keys,
            _work: work,
            home: tempfile::tempdir().expect("home"),
            a,
            b,
        }
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    async fn register(&self, server: &ServerProcess, name: &str) -> Client {
        Client::register(&server.client_options(self.home()), name)
            .await
            .unwrap_or_else(|e| panic!("register {name}: {e:#}"))
    }

    async fn open(&self, server: &ServerProcess, name: &str) -> Client {
        Client::open(&server.client_options(self.home()), name)
            .await
            .unwrap_or_else(|e| panic!("open {name}: {e:#}"))
    }
}

fn texts(got: Vec<chatctl::client::Received>) -> Vec<String> {
    got.into_iter().map(|m| m.text).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_sent_through_a_is_pushed_to_a_recipient_connected_to_b() {
    let cluster = Cluster::new();
    let mut alice = cluster.register(&cluster.a, "alice").await;
    let mut bob = cluster.register(&cluster.b, "bob").await;
    alice.send_text("bob", "hello across").await.expect("send");
    let got = bob.receive(IDLE).await.expect("receive");
    assert_eq!(texts(got), vec!["hello across".to_owned()]);

    // Replies flow back the other way, and each push arrives without polling.
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let start = Instant::now();
        bob.send_text("alice", &format!("pong {round}"))
            .await
            .expect("reply");
        let got = alice.receive(Duration::from_millis(300)).await.expect("a");
        worst = worst.max(start.elapsed());
        assert_eq!(texts(got), vec![format!("pong {round}")]);
    }
    println!("cross-instance send + push + idle wait: worst {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_on_b_receives_what_was_sent_through_a_in_order() {
    let cluster = Cluster::new();
    let mut alice = cluster.register(&cluster.a, "alice").await;
    cluster.register(&cluster.b, "bob").await.conn.close().await;
    for i in 0..20 {
        alice
            .send_text("bob", &format!("message {i}"))
            .await
            .expect("send");
    }
    let mut bob = cluster.open(&cluster.b, "bob").await;
    let got = texts(bob.receive(IDLE).await.expect("receive"));
    let want: Vec<String> = (0..20).map(|i| format!("message {i}")).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_instance_loses_nothing() {
    let mut cluster = Cluster::new();
    let mut alice = cluster.register(&cluster.a, "alice").await;
    cluster.register(&cluster.b, "bob").await.conn.close().await;
    for i in 0..10 {
        alice
            .send_text("bob", &format!("before crash {i}"))
            .await
            .expect("send");
    }
    alice.conn.close().await;
    cluster.a.kill9().expect("kill -9 a");
    cluster.a.restart().expect("restart a");

    let mut bob = cluster.open(&cluster.b, "bob").await;
    let got = texts(bob.receive(IDLE).await.expect("receive"));
    let want: Vec<String> = (0..10).map(|i| format!("before crash {i}")).collect();
    assert_eq!(got, want);

    // The restarted instance serves alice again and still pushes to bob on B.
    let mut alice = cluster.open(&cluster.a, "alice").await;
    alice.send_text("bob", "after restart").await.expect("send");
    let got = texts(bob.receive(IDLE).await.expect("receive"));
    assert_eq!(got, vec!["after restart".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_registered_on_a_is_proven_through_b_under_consistent_heads() {
    let cluster = Cluster::new();
    let carol = cluster.register(&cluster.a, "carol").await;
    carol.conn.close().await;
    // dave checks carol's key through B, then through A with the same client state: every
    // head of A must be consistent with the heads B showed him, and the other way round.
    let mut dave = cluster.register(&cluster.b, "dave").await;
    let leaf = dave.verified_leaf("carol", 1).await.expect("proof via b");
    assert_eq!((leaf.username.as_str(), leaf.device_id), ("carol", 1));
    dave.conn.close().await;

    let erin = cluster.register(&cluster.a, "erin").await;
    erin.conn.close().await;
    let mut dave = cluster.open(&cluster.a, "dave").await;
    let on_a = dave.verified_leaf("carol", 1).await.expect("proof via a");
    assert_eq!(on_a.identity_ed25519, leaf.identity_ed25519);
    dave.verified_leaf("erin", 1).await.expect("erin via a");
    dave.conn.close().await;

    let mut dave = cluster.open(&cluster.b, "dave").await;
    dave.verified_leaf("erin", 1)
        .await
        .expect("erin, registered on a, via b");
}
