//! The embedded store, for a single server instance: accounts, prekeys and the key directory in
//! one redb file, `DIR/chat.redb`; mailboxes in an append-only log beside it,
//! `DIR/mailboxes.log` (see the `mailbox_log` module).
//!
//! Every redb write is one transaction run on tokio's blocking pool and committed with redb's
//! default durability (fsync on commit) before the call returns, so what a call returned
//! survives `kill -9`. redb runs one write transaction at a time, which is what makes account
//! creation and prekey hand-out atomic. Every value is sealed with the data-at-rest key (see
//! [`super::seal`]); row keys stay in the clear (see [`super`]).
//!
//! Appends and acks are group-committed by the mailbox log: concurrent [`Store::append`] and
//! [`Store::ack`] calls queue up while a batch is written and the next batch takes them all, one
//! `pwrite` and one fsync; each caller is answered only after that fsync, so an acknowledged
//! envelope (and a deletion answered as done) is still a durable one. A database written before
//! the log keeps its mailboxes in redb tables; they move into the log once, on open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use super::mailbox_log::{MailboxLog, MailboxSnapshot};
use super::seal::{DataKeyRing, Slot, Table};
use super::{
    AppendOutcome, AppendRequest, DEDUP_IDLE, DEDUP_WINDOW, MailboxId, MessageId, Prekey, Store,
    StoreError, StoredMessage,
};

/// The database file inside the data directory.
pub const FILE_NAME: &str = "chat.redb";

const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new(Table::Accounts.name());
const PREKEYS: TableDefinition<(&str, u32, u32), &[u8]> =
    TableDefinition::new(Table::Prekeys.name());
const LEAVES: TableDefinition<u64, &[u8]> = TableDefinition::new(Table::Leaves.name());
const META: TableDefinition<&str, &[u8]> = TableDefinition::new(Table::Meta.name());
const MAILBOX_MESSAGES: TableDefinition<(&str, u32, u64), &[u8]> =
    TableDefinition::new(Table::MailboxMessages.name());
const MAILBOX_STATE: TableDefinition<(&str, u32), &[u8]> =
    TableDefinition::new(Table::MailboxState.name());
const MAILBOX_IDS: TableDefinition<(&str, u32, [u8; 16]), &[u8]> =
    TableDefinition::new(Table::MailboxIds.name());
const MAILBOX_ACKED: TableDefinition<(&str, u32, u64), &[u8]> =
    TableDefinition::new(Table::MailboxAcked.name());

const TREE_HEAD: &str = "tree_head";

/// The redb-backed [`Store`]. Cheap to clone; clones share the open database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    keys: DataKeyRing,
    path: PathBuf,
    /// The mailboxes: an append-only log beside the database (see the `mailbox_log` module).
    mailboxes: MailboxLog,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("keys", &self.inner.keys)
            .finish()
    }
}

/// How long `open` waits for a just-dropped store of this process to release the file.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens (or creates) the database. The committer of a store that was just dropped
/// answers its callers a moment before its thread lets go of the database, so a reopen in the
/// same process may briefly find the file still open: wait for that, not for another process.
fn create_database(path: &Path) -> Result<Database, StoreError> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match Database::create(path) {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "cannot open {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

impl EmbeddedStore {
    /// Opens `dir/chat.redb`, creating the directory and the database if needed (and
    /// recovering it after a crash). Records are sealed with the active key of `keys`.
    pub async fn open(dir: impl AsRef<Path>, keys: DataKeyRing) -> Result<Self, StoreError> {
        Self::open_with_dedup(dir, keys, DEDUP_WINDOW, DEDUP_IDLE).await
    }

    /// [`EmbeddedStore::open`] with another duplicate window (see [`super::DEDUP_WINDOW`] and
    /// [`DEDUP_IDLE`]).
    async fn open_with_dedup(
        dir: impl AsRef<Path>,
        keys: DataKeyRing,
        dedup_window: u64,
        dedup_idle: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_owned();
        let inner = tokio::task::spawn_blocking(move || -> Result<Inner, StoreError> {
            std::fs::create_dir_all(&dir).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot create data directory {}: {e}",
                    dir.display()
                ))
            })?;
            let path = dir.join(FILE_NAME);
            let db = create_database(&path)?;
            let txn = db.begin_write().map_err(db_err)?;
            {
                txn.open_table(ACCOUNTS).map_err(db_err)?;
                txn.open_table(PREKEYS).map_err(db_err)?;
                txn.open_table(LEAVES).map_err(db_err)?;
                txn.open_table(META).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            move_mailboxes_to_the_log(&db, &keys, &dir)?;
            let mailboxes = MailboxLog::open(&dir, &keys, dedup_window, dedup_idle)?;
            Ok(Inner {
                db,
                keys,
                path,
                mailboxes,
            })
        })
        .await
        .map_err(join_err)??;
        Ok(EmbeddedStore {
            inner: Arc::new(inner),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs a read transaction on the calling task. Reads are point lookups and short ranges
    /// (a recipient's account, a delivery batch) served from redb's cache in microseconds; a
    /// hop to the blocking pool cost more than the read itself (spawning and waking a thread
    /// per send was 12% of a loaded server's CPU, docs/BENCHMARKS.md, issue #8). Writes, which
    /// wait for fsync, stay on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&ReadTransaction, &DataKeyRing) -> Result<T, StoreError>,
    {
        let txn = self.inner.db.begin_read().map_err(db_err)?;
        f(&txn, &self.inner.keys)
    }

    /// Runs a write transaction on the blocking pool and commits it (durably) if `f` succeeds;
    /// if `f` fails nothing is written.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction, &DataKeyRing) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let txn = inner.db.begin_write().map_err(db_err)?;
            let out = f(&txn, &inner.keys)?;
            txn.commit().map_err(db_err)?;
            Ok(out)
        })
        .await
        .map_err(join_err)?
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

fn join_err(e: tokio::task::JoinError) -> StoreError {
    StoreError::Backend(format!("store task failed: {e}"))
}

fn account_slot(username: &str) -> Slot {
    Slot::new().str(username)
}

fn prekey_slot(username: &str, device_id: u32, prekey_id: u32) -> Slot {
    Slot::new().str(username).u32(device_id).u32(prekey_id)
}

fn mailbox_slot(mailbox: &MailboxId) -> Slot {
    Slot::new().str(&mailbox.username).u32(mailbox.device_id)
}

fn seq_slot(mailbox: &MailboxId, seq: u64) -> Slot {
    mailbox_slot(mailbox).u64(seq)
}

fn read_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!("{what}: expected 8 bytes, got {}", bytes.len()))
    })?;
    Ok(u64::from_be_bytes(array))
}

fn read_message_id(bytes: &[u8], what: &str) -> Result<MessageId, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what}: expected a 16-byte message id")))
}

/// Counters of one mailbox, stored sealed in `mailbox_state`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MailboxState {
    /// The largest seq ever assigned (0: none yet).
    last_seq: u64,
    /// Messages held (appended, not acked).
    depth: u64,
    /// Acked message ids still remembered in `mailbox_acked` / `mailbox_ids`.
    remembered: u64,
}

impl MailboxState {
    #[cfg(test)]
    fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.last_seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.depth.to_be_bytes());
        out[16..].copy_from_slice(&self.remembered.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() != 24 {
            return Err(StoreError::Corrupt(format!(
                "mailbox state: expected 24 bytes, got {}",
                bytes.len()
            )));
        }
        Ok(MailboxState {
            last_seq: read_u64(&bytes[..8], "mailbox state")?,
            depth: read_u64(&bytes[8..16], "mailbox state")?,
            remembered: read_u64(&bytes[16..], "mailbox state")?,
        })
    }
}

/// Splits a `mailbox_messages` plaintext into message id and envelope.
fn decode_message(seq: u64, plain: Vec<u8>) -> Result<StoredMessage, StoreError> {
    if plain.len() < 16 {
        return Err(StoreError::Corrupt(format!(
            "mailbox message {seq}: shorter than its message id"
        )));
    }
    let message_id = read_message_id(&plain[..16], "mailbox message")?;
    Ok(StoredMessage {
        seq,
        message_id,
        record: plain[16..].to_vec(),
    })
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create_account(&self, username: &str, record: Vec<u8>) -> Result<(), StoreError> {
        let username = username.to_owned();
        self.write(move |txn, keys| {
            let mut table = txn.open_table(ACCOUNTS).map_err(db_err)?;
            if table.get(username.as_str()).map_err(db_err)?.is_some() {
                return Err(StoreError::AlreadyExists(format!("account {username:?}")));
            }
            let sealed = keys.seal(Table::Accounts, &account_slot(&username), &record)?;
            table
                .insert(username.as_str(), sealed.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn get_account(&self, username: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let username = username.to_owned();
        self.read(move |txn, keys| {
            let table = txn.open_table(ACCOUNTS).map_err(db_err)?;
            let Some(sealed) = table.get(username.as_str()).map_err(db_err)? else {
                return Ok(None);
            };
            keys.open(Table::Accounts, &account_slot(&username), sealed.value())
                .map(Some)
        })
        .await
    }

    async fn put_account(&self, username: &str, record: Vec<u8>) -> Result<(), StoreError> {
        let username = username.to_owned();
        self.write(move |txn, keys| {
            let mut table = txn.open_table(ACCOUNTS).map_err(db_err)?;
            if table.get(username.as_str()).map_err(db_err)?.is_none() {
                return Err(StoreError::NotFound(format!("account {username:?}")));
            }
            let sealed = keys.seal(Table::Accounts, &account_slot(&username), &record)?;
            table
                .insert(username.as_str(), sealed.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn add_prekeys(
        &self,
        username: &str,
        device_id: u32,
        prekeys: Vec<Prekey>,
    ) -> Result<(), StoreError> {
        let username = username.to_owned();
        self.write(move |txn, keys| {
            let mut table = txn.open_table(PREKEYS).map_err(db_err)?;
            for (prekey_id, public) in prekeys {
                let slot = prekey_slot(&username, device_id, prekey_id);
                let row = (username.as_str(), device_id, prekey_id);
                let existing = match table.get(row).map_err(db_err)? {
                    Some(sealed) => Some(keys.open(Table::Prekeys, &slot, sealed.value())?),
                    None => None,
                };
                match existing {
                    Some(stored) if stored.as_slice() == public.as_slice() => {}
                    Some(_) => {
                        return Err(StoreError::AlreadyExists(format!(
                            "prekey {prekey_id} of {username}/{device_id} with a different key"
                        )));
                    }
                    None => {
                        let sealed = keys.seal(Table::Prekeys, &slot, &public)?;
                        table.insert(row, sealed.as_slice()).map_err(db_err)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn take_prekey(
        &self,
        username: &str,
        device_id: u32,
    ) -> Result<Option<Prekey>, StoreError> {
        let username = username.to_owned();
        self.write(move |txn, keys| {
            let mut table = txn.open_table(PREKEYS).map_err(db_err)?;
            let first = {
                let mut range = table
                    .range(
                        (username.as_str(), device_id, 0)
                            ..=(username.as_str(), device_id, u32::MAX),
                    )
                    .map_err(db_err)?;
                match range.next() {
                    None => None,
                    Some(entry) => {
                        let (row, sealed) = entry.map_err(db_err)?;
                        Some((row.value().2, sealed.value().to_vec()))
                    }
                }
            };
            let Some((prekey_id, sealed)) = first else {
                return Ok(None);
            };
            let plain = keys.open(
                Table::Prekeys,
                &prekey_slot(&username, device_id, prekey_id),
                &sealed,
            )?;
            let public: [u8; 32] = plain.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt(format!(
                    "prekey {prekey_id} of {username}/{device_id}: not 32 bytes"
                ))
            })?;
            table
                .remove((username.as_str(), device_id, prekey_id))
                .map_err(db_err)?;
            Ok(Some((prekey_id, public)))
        })
        .await
    }

    async fn prekey_count(&self, username: &str, device_id: u32) -> Result<u64, StoreError> {
        let username = username.to_owned();
        self.read(move |txn, _| {
            let table = txn.open_table(PREKEYS).map_err(db_err)?;
            let range = table
                .range((username.as_str(), device_id, 0)..=(username.as_str(), device_id, u32::MAX))
                .map_err(db_err)?;
            let mut count = 0u64;
            for entry in range {
                entry.map_err(db_err)?;
                count += 1;
            }
            Ok(count)
        })
        .await
    }

    async fn append_leaf(&self, leaf: Vec<u8>) -> Result<u64, StoreError> {
        self.write(move |txn, keys| {
            let mut table = txn.open_table(LEAVES).map_err(db_err)?;
            // Leaves are never deleted, so the count is the next index.
            let index = table.len().map_err(db_err)?;
            let sealed = keys.seal(Table::Leaves, &Slot::new().u64(index), &leaf)?;
            table.insert(index, sealed.as_slice()).map_err(db_err)?;
            Ok(index)
        })
        .await
    }

    async fn leaf_count(&self) -> Result<u64, StoreError> {
        self.read(|txn, _| {
            let table = txn.open_table(LEAVES).map_err(db_err)?;
            table.len().map_err(db_err)
        })
        .await
    }

    async fn leaves(&self, start: u64, count: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.read(move |txn, keys| {
            let table = txn.open_table(LEAVES).map_err(db_err)?;
            let end = start.saturating_add(count);
            let mut out = Vec::new();
            for entry in table.range(start..end).map_err(db_err)? {
                let (index, sealed) = entry.map_err(db_err)?;
                out.push(keys.open(
                    Table::Leaves,
                    &Slot::new().u64(index.value()),
                    sealed.value(),
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_tree_head(&self, head: Vec<u8>) -> Result<(), StoreError> {
        self.write(move |txn, keys| {
            let mut table = txn.open_table(META).map_err(db_err)?;
            let sealed = keys.seal(Table::Meta, &Slot::new().str(TREE_HEAD), &head)?;
            table.insert(TREE_HEAD, sealed.as_slice()).map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn latest_tree_head(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn, keys| {
            let table = txn.open_table(META).map_err(db_err)?;
            let Some(sealed) = table.get(TREE_HEAD).map_err(db_err)? else {
                return Ok(None);
            };
            keys.open(Table::Meta, &Slot::new().str(TREE_HEAD), sealed.value())
                .map(Some)
        })
        .await
    }

    async fn append(
        &self,
        mailbox: &MailboxId,
        message_id: MessageId,
        record: Vec<u8>,
        max_depth: u64,
    ) -> Result<AppendOutcome, StoreError> {
        let request = AppendRequest {
            mailbox: mailbox.clone(),
            message_id,
            record,
            max_depth,
        };
        let mut out = self.append_many(vec![request]).await;
        out.pop().unwrap_or_else(|| Err(committer_stopped()))
    }

    async fn append_many(
        &self,
        appends: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        let answers = self
            .inner
            .mailboxes
            .enqueue_appends(appends, || self.start_committer());
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(answer.await.unwrap_or_else(|_| Err(committer_stopped())));
        }
        out
    }

    async fn fetch(
        &self,
        mailbox: &MailboxId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner
            .mailboxes
            .fetch(&self.inner.keys, mailbox, after_seq, limit)
    }

    async fn ack(&self, mailbox: &MailboxId, up_to_seq: u64) -> Result<u64, StoreError> {
        self.inner
            .mailboxes
            .enqueue_ack(mailbox, up_to_seq, || self.start_committer())
            .await
            .unwrap_or_else(|_| Err(committer_stopped()))
    }

    async fn depth(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        self.inner.mailboxes.depth(mailbox)
    }

    async fn next_seq(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        self.inner.mailboxes.next_seq(mailbox)
    }

    fn render_metrics(&self, out: &mut String) {
        let log = &self.inner.mailboxes;
        crate::metrics::counter(
            out,
            "chatapp_store_commits_total",
            "Group commits of the mailbox log (one write and one fdatasync each).",
            &log.commits,
        );
        crate::metrics::counter(
            out,
            "chatapp_store_committed_entries_total",
            "Appends and acks written by group commits (entries / commits = batch size).",
            &log.committed_entries,
        );
        log.disk_latency.render(
            out,
            "chatapp_store_disk_seconds",
            "Time the disk took for each group commit's write and fdatasync.",
        );
    }
}

fn committer_stopped() -> StoreError {
    StoreError::Backend("the store's committer stopped".into())
}

impl EmbeddedStore {
    /// Starts the mailbox log's group committer on the blocking pool; it starts compactions
    /// on a thread of their own.
    fn start_committer(&self) {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let compact = || {
                let worker = Arc::clone(&inner);
                let spawned = std::thread::Builder::new()
                    .name("mailbox-compaction".into())
                    .spawn(move || worker.mailboxes.compact(&worker.keys));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a mailbox log compaction");
                    inner.mailboxes.compaction_not_started();
                }
            };
            inner.mailboxes.commit_queued(&inner.keys, &compact)
        });
    }
}

/// Marks in `meta` that the mailboxes live in the log file (sealed like every value).
const MAILBOXES_IN_LOG: &str = "mailboxes_in_log";

/// Moves the mailboxes of a database written before the mailbox log (redb tables
/// `mailbox_messages`, `mailbox_state`, `mailbox_ids`, `mailbox_acked`) into a new log file, once.
///
/// Crash-safe by order: the log is written and renamed into place first; only then are the
/// tables dropped and the marker set, in one transaction. A crash in between leaves the tables
/// and no marker, so the next open writes the log again from them. A new database takes the same
/// path with no mailboxes and starts an empty log.
fn move_mailboxes_to_the_log(
    db: &Database,
    keys: &DataKeyRing,
    dir: &Path,
) -> Result<(), StoreError> {
    let marker = Slot::new().str(MAILBOXES_IN_LOG);
    {
        let txn = db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        if let Some(sealed) = meta.get(MAILBOXES_IN_LOG).map_err(db_err)? {
            keys.open(Table::Meta, &marker, sealed.value())?;
            return Ok(());
        }
    }
    let snapshots = legacy_mailboxes(db, keys)?;
    let moved: usize = snapshots.iter().map(|s| s.live.len()).sum();
    super::mailbox_log::write_log(dir, keys, 1, snapshots)?;
    let txn = db.begin_write().map_err(db_err)?;
    // A new database has none of these tables: nothing to delete is not an error.
    txn.delete_table(MAILBOX_MESSAGES).map_err(db_err)?;
    txn.delete_table(MAILBOX_STATE).map_err(db_err)?;
    txn.delete_table(MAILBOX_IDS).map_err(db_err)?;
    txn.delete_table(MAILBOX_ACKED).map_err(db_err)?;
    {
        let mut meta = txn.open_table(META).map_err(db_err)?;
        let sealed = keys.seal(Table::Meta, &marker, b"1")?;
        meta.insert(MAILBOXES_IN_LOG, sealed.as_slice())
            .map_err(db_err)?;
    }
    txn.commit().map_err(db_err)?;
    if moved > 0 {
        tracing::info!(
            messages = moved,
            "mailboxes moved from the database to the mailbox log"
        );
    }
    Ok(())
}

/// Every mailbox of the pre-log tables: counters, remembered acked ids and unacked messages.
fn legacy_mailboxes(db: &Database, keys: &DataKeyRing) -> Result<Vec<MailboxSnapshot>, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let mut by_mailbox: HashMap<MailboxId, MailboxSnapshot> = HashMap::new();
    fn snapshot(
        map: &mut HashMap<MailboxId, MailboxSnapshot>,
        mailbox: MailboxId,
    ) -> &mut MailboxSnapshot {
        map.entry(mailbox.clone())
            .or_insert_with(|| MailboxSnapshot {
                mailbox,
                last_seq: 0,
                acked: Vec::new(),
                live: Vec::new(),
            })
    }
    match txn.open_table(MAILBOX_STATE) {
        Ok(states) => {
            for entry in states.iter().map_err(db_err)? {
                let (row, sealed) = entry.map_err(db_err)?;
                let (user, device) = row.value();
                let mailbox = MailboxId::new(user, device);
                let plain =
                    keys.open(Table::MailboxState, &mailbox_slot(&mailbox), sealed.value())?;
                snapshot(&mut by_mailbox, mailbox).last_seq =
                    MailboxState::decode(&plain)?.last_seq;
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(e)),
    }
    for (mailbox, seq, plain) in legacy_rows(&txn, MAILBOX_MESSAGES, Table::MailboxMessages, keys)?
    {
        let s = snapshot(&mut by_mailbox, mailbox);
        s.last_seq = s.last_seq.max(seq);
        s.live.push(decode_message(seq, plain)?);
    }
    for (mailbox, seq, plain) in legacy_rows(&txn, MAILBOX_ACKED, Table::MailboxAcked, keys)? {
        let id = read_message_id(&plain, "acked message id")?;
        snapshot(&mut by_mailbox, mailbox).acked.push((seq, id));
    }
    Ok(by_mailbox.into_values().collect())
}

/// Every row of a pre-log `(user, device, seq)` table, opened, in key order; none if the table
/// does not exist.
fn legacy_rows(
    txn: &ReadTransaction,
    definition: TableDefinition<(&str, u32, u64), &[u8]>,
    table: Table,
    keys: &DataKeyRing,
) -> Result<Vec<(MailboxId, u64, Vec<u8>)>, StoreError> {
    let rows = match txn.open_table(definition) {
        Ok(rows) => rows,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(db_err(e)),
    };
    let mut out = Vec::new();
    for entry in rows.iter().map_err(db_err)? {
        let (row, sealed) = entry.map_err(db_err)?;
        let (user, device, seq) = row.value();
        let mailbox = MailboxId::new(user, device);
        let plain = keys.open(table, &seq_slot(&mailbox, seq), sealed.value())?;
        out.push((mailbox, seq, plain));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn key_file_of(keys: &DataKeyRing) -> DataKeyRing {
        DataKeyRing::from_file_string(&keys.to_file_string()).expect("parse")
    }

    /// Drops `store` and opens its directory again with the same key.
    async fn reopen(
        store: EmbeddedStore,
        dir: &tempfile::TempDir,
        keys: &DataKeyRing,
    ) -> EmbeddedStore {
        drop(store);
        EmbeddedStore::open(dir.path(), key_file_of(keys))
            .await
            .expect("reopen")
    }

    /// A store on a fresh directory, and its key (to reopen it with).
    async fn opened() -> (tempfile::TempDir, DataKeyRing, EmbeddedStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = DataKeyRing::generate(&mut OsRng);
        let store = EmbeddedStore::open(dir.path(), key_file_of(&keys))
            .await
            .expect("open");
        (dir, keys, store)
    }

    /// One number of the store's Prometheus text.
    fn metric(text: &str, name: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    #[tokio::test]
    async fn metrics_count_group_commits_their_entries_and_the_disk_time_of_each() {
        let (_dir, _keys, store) = opened().await;
        let mailbox = MailboxId::new("bob", 1);
        let mut before = String::new();
        store.render_metrics(&mut before);
        assert_eq!(metric(&before, "chatapp_store_commits_total"), 0);

        // Three appends in one call go into one group commit; a duplicate writes nothing.
        let requests = (1..=3u8)
            .map(|n| AppendRequest {
                mailbox: mailbox.clone(),
                message_id: [n; 16],
                record: vec![n; 40],
                max_depth: 10,
            })
            .collect();
        for outcome in store.append_many(requests).await {
            outcome.expect("append");
        }
        store
            .append(&mailbox, [1; 16], vec![1; 40], 10)
            .await
            .expect("duplicate");
        assert_eq!(store.ack(&mailbox, 2).await.expect("ack"), 2);

        let mut text = String::new();
        store.render_metrics(&mut text);
        let commits = metric(&text, "chatapp_store_commits_total");
        assert_eq!(commits, 2, "the appends and the ack: {text}");
        assert_eq!(metric(&text, "chatapp_store_committed_entries_total"), 4);
        assert_eq!(metric(&text, "chatapp_store_disk_seconds_count"), commits);
        assert!(text.contains("# TYPE chatapp_store_disk_seconds histogram"));
    }

    #[tokio::test]
    async fn account_record_copied_into_another_users_row_does_not_open() {
        let (dir, keys, store) = opened().await;
        store
            .create_account("alice", b"alice-keys".to_vec())
            .await
            .expect("alice");
        store
            .create_account("mallory", b"mallory-keys".to_vec())
            .await
            .expect("mallory");
        drop(store);

        // A storage attacker copies mallory's sealed record into alice's row.
        // The committer lets go of the file a moment after its last answer.
        let db = create_database(&dir.path().join(FILE_NAME)).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut table = txn.open_table(ACCOUNTS).expect("table");
            let mallory = table
                .get("mallory")
                .expect("get")
                .expect("row")
                .value()
                .to_vec();
            table.insert("alice", mallory.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
        drop(db);

        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        let err = store
            .get_account("alice")
            .await
            .expect_err("swapped record");
        assert!(
            matches!(
                err,
                StoreError::Unseal {
                    table: Table::Accounts,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn every_stored_value_is_a_sealed_record_under_the_active_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), DataKeyRing::generate(&mut OsRng))
            .await
            .expect("open");
        let mailbox = MailboxId::new("bob", 1);
        store
            .create_account("bob", b"acct".to_vec())
            .await
            .expect("account");
        store
            .add_prekeys("bob", 1, vec![(1, [1; 32]), (2, [2; 32])])
            .await
            .expect("prekeys");
        store.append_leaf(b"leaf".to_vec()).await.expect("leaf");
        store.put_tree_head(b"head".to_vec()).await.expect("head");
        store
            .append(&mailbox, [1; 16], b"m1".to_vec(), 10)
            .await
            .expect("m1");
        store
            .append(&mailbox, [2; 16], b"m2".to_vec(), 10)
            .await
            .expect("m2");
        store.ack(&mailbox, 1).await.expect("ack");
        drop(store);

        // The committer lets go of the file a moment after its last answer.
        let db = create_database(&dir.path().join(FILE_NAME)).expect("raw open");
        let txn = db.begin_read().expect("txn");
        let mut values: Vec<Vec<u8>> = Vec::new();
        macro_rules! collect {
            ($def:expr) => {
                for entry in txn.open_table($def).expect("table").iter().expect("iter") {
                    values.push(entry.expect("entry").1.value().to_vec());
                }
            };
        }
        collect!(ACCOUNTS);
        collect!(PREKEYS);
        collect!(LEAVES);
        collect!(META);
        // Account, two prekeys, a leaf, the tree head and the mailboxes-in-log marker.
        assert_eq!(values.len(), 1 + 2 + 1 + 2);
        for value in values {
            assert!(value.len() >= super::super::seal::MIN_RECORD_LEN);
            assert_eq!(
                &value[..5],
                &[super::super::seal::RECORD_VERSION, 0, 0, 0, 1],
                "the current record version, key id 1"
            );
        }
        // The mailboxes are in the log, not in tables.
        assert!(matches!(
            txn.open_table(MAILBOX_MESSAGES),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }

    #[tokio::test]
    async fn acked_ids_beyond_the_dedup_window_are_forgotten_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open_with_dedup(
            dir.path(),
            DataKeyRing::generate(&mut OsRng),
            2,
            DEDUP_IDLE,
        )
        .await
        .expect("open");
        let mailbox = MailboxId::new("uma", 1);
        for n in 1..=4u8 {
            store
                .append(&mailbox, [n; 16], vec![n], 10)
                .await
                .expect("append");
        }
        store.ack(&mailbox, 3).await.expect("ack");
        // Ids 2 and 3 (the last two acked) and 4 (pending) are remembered; id 1 is forgotten.
        for n in 2..=4u8 {
            let again = store
                .append(&mailbox, [n; 16], vec![n], 10)
                .await
                .expect("resend");
            assert_eq!((again.seq, again.duplicate), (u64::from(n), true));
        }
        let forgotten = store
            .append(&mailbox, [1; 16], vec![1], 10)
            .await
            .expect("resend");
        assert_eq!((forgotten.seq, forgotten.duplicate), (5, false));

        assert_eq!(
            store.inner.mailboxes.remembered(&mailbox),
            2,
            "the acked ring holds the window"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_are_batched_yet_each_durable_and_in_order() {
        let (dir, keys, store) = opened().await;
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..200u32 {
            let store = store.clone();
            tasks.spawn(async move {
                let mailbox = MailboxId::new(format!("u{}", n % 4), 1);
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&n.to_be_bytes());
                let outcome = store.append(&mailbox, id, vec![7; 64], 1000).await;
                (n, outcome.expect("append"))
            });
        }
        let mut seqs: Vec<Vec<u64>> = vec![Vec::new(); 4];
        while let Some(done) = tasks.join_next().await {
            let (n, outcome) = done.expect("task");
            assert!(!outcome.duplicate);
            seqs[(n % 4) as usize].push(outcome.seq);
        }
        // Every acknowledged append survives a reopen, under the seq it was acknowledged with.
        drop(store);
        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        for (u, mut got) in seqs.into_iter().enumerate() {
            got.sort_unstable();
            assert_eq!(got, (1..=50).collect::<Vec<u64>>(), "mailbox u{u}");
            let stored = store
                .fetch(&MailboxId::new(format!("u{u}"), 1), 0, 100)
                .await
                .expect("fetch");
            assert_eq!(stored.len(), 50);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_full_mailbox_in_a_batch_refuses_only_its_own_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), DataKeyRing::generate(&mut OsRng))
            .await
            .expect("open");
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..40u8 {
            let store = store.clone();
            tasks.spawn(async move {
                // Mailbox "small" holds 5; "big" holds all of its 20.
                let (user, limit) = if n % 2 == 0 {
                    ("small", 5)
                } else {
                    ("big", 100)
                };
                let outcome = store
                    .append(&MailboxId::new(user, 1), [n; 16], vec![n], limit)
                    .await;
                (user, outcome)
            });
        }
        let (mut small_ok, mut small_full, mut big_ok) = (0, 0, 0);
        while let Some(done) = tasks.join_next().await {
            match done.expect("task") {
                ("small", Ok(_)) => small_ok += 1,
                ("small", Err(StoreError::MailboxFull { limit: 5 })) => small_full += 1,
                ("big", Ok(_)) => big_ok += 1,
                (user, other) => panic!("{user}: {other:?}"),
            }
        }
        assert_eq!((small_ok, small_full, big_ok), (5, 15, 20));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_same_message_id_twice_in_one_batch_is_stored_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), DataKeyRing::generate(&mut OsRng))
            .await
            .expect("open");
        let mailbox = MailboxId::new("dup", 1);
        let (a, b) = tokio::join!(
            store.append(&mailbox, [9; 16], b"x".to_vec(), 10),
            store.append(&mailbox, [9; 16], b"x".to_vec(), 10)
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!((a.seq, b.seq), (1, 1));
        assert!(a.duplicate != b.duplicate, "exactly one is the original");
        assert_eq!(store.depth(&mailbox).await.expect("depth"), 1);
    }

    /// Appends per second one at a time (one commit each, as before group commit) and 32 at a
    /// time (batched). Timing, not a check: `cargo test -p chat-server group_commit -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "timing; run by hand"]
    async fn group_commit_throughput() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), DataKeyRing::generate(&mut OsRng))
            .await
            .expect("open");
        for concurrency in [1u32, 32] {
            let start = std::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for c in 0..concurrency {
                let store = store.clone();
                tasks.spawn(async move {
                    for n in 0..(1000 / concurrency) {
                        let mut id = [0u8; 16];
                        id[..4].copy_from_slice(&c.to_be_bytes());
                        id[4..8].copy_from_slice(&n.to_be_bytes());
                        id[8..12].copy_from_slice(&concurrency.to_be_bytes());
                        let mailbox = MailboxId::new(format!("c{c}"), 1);
                        store
                            .append(&mailbox, id, vec![0; 300], 1_000_000)
                            .await
                            .expect("append");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            let per_sec = 1000.0 / start.elapsed().as_secs_f64();
            println!("{concurrency} concurrent appenders: {per_sec:.0} appends/s");
        }
    }

    fn log_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join(super::super::mailbox_log::LOG_FILE)
    }

    async fn append_n(store: &EmbeddedStore, mailbox: &MailboxId, ids: std::ops::Range<u8>) {
        for n in ids {
            let outcome = store
                .append(mailbox, [n; 16], vec![n; 40], 1000)
                .await
                .expect("append");
            assert!(!outcome.duplicate);
        }
    }

    async fn ids_in(store: &EmbeddedStore, mailbox: &MailboxId) -> Vec<(u64, u8)> {
        store
            .fetch(mailbox, 0, 1000)
            .await
            .expect("fetch")
            .into_iter()
            .map(|m| {
                assert_eq!(m.record, vec![m.message_id[0]; 40], "record of {}", m.seq);
                (m.seq, m.message_id[0])
            })
            .collect()
    }

    #[tokio::test]
    async fn a_torn_last_batch_is_cut_off_and_everything_acknowledged_stays() {
        let (dir, keys, store) = opened().await;
        let mailbox = MailboxId::new("tess", 1);
        append_n(&store, &mailbox, 1..4).await;
        let good_len = store.inner.mailboxes.end();
        drop(store);
        assert!(
            std::fs::metadata(log_path(&dir)).expect("log").len() > good_len,
            "zeros are written ahead"
        );

        // A crash in the middle of the next batch's write: its header promises 500 bytes and
        // fewer made it to the disk, over the zeros written ahead.
        let mut torn = 500u32.to_le_bytes().to_vec();
        torn.extend_from_slice(&[7u8; 120]);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(log_path(&dir))
            .expect("open log");
        std::os::unix::fs::FileExt::write_all_at(&file, &torn, good_len).expect("write");
        drop(file);

        let store = EmbeddedStore::open(dir.path(), key_file_of(&keys))
            .await
            .expect("reopen after a torn write");
        assert_eq!(
            std::fs::metadata(log_path(&dir)).expect("log").len(),
            good_len
        );
        assert_eq!(ids_in(&store, &mailbox).await, vec![(1, 1), (2, 2), (3, 3)]);
        let next = store
            .append(&mailbox, [4; 16], vec![4; 40], 1000)
            .await
            .expect("append");
        assert_eq!((next.seq, next.duplicate), (4, false));
        let store = reopen(store, &dir, &keys).await;
        assert_eq!(ids_in(&store, &mailbox).await.len(), 4);

        // A zero-filled tail (the file grew, its data never landed) is torn too.
        drop(store);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(log_path(&dir))
            .expect("open log");
        std::io::Write::write_all(&mut file, &[0u8; 4096]).expect("write");
        drop(file);
        let store = EmbeddedStore::open(dir.path(), keys)
            .await
            .expect("reopen after a zero-filled tail");
        assert_eq!(ids_in(&store, &mailbox).await.len(), 4);
    }

    #[tokio::test]
    async fn a_damaged_batch_with_more_after_it_refuses_to_open() {
        let (dir, keys, store) = opened().await;
        let mailbox = MailboxId::new("dora", 1);
        append_n(&store, &mailbox, 1..4).await;
        drop(store);
        let mut bytes = std::fs::read(log_path(&dir)).expect("read");
        // Flip a byte inside the first batch's sealed entry. The header is 16 bytes, a
        // length and the sealed check entry: 4 + sealing overhead + 19.
        let first_batch = 16 + 4 + super::super::seal::MIN_RECORD_LEN + 19;
        bytes[first_batch + 4 + 4 + 30] ^= 0x55;
        std::fs::write(log_path(&dir), &bytes).expect("write");
        let err = EmbeddedStore::open(dir.path(), keys)
            .await
            .expect_err("a damaged batch in the middle is not a torn write");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert_eq!(
            std::fs::read(log_path(&dir)).expect("read"),
            bytes,
            "a refused open changes nothing"
        );
    }

    #[tokio::test]
    async fn fresh_records_are_delivered_from_memory_and_read_the_same_from_the_file() {
        let (dir, keys, store) = opened().await;
        let mailbox = MailboxId::new("rita", 1);
        append_n(&store, &mailbox, 1..6).await;
        assert_eq!(store.inner.mailboxes.recent_count(), 5);
        let from_memory = ids_in(&store, &mailbox).await;
        store.ack(&mailbox, 2).await.expect("ack");
        assert_eq!(
            store.inner.mailboxes.recent_count(),
            3,
            "acked records are let go"
        );
        drop(store);
        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        assert_eq!(store.inner.mailboxes.recent_count(), 0);
        assert_eq!(ids_in(&store, &mailbox).await, from_memory[2..].to_vec());
    }

    #[tokio::test]
    async fn a_wrong_data_key_refuses_to_open_and_cuts_nothing_off() {
        let (dir, keys, store) = opened().await;
        let mailbox = MailboxId::new("walt", 1);
        append_n(&store, &mailbox, 1..3).await;
        drop(store);
        let before = std::fs::read(log_path(&dir)).expect("read");
        let err = EmbeddedStore::open(dir.path(), DataKeyRing::generate(&mut OsRng))
            .await
            .expect_err("wrong key");
        assert!(matches!(err, StoreError::Unseal { .. }), "{err}");
        assert_eq!(std::fs::read(log_path(&dir)).expect("read"), before);
        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        assert_eq!(ids_in(&store, &mailbox).await.len(), 2);
    }

    #[tokio::test]
    async fn compaction_keeps_messages_counters_and_remembered_ids() {
        let (dir, keys, store) = opened().await;
        let (a, b) = ann_and_ben_mostly_acked(&store).await;
        let before = std::fs::metadata(log_path(&dir)).expect("log").len();
        let after = compact_now(&store, &dir);
        assert!(after < before, "{after} bytes after, {before} before");

        check_compacted(&store, &a, &b).await;
        drop(store);
        // The compacted file replays to the same.
        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        check_compacted(&store, &a, &b).await;
    }

    #[tokio::test]
    async fn a_compaction_forgets_the_acked_ids_of_idle_mailboxes_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = DataKeyRing::generate(&mut OsRng);
        // Long enough that Ben's append and the compaction after it (an fsync each) never
        // take it on a loaded machine.
        let idle = std::time::Duration::from_millis(1500);
        let store = EmbeddedStore::open_with_dedup(dir.path(), key_file_of(&keys), 10, idle)
            .await
            .expect("open");
        let (a, b) = ann_and_ben_mostly_acked(&store).await;
        let mailboxes = &store.inner.mailboxes;
        assert_eq!(
            (mailboxes.remembered(&a), mailboxes.remembered(&b)),
            (10, 5)
        );
        tokio::time::sleep(idle + std::time::Duration::from_millis(200)).await;
        // Ben's mailbox is in use again; Ann's has been idle for longer than `idle`.
        append_n(&store, &b, 6..7).await;
        compact_now(&store, &dir);
        assert_eq!((mailboxes.remembered(&a), mailboxes.remembered(&b)), (0, 5));

        // Ann's unacked messages and counters are all there, and so are Ben's acked ids.
        assert_eq!(
            ids_in(&store, &a).await,
            (16..=20).map(|n| (n, n as u8)).collect::<Vec<_>>()
        );
        assert_recognised(&store, &[(&a, 18, 18), (&b, 5, 5), (&b, 6, 6)]).await;
        // Reopened, the compacted file brings back no forgotten id.
        drop(store);
        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        assert_eq!(store.inner.mailboxes.remembered(&a), 0);
        assert_eq!(store.inner.mailboxes.remembered(&b), 5);
        // A resend of an acked id Ann's mailbox forgot is a new message, after the last seq.
        let forgotten = store
            .append(&a, [11; 16], vec![11; 40], 1000)
            .await
            .expect("resend");
        assert_eq!((forgotten.seq, forgotten.duplicate), (21, false));
    }

    #[tokio::test]
    async fn a_reopened_log_counts_only_its_live_part_towards_the_next_compaction() {
        let (dir, keys, store) = opened().await;
        let (a, b) = (MailboxId::new("ann", 1), MailboxId::new("ben", 2));
        append_n(&store, &a, 1..101).await;
        append_n(&store, &b, 1..11).await;
        assert_eq!(store.ack(&a, 95).await.expect("ack"), 95);
        drop(store);
        let file = std::fs::metadata(log_path(&dir)).expect("log").len();

        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        let live = store.inner.mailboxes.snapshot_len();
        // Mostly acked: the live part is a small share of the file, not all of it.
        assert!(live * 4 < file, "live {live} of {file} bytes");
        // And it is what a compaction writes (give or take its batch headers).
        let written = compact_now(&store, &dir);
        assert!(
            live <= written && written - live <= 16,
            "estimated {live}, compaction wrote {written}"
        );
    }

    #[tokio::test]
    async fn the_replaced_log_becomes_the_spare_the_next_compaction_writes_over() {
        let (dir, keys, store) = opened().await;
        let (a, b) = ann_and_ben_mostly_acked(&store).await;
        let log = std::fs::File::open(log_path(&dir)).expect("log");
        let spare = dir.path().join("mailboxes.log.spare");
        const SPARE: u64 = 1024 * 1024;
        let mailboxes = &store.inner.mailboxes;

        // No spare yet: a new file; the replaced one is zeroed in place and kept as the spare.
        let compact = |spare| mailboxes.compact_now(&store.inner.keys, spare);
        compact(Some(SPARE)).expect("compact");
        check_compacted(&store, &a, &b).await;
        assert!(!dir.path().join("mailboxes.log.old").exists());
        assert_eq!(std::fs::metadata(&spare).expect("spare").len(), SPARE);
        let zeros = std::fs::read(&spare).expect("spare");
        assert!(zeros.iter().all(|&b| b == 0), "the spare holds only zeros");
        use std::os::unix::fs::MetadataExt;
        let recycled = std::fs::metadata(&spare).expect("spare").ino();
        assert_eq!(
            recycled,
            log.metadata().expect("old log").ino(),
            "the same file"
        );

        // The next compaction writes over it: the log is the spare's size, zeros after the data.
        append_n(&store, &b, 6..56).await;
        compact(None).expect("compact");
        assert!(!spare.exists(), "the spare was used up");
        let meta = std::fs::metadata(log_path(&dir)).expect("log");
        assert_eq!((meta.ino(), meta.len()), (recycled, SPARE));
        let data = mailboxes.end();
        assert!(data < SPARE / 4, "{data} bytes of data");

        // Appends overwrite the zeros: the file does not grow (no block to allocate, no
        // journal commit for their fsyncs to wait for).
        append_n(&store, &b, 56..100).await;
        assert!(mailboxes.end() > data);
        assert_eq!(std::fs::metadata(log_path(&dir)).expect("log").len(), SPARE);

        // Reopened, the zeros are kept and everything is there.
        drop(store);
        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        assert_eq!(std::fs::metadata(log_path(&dir)).expect("log").len(), SPARE);
        assert_eq!(ids_in(&store, &a).await.len(), 5);
        assert_eq!(
            ids_in(&store, &b).await,
            (6..100).map(|n| (n, n as u8)).collect::<Vec<_>>()
        );
        append_n(&store, &b, 100..104).await;
        assert_eq!(std::fs::metadata(log_path(&dir)).expect("log").len(), SPARE);
    }

    #[tokio::test]
    async fn a_second_name_of_the_log_left_by_a_crash_is_removed_and_the_log_kept() {
        // A crash between linking the log as `.old` and renaming the new file over it leaves
        // both names on the one live log; zeroing `.old` then would wipe it.
        let (dir, keys, store) = opened().await;
        let a = MailboxId::new("ann", 1);
        append_n(&store, &a, 1..11).await;
        drop(store);
        let old = dir.path().join("mailboxes.log.old");
        std::fs::hard_link(log_path(&dir), &old).expect("link");

        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        assert!(!old.exists(), "the second name is gone");
        assert_eq!(ids_in(&store, &a).await.len(), 10);
        store
            .inner
            .mailboxes
            .compact_now(&store.inner.keys, Some(64 * 1024))
            .expect("compact");
        assert_eq!(ids_in(&store, &a).await.len(), 10);
    }

    /// Compacts the log on this thread; the size of the file it wrote.
    fn compact_now(store: &EmbeddedStore, dir: &tempfile::TempDir) -> u64 {
        store
            .inner
            .mailboxes
            .compact_now(&store.inner.keys, None)
            .expect("compact");
        std::fs::metadata(log_path(dir)).expect("log").len()
    }

    /// Ann with messages 1-20 and Ben with 1-5, acked up to 15 and 5: what
    /// [`check_compacted`] expects to find.
    async fn ann_and_ben_mostly_acked(store: &EmbeddedStore) -> (MailboxId, MailboxId) {
        let (a, b) = (MailboxId::new("ann", 1), MailboxId::new("ben", 2));
        append_n(store, &a, 1..21).await;
        append_n(store, &b, 1..6).await;
        assert_eq!(store.ack(&a, 15).await.expect("ack"), 15);
        assert_eq!(store.ack(&b, 5).await.expect("ack"), 5);
        (a, b)
    }

    async fn check_compacted(store: &EmbeddedStore, a: &MailboxId, b: &MailboxId) {
        assert_eq!(
            ids_in(store, a).await,
            (16..=20).map(|n| (n, n as u8)).collect::<Vec<_>>()
        );
        assert!(ids_in(store, b).await.is_empty());
        assert_eq!(store.depth(a).await.expect("depth"), 5);
        assert_eq!(store.next_seq(b).await.expect("next"), 6);
        // An acked id and an unacked one are both still recognised.
        assert_recognised(store, &[(a, 3, 3), (a, 18, 18), (b, 5, 5)]).await;
    }

    /// Resends each `(mailbox, id)` (as [`append_n`] sent it) and checks it is answered as a
    /// duplicate of `seq`.
    async fn assert_recognised(store: &EmbeddedStore, resends: &[(&MailboxId, u8, u64)]) {
        for &(mailbox, id, seq) in resends {
            let again = store
                .append(mailbox, [id; 16], vec![id; 40], 1000)
                .await
                .expect("resend");
            assert_eq!(
                (again.seq, again.duplicate),
                (seq, true),
                "{mailbox} id {id}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn compaction_while_appends_and_acks_go_on_loses_and_revives_nothing() {
        let (dir, keys, store) = opened().await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..4u8 {
            let (store, stop) = (store.clone(), stop.clone());
            writers.spawn(async move {
                let mailbox = MailboxId::new(format!("w{w}"), 1);
                let mut n = 0u32;
                // Append until stopped, acking all but the last 10 every 25 appends.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 200 {
                    n += 1;
                    let mut id = [w; 16];
                    id[..4].copy_from_slice(&n.to_be_bytes());
                    let outcome = store
                        .append(&mailbox, id, n.to_be_bytes().to_vec(), 100_000)
                        .await
                        .expect("append");
                    assert_eq!((outcome.seq, outcome.duplicate), (u64::from(n), false));
                    if n % 25 == 0 {
                        store.ack(&mailbox, u64::from(n) - 10).await.expect("ack");
                    }
                }
                (mailbox, n)
            });
        }
        // Three compactions, each racing the writers.
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            let s = store.clone();
            tokio::task::spawn_blocking(move || {
                s.inner.mailboxes.compact_now(&s.inner.keys, Some(1 << 20))
            })
            .await
            .expect("join")
            .expect("compact");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut expected = Vec::new();
        while let Some(done) = writers.join_next().await {
            let (mailbox, n) = done.expect("writer");
            let acked = u64::from(n / 25 * 25).saturating_sub(10);
            expected.push((mailbox, acked, n));
        }
        let check = |store: EmbeddedStore, expected: Vec<(MailboxId, u64, u32)>| async move {
            for (mailbox, acked, n) in expected {
                let got: Vec<u64> = store
                    .fetch(&mailbox, 0, 100_000)
                    .await
                    .expect("fetch")
                    .into_iter()
                    .map(|m| {
                        assert_eq!(m.record, (m.seq as u32).to_be_bytes().to_vec());
                        m.seq
                    })
                    .collect();
                assert_eq!(
                    got,
                    (acked + 1..=u64::from(n)).collect::<Vec<_>>(),
                    "{mailbox}"
                );
                assert_eq!(
                    store.next_seq(&mailbox).await.expect("next"),
                    u64::from(n) + 1
                );
                // The first acked id is still remembered (the window is 10 000).
                let mut id = [mailbox.username.as_bytes()[1] - b'0'; 16];
                id[..4].copy_from_slice(&1u32.to_be_bytes());
                let again = store
                    .append(&mailbox, id, vec![], 100_000)
                    .await
                    .expect("resend");
                assert_eq!((again.seq, again.duplicate), (1, true), "{mailbox}");
            }
        };
        check(store.clone(), expected.clone()).await;
        drop(store);
        let store = EmbeddedStore::open(dir.path(), keys).await.expect("reopen");
        check(store, expected).await;
    }

    /// Appends message `n` (id and record of `n`s) to `mailbox` through the log itself, as
    /// the store's append does, on a blocking thread: a write in the middle of a compaction.
    fn append_in_log(store: &EmbeddedStore, mailbox: &MailboxId, n: u8) {
        let log = &store.inner.mailboxes;
        let commit = || log.commit_queued(&store.inner.keys, &|| {});
        let request = AppendRequest {
            mailbox: mailbox.clone(),
            message_id: [n; 16],
            record: vec![n; 40],
            max_depth: 1000,
        };
        for answer in log.enqueue_appends(vec![request], commit) {
            answer.blocking_recv().expect("answer").expect("append");
        }
    }

    /// A batch whose write or `fdatasync` fails is refused as a whole: its appends are not
    /// delivered and its acks are undone (the file is cut back to the batch before and the
    /// index rebuilt from it), nothing of it is found after a reopen, and the log goes on.
    #[tokio::test]
    async fn a_failed_write_refuses_its_batch_undoes_its_acks_and_the_log_goes_on() {
        let (dir, keys, store) = opened().await;
        let (sam, tia) = (MailboxId::new("sam", 1), MailboxId::new("tia", 1));
        append_n(&store, &sam, 1..4).await;
        append_n(&store, &tia, 1..2).await;
        let (s, m, t) = (store.clone(), sam.clone(), tia.clone());
        tokio::task::spawn_blocking(move || {
            let log = &s.inner.mailboxes;
            // Queued without a committer, then committed as one batch below.
            let later = || {};
            let request = |mailbox: &MailboxId, n: u8| AppendRequest {
                mailbox: mailbox.clone(),
                message_id: [n; 16],
                record: vec![n; 40],
                max_depth: 1000,
            };
            let acked = log.enqueue_ack(&m, 2, later);
            let appended = log.enqueue_appends(vec![request(&m, 4), request(&t, 2)], later);
            log.inject_write_failure();
            log.commit_queued(&s.inner.keys, &|| {});
            let ack = acked.blocking_recv().expect("answered");
            assert!(ack.is_err(), "the ack was answered {ack:?}");
            for answer in appended {
                let answer = answer.blocking_recv().expect("answered");
                assert!(answer.is_err(), "an append was answered {answer:?}");
            }
        })
        .await
        .expect("join");
        let before = [(1, 1), (2, 2), (3, 3)];
        assert_eq!(ids_in(&store, &sam).await, before);
        assert_eq!(ids_in(&store, &tia).await, [(1, 1)]);
        // The refused appends were never stored: sent again, they are new, with the same seqs.
        append_n(&store, &sam, 4..5).await;
        append_n(&store, &tia, 2..3).await;
        store.ack(&sam, 1).await.expect("ack");
        let after = [(2, 2), (3, 3), (4, 4)];
        assert_eq!(ids_in(&store, &sam).await, after);
        let store = reopen(store, &dir, &keys).await;
        assert_eq!(ids_in(&store, &sam).await, after);
        assert_eq!(ids_in(&store, &tia).await, [(1, 1), (2, 2)]);
    }

    /// A compaction plans one mailbox per step in tests. Writes that land between the steps
    /// are in the state of a mailbox taken after them and must not be copied again (a second
    /// copy of an append makes the reopened log refuse to open); writes after a mailbox was
    /// taken must be copied.
    #[tokio::test]
    async fn writes_between_the_steps_of_a_compactions_plan_are_kept_once() {
        let (dir, keys, store) = opened().await;
        let (ann, ben) = (MailboxId::new("ann", 1), MailboxId::new("ben", 1));
        append_n(&store, &ann, 1..4).await;
        append_n(&store, &ben, 1..4).await;
        store.ack(&ann, 1).await.expect("ack");
        let s = store.clone();
        let (a, b) = (ann.clone(), ben.clone());
        tokio::task::spawn_blocking(move || {
            let (ann, ben) = (a, b);
            let log = &s.inner.mailboxes;
            let commit = || log.commit_queued(&s.inner.keys, &|| {});
            let append = |m: &MailboxId, n: u8| append_in_log(&s, m, n);
            let mut step = 0;
            s.inner
                .mailboxes
                .compact_now_then(&s.inner.keys, None, &mut || {
                    step += 1;
                    match step {
                        // ann was taken; ben was not yet.
                        1 => {
                            append(&ben, 4);
                            let acked = log.enqueue_ack(&ben, 2, commit);
                            assert_eq!(acked.blocking_recv().expect("answer").expect("ack"), 2);
                            append(&ann, 4);
                        }
                        // Both taken: the plan is done.
                        2 => append(&ben, 5),
                        _ => {}
                    }
                })
                .expect("compact");
            assert_eq!(step, 2, "one mailbox per step");
        })
        .await
        .expect("join");
        // (seq, id): the ids were appended as 1, 2, 3, ... in each mailbox.
        assert_eq!(ids_in(&store, &ann).await, [(2, 2), (3, 3), (4, 4)]);
        assert_eq!(ids_in(&store, &ben).await, [(3, 3), (4, 4), (5, 5)]);
        let store = reopen(store, &dir, &keys).await;
        assert_eq!(ids_in(&store, &ann).await, [(2, 2), (3, 3), (4, 4)]);
        assert_eq!(ids_in(&store, &ben).await, [(3, 3), (4, 4), (5, 5)]);
        assert_eq!(store.next_seq(&ben).await.expect("next"), 6);
    }

    /// Catch-up rounds in the background that find more to copy each time stop, and the rest
    /// is caught up on the compaction's own thread: every write is kept once.
    #[tokio::test]
    async fn a_catch_up_that_falls_behind_goes_on_at_normal_priority_and_keeps_every_write() {
        let (dir, keys, store) = opened().await;
        let ann = MailboxId::new("ann", 1);
        append_n(&store, &ann, 1..4).await;
        let s = store.clone();
        let a = ann.clone();
        let (times, last) = tokio::task::spawn_blocking(move || {
            let log = &s.inner.mailboxes;
            let mut next = 4u8;
            let mut append = |count: usize| {
                for _ in 0..count {
                    append_in_log(&s, &a, next);
                    next += 1;
                }
            };
            // Before round r the committer has written r + 1 messages: always more.
            let times = log
                .compact_now_with(&s.inner.keys, None, &mut || {}, &mut |round| {
                    append(round + 1)
                })
                .expect("compact");
            (times, next - 1)
        })
        .await
        .expect("join");
        assert_eq!(
            times.catch_up_rounds,
            super::super::mailbox_log::CATCH_UP_ROUNDS
        );
        assert!(
            times.rounds_at_normal_priority > 0
                && times.rounds_at_normal_priority < times.catch_up_rounds,
            "{times:?}"
        );
        let all: Vec<(u64, u8)> = (1..=last).map(|n| (u64::from(n), n)).collect();
        assert_eq!(ids_in(&store, &ann).await, all);
        let store = reopen(store, &dir, &keys).await;
        assert_eq!(ids_in(&store, &ann).await, all);
    }

    /// Messages appended and acked while a compaction catches up are copied without their
    /// records; after a reopen the unacked ones are there whole, and a resend of an acked
    /// one is still recognised.
    #[tokio::test]
    async fn a_catch_up_leaves_out_the_records_of_messages_acked_meanwhile() {
        let (dir, keys, store) = opened().await;
        let ann = MailboxId::new("ann", 1);
        append_n(&store, &ann, 1..3).await;
        let s = store.clone();
        let a = ann.clone();
        let times = tokio::task::spawn_blocking(move || {
            let log = &s.inner.mailboxes;
            let commit = || log.commit_queued(&s.inner.keys, &|| {});
            log.compact_now_with(&s.inner.keys, None, &mut || {}, &mut |round| {
                if round > 0 {
                    return;
                }
                // Five new messages, and every message up to the fourth acked.
                for n in 3..8u8 {
                    append_in_log(&s, &a, n);
                }
                let acked = log.enqueue_ack(&a, 4, commit);
                assert_eq!(acked.blocking_recv().expect("answer").expect("ack"), 4);
            })
            .expect("compact")
        })
        .await
        .expect("join");
        // 3 and 4 were written and acked after the plan; 1 and 2 were in it, acked later.
        assert_eq!(times.records_left_out, 2, "{times:?}");
        let unacked = [(5, 5), (6, 6), (7, 7)];
        assert_eq!(ids_in(&store, &ann).await, unacked);
        let store = reopen(store, &dir, &keys).await;
        assert_eq!(ids_in(&store, &ann).await, unacked);
        let records: Vec<Vec<u8>> = store
            .fetch(&ann, 0, 10)
            .await
            .expect("fetch")
            .into_iter()
            .map(|m| m.record)
            .collect();
        assert_eq!(records, [vec![5; 40], vec![6; 40], vec![7; 40]]);
        assert_recognised(&store, &[(&ann, 1, 1), (&ann, 3, 3), (&ann, 4, 4)]).await;
        assert_eq!(store.next_seq(&ann).await.expect("next"), 8);
    }

    /// Writes mailbox rows the way the store did before the mailbox log (redb tables).
    fn write_legacy_mailbox(dir: &Path, keys: &DataKeyRing) {
        let db = create_database(&dir.join(FILE_NAME)).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mailbox = MailboxId::new("lena", 3);
            let mut messages = txn.open_table(MAILBOX_MESSAGES).expect("table");
            for seq in [4u64, 5] {
                let mut plain = vec![seq as u8; 16];
                plain.extend_from_slice(&[seq as u8; 40]);
                let sealed = keys
                    .seal(Table::MailboxMessages, &seq_slot(&mailbox, seq), &plain)
                    .expect("seal");
                messages
                    .insert(("lena", 3, seq), sealed.as_slice())
                    .expect("insert");
            }
            let mut acked = txn.open_table(MAILBOX_ACKED).expect("table");
            for seq in [2u64, 3] {
                let sealed = keys
                    .seal(
                        Table::MailboxAcked,
                        &seq_slot(&mailbox, seq),
                        &[seq as u8; 16],
                    )
                    .expect("seal");
                acked
                    .insert(("lena", 3, seq), sealed.as_slice())
                    .expect("insert");
            }
            let state = MailboxState {
                last_seq: 5,
                depth: 2,
                remembered: 2,
            };
            let mut states = txn.open_table(MAILBOX_STATE).expect("table");
            let sealed = keys
                .seal(
                    Table::MailboxState,
                    &mailbox_slot(&mailbox),
                    &state.encode(),
                )
                .expect("seal");
            states
                .insert(("lena", 3), sealed.as_slice())
                .expect("insert");
            txn.open_table(MAILBOX_IDS).expect("table");
        }
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn mailboxes_of_a_database_from_before_the_log_are_moved_into_it_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = DataKeyRing::generate(&mut OsRng);
        write_legacy_mailbox(dir.path(), &keys);
        let mailbox = MailboxId::new("lena", 3);
        for round in 0..2 {
            let store = EmbeddedStore::open(dir.path(), key_file_of(&keys))
                .await
                .expect("open");
            assert_eq!(
                ids_in(&store, &mailbox).await,
                vec![(4, 4), (5, 5)],
                "round {round}"
            );
            assert_eq!(store.next_seq(&mailbox).await.expect("next"), 6);
            let again = store
                .append(&mailbox, [2; 16], vec![2; 40], 1000)
                .await
                .expect("resend");
            assert_eq!(
                (again.seq, again.duplicate),
                (2, true),
                "acked id remembered"
            );
            let txn = store.inner.db.begin_read().expect("txn");
            assert!(matches!(
                txn.open_table(MAILBOX_STATE),
                Err(redb::TableError::TableDoesNotExist(_))
            ));
        }
    }

    #[test]
    fn mailbox_state_round_trips_and_rejects_wrong_lengths() {
        let state = MailboxState {
            last_seq: 7,
            depth: 3,
            remembered: 4,
        };
        assert_eq!(
            MailboxState::decode(&state.encode()).expect("decode"),
            state
        );
        assert!(matches!(
            MailboxState::decode(&[0; 23]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
