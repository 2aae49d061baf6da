//! The embedded store: one redb file, `DIR/chat.redb`, for a single server instance.
//!
//! Every operation is one redb transaction run on tokio's blocking pool; every write commits
//! with redb's default durability (fsync on commit) before the call returns, so what a call
//! returned survives `kill -9`. redb runs one write transaction at a time, which is what makes
//! account creation, prekey hand-out and sequence assignment atomic. Every value is sealed with
//! the data-at-rest key (see [`super::seal`]); row keys stay in the clear (see [`super`]).
//!
//! Appends and acks are group-committed: concurrent [`Store::append`] and [`Store::ack`] calls
//! queue up while a commit is running and the next write transaction takes them all, one fsync
//! for the batch; each caller is answered only after that commit, so an acknowledged envelope
//! (and a deletion answered as done) is still a durable one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use super::seal::{DataKeyRing, Slot, Table};
use super::{
    AppendOutcome, AppendRequest, DEDUP_WINDOW, MailboxId, MessageId, Prekey, Store, StoreError,
    StoredMessage,
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
    /// Acked message ids remembered per mailbox ([`DEDUP_WINDOW`]; smaller in tests).
    dedup_window: u64,
    /// Appends and acks waiting for the next group commit.
    queue: Mutex<WriteQueue>,
}

/// One [`Store::append`] call waiting for its commit.
struct PendingAppend {
    mailbox: MailboxId,
    message_id: MessageId,
    record: Vec<u8>,
    max_depth: u64,
    done: tokio::sync::oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// One [`Store::ack`] call waiting for its commit.
struct PendingAck {
    mailbox: MailboxId,
    up_to_seq: u64,
    done: tokio::sync::oneshot::Sender<Result<u64, StoreError>>,
}

#[derive(Default)]
struct WriteQueue {
    appends: Vec<PendingAppend>,
    acks: Vec<PendingAck>,
    /// A committer is running on the blocking pool and will take `appends` and `acks`.
    committing: bool,
}

/// Clears `committing` if the committer unwinds, so later writes start a new one (the
/// callers of the batch it held see their answer channel closed).
struct CommitterGuard<'a>(&'a Inner);

impl Drop for CommitterGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .committing = false;
        }
    }
}

impl Inner {
    /// Commits queued acks and appends, a batch per write transaction, until the queue is empty.
    fn commit_queued(&self) {
        let _guard = CommitterGuard(self);
        loop {
            let (acks, batch) = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if queue.appends.is_empty() && queue.acks.is_empty() {
                    queue.committing = false;
                    return;
                }
                (
                    std::mem::take(&mut queue.acks),
                    std::mem::take(&mut queue.appends),
                )
            };
            let (ack_results, results) = match self.write_batch(&acks, &batch) {
                Ok(results) => results,
                // One bad write must not fail its neighbours: each alone, as without batching.
                Err(_) if acks.len() + batch.len() > 1 => (
                    acks.iter()
                        .map(|a| {
                            self.write_batch(std::slice::from_ref(a), &[])
                                .and_then(|(mut r, _)| r.remove(0))
                        })
                        .collect(),
                    batch
                        .iter()
                        .map(|p| {
                            self.write_batch(&[], std::slice::from_ref(p))
                                .and_then(|(_, mut r)| r.remove(0))
                        })
                        .collect(),
                ),
                Err(e) if acks.is_empty() => (Vec::new(), vec![Err(e)]),
                Err(e) => (vec![Err(e)], Vec::new()),
            };
            for (pending, result) in acks.into_iter().zip(ack_results) {
                let _ = pending.done.send(result);
            }
            for (pending, result) in batch.into_iter().zip(results) {
                let _ = pending.done.send(result);
            }
        }
    }

    /// Applies the acks, then the appends, in one write transaction and commits it (durably).
    /// A full mailbox refuses that append only; any other error aborts the whole transaction.
    #[allow(clippy::type_complexity)]
    fn write_batch(
        &self,
        acks: &[PendingAck],
        batch: &[PendingAppend],
    ) -> Result<
        (
            Vec<Result<u64, StoreError>>,
            Vec<Result<AppendOutcome, StoreError>>,
        ),
        StoreError,
    > {
        let txn = self.db.begin_write().map_err(db_err)?;
        let mut acked = Vec::with_capacity(acks.len());
        for a in acks {
            acked.push(Ok(ack_in(
                &txn,
                &self.keys,
                self.dedup_window,
                &a.mailbox,
                a.up_to_seq,
            )?));
        }
        let mut out = Vec::with_capacity(batch.len());
        if !batch.is_empty() {
            let mut appends = AppendTxn::open(&txn)?;
            for p in batch {
                match appends.append(&self.keys, &p.mailbox, p.message_id, &p.record, p.max_depth) {
                    Err(StoreError::MailboxFull { limit }) => {
                        out.push(Err(StoreError::MailboxFull { limit }));
                    }
                    result => out.push(Ok(result?)),
                }
            }
            appends.finish(&self.keys)?;
        }
        txn.commit().map_err(db_err)?;
        Ok((acked, out))
    }
}

/// Deletes the messages of `mailbox` up to `up_to_seq` inside `txn`, remembers their ids for
/// the duplicate window and forgets the oldest beyond `dedup_window`; how many were deleted.
fn ack_in(
    txn: &WriteTransaction,
    keys: &DataKeyRing,
    dedup_window: u64,
    mailbox: &MailboxId,
    up_to_seq: u64,
) -> Result<u64, StoreError> {
    let user = mailbox.username.as_str();
    let device = mailbox.device_id;
    let mut states = txn.open_table(MAILBOX_STATE).map_err(db_err)?;
    let mut state = MailboxState::load(&states, keys, mailbox)?;
    let mut messages = txn.open_table(MAILBOX_MESSAGES).map_err(db_err)?;
    let mut acked = txn.open_table(MAILBOX_ACKED).map_err(db_err)?;
    let mut ids = txn.open_table(MAILBOX_IDS).map_err(db_err)?;

    let mut done = Vec::new();
    for entry in messages
        .range((user, device, 0)..=(user, device, up_to_seq))
        .map_err(db_err)?
    {
        let (row, sealed) = entry.map_err(db_err)?;
        let seq = row.value().2;
        let plain = keys.open(
            Table::MailboxMessages,
            &seq_slot(mailbox, seq),
            sealed.value(),
        )?;
        done.push(decode_message(seq, plain)?);
    }
    for message in &done {
        messages
            .remove((user, device, message.seq))
            .map_err(db_err)?;
        let sealed = keys.seal(
            Table::MailboxAcked,
            &seq_slot(mailbox, message.seq),
            &message.message_id,
        )?;
        acked
            .insert((user, device, message.seq), sealed.as_slice())
            .map_err(db_err)?;
    }
    let removed = done.len() as u64;
    state.depth = state.depth.saturating_sub(removed);
    state.remembered += removed;

    // Forget the oldest acked ids beyond the duplicate window.
    while state.remembered > dedup_window {
        let oldest = {
            let mut range = acked
                .range((user, device, 0)..=(user, device, u64::MAX))
                .map_err(db_err)?;
            match range.next() {
                None => None,
                Some(entry) => {
                    let (row, sealed) = entry.map_err(db_err)?;
                    Some((row.value().2, sealed.value().to_vec()))
                }
            }
        };
        let Some((seq, sealed)) = oldest else {
            state.remembered = 0;
            break;
        };
        let plain = keys.open(Table::MailboxAcked, &seq_slot(mailbox, seq), &sealed)?;
        let message_id = read_message_id(&plain, "acked message id")?;
        acked.remove((user, device, seq)).map_err(db_err)?;
        ids.remove((user, device, message_id)).map_err(db_err)?;
        state.remembered -= 1;
    }

    if removed > 0 {
        let sealed_state =
            keys.seal(Table::MailboxState, &mailbox_slot(mailbox), &state.encode())?;
        states
            .insert((user, device), sealed_state.as_slice())
            .map_err(db_err)?;
    }
    Ok(removed)
}

fn committer_stopped() -> StoreError {
    StoreError::Backend("the store's committer stopped".into())
}

type AppendAnswer = tokio::sync::oneshot::Receiver<Result<AppendOutcome, StoreError>>;
type AckAnswer = tokio::sync::oneshot::Receiver<Result<u64, StoreError>>;

impl EmbeddedStore {
    /// Queues appends, in order and all under one lock (so one batch of a caller is never
    /// interleaved with another's), for the group committer.
    fn enqueue_appends(&self, appends: Vec<AppendRequest>) -> Vec<AppendAnswer> {
        if appends.is_empty() {
            return Vec::new();
        }
        let mut answers = Vec::with_capacity(appends.len());
        self.enqueue(|queue| {
            for a in appends {
                let (done, answer) = tokio::sync::oneshot::channel();
                queue.appends.push(PendingAppend {
                    mailbox: a.mailbox,
                    message_id: a.message_id,
                    record: a.record,
                    max_depth: a.max_depth,
                    done,
                });
                answers.push(answer);
            }
        });
        answers
    }

    /// Queues an ack for the group committer.
    fn enqueue_ack(&self, mailbox: &MailboxId, up_to_seq: u64) -> AckAnswer {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.enqueue(|queue| {
            queue.acks.push(PendingAck {
                mailbox: mailbox.clone(),
                up_to_seq,
                done,
            })
        });
        answer
    }

    /// Adds to the write queue under its lock and starts the committer if it is idle.
    fn enqueue(&self, add: impl FnOnce(&mut WriteQueue)) {
        let start_committer = {
            let mut queue = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            add(&mut queue);
            !std::mem::replace(&mut queue.committing, true)
        };
        if start_committer {
            let inner = Arc::clone(&self.inner);
            tokio::task::spawn_blocking(move || inner.commit_queued());
        }
    }
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
        Self::open_with_dedup_window(dir, keys, DEDUP_WINDOW).await
    }

    async fn open_with_dedup_window(
        dir: impl AsRef<Path>,
        keys: DataKeyRing,
        dedup_window: u64,
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
                txn.open_table(MAILBOX_MESSAGES).map_err(db_err)?;
                txn.open_table(MAILBOX_STATE).map_err(db_err)?;
                txn.open_table(MAILBOX_IDS).map_err(db_err)?;
                txn.open_table(MAILBOX_ACKED).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(Inner {
                db,
                keys,
                path,
                dedup_window,
                queue: Mutex::new(WriteQueue::default()),
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

fn id_slot(mailbox: &MailboxId, message_id: &MessageId) -> Slot {
    mailbox_slot(mailbox).bytes(message_id)
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

    fn load(
        table: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
        keys: &DataKeyRing,
        mailbox: &MailboxId,
    ) -> Result<Self, StoreError> {
        match table
            .get((mailbox.username.as_str(), mailbox.device_id))
            .map_err(db_err)?
        {
            None => Ok(MailboxState::default()),
            Some(sealed) => {
                let plain =
                    keys.open(Table::MailboxState, &mailbox_slot(mailbox), sealed.value())?;
                MailboxState::decode(&plain)
            }
        }
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

/// Appends one message inside `txn` (see [`Store::append`]); refuses before writing anything
/// when the message is a duplicate or the mailbox is full.
/// The mailbox tables of one write transaction of appends: each table opened once, and each
/// mailbox's state read once and written (sealed) once, by [`AppendTxn::finish`], however
/// many of the batch's appends go to it.
struct AppendTxn<'t> {
    ids: redb::Table<'t, (&'static str, u32, MessageId), &'static [u8]>,
    states: redb::Table<'t, (&'static str, u32), &'static [u8]>,
    messages: redb::Table<'t, (&'static str, u32, u64), &'static [u8]>,
    /// States of the mailboxes appended to, as they will be written.
    changed: HashMap<MailboxId, MailboxState>,
}

impl<'t> AppendTxn<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            ids: txn.open_table(MAILBOX_IDS).map_err(db_err)?,
            states: txn.open_table(MAILBOX_STATE).map_err(db_err)?,
            messages: txn.open_table(MAILBOX_MESSAGES).map_err(db_err)?,
            changed: HashMap::new(),
        })
    }

    fn append(
        &mut self,
        keys: &DataKeyRing,
        mailbox: &MailboxId,
        message_id: MessageId,
        record: &[u8],
        max_depth: u64,
    ) -> Result<AppendOutcome, StoreError> {
        let user = mailbox.username.as_str();
        let device = mailbox.device_id;
        if let Some(sealed) = self.ids.get((user, device, message_id)).map_err(db_err)? {
            let plain = keys.open(
                Table::MailboxIds,
                &id_slot(mailbox, &message_id),
                sealed.value(),
            )?;
            let seq = read_u64(&plain, "mailbox id")?;
            return Ok(AppendOutcome {
                seq,
                duplicate: true,
            });
        }
        let mut state = match self.changed.get(mailbox) {
            Some(state) => *state,
            None => MailboxState::load(&self.states, keys, mailbox)?,
        };
        let seq = super::next_seq_unless_full(mailbox, state.last_seq, state.depth, max_depth)?;
        state.last_seq = seq;
        state.depth += 1;

        let mut plain = Vec::with_capacity(16 + record.len());
        plain.extend_from_slice(&message_id);
        plain.extend_from_slice(record);
        let sealed = keys.seal(Table::MailboxMessages, &seq_slot(mailbox, seq), &plain)?;
        self.messages
            .insert((user, device, seq), sealed.as_slice())
            .map_err(db_err)?;
        let sealed_id = keys.seal(
            Table::MailboxIds,
            &id_slot(mailbox, &message_id),
            &seq.to_be_bytes(),
        )?;
        self.ids
            .insert((user, device, message_id), sealed_id.as_slice())
            .map_err(db_err)?;
        self.changed.insert(mailbox.clone(), state);
        Ok(AppendOutcome {
            seq,
            duplicate: false,
        })
    }

    /// Writes the state of every mailbox appended to.
    fn finish(mut self, keys: &DataKeyRing) -> Result<(), StoreError> {
        for (mailbox, state) in std::mem::take(&mut self.changed) {
            let sealed = keys.seal(
                Table::MailboxState,
                &mailbox_slot(&mailbox),
                &state.encode(),
            )?;
            self.states
                .insert(
                    (mailbox.username.as_str(), mailbox.device_id),
                    sealed.as_slice(),
                )
                .map_err(db_err)?;
        }
        Ok(())
    }
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
        let mut answers = self.enqueue_appends(vec![request]);
        match answers.pop() {
            Some(answer) => answer.await.unwrap_or_else(|_| Err(committer_stopped())),
            None => Err(committer_stopped()),
        }
    }

    async fn append_many(
        &self,
        appends: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        let mut out = Vec::with_capacity(appends.len());
        for answer in self.enqueue_appends(appends) {
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
        let mailbox = mailbox.clone();
        self.read(move |txn, keys| {
            let Some(first) = after_seq.checked_add(1) else {
                return Ok(Vec::new());
            };
            let user = mailbox.username.as_str();
            let device = mailbox.device_id;
            let table = txn.open_table(MAILBOX_MESSAGES).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table
                .range((user, device, first)..=(user, device, u64::MAX))
                .map_err(db_err)?
                .take(limit)
            {
                let (row, sealed) = entry.map_err(db_err)?;
                let seq = row.value().2;
                let plain = keys.open(
                    Table::MailboxMessages,
                    &seq_slot(&mailbox, seq),
                    sealed.value(),
                )?;
                out.push(decode_message(seq, plain)?);
            }
            Ok(out)
        })
        .await
    }

    async fn ack(&self, mailbox: &MailboxId, up_to_seq: u64) -> Result<u64, StoreError> {
        self.enqueue_ack(mailbox, up_to_seq)
            .await
            .unwrap_or_else(|_| Err(committer_stopped()))
    }

    async fn depth(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        let mailbox = mailbox.clone();
        self.read(move |txn, keys| {
            let states = txn.open_table(MAILBOX_STATE).map_err(db_err)?;
            Ok(MailboxState::load(&states, keys, &mailbox)?.depth)
        })
        .await
    }

    async fn next_seq(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        let mailbox = mailbox.clone();
        self.read(move |txn, keys| {
            let states = txn.open_table(MAILBOX_STATE).map_err(db_err)?;
            Ok(MailboxState::load(&states, keys, &mailbox)?
                .last_seq
                .saturating_add(1))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn key_file_of(keys: &DataKeyRing) -> DataKeyRing {
        DataKeyRing::from_file_string(&keys.to_file_string()).expect("parse")
    }

    #[tokio::test]
    async fn account_record_copied_into_another_users_row_does_not_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = DataKeyRing::generate(&mut OsRng);
        let store = EmbeddedStore::open(dir.path(), key_file_of(&keys))
            .await
            .expect("open");
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
        collect!(MAILBOX_MESSAGES);
        collect!(MAILBOX_STATE);
        collect!(MAILBOX_IDS);
        collect!(MAILBOX_ACKED);
        assert_eq!(values.len(), 1 + 2 + 1 + 1 + 1 + 1 + 2 + 1);
        for value in values {
            assert!(value.len() >= super::super::seal::MIN_RECORD_LEN);
            assert_eq!(&value[..5], &[1, 0, 0, 0, 1], "version 1, key id 1");
        }
    }

    #[tokio::test]
    async fn acked_ids_beyond_the_dedup_window_are_forgotten_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            EmbeddedStore::open_with_dedup_window(dir.path(), DataKeyRing::generate(&mut OsRng), 2)
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

        let txn = store.inner.db.begin_read().expect("txn");
        let acked = txn.open_table(MAILBOX_ACKED).expect("table");
        assert_eq!(
            acked.len().expect("len"),
            2,
            "the acked ring holds the window"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_are_batched_yet_each_durable_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = DataKeyRing::generate(&mut OsRng);
        let store = EmbeddedStore::open(dir.path(), key_file_of(&keys))
            .await
            .expect("open");
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
