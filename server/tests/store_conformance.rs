//! The store conformance suite run against the embedded (redb) store, plus the crash test:
//! a message `append` returned survives `kill -9` of the process that wrote it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use async_trait::async_trait;
use chat_server::store::conformance::StoreHarness;
use chat_server::store::{DataKeyRing, EmbeddedStore, MailboxId, Store, StoreError};
use rand_core::OsRng;
use tempfile::TempDir;

struct EmbeddedHarness {
    dir: TempDir,
}

#[async_trait]
impl StoreHarness for EmbeddedHarness {
    async fn open(&self, keys: DataKeyRing) -> Result<Arc<dyn Store>, StoreError> {
        Ok(Arc::new(EmbeddedStore::open(self.dir.path(), keys).await?))
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

async fn embedded_harness() -> EmbeddedHarness {
    EmbeddedHarness {
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

chat_server::store_conformance_tests!(embedded_harness);

const CRASH_DIR_ENV: &str = "CHAT_STORE_CRASH_TEST_DIR";

/// Child half of `appended_message_survives_kill_9`: appends, reports the seq, then waits to
/// be killed. Ignored in normal runs; the parent runs it with `--ignored`.
#[tokio::test]
#[ignore = "helper process of appended_message_survives_kill_9"]
async fn crash_child_appends_then_waits_to_be_killed() {
    let dir = PathBuf::from(std::env::var(CRASH_DIR_ENV).expect("run by the crash test"));
    let keys = DataKeyRing::load(&dir.join("data.key")).expect("keys");
    let store = EmbeddedStore::open(dir.join("data"), keys)
        .await
        .expect("open");
    let outcome = store
        .append(
            &MailboxId::new("sam", 1),
            [7; 16],
            b"must survive".to_vec(),
            100,
        )
        .await
        .expect("append");
    println!("APPENDED {}", outcome.seq);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }
}

#[tokio::test]
async fn appended_message_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = DataKeyRing::generate(&mut OsRng);
    std::fs::write(
        dir.path().join("data.key"),
        keys.to_file_string().as_bytes(),
    )
    .expect("keys");

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "crash_child_appends_then_waits_to_be_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut seq = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(rest) = line.strip_prefix("APPENDED ") {
            seq = Some(rest.trim().parse::<u64>().expect("seq"));
            break;
        }
    }
    child.kill().expect("SIGKILL the child"); // SIGKILL on unix: no destructor, no flush
    child.wait().expect("reap");
    let seq = seq.expect("child reported an append");

    let store = EmbeddedStore::open(dir.path().join("data"), keys)
        .await
        .expect("reopen");
    let messages = store
        .fetch(&MailboxId::new("sam", 1), 0, 10)
        .await
        .expect("fetch");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].seq, seq);
    assert_eq!(messages[0].record, b"must survive".to_vec());
}
