//! The NATS store: the [`Store`] trait on NATS JetStream, shared by many chat-server instances.
//!
//! Every value is sealed with the data-at-rest key exactly like the embedded store (see
//! [`super::seal`]); subjects carry only row keys (hex usernames, device ids, prekey pools,
//! sequence numbers, message ids), which stay in the clear by design (see [`super`]). Every
//! stream uses file storage and every write waits for the JetStream publish ack, so what a call
//! returned is in the server's store (and, with `replicas = 3`, on a quorum of a NATS cluster).
//!
//! # Layout
//!
//! `<u>` is the hex of the username (`_` for the empty name), `<d>` the device id in decimal.
//!
//! | stream | subjects | per subject | what |
//! |---|---|---|---|
//! | `CHATAPP_ACCOUNTS` | `chatapp.store.account.<u>` | 1 | account record (`accounts`) |
//! | `CHATAPP_PREKEYS` | `chatapp.store.prekeys.<u>.<d>` | 1 | a device's prekey pool (`prekey_pools`) |
//! | `CHATAPP_LEAVES` | `chatapp.store.leaf` | all, no delete, no purge | directory leaf `seq - 1` (`leaves`) |
//! | `CHATAPP_META` | `chatapp.store.meta.tree_head` | 1 | latest signed tree head (`meta`) |
//! | `CHATAPP_MAILBOX` | `chatapp.store.mailbox.<u>.<d>` | all | the mailbox log (`mailbox_log`) |
//! |  | `chatapp.store.acked.<u>.<d>` | all | acked ids still remembered (`mailbox_acked`) |
//! | `CHATAPP_MSGIDS` | `chatapp.store.msgid.<u>.<d>.<hex id>` | 1 | message id -> seq (`mailbox_ids`) |
//!
//! Delivery notifications (see [`crate::backplane`]) use core NATS on `chatapp.mail.<u>.<d>`,
//! outside every stream.
//!
//! # Compare-and-swap rules
//!
//! JetStream checks `Nats-Expected-Last-Subject-Sequence` (the stream sequence of the last
//! message on the subject, 0 for "none") and `Nats-Expected-Last-Sequence` (the last sequence of
//! the whole stream) atomically with the write; a mismatch is a conflict, and the caller re-reads
//! and retries. With one message kept per subject this is a key-value store with revisions.
//! - **Accounts**: create publishes with expected subject sequence 0 (a conflict is
//!   `AlreadyExists`); put re-publishes against the revision it read (`NotFound` if none).
//! - **Prekeys**: one sealed pool per device; add and take are read-modify-write against the
//!   pool's revision, so across instances and concurrent callers each prekey is handed out once.
//! - **Leaves**: published with expected stream sequence = the index it is sealed for, so the
//!   stream sequence is always `index + 1` and appends from many instances are serialised; the
//!   index returned is the one every instance reads back.
//! - **Mailboxes**: one log subject per mailbox, each entry published against the sequence of
//!   the previous one, so the entry *is* the commit: it carries the message and the mailbox
//!   counters after it (last seq, depth, acked floor). An ack appends a marker (the new floor)
//!   the same way, then purges the acked entries (only garbage collection: readers ignore entries
//!   below the floor of the tail). No gaps, no reordering, nothing half-written.
//! - **Duplicates**: before appending, a message id is claimed by creating its subject in
//!   `CHATAPP_MSGIDS` (expected subject sequence 0) with seq 0 ("pending"); after the append the
//!   claim is replaced by the seq. A resend finds the seq and is answered as a duplicate; a
//!   concurrent resend waits for the pending claim; a claim left pending by a crashed instance is
//!   taken over after [`CLAIM_STALE`], after looking for the id in the live log and among the
//!   remembered acked ids (the message may have landed, been delivered and been acked since); a
//!   claim whose append failed is given up as stale at once (the append may have landed), never
//!   deleted, so its resend takes it over the same way. Acked ids go to
//!   the `acked` ring and are forgotten oldest first beyond the duplicate window, like the
//!   embedded store. (JetStream's own `Nats-Msg-Id` window is only time-based, so it is not used.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{
    Config as StreamConfig, DiscardPolicy, LastRawMessageErrorKind, StorageType, Stream,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt as _;

use super::seal::{DataKeyRing, Slot, Table};
use super::{
    AppendOutcome, DEDUP_WINDOW, MailboxId, MessageId, Prekey, Store, StoreError, StoredMessage,
};

/// A pending message-id claim older than this is taken to be left by a crashed instance.
pub const CLAIM_STALE: Duration = Duration::from_secs(30);
/// Compare-and-swap retries before giving up (each retry means another writer won).
const MAX_RETRIES: u32 = 10_000;
/// Leaves read concurrently by [`NatsStore::leaves`].
const LEAF_READ_CONCURRENCY: usize = 32;
/// How long one JetStream request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const ENTRY_HEADER: &str = "Chat-Entry";
const SEQ_HEADER: &str = "Chat-Seq";
const LEAF_SUBJECT: &str = "chatapp.store.leaf";
const TREE_HEAD: &str = "tree_head";

/// Knobs of a [`NatsStore`].
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// JetStream replicas of every stream (1 for one server, 3 for a cluster).
    pub replicas: usize,
    /// Acked message ids remembered per mailbox ([`DEDUP_WINDOW`]).
    pub dedup_window: u64,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            dedup_window: DEDUP_WINDOW,
        }
    }
}

/// The JetStream-backed [`Store`]. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    js: async_nats::jetstream::Context,
    keys: DataKeyRing,
    dedup_window: u64,
    accounts: Stream,
    prekeys: Stream,
    leaves: Stream,
    meta: Stream,
    mailbox: Stream,
    msgids: Stream,
    /// The last leaf count seen: the expected stream sequence of the next leaf append.
    leaf_hint: AtomicU64,
    /// Per mailbox, where the last fetch stopped: (mailbox seq, stream seq of that message).
    /// A delivery loop asks for what follows the seq it was last given, so the scan resumes at
    /// that stream position instead of walking the whole backlog again (one round trip per
    /// entry). Only a hint: the log is in seq order, so starting there skips nothing newer.
    fetch_cursors: std::sync::Mutex<HashMap<MailboxId, (u64, u64)>>,
}

/// Cursor hints kept before the map is cleared (each is a few dozen bytes).
const MAX_FETCH_CURSORS: usize = 16_384;

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("url", &self.inner.url)
            .field("keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("nats: {what}: {e}"))
}

/// A write that lost its compare-and-swap.
struct Conflict;

enum Expect {
    Nothing,
    /// Expected stream sequence of the last message on the subject (0: none).
    Subject(u64),
    /// Expected last sequence of the whole stream.
    Stream(u64),
}

impl NatsStore {
    /// Connects to `url` (`nats://host:port`), creating the streams if they do not exist.
    pub async fn connect(
        url: &str,
        keys: DataKeyRing,
        options: NatsOptions,
    ) -> Result<Self, StoreError> {
        let client = async_nats::ConnectOptions::new()
            .name("chat-server store")
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .map_err(|e| backend(&format!("cannot connect to {url}"), e))?;
        let js = async_nats::jetstream::new(client);
        let replicas = options.replicas.max(1);
        let stream = |name: &str, subjects: &[&str], per_subject: i64| StreamConfig {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            max_messages_per_subject: per_subject,
            storage: StorageType::File,
            num_replicas: replicas,
            discard: DiscardPolicy::Old,
            ..Default::default()
        };
        let mut leaves = stream("CHATAPP_LEAVES", &[LEAF_SUBJECT], 0);
        leaves.deny_delete = true;
        leaves.deny_purge = true;
        let configs = [
            stream("CHATAPP_ACCOUNTS", &["chatapp.store.account.*"], 1),
            stream("CHATAPP_PREKEYS", &["chatapp.store.prekeys.*.*"], 1),
            leaves,
            stream("CHATAPP_META", &["chatapp.store.meta.*"], 1),
            stream(
                "CHATAPP_MAILBOX",
                &["chatapp.store.mailbox.*.*", "chatapp.store.acked.*.*"],
                0,
            ),
            stream("CHATAPP_MSGIDS", &["chatapp.store.msgid.*.*.*"], 1),
        ];
        let mut streams = Vec::with_capacity(configs.len());
        for config in configs {
            let name = config.name.clone();
            let stream = js
                .get_or_create_stream(config)
                .await
                .map_err(|e| backend(&format!("cannot open stream {name} on {url}"), e))?;
            streams.push(stream);
        }
        let mut streams = streams.into_iter();
        let mut next = || {
            streams
                .next()
                .ok_or_else(|| StoreError::Backend("nats: stream list".into()))
        };
        let inner = Inner {
            url: url.to_owned(),
            js,
            keys,
            dedup_window: options.dedup_window,
            accounts: next()?,
            prekeys: next()?,
            leaves: next()?,
            meta: next()?,
            mailbox: next()?,
            msgids: next()?,
            leaf_hint: AtomicU64::new(0),
            fetch_cursors: std::sync::Mutex::new(HashMap::new()),
        };
        Ok(NatsStore {
            inner: Arc::new(inner),
        })
    }

    /// The server this store talks to.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    fn keys(&self) -> &DataKeyRing {
        &self.inner.keys
    }

    /// The last message on `subject`, if any.
    async fn last(
        &self,
        stream: &Stream,
        subject: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(backend(&format!("read {subject}"), e)),
        }
    }

    /// The first message on `subject` with stream sequence `>= from`, if any.
    async fn first_from(
        &self,
        stream: &Stream,
        subject: &str,
        from: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        match stream
            .get_first_raw_message_by_subject(subject, from.max(1))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(backend(&format!("read {subject}"), e)),
        }
    }

    /// Publishes and waits for the ack; `Err(Conflict)` inside when the expectation failed.
    async fn publish(
        &self,
        subject: &str,
        payload: Vec<u8>,
        headers: Option<HeaderMap>,
        expect: Expect,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        let mut message = PublishMessage::build().payload(Bytes::from(payload));
        if let Some(headers) = headers {
            message = message.headers(headers);
        }
        message = match expect {
            Expect::Nothing => message,
            Expect::Subject(seq) => message.expected_last_subject_sequence(seq),
            Expect::Stream(seq) => message.expected_last_sequence(seq),
        };
        let ack = self
            .inner
            .js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(|e| backend(&format!("publish {subject}"), e))?
            .await;
        match ack {
            Ok(ack) => Ok(Ok(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Err(Conflict)),
            Err(e) => Err(backend(&format!("publish {subject}"), e)),
        }
    }
}

fn token(username: &str) -> String {
    if username.is_empty() {
        "_".to_owned()
    } else {
        hex::encode(username.as_bytes())
    }
}

fn account_subject(username: &str) -> String {
    format!("chatapp.store.account.{}", token(username))
}

fn prekey_subject(username: &str, device_id: u32) -> String {
    format!("chatapp.store.prekeys.{}.{device_id}", token(username))
}

fn log_subject(mailbox: &MailboxId) -> String {
    format!(
        "chatapp.store.mailbox.{}.{}",
        token(&mailbox.username),
        mailbox.device_id
    )
}

fn acked_subject(mailbox: &MailboxId) -> String {
    format!(
        "chatapp.store.acked.{}.{}",
        token(&mailbox.username),
        mailbox.device_id
    )
}

fn msgid_subject(mailbox: &MailboxId, id: &MessageId) -> String {
    format!(
        "chatapp.store.msgid.{}.{}.{}",
        token(&mailbox.username),
        mailbox.device_id,
        hex::encode(id)
    )
}

/// The core NATS subject on which deliveries to `mailbox` are announced.
pub fn notify_subject(mailbox: &MailboxId) -> String {
    format!(
        "chatapp.mail.{}.{}",
        token(&mailbox.username),
        mailbox.device_id
    )
}

fn mailbox_slot(mailbox: &MailboxId) -> Slot {
    Slot::new().str(&mailbox.username).u32(mailbox.device_id)
}

fn read_u64(bytes: &[u8], at: usize, what: &str) -> Result<u64, StoreError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("{what}: too short")))
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn header(name: &str, value: String) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(name, value.as_str());
    headers
}

fn header_value(message: &StreamMessage, name: &str) -> Result<String, StoreError> {
    message
        .headers
        .get(name)
        .map(|v| v.as_str().to_owned())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{} #{}: no {name} header",
                message.subject, message.sequence
            ))
        })
}

// --- prekey pools ----------------------------------------------------------------------------

fn encode_pool(pool: &[Prekey]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pool.len() * 36);
    for (id, key) in pool {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(key);
    }
    out
}

fn decode_pool(bytes: &[u8]) -> Result<Vec<Prekey>, StoreError> {
    if bytes.len() % 36 != 0 {
        return Err(StoreError::Corrupt("prekey pool: not whole entries".into()));
    }
    bytes
        .chunks_exact(36)
        .map(|chunk| {
            let id = chunk
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes);
            let key = chunk.get(4..).and_then(|b| <[u8; 32]>::try_from(b).ok());
            match (id, key) {
                (Some(id), Some(key)) => Ok((id, key)),
                _ => Err(StoreError::Corrupt("prekey pool entry".into())),
            }
        })
        .collect()
}

// --- mailbox log -----------------------------------------------------------------------------

/// The counters of a mailbox after a log entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MailboxState {
    /// The largest seq ever assigned (0: none).
    last_seq: u64,
    /// Messages held (appended, not acked).
    depth: u64,
    /// Every message with `seq <= floor` is acked.
    floor: u64,
}

/// One entry of a mailbox log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LogEntry {
    Message {
        state: MailboxState,
        message_id: MessageId,
        record: Vec<u8>,
    },
    Ack {
        state: MailboxState,
    },
}

impl LogEntry {
    fn state(&self) -> MailboxState {
        match self {
            LogEntry::Message { state, .. } | LogEntry::Ack { state } => *state,
        }
    }

    /// The clear header naming the entry; it is also the row its record is sealed for.
    fn header(&self) -> String {
        match self {
            LogEntry::Message { state, .. } => format!("m {}", state.last_seq),
            LogEntry::Ack { state } => format!("a {} {}", state.floor, state.last_seq),
        }
    }

    fn slot(mailbox: &MailboxId, header: &str) -> Result<Slot, StoreError> {
        let parts: Vec<&str> = header.split(' ').collect();
        let number = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("mailbox log header {header:?}")))
        };
        match parts.as_slice() {
            ["m", seq] => Ok(mailbox_slot(mailbox).u64(number(seq)?)),
            ["a", floor, last] => Ok(mailbox_slot(mailbox)
                .u64(0)
                .u64(number(floor)?)
                .u64(number(last)?)),
            _ => Err(StoreError::Corrupt(format!(
                "mailbox log header {header:?}"
            ))),
        }
    }

    fn seal(&self, keys: &DataKeyRing, mailbox: &MailboxId) -> Result<Vec<u8>, StoreError> {
        let state = self.state();
        let mut plain = Vec::new();
        match self {
            LogEntry::Message {
                message_id, record, ..
            } => {
                plain.push(1);
                plain.extend_from_slice(&state.depth.to_be_bytes());
                plain.extend_from_slice(&state.floor.to_be_bytes());
                plain.extend_from_slice(message_id);
                plain.extend_from_slice(record);
            }
            LogEntry::Ack { .. } => {
                plain.push(2);
                plain.extend_from_slice(&state.depth.to_be_bytes());
            }
        }
        keys.seal(
            Table::MailboxLog,
            &Self::slot(mailbox, &self.header())?,
            &plain,
        )
    }

    fn open(
        keys: &DataKeyRing,
        mailbox: &MailboxId,
        message: &StreamMessage,
    ) -> Result<Self, StoreError> {
        let header = header_value(message, ENTRY_HEADER)?;
        let plain = keys.open(
            Table::MailboxLog,
            &Self::slot(mailbox, &header)?,
            &message.payload,
        )?;
        let corrupt = || StoreError::Corrupt(format!("mailbox log entry {header:?} of {mailbox}"));
        let numbers: Vec<u64> = header
            .split(' ')
            .skip(1)
            .map(|n| n.parse().map_err(|_| corrupt()))
            .collect::<Result<_, _>>()?;
        let depth = read_u64(&plain, 1, "mailbox log entry")?;
        match (plain.first(), numbers.as_slice()) {
            (Some(1), [seq]) => {
                let floor = read_u64(&plain, 9, "mailbox log entry")?;
                let message_id: MessageId = plain
                    .get(17..33)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(corrupt)?;
                Ok(LogEntry::Message {
                    state: MailboxState {
                        last_seq: *seq,
                        depth,
                        floor,
                    },
                    message_id,
                    record: plain.get(33..).ok_or_else(corrupt)?.to_vec(),
                })
            }
            (Some(2), [floor, last_seq]) if plain.len() == 9 => Ok(LogEntry::Ack {
                state: MailboxState {
                    last_seq: *last_seq,
                    depth,
                    floor: *floor,
                },
            }),
            _ => Err(corrupt()),
        }
    }
}

/// The tail of a mailbox log: its stream sequence and the counters after it.
#[derive(Debug, Clone, Copy, Default)]
struct Tail {
    stream_seq: u64,
    state: MailboxState,
}

impl NatsStore {
    async fn tail(&self, mailbox: &MailboxId) -> Result<Tail, StoreError> {
        match self
            .last(&self.inner.mailbox, &log_subject(mailbox))
            .await?
        {
            None => Ok(Tail::default()),
            Some(message) => Ok(Tail {
                stream_seq: message.sequence,
                state: LogEntry::open(self.keys(), mailbox, &message)?.state(),
            }),
        }
    }

    /// Live messages (`seq > max(after, floor of tail)`) in seq order, at most `limit`, up to
    /// the tail; with their stream sequences. The scan starts at stream sequence `from` (1 for
    /// the whole log; a later position only when every message with `seq > after` lies there
    /// or beyond).
    async fn live(
        &self,
        mailbox: &MailboxId,
        tail: &Tail,
        after: u64,
        limit: usize,
        from: u64,
    ) -> Result<Vec<(u64, StoredMessage)>, StoreError> {
        let subject = log_subject(mailbox);
        let start = after.max(tail.state.floor);
        let mut out = Vec::new();
        if start >= tail.state.last_seq || limit == 0 {
            return Ok(out);
        }
        let mut cursor = from.max(1);
        while cursor <= tail.stream_seq && out.len() < limit {
            let Some(message) = self
                .first_from(&self.inner.mailbox, &subject, cursor)
                .await?
            else {
                break;
            };
            if message.sequence > tail.stream_seq {
                break;
            }
            cursor = message.sequence + 1;
            if let LogEntry::Message {
                state,
                message_id,
                record,
            } = LogEntry::open(self.keys(), mailbox, &message)?
            {
                if state.last_seq > start {
                    out.push((
                        message.sequence,
                        StoredMessage {
                            seq: state.last_seq,
                            message_id,
                            record,
                        },
                    ));
                    if state.last_seq >= tail.state.last_seq {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The stream sequence of the message with mailbox seq `after`, if the last fetch of this
    /// mailbox stopped there.
    fn fetch_cursor(&self, mailbox: &MailboxId, after: u64) -> Option<u64> {
        let cursors = self.inner.fetch_cursors.lock().ok()?;
        cursors
            .get(mailbox)
            .filter(|(seq, _)| *seq == after && after > 0)
            .map(|(_, stream_seq)| *stream_seq)
    }

    fn set_fetch_cursor(&self, mailbox: &MailboxId, seq: u64, stream_seq: u64) {
        if let Ok(mut cursors) = self.inner.fetch_cursors.lock() {
            if cursors.len() >= MAX_FETCH_CURSORS && !cursors.contains_key(mailbox) {
                cursors.clear();
            }
            cursors.insert(mailbox.clone(), (seq, stream_seq));
        }
    }

    /// Appends with the message id already claimed by this caller.
    async fn append_claimed(
        &self,
        mailbox: &MailboxId,
        message_id: MessageId,
        record: &[u8],
        max_depth: u64,
        taken_over: bool,
    ) -> Result<AppendOutcome, StoreError> {
        let subject = log_subject(mailbox);
        for _ in 0..MAX_RETRIES {
            let tail = self.tail(mailbox).await?;
            if taken_over {
                // The crashed claimer may have appended before it died, and the message may
                // since have been delivered and acked: look in the live log, then among the
                // remembered acked ids (looking in the live log alone stored such a message a
                // second time, seen in the chaos soak).
                let live = self.live(mailbox, &tail, 0, usize::MAX, 1).await?;
                let found = match live.iter().find(|(_, m)| m.message_id == message_id) {
                    Some((_, m)) => Some(m.seq),
                    None => self.remembered_seq(mailbox, &message_id).await?,
                };
                if let Some(seq) = found {
                    return Ok(AppendOutcome {
                        seq,
                        duplicate: true,
                    });
                }
            }
            let state = tail.state;
            let seq = super::next_seq_unless_full(mailbox, state.last_seq, state.depth, max_depth)?;
            let entry = LogEntry::Message {
                state: MailboxState {
                    last_seq: seq,
                    depth: state.depth + 1,
                    floor: state.floor,
                },
                message_id,
                record: record.to_vec(),
            };
            let sealed = entry.seal(self.keys(), mailbox)?;
            let headers = header(ENTRY_HEADER, entry.header());
            match self
                .publish(
                    &subject,
                    sealed,
                    Some(headers),
                    Expect::Subject(tail.stream_seq),
                )
                .await?
            {
                Ok(_) => {
                    return Ok(AppendOutcome {
                        seq,
                        duplicate: false,
                    });
                }
                Err(Conflict) => tokio::task::yield_now().await,
            }
        }
        Err(contention(&subject))
    }

    /// Claims `message_id` for this caller, or finds it committed. Returns the claim's stream
    /// sequence and whether it was taken over from a stale claim.
    async fn claim(
        &self,
        mailbox: &MailboxId,
        message_id: &MessageId,
    ) -> Result<Result<(u64, bool), u64>, StoreError> {
        let subject = msgid_subject(mailbox, message_id);
        let slot = mailbox_slot(mailbox).bytes(message_id);
        let pending = {
            let mut plain = [0u8; 16];
            plain[8..].copy_from_slice(&unix_millis().to_be_bytes());
            plain
        };
        let started = Instant::now();
        for _ in 0..MAX_RETRIES {
            let (expect, taking_over) = match self.last(&self.inner.msgids, &subject).await? {
                Some(message) => {
                    let plain = self
                        .keys()
                        .open(Table::MailboxIds, &slot, &message.payload)?;
                    let seq = read_u64(&plain, 0, "message id")?;
                    if seq != 0 {
                        return Ok(Err(seq));
                    }
                    let claimed_at = read_u64(&plain, 8, "message id claim")?;
                    let age = unix_millis().saturating_sub(claimed_at);
                    if u128::from(age) < CLAIM_STALE.as_millis() {
                        if started.elapsed() > CLAIM_STALE {
                            return Err(StoreError::Backend(format!(
                                "nats: message id of {mailbox} stays claimed by another writer"
                            )));
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    (message.sequence, true)
                }
                None => (0, false),
            };
            let sealed = self.keys().seal(Table::MailboxIds, &slot, &pending)?;
            match self
                .publish(&subject, sealed, None, Expect::Subject(expect))
                .await?
            {
                Ok(claim) => return Ok(Ok((claim, taking_over))),
                Err(Conflict) => tokio::task::yield_now().await,
            }
        }
        Err(contention(&subject))
    }

    /// Marks this caller's pending claim (stream sequence `claim`) as stale at once, so that
    /// the next writer of the id takes it over, which looks for the id in the live log before
    /// appending.
    async fn abandon_claim(
        &self,
        mailbox: &MailboxId,
        message_id: &MessageId,
        claim: u64,
    ) -> Result<(), StoreError> {
        // Pending (seq 0), claimed at time 0: older than any CLAIM_STALE.
        let abandoned = [0u8; 16];
        let sealed = self.keys().seal(
            Table::MailboxIds,
            &mailbox_slot(mailbox).bytes(message_id),
            &abandoned,
        )?;
        // A conflict means another writer took the claim over already: nothing to give up.
        let _ = self
            .publish(
                &msgid_subject(mailbox, message_id),
                sealed,
                None,
                Expect::Subject(claim),
            )
            .await?;
        Ok(())
    }

    /// The seq of `message_id` if the mailbox's ring of acked ids remembers it (a scan of the
    /// ring, at most the duplicate window: only a claim takeover, after a crash, asks).
    async fn remembered_seq(
        &self,
        mailbox: &MailboxId,
        message_id: &MessageId,
    ) -> Result<Option<u64>, StoreError> {
        let ring = acked_subject(mailbox);
        let mut cursor = 1u64;
        while let Some(message) = self.first_from(&self.inner.mailbox, &ring, cursor).await? {
            cursor = message.sequence + 1;
            let (seq, id) = self.open_acked(mailbox, &ring, &message)?;
            if id == *message_id {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }

    /// The (seq, message id) of one entry of a mailbox's ring of acked ids.
    fn open_acked(
        &self,
        mailbox: &MailboxId,
        ring: &str,
        message: &StreamMessage,
    ) -> Result<(u64, MessageId), StoreError> {
        let seq: u64 = header_value(message, SEQ_HEADER)?
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("{ring}: bad {SEQ_HEADER}")))?;
        let plain = self.keys().open(
            Table::MailboxAcked,
            &mailbox_slot(mailbox).u64(seq),
            &message.payload,
        )?;
        let id: MessageId = plain
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("{ring}: not a message id")))?;
        Ok((seq, id))
    }

    /// Test support: what an instance that crashed in the middle of an append leaves behind.
    /// The message is in the log, but its id's claim is still pending. The claim is then
    /// marked stale, as one left by a crashed instance becomes after [`CLAIM_STALE`], so
    /// the next append of the id takes it over. Returns the message's seq. Only in builds with
    /// the `test-hooks` feature (this package's tests).
    #[cfg(feature = "test-hooks")]
    pub async fn append_then_crash(
        &self,
        mailbox: &MailboxId,
        message_id: MessageId,
        record: &[u8],
    ) -> Result<u64, StoreError> {
        let Ok((claim, _)) = self.claim(mailbox, &message_id).await? else {
            return Err(StoreError::Backend("the id is already committed".into()));
        };
        let outcome = self
            .append_claimed(mailbox, message_id, record, u64::MAX, false)
            .await?;
        self.abandon_claim(mailbox, &message_id, claim).await?;
        Ok(outcome.seq)
    }

    /// Remembers the acked messages in the ring and forgets the oldest beyond the window.
    async fn remember_acked(
        &self,
        mailbox: &MailboxId,
        acked: &[StoredMessage],
    ) -> Result<(), StoreError> {
        let ring = acked_subject(mailbox);
        for message in acked {
            let sealed = self.keys().seal(
                Table::MailboxAcked,
                &mailbox_slot(mailbox).u64(message.seq),
                &message.message_id,
            )?;
            self.publish(
                &ring,
                sealed,
                Some(header(SEQ_HEADER, message.seq.to_string())),
                Expect::Nothing,
            )
            .await?
            .map_err(|Conflict| contention(&ring))?;
        }
        let mut info = self
            .inner
            .mailbox
            .info_with_subjects(&ring)
            .await
            .map_err(|e| backend(&format!("count {ring}"), e))?;
        let mut held = 0u64;
        while let Some(entry) = info.next().await {
            let (subject, count) = entry.map_err(|e| backend(&format!("count {ring}"), e))?;
            if subject == ring {
                held = count as u64;
            }
        }
        let mut excess = held.saturating_sub(self.inner.dedup_window);
        let mut cursor = 1u64;
        let mut purge_below = 0u64;
        while excess > 0 {
            let Some(message) = self.first_from(&self.inner.mailbox, &ring, cursor).await? else {
                break;
            };
            cursor = message.sequence + 1;
            let (_, id) = self.open_acked(mailbox, &ring, &message)?;
            self.inner
                .msgids
                .purge()
                .filter(msgid_subject(mailbox, &id))
                .await
                .map_err(|e| backend("forget a message id", e))?;
            purge_below = cursor;
            excess -= 1;
        }
        if purge_below > 0 {
            self.inner
                .mailbox
                .purge()
                .filter(&ring)
                .sequence(purge_below)
                .await
                .map_err(|e| backend(&format!("trim {ring}"), e))?;
        }
        Ok(())
    }
}

fn contention(subject: &str) -> StoreError {
    StoreError::Backend(format!(
        "nats: {subject}: gave up after {MAX_RETRIES} compare-and-swap conflicts"
    ))
}

#[async_trait]
impl Store for NatsStore {
    async fn create_account(&self, username: &str, record: Vec<u8>) -> Result<(), StoreError> {
        let sealed = self
            .keys()
            .seal(Table::Accounts, &Slot::new().str(username), &record)?;
        match self
            .publish(&account_subject(username), sealed, None, Expect::Subject(0))
            .await?
        {
            Ok(_) => Ok(()),
            Err(Conflict) => Err(StoreError::AlreadyExists(format!("account {username:?}"))),
        }
    }

    async fn get_account(&self, username: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(message) = self
            .last(&self.inner.accounts, &account_subject(username))
            .await?
        else {
            return Ok(None);
        };
        self.keys()
            .open(
                Table::Accounts,
                &Slot::new().str(username),
                &message.payload,
            )
            .map(Some)
    }

    async fn put_account(&self, username: &str, record: Vec<u8>) -> Result<(), StoreError> {
        let subject = account_subject(username);
        let sealed = self
            .keys()
            .seal(Table::Accounts, &Slot::new().str(username), &record)?;
        for _ in 0..MAX_RETRIES {
            let Some(current) = self.last(&self.inner.accounts, &subject).await? else {
                return Err(StoreError::NotFound(format!("account {username:?}")));
            };
            match self
                .publish(
                    &subject,
                    sealed.clone(),
                    None,
                    Expect::Subject(current.sequence),
                )
                .await?
            {
                Ok(_) => return Ok(()),
                Err(Conflict) => tokio::task::yield_now().await,
            }
        }
        Err(contention(&subject))
    }

    async fn add_prekeys(
        &self,
        username: &str,
        device_id: u32,
        keys: Vec<Prekey>,
    ) -> Result<(), StoreError> {
        let subject = prekey_subject(username, device_id);
        let slot = Slot::new().str(username).u32(device_id);
        for _ in 0..MAX_RETRIES {
            let (revision, mut pool) = self.prekey_pool(&subject, &slot).await?;
            let mut changed = false;
            for (prekey_id, public) in &keys {
                match pool.binary_search_by_key(prekey_id, |(id, _)| *id) {
                    Ok(at) if pool[at].1 == *public => {}
                    Ok(_) => {
                        return Err(StoreError::AlreadyExists(format!(
                            "prekey {prekey_id} of {username}/{device_id} with a different key"
                        )));
                    }
                    Err(at) => {
                        pool.insert(at, (*prekey_id, *public));
                        changed = true;
                    }
                }
            }
            if !changed {
                return Ok(());
            }
            let sealed = self
                .keys()
                .seal(Table::PrekeyPools, &slot, &encode_pool(&pool))?;
            match self
                .publish(&subject, sealed, None, Expect::Subject(revision))
                .await?
            {
                Ok(_) => return Ok(()),
                Err(Conflict) => tokio::task::yield_now().await,
            }
        }
        Err(contention(&subject))
    }

    async fn take_prekey(
        &self,
        username: &str,
        device_id: u32,
    ) -> Result<Option<Prekey>, StoreError> {
        let subject = prekey_subject(username, device_id);
        let slot = Slot::new().str(username).u32(device_id);
        for _ in 0..MAX_RETRIES {
            let (revision, mut pool) = self.prekey_pool(&subject, &slot).await?;
            if pool.is_empty() {
                return Ok(None);
            }
            let taken = pool.remove(0);
            let sealed = self
                .keys()
                .seal(Table::PrekeyPools, &slot, &encode_pool(&pool))?;
            match self
                .publish(&subject, sealed, None, Expect::Subject(revision))
                .await?
            {
                Ok(_) => return Ok(Some(taken)),
                Err(Conflict) => tokio::task::yield_now().await,
            }
        }
        Err(contention(&subject))
    }

    async fn prekey_count(&self, username: &str, device_id: u32) -> Result<u64, StoreError> {
        let subject = prekey_subject(username, device_id);
        let slot = Slot::new().str(username).u32(device_id);
        Ok(self.prekey_pool(&subject, &slot).await?.1.len() as u64)
    }

    async fn append_leaf(&self, leaf: Vec<u8>) -> Result<u64, StoreError> {
        let mut index = self.inner.leaf_hint.load(Ordering::Relaxed);
        for _ in 0..MAX_RETRIES {
            let sealed = self
                .keys()
                .seal(Table::Leaves, &Slot::new().u64(index), &leaf)?;
            match self
                .publish(LEAF_SUBJECT, sealed, None, Expect::Stream(index))
                .await?
            {
                Ok(seq) if seq == index + 1 => {
                    self.inner.leaf_hint.fetch_max(seq, Ordering::Relaxed);
                    return Ok(index);
                }
                Ok(seq) => {
                    return Err(StoreError::Corrupt(format!(
                        "leaf sealed for index {index} stored at stream sequence {seq}"
                    )));
                }
                Err(Conflict) => index = self.leaf_count().await?,
            }
        }
        Err(contention(LEAF_SUBJECT))
    }

    async fn leaf_count(&self) -> Result<u64, StoreError> {
        let info = self
            .inner
            .leaves
            .get_info()
            .await
            .map_err(|e| backend("leaf count", e))?;
        let count = info.state.last_sequence;
        self.inner.leaf_hint.fetch_max(count, Ordering::Relaxed);
        Ok(count)
    }

    async fn leaves(&self, start: u64, count: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let total = self.leaf_count().await?;
        let end = start.saturating_add(count).min(total);
        if start >= end {
            return Ok(Vec::new());
        }
        let reads = futures_util::stream::iter(start..end)
            .map(|index| async move {
                let message = self
                    .inner
                    .leaves
                    .get_raw_message(index + 1)
                    .await
                    .map_err(|e| backend(&format!("read leaf {index}"), e))?;
                self.keys()
                    .open(Table::Leaves, &Slot::new().u64(index), &message.payload)
            })
            .buffered(LEAF_READ_CONCURRENCY);
        futures_util::pin_mut!(reads);
        let mut out = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
        while let Some(leaf) = reads.next().await {
            out.push(leaf?);
        }
        Ok(out)
    }

    async fn put_tree_head(&self, head: Vec<u8>) -> Result<(), StoreError> {
        let sealed = self
            .keys()
            .seal(Table::Meta, &Slot::new().str(TREE_HEAD), &head)?;
        self.publish(
            &format!("chatapp.store.meta.{TREE_HEAD}"),
            sealed,
            None,
            Expect::Nothing,
        )
        .await?
        .map_err(|Conflict| contention(TREE_HEAD))?;
        Ok(())
    }

    async fn latest_tree_head(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(message) = self
            .last(&self.inner.meta, &format!("chatapp.store.meta.{TREE_HEAD}"))
            .await?
        else {
            return Ok(None);
        };
        self.keys()
            .open(Table::Meta, &Slot::new().str(TREE_HEAD), &message.payload)
            .map(Some)
    }

    async fn append(
        &self,
        mailbox: &MailboxId,
        message_id: MessageId,
        record: Vec<u8>,
        max_depth: u64,
    ) -> Result<AppendOutcome, StoreError> {
        let (claim, taken_over) = match self.claim(mailbox, &message_id).await? {
            Ok(claim) => claim,
            Err(seq) => {
                return Ok(AppendOutcome {
                    seq,
                    duplicate: true,
                });
            }
        };
        let result = self
            .append_claimed(mailbox, message_id, &record, max_depth, taken_over)
            .await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                // Give the claim up so that a resend is not kept waiting, but as an abandoned
                // claim, not a deleted one: the error may be a publish whose ack timed out while
                // the entry did land, and only a takeover looks for the id in the log first
                // (deleting the claim let the resend append the message a second time).
                if let Err(abandon) = self.abandon_claim(mailbox, &message_id, claim).await {
                    tracing::warn!(error = %abandon, "cannot give up a message id claim");
                }
                return Err(e);
            }
        };
        let subject = msgid_subject(mailbox, &message_id);
        let mut committed = [0u8; 16];
        committed[..8].copy_from_slice(&outcome.seq.to_be_bytes());
        committed[8..].copy_from_slice(&unix_millis().to_be_bytes());
        let sealed = self.keys().seal(
            Table::MailboxIds,
            &mailbox_slot(mailbox).bytes(&message_id),
            &committed,
        )?;
        if let Err(Conflict) = self
            .publish(&subject, sealed, None, Expect::Subject(claim))
            .await?
        {
            tracing::warn!(%mailbox, "message id claim was taken over while appending");
        }
        Ok(outcome)
    }

    async fn fetch(
        &self,
        mailbox: &MailboxId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let tail = self.tail(mailbox).await?;
        let from = self
            .fetch_cursor(mailbox, after_seq)
            .filter(|&stream_seq| stream_seq < tail.stream_seq)
            .map_or(1, |stream_seq| stream_seq + 1);
        let live = self.live(mailbox, &tail, after_seq, limit, from).await?;
        if let Some((stream_seq, last)) = live.last() {
            self.set_fetch_cursor(mailbox, last.seq, *stream_seq);
        }
        Ok(live.into_iter().map(|(_, m)| m).collect())
    }

    async fn ack(&self, mailbox: &MailboxId, up_to_seq: u64) -> Result<u64, StoreError> {
        let subject = log_subject(mailbox);
        for _ in 0..MAX_RETRIES {
            let tail = self.tail(mailbox).await?;
            let state = tail.state;
            let floor = up_to_seq.min(state.last_seq);
            if floor <= state.floor {
                return Ok(0);
            }
            // Seqs are contiguous above the floor, so the acknowledged messages are the first
            // `floor - state.floor` live ones; one more finds where the purge may stop. (Reading
            // the whole backlog here made every ack cost a round trip per waiting message,
            // which a receiver that fell behind never recovered from.)
            let wanted = usize::try_from(floor - state.floor)
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            let live = self.live(mailbox, &tail, 0, wanted, 1).await?;
            let acked: Vec<StoredMessage> = live
                .iter()
                .filter(|(_, m)| m.seq <= floor)
                .map(|(_, m)| m.clone())
                .collect();
            let removed = acked.len() as u64;
            let marker = LogEntry::Ack {
                state: MailboxState {
                    last_seq: state.last_seq,
                    depth: state.depth.saturating_sub(removed),
                    floor,
                },
            };
            let sealed = marker.seal(self.keys(), mailbox)?;
            let headers = header(ENTRY_HEADER, marker.header());
            let marker_seq = match self
                .publish(
                    &subject,
                    sealed,
                    Some(headers),
                    Expect::Subject(tail.stream_seq),
                )
                .await?
            {
                Ok(seq) => seq,
                Err(Conflict) => {
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            // Garbage collection only: readers already skip what is below the floor.
            let cutoff = live
                .iter()
                .find(|(_, m)| m.seq > floor)
                .map_or(marker_seq, |(stream_seq, _)| *stream_seq);
            if let Err(e) = self
                .inner
                .mailbox
                .purge()
                .filter(&subject)
                .sequence(cutoff)
                .await
            {
                tracing::warn!(error = %e, %mailbox, "cannot purge acked messages");
            }
            self.remember_acked(mailbox, &acked).await?;
            return Ok(removed);
        }
        Err(contention(&subject))
    }

    async fn depth(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        Ok(self.tail(mailbox).await?.state.depth)
    }

    async fn next_seq(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        Ok(self.tail(mailbox).await?.state.last_seq.saturating_add(1))
    }
}

impl NatsStore {
    /// A device's prekey pool, sorted by id, with its revision (0: none yet).
    async fn prekey_pool(
        &self,
        subject: &str,
        slot: &Slot,
    ) -> Result<(u64, Vec<Prekey>), StoreError> {
        match self.last(&self.inner.prekeys, subject).await? {
            None => Ok((0, Vec::new())),
            Some(message) => {
                let plain = self
                    .keys()
                    .open(Table::PrekeyPools, slot, &message.payload)?;
                Ok((message.sequence, decode_pool(&plain)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn prekey_pool_round_trips_and_rejects_partial_entries() {
        let pool = vec![(1, [1; 32]), (9, [9; 32])];
        assert_eq!(decode_pool(&encode_pool(&pool)).expect("decode"), pool);
        assert!(matches!(decode_pool(&[0; 35]), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn mailbox_log_entry_opens_only_for_its_own_mailbox() {
        let keys = DataKeyRing::generate(&mut OsRng);
        let mailbox = MailboxId::new("ann", 1);
        let entry = LogEntry::Message {
            state: MailboxState {
                last_seq: 3,
                depth: 2,
                floor: 1,
            },
            message_id: [7; 16],
            record: b"envelope".to_vec(),
        };
        let sealed = entry.seal(&keys, &mailbox).expect("seal");
        let stored = |subject: &str| StreamMessage {
            subject: subject.into(),
            sequence: 1,
            headers: header(ENTRY_HEADER, entry.header()),
            payload: Bytes::from(sealed.clone()),
            time: time_zero(),
        };
        assert_eq!(
            LogEntry::open(&keys, &mailbox, &stored("x")).expect("open"),
            entry
        );
        assert!(matches!(
            LogEntry::open(&keys, &MailboxId::new("ann", 2), &stored("x")),
            Err(StoreError::Unseal { .. })
        ));
    }

    fn time_zero() -> time::OffsetDateTime {
        time::OffsetDateTime::UNIX_EPOCH
    }

    #[test]
    fn subjects_use_hex_tokens_so_any_username_is_one_token() {
        let mailbox = MailboxId::new("a.b *>", 2);
        assert_eq!(notify_subject(&mailbox), "chatapp.mail.612e62202a3e.2");
        assert_eq!(
            account_subject(""),
            "chatapp.store.account._",
            "an empty name is still a token"
        );
    }
}
