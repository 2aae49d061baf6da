//! The store conformance suite run against the NATS store on a real `nats-server -js` (Debian
//! package `nats-server`), started by each test on a free port with its own store directory.
//! Every reopen restarts the server with `kill -9` on the same directory, so "survives reopen"
//! means "survives a crash of NATS". Without `nats-server` on PATH these tests fail; they never
//! skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chat_server::store::conformance::StoreHarness;
use chat_server::store::{DataKeyRing, MailboxId, NatsOptions, NatsStore, Store, StoreError};
use rand_core::OsRng;
use tempfile::TempDir;

/// A `nats-server -js` child process; killed on drop.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl NatsServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = NatsServer {
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        let before = std::fs::metadata(self.log()).map_or(0, |m| m.len() as usize);
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store_dir())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `nats-server` ({e}): the NATS store tests need the real server; \
                     install it with `apt-get install nats-server` (or `cargo xtask deps`)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(self.log()).unwrap_or_default();
            if text
                .get(before..)
                .unwrap_or_default()
                .contains("Server is ready")
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nats-server exited with {status}:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not ready in 20 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` and start again on the same port and store directory.
    fn crash_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill nats-server");
            child.wait().expect("reap nats-server");
        }
        self.spawn();
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct NatsHarness {
    server: Mutex<NatsServer>,
    store_dir: PathBuf,
    opened: Mutex<bool>,
}

#[async_trait]
impl StoreHarness for NatsHarness {
    async fn open(&self, keys: DataKeyRing) -> Result<Arc<dyn Store>, StoreError> {
        let url = {
            let mut opened = self.opened.lock().expect("lock");
            let mut server = self.server.lock().expect("lock");
            if *opened {
                server.crash_and_restart();
            }
            *opened = true;
            server.url()
        };
        Ok(Arc::new(
            NatsStore::connect(&url, keys, NatsOptions::default()).await?,
        ))
    }

    fn data_dir(&self) -> &Path {
        &self.store_dir
    }
}

async fn nats_harness() -> NatsHarness {
    let server = NatsServer::start();
    NatsHarness {
        store_dir: server.store_dir(),
        server: Mutex::new(server),
        opened: Mutex::new(false),
    }
}

chat_server::store_conformance_tests!(nats_harness);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_prekeys_leaves_and_mailboxes() {
    let server = NatsServer::start();
    let keys = DataKeyRing::generate(&mut OsRng);
    let same = || DataKeyRing::from_file_string(&keys.to_file_string()).expect("keys");
    let a = NatsStore::connect(&server.url(), same(), NatsOptions::default())
        .await
        .expect("a");
    let b = NatsStore::connect(&server.url(), same(), NatsOptions::default())
        .await
        .expect("b");

    a.add_prekeys("zoe", 1, (1..=6).map(|i| (i, [i as u8; 32])).collect())
        .await
        .expect("add");
    let mut taken = Vec::new();
    for store in [&a, &b, &a, &b, &a, &b, &a] {
        if let Some((id, _)) = store.take_prekey("zoe", 1).await.expect("take") {
            taken.push(id);
        }
    }
    assert_eq!(taken, vec![1, 2, 3, 4, 5, 6], "each prekey once, in order");

    let mut indexes = Vec::new();
    for (n, store) in [&a, &b, &b, &a].into_iter().enumerate() {
        indexes.push(store.append_leaf(vec![n as u8]).await.expect("leaf"));
    }
    assert_eq!(indexes, vec![0, 1, 2, 3], "indexes agree across instances");
    assert_eq!(b.leaves(0, 10).await.expect("leaves").len(), 4);

    let mb = MailboxId::new("zoe", 1);
    let first = a.append(&mb, [1; 16], b"x".to_vec(), 10).await.expect("a");
    let again = b.append(&mb, [1; 16], b"x".to_vec(), 10).await.expect("b");
    assert_eq!((first.seq, again.seq, again.duplicate), (1, 1, true));
    assert_eq!(b.fetch(&mb, 0, 10).await.expect("fetch").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_ids_beyond_the_dedup_window_are_forgotten_oldest_first() {
    let server = NatsServer::start();
    let options = NatsOptions {
        dedup_window: 2,
        ..NatsOptions::default()
    };
    let store = connect(&server, options).await;
    let mb = MailboxId::new("uma", 1);
    for n in 1..=4u8 {
        store
            .append(&mb, [n; 16], vec![n], 10)
            .await
            .expect("append");
    }
    store.ack(&mb, 3).await.expect("ack");
    for n in 2..=4u8 {
        let again = store
            .append(&mb, [n; 16], vec![n], 10)
            .await
            .expect("resend");
        assert_eq!((again.seq, again.duplicate), (u64::from(n), true));
    }
    let forgotten = store
        .append(&mb, [1; 16], vec![1], 10)
        .await
        .expect("resend");
    assert_eq!((forgotten.seq, forgotten.duplicate), (5, false));
}

/// A store on `server` with a fresh data key.
async fn connect(server: &NatsServer, options: NatsOptions) -> NatsStore {
    NatsStore::connect(&server.url(), DataKeyRing::generate(&mut OsRng), options)
        .await
        .expect("connect")
}

/// An instance appended a message and crashed before it marked the id committed. The
/// message was then delivered and acked. The sender's resend takes the stale claim over, and
/// it must find the id among the remembered acked ids, not store the message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_after_a_crashed_append_that_was_since_acked_is_a_duplicate() {
    let server = NatsServer::start();
    let store = connect(&server, NatsOptions::default()).await;
    let mb = MailboxId::new("vic", 1);
    store
        .append(&mb, [1; 16], vec![1], 10)
        .await
        .expect("first");
    let seq = store
        .append_then_crash(&mb, [2; 16], &[2])
        .await
        .expect("append, then crash");
    assert_eq!(seq, 2);
    assert_eq!(store.ack(&mb, 2).await.expect("ack"), 2);

    let resend = store
        .append(&mb, [2; 16], vec![2], 10)
        .await
        .expect("resend");
    assert_eq!((resend.seq, resend.duplicate), (2, true));
    assert!(
        store.fetch(&mb, 0, 10).await.expect("fetch").is_empty(),
        "nothing is stored a second time"
    );
    assert_eq!(store.next_seq(&mb).await.expect("next"), 3);
}

/// Not a benchmark: prints the latency of one mailbox append so runs can be compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_latency_is_reported() {
    let server = NatsServer::start();
    let store = connect(&server, NatsOptions::default()).await;
    let mb = MailboxId::new("lat", 1);
    let n = 200u32;
    let start = Instant::now();
    for i in 0..n {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        store
            .append(&mb, id, vec![0; 256], 1_000)
            .await
            .expect("append");
    }
    let per_append = start.elapsed() / n;
    let start = Instant::now();
    let fetched = store.fetch(&mb, 0, 64).await.expect("fetch");
    let fetch_64 = start.elapsed();
    println!("nats append: {per_append:?} per message; fetch of 64: {fetch_64:?}");
    assert_eq!(fetched.len(), 64);
}
