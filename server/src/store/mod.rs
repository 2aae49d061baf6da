//! Storage of chat-server: the [`Store`] trait every backend implements, its error type, the
//! embedded backend (redb, and an append-only log for mailboxes), data-at-rest sealing, and the
//! conformance suite any backend must pass.
//!
//! # What a store keeps
//! Accounts (opaque records), one-time prekeys, the key directory's append-only log of leaves
//! and its latest signed tree head, and per-device mailboxes of opaque envelopes. The store
//! never interprets a record; it only keeps, orders, deduplicates and hands them out.
//!
//! # Sealing: inside each backend, through one shared sealer
//! Every value a backend writes, including its own bookkeeping (mailbox counters, the duplicate
//! index), is a record sealed by [`seal::DataKeyRing::seal`] with associated data naming the
//! table and the row key (see [`seal`] for the byte layout). A backend receives the
//! `DataKeyRing` when it is opened. We chose this over a `SealedStore<S>` wrapper around an
//! unsealed backend because a wrapper can only seal the payloads that pass through the trait: it
//! can neither seal the backend's own bookkeeping nor bind a record to the slot the backend
//! assigns inside its transaction (the seq of an appended message, the index of a leaf). The
//! NATS backend gets the same sealing by calling the same `seal`/`open` with the same
//! [`seal::Table`]s and [`seal::Slot`]s, and the conformance suite checks that it does: a marker
//! written through the store must not appear in its bytes, and records must fail to open under
//! another key.
//!
//! # What stays in the clear
//! Row keys: usernames, device ids, prekey ids, leaf indexes, mailbox sequence numbers and
//! client-generated message ids. A backend must look them up and order them inside its own
//! transactions, and they are no secret from the server: usernames and device ids are
//! published in the key directory anyway, message ids are random, and sequence numbers are
//! counters. Hiding them with an HMAC would cost a second key and make ranges (mailbox by
//! seq, leaves by index) impossible; not worth it. Sizes and timing of records are visible too.
//!
//! # Duplicate window
//! A message id is remembered while its message is in the mailbox, and after it is acked for
//! the last [`DEDUP_WINDOW`] acked messages of that mailbox; a resend of an older acked
//! message would be stored again. Clients resend within seconds, so this bounds storage per
//! mailbox without losing the exactly-once view the user sees. The protocol promises the
//! shorter of that window and seven days. The embedded store also
//! forgets the acked ids of a mailbox nothing was appended to or acked in for [`DEDUP_IDLE`]
//! (at its next compaction), so what it keeps in memory and rewrites at every compaction
//! grows with the mailboxes in use, not with every mailbox that ever received
//! `DEDUP_WINDOW` messages. A resend the server no longer recognises is delivered again but
//! shown once: the recipient's ratchet refuses the second copy, and the clients say so.

use async_trait::async_trait;

pub mod conformance;
pub mod embedded;
mod mailbox_log;
pub mod nats;
pub mod seal;

pub use embedded::EmbeddedStore;
pub use nats::{NatsOptions, NatsStore};
pub use seal::{DataKeyRing, KeyFileError};

/// How many acked message ids each mailbox remembers for duplicate detection.
pub const DEDUP_WINDOW: u64 = 10_000;

/// How long a mailbox with no append and no ack keeps its acked ids in the embedded store
/// (see "Duplicate window" above): up to 240 KiB per mailbox that reached the window, in
/// memory and in every compaction. Seven days, what the protocol promises (docs/PROTOCOL.md,
/// "Idempotent resend"): every acked id of a mailbox idle that long was acked before then.
pub const DEDUP_IDLE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 60 * 60);

/// A client-generated message id; resending the same id is idempotent.
pub type MessageId = [u8; 16];

/// A one-time prekey: its id and X25519 public key.
pub type Prekey = (u32, [u8; 32]);

/// One device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MailboxId {
    pub username: String,
    pub device_id: u32,
}

impl MailboxId {
    pub fn new(username: impl Into<String>, device_id: u32) -> Self {
        MailboxId {
            username: username.into(),
            device_id,
        }
    }
}

impl std::fmt::Display for MailboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.username, self.device_id)
    }
}

/// What [`Store::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The message's sequence number in its mailbox.
    pub seq: u64,
    /// The message id was seen before: `seq` is the original one and nothing was stored.
    pub duplicate: bool,
}

/// The seq the next message of `mailbox` gets, or `MailboxFull` when it holds `max_depth`
/// already: the rule of [`Store::append`], shared by the backends.
pub(crate) fn next_seq_unless_full(
    mailbox: &MailboxId,
    last_seq: u64,
    depth: u64,
    max_depth: u64,
) -> Result<u64, StoreError> {
    if depth >= max_depth {
        return Err(StoreError::MailboxFull { limit: max_depth });
    }
    last_seq
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt(format!("mailbox {mailbox}: seq overflow")))
}

/// One append of a [`Store::append_many`] batch: the arguments of [`Store::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    pub mailbox: MailboxId,
    pub message_id: MessageId,
    pub record: Vec<u8>,
    pub max_depth: u64,
}

/// One message read from a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub message_id: MessageId,
    pub record: Vec<u8>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("mailbox full: it holds the limit of {limit} messages")]
    MailboxFull { limit: u64 },
    /// A sealed record could not be opened: unknown key id, wrong key, tampering, or a record
    /// moved from another row or table.
    #[error("cannot open a record of table {table}: {reason}")]
    Unseal { table: seal::Table, reason: String },
    /// A record opened but its contents are not what this table holds.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The backend (disk, database, network) failed.
    #[error("storage backend: {0}")]
    Backend(String),
}

/// The storage the server needs. Every mutating call is durable (committed) before it returns
/// and atomic: it happens entirely or not at all, whatever other callers do concurrently.
#[async_trait]
pub trait Store: Send + Sync {
    // --- accounts -------------------------------------------------------------------------

    /// Creates an account; `AlreadyExists` if the username is taken.
    async fn create_account(&self, username: &str, record: Vec<u8>) -> Result<(), StoreError>;
    async fn get_account(&self, username: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Replaces the record of an existing account (key changes); `NotFound` if there is none,
    /// so it can never be used to take a name around `create_account`.
    async fn put_account(&self, username: &str, record: Vec<u8>) -> Result<(), StoreError>;

    // --- one-time prekeys -----------------------------------------------------------------

    /// Adds prekeys to a device's pool. Re-adding an id with the same key is a no-op; an id
    /// already present with a different key is `AlreadyExists` and nothing is added.
    async fn add_prekeys(
        &self,
        username: &str,
        device_id: u32,
        keys: Vec<Prekey>,
    ) -> Result<(), StoreError>;
    /// Removes and returns the prekey with the smallest id; each stored prekey is handed out
    /// at most once, across concurrent callers and restarts.
    async fn take_prekey(
        &self,
        username: &str,
        device_id: u32,
    ) -> Result<Option<Prekey>, StoreError>;
    async fn prekey_count(&self, username: &str, device_id: u32) -> Result<u64, StoreError>;

    // --- key directory log ----------------------------------------------------------------

    /// Appends a leaf and returns its index (0 for the first).
    async fn append_leaf(&self, leaf: Vec<u8>) -> Result<u64, StoreError>;
    async fn leaf_count(&self) -> Result<u64, StoreError>;
    /// Leaves `start .. start + count` in order, fewer if the log is shorter.
    async fn leaves(&self, start: u64, count: u64) -> Result<Vec<Vec<u8>>, StoreError>;
    async fn put_tree_head(&self, head: Vec<u8>) -> Result<(), StoreError>;
    async fn latest_tree_head(&self) -> Result<Option<Vec<u8>>, StoreError>;

    // --- mailboxes ------------------------------------------------------------------------

    /// Appends a message. Seqs start at 1 and strictly increase, never reused after an ack. A
    /// message id seen before (see [`DEDUP_WINDOW`]) returns the original seq with
    /// `duplicate: true` and stores nothing. `MailboxFull` when `depth >= max_depth`.
    async fn append(
        &self,
        mailbox: &MailboxId,
        message_id: MessageId,
        record: Vec<u8>,
        max_depth: u64,
    ) -> Result<AppendOutcome, StoreError>;
    /// Appends several messages in the order given, each with the outcome [`Store::append`]
    /// would give it alone (one full mailbox or duplicate does not affect the others). Lets a
    /// connection that pipelines its sends have them committed together: the embedded store
    /// puts the whole batch into one group commit. The default appends one after another.
    async fn append_many(
        &self,
        appends: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        let mut out = Vec::with_capacity(appends.len());
        for a in appends {
            out.push(
                self.append(&a.mailbox, a.message_id, a.record, a.max_depth)
                    .await,
            );
        }
        out
    }
    /// Up to `limit` messages with `seq > after_seq`, in seq order.
    async fn fetch(
        &self,
        mailbox: &MailboxId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;
    /// Deletes every message with `seq <= up_to_seq`; returns how many were deleted.
    async fn ack(&self, mailbox: &MailboxId, up_to_seq: u64) -> Result<u64, StoreError>;
    /// How many messages the mailbox holds (appended and not yet acked).
    async fn depth(&self, mailbox: &MailboxId) -> Result<u64, StoreError>;
    /// The seq the next new message will get (1 for an empty, never-used mailbox).
    async fn next_seq(&self, mailbox: &MailboxId) -> Result<u64, StoreError>;

    /// Metrics of the store itself, appended to `/metrics` in Prometheus text (the embedded
    /// store: its group commits and how long the disk takes to make each durable).
    fn render_metrics(&self, _out: &mut String) {}
}
