//! The mailboxes of the embedded store: one append-only log file, `DIR/mailboxes.log`, and an
//! index of it in memory.
//!
//! # Why a log and not redb tables
//! A message is written once and deleted moments later, when its recipient acks it. In redb
//! tables that was five B-tree updates per message (the message row, its id row, the acked ring
//! row and the rows the ring forgets, the mailbox counters), each a copy-on-write of 4 KiB
//! pages, and six AEAD operations; redb was half of a loaded server's CPU (docs/BENCHMARKS.md,
//! issue #8). Here an append is one sealed entry added to a buffer, an ack one small entry, and
//! a group commit one `pwrite` and one `fdatasync`.
//!
//! # File layout
//! ```text
//! file  := "CHATMBX1" generation:u64le check_len:u32le check batch*
//! batch := body_len:u32le entry*                 (one group commit: one write, one fsync)
//! entry := sealed_len:u32le sealed               (sealed: seal::DataKeyRing::seal)
//! ```
//! Each entry is sealed for [`Table::MailboxFile`] with the slot (generation, offset of the
//! entry), so an entry cannot be moved inside the file or into another generation of it.
//! `check` is the sealed text [`CHECK`] at offset 16: opening it first tells a wrong data key
//! (the store refuses to open, [`StoreError::Unseal`], the file untouched) from a torn write. Entry
//! plaintexts (integers big-endian, `user` is `len:u16 bytes`):
//! ```text
//! 1 append   user device:u32 seq:u64 message_id:[16] record
//! 2 ack      user device:u32 up_to_seq:u64
//! 3 mailbox  user device:u32 last_seq:u64 count:u32 (seq:u64 message_id:[16])*count
//! ```
//! `mailbox` entries are written by a compaction: the counters and remembered acked ids of a
//! mailbox, before its unacked messages. A compaction's catch-up writes the append of a
//! message acked by then with an empty record: replayed, it counts the seq, and the ack after
//! it remembers the id.
//!
//! # Durability and recovery
//! A batch is written and fsynced before any caller of it is answered, and the next batch is
//! written only after that, so only the last batch of the file can be torn by a crash. The file
//! is grown [`PREALLOCATE`] bytes of zeros ahead of the batches. On open, a last batch that is
//! incomplete, zero-filled or does not authenticate is cut off with the zeros after it (it held
//! only unanswered writes); zeros after the last good batch stay for the next batches to
//! overwrite; a bad batch followed by anything but zeros is corruption and the store refuses
//! to open. If a write or fsync fails, the file is cut back to the last good batch
//! and the index is rebuilt from it, so the callers of the failed batch get an error and
//! nothing they were not told about is kept.
//!
//! # Compaction
//! When the file has grown past [`COMPACT_MIN_BYTES`] and four times what the last compaction
//! wrote, the committer starts a compaction thread. It takes the index in steps of at most
//! about [`PLAN_STEP`] with writes held, each mailbox as of the file's end at its step (an
//! entry of a mailbox written before its step is in its state and is not copied again; a
//! mailbox with no append or ack for `dedup_idle` forgets its acked ids at its step); writes
//! every mailbox's counters, remembered ids and unacked messages to `mailboxes.log.tmp` under a
//! new generation while the committer goes on writing to the old file; then copies what was
//! written since the first step, and the last of it with the write gate held;
//! then renames the new file over the log and switches the index to it (see
//! [`MailboxLog::compact`]). The new file is written over `mailboxes.log.spare`,
//! [`SPARE_BYTES`] of zeros; the file it replaced, linked as `mailboxes.log.old` just before
//! the rename, is zeroed in place and becomes the next spare.
//! So once a log has been compacted, the committer's writes overwrite blocks the file already
//! has, and nothing is freed or allocated on the disk while it runs.
//!
//! Writing the new file, catching up and zeroing run on threads in the idle scheduling class
//! (`in_background`), so they take what the committer and the connections leave of the
//! cores; catch-up rounds that fall behind the committer go on at normal priority, and the
//! final step, which holds writes, runs at normal priority. A catch-up reads the old file
//! [`COPY_CHUNK`] at a time. Each compaction logs where its time went (`planned_ms` and
//! `held_ms` hold up the committer; `rounds_at_normal_priority` says it fell behind).
//!
//! # Reads
//! The index holds, per mailbox, the counters, the remembered ids (unacked and the last
//! `dedup_window` acked) and where each unacked message's entry is, and the records of recently
//! appended unacked messages up to [`RECENT_BYTES`]. [`MailboxLog::fetch`] takes those from
//! memory and reads the others back with `pread` and opens them; it shows only messages whose
//! batch is on disk.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use indexmap::IndexMap;

use crate::metrics::Histogram;

use super::seal::{DataKeyRing, MIN_RECORD_LEN, Slot, Table};
use super::{AppendOutcome, AppendRequest, MailboxId, MessageId, StoreError, StoredMessage};

/// The log file inside the data directory.
pub const LOG_FILE: &str = "mailboxes.log";
const TMP_FILE: &str = "mailboxes.log.tmp";
/// Zeros written ahead for the next compaction to write into (see [`MailboxLog::compact`]).
/// It only ever holds zeros: the compaction renames it to [`TMP_FILE`] before writing.
const SPARE_FILE: &str = "mailboxes.log.spare";
/// A second name for the log a compaction replaces, so that file can be zeroed in place and
/// become the next spare; removed on open (it is never read).
const OLD_FILE: &str = "mailboxes.log.old";
/// The size of a spare: the smallest log a compaction is due at, and room for the appends
/// while that compaction runs. A log that must grow larger (four times a large compaction)
/// grows past it as a log without a spare does; zeroing a spare four times a snapshot of
/// hundreds of MiB held the disk for seconds after an overload (docs/BENCHMARKS.md).
const SPARE_BYTES: u64 = COMPACT_MIN_BYTES + 32 * 1024 * 1024;
const MAGIC: &[u8; 8] = b"CHATMBX1";
/// Magic and generation; the sealed check entry follows.
const FIXED_HEADER: usize = 16;
/// The plaintext of the check entry.
const CHECK: &[u8] = b"chatapp mailbox log";
/// The log file grows by writing this many zeros ahead of the batches at a time, so most
/// commits overwrite blocks the file already has and their `fdatasync` flushes data only; a
/// write that grows the file also commits the file system's journal (one more thread to wake,
/// and a slower fsync). Measured at 25 000 msgs/s: p99 6.4-7.2 ms growing with every batch,
/// 4.3-5.2 ms with 256 KiB ahead, 22-28 ms with 4 MiB ahead (the batch that writes the zeros
/// waits for them).
const PREALLOCATE: u64 = 256 * 1024;
/// Records of unacked messages kept in memory for their delivery, at most (see
/// `Index::recent`); messages beyond it are read back from the file.
const RECENT_BYTES: usize = 32 * 1024 * 1024;
/// A log smaller than this is never compacted. Each compaction rewrites every mailbox's
/// remembered ids (up to 240 KiB per busy mailbox) and loads the disk while it runs, which
/// shows in the latency of the commits meanwhile; a larger log makes that rarer for the price
/// of disk space (docs/BENCHMARKS.md, issue #8).
pub const COMPACT_MIN_BYTES: u64 = 256 * 1024 * 1024;
/// Appends taken into one batch at most (the rest wait for the next).
const MAX_BATCH: usize = 4096;
/// A compaction writes batches of about this size and syncs after each, so the disk never
/// has much of it queued ahead of the committer's small fsyncs (one 8 MiB fsync held a
/// concurrent commit up for ~10 ms and more, docs/BENCHMARKS.md).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// A spare is zeroed [`MAX_BATCH_BYTES`] and a sync at a time with this pause after each
/// (about 100 MiB/s), so making one does not take the disk and a core from the committer in
/// one burst.
const ZEROING_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

const KIND_APPEND: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_MAILBOX: u8 = 3;

/// One mailbox's counters and ids, as a compaction or a migration writes them.
pub(super) struct MailboxSnapshot {
    pub mailbox: MailboxId,
    pub last_seq: u64,
    /// Acked ids still remembered, oldest first.
    pub acked: Vec<(u64, MessageId)>,
    /// Unacked messages in seq order.
    pub live: Vec<StoredMessage>,
}

/// Where an unacked message's entry is.
#[derive(Debug, Clone, Copy)]
struct Live {
    seq: u64,
    message_id: MessageId,
    /// Offset of the entry (its length prefix) in the file.
    offset: u64,
    sealed_len: u32,
}

#[derive(Default)]
struct Mailbox {
    /// The largest seq ever assigned.
    last_seq: u64,
    /// The largest seq whose batch is on disk: fetch shows no later message.
    durable_seq: u64,
    live: VecDeque<Live>,
    /// Acked ids remembered for duplicate detection, oldest first.
    acked: VecDeque<(u64, MessageId)>,
    /// Every remembered id (unacked or in `acked`) -> its seq, and ids forgotten since the
    /// last purge: an id whose seq is older than the oldest remembered one is forgotten (see
    /// [`Mailbox::remembered_seq`]). Forgetting an id is then no lookup at all; a removal
    /// per acked message was one more cache miss in a table of 10 000 ids per busy mailbox,
    /// 3% of a loaded server's CPU (docs/BENCHMARKS.md, issue #8). See [`Mailbox::purge`].
    ids: HashMap<MessageId, u64>,
    /// When an append or an ack last touched the mailbox, in milliseconds since the log was
    /// opened (a replayed mailbox counts as touched at the open).
    active_at_ms: u64,
}

impl Mailbox {
    /// Drops the messages up to `up_to_seq`, remembering their ids and telling `dropped`
    /// where each was; how many there were.
    fn ack(&mut self, up_to_seq: u64, dedup_window: u64, mut dropped: impl FnMut(&Live)) -> u64 {
        let mut removed = 0;
        while self.live.front().is_some_and(|l| l.seq <= up_to_seq) {
            if let Some(l) = self.live.pop_front() {
                self.acked.push_back((l.seq, l.message_id));
                dropped(&l);
                removed += 1;
            }
        }
        self.forget_beyond(dedup_window);
        removed
    }

    /// Adds an unacked message and remembers its id.
    fn append(&mut self, live: Live) {
        self.last_seq = self.last_seq.max(live.seq);
        self.ids.insert(live.message_id, live.seq);
        self.live.push_back(live);
    }

    /// Forgets the oldest acked ids beyond the window. They stay in `ids` until a purge.
    fn forget_beyond(&mut self, dedup_window: u64) {
        let excess = (self.acked.len() as u64).saturating_sub(dedup_window);
        if excess > 0 {
            // At most `dedup_window` fits in memory, so `excess` does too.
            self.acked.drain(..excess as usize);
            self.purge();
        }
    }

    /// Forgets every acked id of a mailbox that has been idle (see [`MailboxLog::plan_in_steps`])
    /// and gives their memory back; how many there were. The ids of unacked messages stay.
    fn forget_acked(&mut self) -> usize {
        let forgotten = self.acked.len();
        self.acked = VecDeque::new();
        let oldest = self.oldest_remembered();
        self.ids.retain(|_, seq| *seq >= oldest);
        self.ids.shrink_to_fit();
        forgotten
    }

    /// The seq of every remembered id is at least this (`u64::MAX`: none is remembered).
    /// Acked ids are forgotten oldest first and every unacked seq is newer than every acked
    /// one, so the remembered ids are exactly those at or after the oldest one kept.
    fn oldest_remembered(&self) -> u64 {
        match (self.acked.front(), self.live.front()) {
            (Some(&(seq, _)), _) => seq,
            (None, Some(l)) => l.seq,
            (None, None) => u64::MAX,
        }
    }

    /// The seq of `id` if it is remembered.
    fn remembered_seq(&self, id: &MessageId) -> Option<u64> {
        self.ids
            .get(id)
            .copied()
            .filter(|&seq| seq >= self.oldest_remembered())
    }

    /// Drops the forgotten ids from `ids` once they are a fifth of it. One pass over the
    /// table per that many acks is a few nanoseconds per ack, and the table stays within the
    /// size it grows to anyway (hashbrown keeps it at most 7/8 full).
    fn purge(&mut self) {
        let remembered = self.acked.len() + self.live.len();
        if self.ids.len() > remembered + remembered / 4 + PURGE_SLACK {
            let oldest = self.oldest_remembered();
            self.ids.retain(|_, seq| *seq >= oldest);
        }
    }
}

/// Forgotten ids a mailbox's table may hold beyond a quarter of its remembered ones.
const PURGE_SLACK: usize = 16;

/// The open log file and its generation.
struct LogFile {
    file: File,
    generation: u64,
}

struct Index {
    file: Arc<LogFile>,
    /// End of the last good batch: where the next one is written.
    len: u64,
    /// The file's size: zeros written ahead of `len` (see [`PREALLOCATE`]).
    allocated: u64,
    /// What the last compaction (or the migration) wrote.
    snapshot_len: u64,
    /// In order of first use; a mailbox is never removed, so its position stays (a
    /// compaction plans the index in steps by position).
    mailboxes: IndexMap<MailboxId, Mailbox>,
    /// Records of recently appended, unacked messages by entry offset, so the delivery that
    /// usually follows an append at once reads neither the file nor opens the entry.
    recent: HashMap<u64, Arc<[u8]>>,
    /// Bytes in `recent`, at most [`RECENT_BYTES`].
    recent_bytes: usize,
    /// Set when the file could not be brought back to a known state: every call fails.
    failed: Option<String>,
    /// The time of the batch being applied, in milliseconds since the log was opened (0
    /// while replaying): what an append or ack sets `Mailbox::active_at_ms` to.
    now_ms: u64,
}

impl Index {
    fn check(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(why) => Err(StoreError::Backend(format!("mailbox log unusable: {why}"))),
            None => Ok(()),
        }
    }

    fn apply_append(&mut self, mailbox: &MailboxId, live: Live) {
        let entry = match self.mailboxes.get_mut(mailbox) {
            Some(entry) => entry,
            None => self.mailboxes.entry(mailbox.clone()).or_default(),
        };
        entry.append(live);
        entry.active_at_ms = self.now_ms;
    }

    fn apply_ack(&mut self, mailbox: &MailboxId, up_to_seq: u64, dedup_window: u64) -> u64 {
        let Some(entry) = self.mailboxes.get_mut(mailbox) else {
            return 0;
        };
        entry.active_at_ms = self.now_ms;
        let (recent, recent_bytes) = (&mut self.recent, &mut self.recent_bytes);
        entry.ack(up_to_seq, dedup_window, |l| {
            if let Some(record) = recent.remove(&l.offset) {
                *recent_bytes -= record.len();
            }
        })
    }

    /// Keeps the record of a message just appended at `offset`, if the budget allows.
    fn remember_recent(&mut self, offset: u64, record: &[u8]) {
        if self.recent_bytes + record.len() <= RECENT_BYTES {
            self.recent_bytes += record.len();
            self.recent.insert(offset, Arc::from(record));
        }
    }

    /// About what a compaction would write now: the file header, each mailbox's counters and
    /// remembered ids, and each unacked message's entry (the part of the file still live).
    fn live_len(&self) -> u64 {
        let entry = (4 + MIN_RECORD_LEN) as u64;
        let header = (FIXED_HEADER + 4 + MIN_RECORD_LEN + CHECK.len()) as u64;
        self.mailboxes.iter().fold(header, |len, (mailbox, m)| {
            let counters = mailbox_plain_len(mailbox, m.acked.len()) as u64;
            let messages: u64 = m.live.iter().map(|l| 4 + u64::from(l.sealed_len)).sum();
            len + entry + counters + messages
        })
    }

    fn forget_recent(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
    }

    fn apply_snapshot(&mut self, snapshot: MailboxSnapshot, dedup_window: u64) {
        let entry = self.mailboxes.entry(snapshot.mailbox).or_default();
        entry.last_seq = entry.last_seq.max(snapshot.last_seq);
        entry.durable_seq = entry.last_seq;
        for (seq, id) in snapshot.acked {
            entry.acked.push_back((seq, id));
            entry.ids.insert(id, seq);
        }
        entry.forget_beyond(dedup_window);
    }
}

/// One append of [`MailboxLog::enqueue_appends`], waiting for its commit.
struct PendingAppend {
    request: AppendRequest,
    done: tokio::sync::oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// One [`MailboxLog::enqueue_ack`] call waiting for its commit.
struct PendingAck {
    mailbox: MailboxId,
    up_to_seq: u64,
    done: tokio::sync::oneshot::Sender<Result<u64, StoreError>>,
}

#[derive(Default)]
struct WriteQueue {
    appends: Vec<PendingAppend>,
    acks: Vec<PendingAck>,
    /// A committer is running on the blocking pool and will take what is queued.
    committing: bool,
}

/// The mailboxes: the log file, its index and the group committer's queue.
pub(super) struct MailboxLog {
    dir: PathBuf,
    dedup_window: u64,
    /// A compaction forgets the acked ids of a mailbox idle this long ([`super::DEDUP_IDLE`]).
    dedup_idle: std::time::Duration,
    /// The clock of `Mailbox::active_at_ms`.
    opened: Instant,
    index: Mutex<Index>,
    queue: Mutex<WriteQueue>,
    /// Held by the committer for a whole batch (stage, write, fsync, account) and by a
    /// compaction's final step: when the compactor holds it, no batch is in flight.
    write_gate: Mutex<()>,
    /// A compaction is running (at most one at a time).
    compacting: std::sync::atomic::AtomicBool,
    /// Each group commit's `pwrite` + `fdatasync`: what the disk adds to every send.
    pub(super) disk_latency: Histogram,
    /// Entries (appends and acks) written by group commits, and the commits themselves.
    pub(super) committed_entries: AtomicU64,
    pub(super) commits: AtomicU64,
    /// Tests: the next batch's write or `fdatasync` reports a failure (after it has in fact
    /// been written), as a disk that lost it would.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn entry_slot(generation: u64, offset: u64) -> Slot {
    Slot::new().u64(generation).u64(offset)
}

// --- entry encoding ---------------------------------------------------------------------

fn put_mailbox(out: &mut Vec<u8>, kind: u8, mailbox: &MailboxId) -> Result<(), StoreError> {
    let user = mailbox.username.as_bytes();
    let len = u16::try_from(user.len())
        .map_err(|_| StoreError::Backend(format!("username of {} bytes", user.len())))?;
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(user);
    out.extend_from_slice(&mailbox.device_id.to_be_bytes());
    Ok(())
}

fn append_plain_len(mailbox: &MailboxId, record: &[u8]) -> usize {
    1 + 2 + mailbox.username.len() + 4 + 8 + 16 + record.len()
}

/// Appends the plaintext of an append entry to `out`.
fn write_append(
    out: &mut Vec<u8>,
    mailbox: &MailboxId,
    seq: u64,
    id: &MessageId,
    record: &[u8],
) -> Result<(), StoreError> {
    put_mailbox(out, KIND_APPEND, mailbox)?;
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(record);
    Ok(())
}

fn ack_plain_len(mailbox: &MailboxId) -> usize {
    1 + 2 + mailbox.username.len() + 4 + 8
}

/// The plaintext length of a mailbox entry remembering `remembered` acked ids.
fn mailbox_plain_len(mailbox: &MailboxId, remembered: usize) -> usize {
    1 + 2 + mailbox.username.len() + 4 + 8 + 4 + remembered * (8 + 16)
}

fn ack_plain(mailbox: &MailboxId, up_to_seq: u64) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(ack_plain_len(mailbox));
    put_mailbox(&mut out, KIND_ACK, mailbox)?;
    out.extend_from_slice(&up_to_seq.to_be_bytes());
    Ok(out)
}

fn mailbox_plain(snapshot: &MailboxSnapshot) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(mailbox_plain_len(&snapshot.mailbox, snapshot.acked.len()));
    put_mailbox(&mut out, KIND_MAILBOX, &snapshot.mailbox)?;
    out.extend_from_slice(&snapshot.last_seq.to_be_bytes());
    let count = u32::try_from(snapshot.acked.len())
        .map_err(|_| StoreError::Backend("too many remembered ids".into()))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (seq, id) in &snapshot.acked {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(id);
    }
    Ok(out)
}

/// A decoded entry plaintext.
enum Entry {
    Append {
        mailbox: MailboxId,
        seq: u64,
        message_id: MessageId,
        record: Vec<u8>,
    },
    Ack {
        mailbox: MailboxId,
        up_to_seq: u64,
    },
    Mailbox(MailboxSnapshot),
}

/// Reads fields off an entry plaintext; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(StoreError::Corrupt("mailbox log entry is truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, StoreError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn id(&mut self) -> Result<MessageId, StoreError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    fn mailbox(&mut self) -> Result<MailboxId, StoreError> {
        let len = usize::from(self.u16()?);
        let user = std::str::from_utf8(self.take(len)?)
            .map_err(|_| StoreError::Corrupt("mailbox log entry: username not UTF-8".into()))?
            .to_owned();
        Ok(MailboxId::new(user, self.u32()?))
    }
}

/// An entry plaintext's kind and mailbox, and a reader at what follows them.
fn entry_head(plain: &[u8]) -> Result<(u8, MailboxId, Reader<'_>), StoreError> {
    let Some((&kind, rest)) = plain.split_first() else {
        return Err(StoreError::Corrupt("empty mailbox log entry".into()));
    };
    let mut r = Reader(rest);
    let mailbox = r.mailbox()?;
    Ok((kind, mailbox, r))
}

fn decode_entry(plain: &[u8]) -> Result<Entry, StoreError> {
    let (kind, mailbox, mut r) = entry_head(plain)?;
    Ok(match kind {
        KIND_APPEND => Entry::Append {
            mailbox,
            seq: r.u64()?,
            message_id: r.id()?,
            record: r.0.to_vec(),
        },
        KIND_ACK => Entry::Ack {
            mailbox,
            up_to_seq: r.u64()?,
        },
        KIND_MAILBOX => {
            let last_seq = r.u64()?;
            let count = r.u32()? as usize;
            if r.0.len() != count.saturating_mul(24) {
                return Err(StoreError::Corrupt(
                    "mailbox log entry: remembered ids do not match their count".into(),
                ));
            }
            let mut acked = Vec::with_capacity(count);
            for _ in 0..count {
                acked.push((r.u64()?, r.id()?));
            }
            Entry::Mailbox(MailboxSnapshot {
                mailbox,
                last_seq,
                acked,
                live: Vec::new(),
            })
        }
        other => {
            return Err(StoreError::Corrupt(format!(
                "mailbox log entry of unknown kind {other}"
            )));
        }
    })
}

/// Builds one batch: entries are sealed for their final offset as they are added.
struct BatchWriter<'k> {
    keys: &'k DataKeyRing,
    generation: u64,
    /// File offset of `buf[0]` (the batch header).
    start: u64,
    /// The batch header, then each entry's length prefix and record, laid out by `push` and
    /// sealed by `finish`.
    buf: Vec<u8>,
}

impl<'k> BatchWriter<'k> {
    fn new(keys: &'k DataKeyRing, generation: u64, start: u64) -> Self {
        Self::with_capacity(keys, generation, start, 0)
    }

    /// A batch whose buffer has room for about `bytes` of entries from the start, so that
    /// building it does not copy it again each time it grows.
    fn with_capacity(keys: &'k DataKeyRing, generation: u64, start: u64, bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(4 + bytes);
        buf.extend_from_slice(&[0; 4]);
        BatchWriter {
            keys,
            generation,
            start,
            buf,
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.len() == 4
    }

    /// Adds an entry, sealed by [`BatchWriter::finish`]; its offset and sealed length.
    fn push(&mut self, plain: &[u8]) -> Result<(u64, u32), StoreError> {
        self.push_written(plain.len(), |out| {
            out.extend_from_slice(plain);
            Ok(())
        })
    }

    /// Adds an append entry, its plaintext written straight into the batch.
    fn push_append(
        &mut self,
        mailbox: &MailboxId,
        seq: u64,
        id: &MessageId,
        record: &[u8],
    ) -> Result<(u64, u32), StoreError> {
        self.push_written(append_plain_len(mailbox, record), |out| {
            write_append(out, mailbox, seq, id, record)
        })
    }

    /// [`BatchWriter::push`] of an entry whose plaintext (about `len_hint` bytes) `write`
    /// appends to the batch itself, to be sealed there in place. The entry's place and length
    /// are final here (sealing adds [`MIN_RECORD_LEN`]); the sealing waits for `finish`, so
    /// the group committer seals a batch after it has let go of the index.
    fn push_written(
        &mut self,
        len_hint: usize,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(u64, u32), StoreError> {
        let offset = self.start + self.buf.len() as u64;
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let sealed_len =
            super::seal::write_to_seal(&mut self.buf, len_hint, write).and_then(|len| {
                u32::try_from(len)
                    .map_err(|_| StoreError::Backend("mailbox log entry over 4 GiB".into()))
            });
        let sealed_len = match sealed_len {
            Ok(len) => len,
            Err(e) => {
                self.buf.truncate(at);
                return Err(e);
            }
        };
        self.buf[at..at + 4].copy_from_slice(&sealed_len.to_le_bytes());
        Ok((offset, sealed_len))
    }

    /// Seals every entry and returns the finished batch bytes (header filled in).
    fn finish(mut self) -> Result<Vec<u8>, StoreError> {
        let body = u32::try_from(self.buf.len() - 4)
            .map_err(|_| StoreError::Backend("mailbox log batch over 4 GiB".into()))?;
        // Each entry, by its length prefix (whose offset is the entry's).
        let mut at = 4;
        while let Some(len) = read_u32(&self.buf, at) {
            let record = at + 4..at + 4 + len as usize;
            let slot = entry_slot(self.generation, self.start + at as u64);
            let end = record.end;
            let record = self.buf.get_mut(record).ok_or_else(|| {
                StoreError::Backend("mailbox log batch: an entry runs past its end".into())
            })?;
            self.keys.seal_in_place(Table::MailboxFile, &slot, record)?;
            at = end;
        }
        self.buf[..4].copy_from_slice(&body.to_le_bytes());
        Ok(self.buf)
    }
}

/// What replaying a log file found.
struct Replayed {
    index: Index,
    /// Bytes of a torn last batch that were cut off.
    torn: u64,
}

/// Reads a whole log file and rebuilds the index; cuts a torn last batch off the file.
fn replay(path: &Path, keys: &DataKeyRing, dedup_window: u64) -> Result<Replayed, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err("cannot open", path, e))?;
    let bytes = std::fs::read(path).map_err(|e| io_err("cannot read", path, e))?;
    let bad_header = || {
        StoreError::Corrupt(format!(
            "{} is not a mailbox log (bad header)",
            path.display()
        ))
    };
    if bytes.len() < FIXED_HEADER || &bytes[..8] != MAGIC {
        return Err(bad_header());
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&bytes[8..16]);
    let generation = u64::from_le_bytes(generation);
    let check_len = read_u32(&bytes, FIXED_HEADER).ok_or_else(bad_header)? as usize;
    let check = bytes
        .get(FIXED_HEADER + 4..FIXED_HEADER + 4 + check_len)
        .ok_or_else(bad_header)?;
    // A wrong key fails here, before anything could be taken for a torn write and cut off.
    if keys.open(
        Table::MailboxFile,
        &entry_slot(generation, FIXED_HEADER as u64),
        check,
    )? != CHECK
    {
        return Err(bad_header());
    }
    let header_len = FIXED_HEADER + 4 + check_len;
    let mut index = Index {
        file: Arc::new(LogFile {
            file: file
                .try_clone()
                .map_err(|e| io_err("cannot open", path, e))?,
            generation,
        }),
        len: header_len as u64,
        allocated: 0,
        snapshot_len: 0,
        mailboxes: IndexMap::new(),
        recent: HashMap::new(),
        recent_bytes: 0,
        failed: None,
        now_ms: 0,
    };
    let mut pos = header_len;
    while pos < bytes.len() {
        match replay_batch(&bytes, pos, generation, keys, dedup_window, &mut index) {
            Ok(end) => pos = end,
            Err(e) => {
                // The last batch written may be torn; zeros written ahead may follow it.
                let after = read_u32(&bytes, pos)
                    .map(|body| pos + 4 + body as usize)
                    .unwrap_or(usize::MAX);
                let more = bytes
                    .get(after.max(pos + 4)..)
                    .is_some_and(|rest| rest.iter().any(|&b| b != 0));
                if more {
                    return Err(StoreError::Corrupt(format!(
                        "{}: batch at byte {pos} is damaged and more follows: {e}",
                        path.display()
                    )));
                }
                break;
            }
        }
    }
    // Zeros written ahead are not a torn batch.
    let torn = if bytes[pos..].iter().all(|&b| b == 0) {
        0
    } else {
        (bytes.len() - pos) as u64
    };
    if torn > 0 {
        // Replay applied nothing of the torn batch: a batch is applied only once it all opened.
        file.set_len(pos as u64)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err("cannot cut the torn end off", path, e))?;
    }
    index.len = pos as u64;
    // Zeros written ahead stay: the next batches overwrite them (see [`PREALLOCATE`]).
    index.allocated = if torn > 0 { pos } else { bytes.len() } as u64;
    for mailbox in index.mailboxes.values_mut() {
        mailbox.durable_seq = mailbox.last_seq;
    }
    Ok(Replayed { index, torn })
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// One entry of a batch: its plaintext, where it is and its sealed length.
struct RawEntry {
    plain: Vec<u8>,
    offset: u64,
    sealed_len: u32,
}

/// Opens every entry of the batch at `bytes[pos..]`, which lies at file offset `base + pos`;
/// the entries and the end of the batch (in `bytes`).
fn parse_batch(
    bytes: &[u8],
    pos: usize,
    base: u64,
    generation: u64,
    keys: &DataKeyRing,
) -> Result<(Vec<RawEntry>, usize), StoreError> {
    let body =
        read_u32(bytes, pos).ok_or_else(|| StoreError::Corrupt("torn batch header".into()))?;
    let end = pos + 4 + body as usize;
    if body == 0 || end > bytes.len() {
        return Err(StoreError::Corrupt("batch runs past the end".into()));
    }
    let mut entries = Vec::new();
    let mut at = pos + 4;
    while at < end {
        let len = read_u32(bytes, at)
            .ok_or_else(|| StoreError::Corrupt("torn entry header".into()))?
            as usize;
        let sealed = bytes
            .get(at + 4..at + 4 + len)
            .filter(|_| at + 4 + len <= end)
            .ok_or_else(|| StoreError::Corrupt("entry runs past its batch".into()))?;
        let offset = base + at as u64;
        let plain = keys.open(Table::MailboxFile, &entry_slot(generation, offset), sealed)?;
        entries.push(RawEntry {
            plain,
            offset,
            sealed_len: len as u32,
        });
        at += 4 + len;
    }
    Ok((entries, end))
}

/// Opens every entry of the batch at `pos`, then applies them all; the batch's end.
fn replay_batch(
    bytes: &[u8],
    pos: usize,
    generation: u64,
    keys: &DataKeyRing,
    dedup_window: u64,
    index: &mut Index,
) -> Result<usize, StoreError> {
    let (raw, end) = parse_batch(bytes, pos, 0, generation, keys)?;
    let mut entries = Vec::with_capacity(raw.len());
    for r in raw {
        let entry = decode_entry(&r.plain)?;
        if let Entry::Append { mailbox, seq, .. } = &entry {
            let last = index
                .mailboxes
                .get(mailbox)
                .and_then(|m| m.live.back())
                .map_or(0, |l| l.seq);
            if *seq <= last {
                return Err(StoreError::Corrupt(format!(
                    "mailbox log: {mailbox} seq {seq} after seq {last}"
                )));
            }
        }
        entries.push((entry, r.offset, r.sealed_len));
    }
    for (entry, offset, sealed_len) in entries {
        match entry {
            Entry::Append {
                mailbox,
                seq,
                message_id,
                ..
            } => index.apply_append(
                &mailbox,
                Live {
                    seq,
                    message_id,
                    offset,
                    sealed_len,
                },
            ),
            Entry::Ack { mailbox, up_to_seq } => {
                index.apply_ack(&mailbox, up_to_seq, dedup_window);
            }
            Entry::Mailbox(snapshot) => index.apply_snapshot(snapshot, dedup_window),
        }
    }
    Ok(end)
}

/// Writes a new log file: the header, then entries in batches, each sealed for its offset.
struct LogWriter<'k> {
    keys: &'k DataKeyRing,
    file: File,
    path: PathBuf,
    generation: u64,
    /// Bytes written so far (the offset of the open batch).
    len: u64,
    /// The file's size when created: zeros (of a spare) that writes overwrite.
    zeroed: u64,
    batch: BatchWriter<'k>,
}

impl<'k> LogWriter<'k> {
    fn create(path: PathBuf, keys: &'k DataKeyRing, generation: u64) -> Result<Self, StoreError> {
        Self::create_in(path, keys, generation, false)
    }

    /// Writes the new log at `path`; with `over_zeros`, over the zeros of a spare renamed to
    /// `path` (which is not truncated), else into a new empty file.
    fn create_in(
        path: PathBuf,
        keys: &'k DataKeyRing,
        generation: u64,
        over_zeros: bool,
    ) -> Result<Self, StoreError> {
        // Read too: once installed, fetches read from it.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!over_zeros)
            .open(&path)
            .map_err(|e| io_err("cannot create", &path, e))?;
        let zeroed = file
            .metadata()
            .map_err(|e| io_err("cannot read the size of", &path, e))?
            .len();
        let mut header = Vec::with_capacity(FIXED_HEADER + 64);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&generation.to_le_bytes());
        let check = keys.seal(
            Table::MailboxFile,
            &entry_slot(generation, FIXED_HEADER as u64),
            CHECK,
        )?;
        header.extend_from_slice(&(check.len() as u32).to_le_bytes());
        header.extend_from_slice(&check);
        file.write_all(&header)
            .map_err(|e| io_err("cannot write", &path, e))?;
        let len = header.len() as u64;
        Ok(LogWriter {
            keys,
            file,
            path,
            generation,
            len,
            zeroed,
            batch: BatchWriter::new(keys, generation, len),
        })
    }

    /// Adds an entry; its offset and sealed length in the new file.
    fn push(&mut self, plain: &[u8]) -> Result<(u64, u32), StoreError> {
        let at = self.batch.push(plain)?;
        self.flush_if_full()?;
        Ok(at)
    }

    /// Adds an append entry (see [`BatchWriter::push_append`]).
    fn push_append(
        &mut self,
        mailbox: &MailboxId,
        seq: u64,
        id: &MessageId,
        record: &[u8],
    ) -> Result<(u64, u32), StoreError> {
        let at = self.batch.push_append(mailbox, seq, id, record)?;
        self.flush_if_full()?;
        Ok(at)
    }

    fn flush_if_full(&mut self) -> Result<(), StoreError> {
        if self.batch.buf.len() >= MAX_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds a mailbox's counters and remembered ids, then its unacked messages; where each of
    /// those went (offset and sealed length), in order.
    fn push_snapshot(&mut self, snapshot: &MailboxSnapshot) -> Result<Vec<(u64, u32)>, StoreError> {
        self.push(&mailbox_plain(snapshot)?)?;
        let mut at = Vec::with_capacity(snapshot.live.len());
        for m in &snapshot.live {
            at.push(self.push_append(&snapshot.mailbox, m.seq, &m.message_id, &m.record)?);
        }
        Ok(at)
    }

    /// Writes the open batch and syncs it.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(
            &mut self.batch,
            BatchWriter::new(self.keys, self.generation, 0),
        );
        let bytes = batch.finish()?;
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err("cannot write", &self.path, e))?;
        self.len += bytes.len() as u64;
        self.batch = BatchWriter::new(self.keys, self.generation, self.len);
        Ok(())
    }

    /// Writes the open batch and fsyncs the file.
    fn sync(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        self.file
            .sync_all()
            .map_err(|e| io_err("cannot sync", &self.path, e))
    }

    /// Syncs, then renames the file to `dir/mailboxes.log` and syncs the directory; the file
    /// and how far it reaches (zeros after `len` included). The file it replaces keeps the
    /// name `mailboxes.log.old` when the file system allows a second link.
    fn install(mut self, dir: &Path) -> Result<(LogFile, u64), StoreError> {
        self.sync()?;
        let path = dir.join(LOG_FILE);
        let old = dir.join(OLD_FILE);
        let _ = std::fs::remove_file(&old);
        if let Err(e) = std::fs::hard_link(&path, &old) {
            tracing::debug!(error = %e, "mailbox log: no second link to the old log; it is freed");
        }
        if let Err(e) = std::fs::rename(&self.path, &path) {
            // `.old` would be a second name of the live log.
            let _ = std::fs::remove_file(&old);
            return Err(io_err("cannot rename into place", &path, e));
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("cannot sync directory", dir, e))?;
        let allocated = self.len.max(self.zeroed);
        Ok((
            LogFile {
                file: self.file,
                generation: self.generation,
            },
            allocated,
        ))
    }
}

/// Turns the log a compaction replaced (`dir/mailboxes.log.old`, once no fetch reads it) into
/// the next spare of `size` bytes: overwritten with zeros in place, cut down gently or grown
/// to `size`, then renamed. Reusing its blocks frees and allocates nothing, so the file
/// system's journal stays quiet; `false` when there is no such file (no second link).
fn recycle(dir: &Path, old: Arc<LogFile>, size: u64) -> Result<bool, StoreError> {
    let path = dir.join(OLD_FILE);
    if !path.exists() {
        release_gently(old);
        return Ok(false);
    }
    let Some(old) = sole_owner(old) else {
        let _ = std::fs::remove_file(&path);
        return Ok(false);
    };
    let file = &old.file;
    let len = file
        .metadata()
        .map_err(|e| io_err("cannot read the size of", &path, e))?
        .len();
    cut_gently(file, len, size);
    // What it held is overwritten, and it is grown to `size` if it was smaller.
    write_zeros(file, &path, 0, size)?;
    drop(old);
    std::fs::rename(&path, dir.join(SPARE_FILE)).map_err(|e| io_err("cannot rename", &path, e))?;
    Ok(true)
}

/// Runs `work` on a thread of its own at the lowest CPU priority and waits for it. A
/// compaction's sealing, copying and zeroing then use what the committer, the connections and
/// the load leave of the cores, instead of taking one from them for tens of milliseconds
/// (docs/BENCHMARKS.md, session 13). The thread is `SCHED_IDLE` (see [`lower_this_thread`]).
/// Nothing that holds the write gate may run there: a thread at the lowest priority holding
/// it gets a sliver of a busy core while the committer waits for it (priority inversion), and
/// an unprivileged thread cannot raise its priority back. Hence a thread per call, not a
/// lowered compaction thread. A panic in `work` is resumed here.
fn in_background<T: Send>(
    work: impl FnOnce() -> Result<T, StoreError> + Send,
) -> Result<T, StoreError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("mailbox-compaction-bg".into())
            .spawn_scoped(scope, || {
                lower_this_thread();
                work()
            })
            .map_err(|e| StoreError::Backend(format!("cannot start a compaction thread: {e}")))?;
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Puts the calling thread in the `SCHED_IDLE` class, or at nice 19 where that is refused.
/// Both give a busy core's time to every other thread first, but a thread at nice 19 still
/// counts as a peer of the others: a connection or the committer woken while it runs may
/// wait out its time slice. A woken thread of the normal class preempts an idle-class one at
/// once. Measured on an aged server at half the maximum rate, the 100 ms slices during a
/// compaction had a median p99 of 11.3 ms at nice 19 and 5.2 ms in `SCHED_IDLE`
/// (docs/BENCHMARKS.md, session 18). The idle class gets even less of a saturated machine,
/// so a catch-up that falls behind finishes at normal priority ([`MailboxLog::catch_up`]).
fn lower_this_thread() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        tracing::debug!(error = ?e, "mailbox log: no SCHED_IDLE for a compaction thread; nice 19");
        if let Err(e) = rustix::process::setpriority_process(None, 19) {
            tracing::debug!(error = %e, "mailbox log: cannot lower a compaction thread's priority");
        }
    }
}

/// Writes zeros over `from..to` of `file` (at `path`), [`MAX_BATCH_BYTES`] and a sync at a
/// time so the committer's syncs never queue behind a large one, with [`ZEROING_PAUSE`] after
/// each.
fn write_zeros(file: &File, path: &Path, from: u64, to: u64) -> Result<(), StoreError> {
    let zeros = vec![0u8; MAX_BATCH_BYTES];
    let mut at = from;
    while at < to {
        let n = (to - at).min(MAX_BATCH_BYTES as u64);
        file.write_all_at(&zeros[..n as usize], at)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_err("cannot write", path, e))?;
        at += n;
        std::thread::sleep(ZEROING_PAUSE);
    }
    Ok(())
}

/// Grows `dir/mailboxes.log.spare` with zeros to `size` bytes (see [`write_zeros`]). A spare
/// left by an earlier run is grown, not rewritten: it only ever holds zeros.
fn fill_spare(dir: &Path, size: u64) -> Result<(), StoreError> {
    let path = dir.join(SPARE_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err("cannot create", &path, e))?;
    let len = file
        .metadata()
        .map_err(|e| io_err("cannot read the size of", &path, e))?
        .len();
    write_zeros(&file, &path, len, size)
}

/// Writes `snapshots` as a new log of `generation` to `dir/mailboxes.log.tmp`, fsyncs it and
/// renames it over the log (then fsyncs the directory).
pub(super) fn write_log(
    dir: &Path,
    keys: &DataKeyRing,
    generation: u64,
    snapshots: impl IntoIterator<Item = MailboxSnapshot>,
) -> Result<(), StoreError> {
    let mut out = LogWriter::create(dir.join(TMP_FILE), keys, generation)?;
    for snapshot in snapshots {
        out.push_snapshot(&snapshot)?;
    }
    out.install(dir)?;
    Ok(())
}

/// What a compaction starts from: the index as it was at `upto` in the file `old`.
pub(super) struct CompactionPlan {
    old: Arc<LogFile>,
    /// Where the first step of the plan stood: the catch-up copies from here.
    upto: u64,
    mailboxes: Vec<PlannedMailbox>,
    /// The longest that one step of making the plan held up the committer, and the steps.
    longest_step: std::time::Duration,
    steps: usize,
    /// Idle mailboxes whose acked ids the plan forgot, and how many ids.
    forgotten_mailboxes: usize,
    forgotten_ids: usize,
}

/// How long one step of a compaction's plan holds writes, at most about (see
/// [`MailboxLog::plan_in_steps`]); tests take one mailbox per step.
const PLAN_STEP: std::time::Duration = std::time::Duration::from_micros(500);

/// Where a compaction's time went, for its log line: the phases that hold up the committer
/// (`planned`, `held`) and those that share the machine with it.
#[derive(Debug, Default)]
pub(super) struct CompactionTimes {
    /// The longest step of the plan, and how many there were.
    planned: std::time::Duration,
    plan_steps: usize,
    /// Idle mailboxes whose acked ids were forgotten, and how many ids.
    idle_mailboxes: usize,
    forgotten_ids: usize,
    snapshot: std::time::Duration,
    catch_up: std::time::Duration,
    /// Catch-up rounds in all, and those run at normal priority because the rounds in the
    /// background fell behind the committer.
    pub(super) catch_up_rounds: usize,
    pub(super) rounds_at_normal_priority: usize,
    /// Appends the catch-up and the final step copied without their records (acked since).
    pub(super) records_left_out: usize,
    held: std::time::Duration,
}

impl CompactionTimes {
    fn ms(d: std::time::Duration) -> f64 {
        (d.as_secs_f64() * 10_000.0).round() / 10.0
    }
}

/// One mailbox as a compaction plan saw it.
struct PlannedMailbox {
    mailbox: MailboxId,
    last_seq: u64,
    /// Cloned under the index lock (a copy of contiguous memory); turned into a `Vec` by the
    /// compaction thread.
    acked: VecDeque<(u64, MessageId)>,
    live: VecDeque<Live>,
    /// The file's end when this mailbox was taken: its entries before it are in its state.
    upto: u64,
}

/// A compaction's new file, written up to `copied` of the old one, and what its final step
/// ([`MailboxLog::switch`]) needs.
struct Prepared<'k> {
    old: Arc<LogFile>,
    out: LogWriter<'k>,
    /// Old offset of every unacked message's entry -> where it is in the new file.
    moved: HashMap<u64, (u64, u32)>,
    /// Mailboxes the plan took after its first step -> the file's end when each was taken.
    later: HashMap<MailboxId, u64>,
    copied: u64,
    /// What the last catch-up round copied.
    last_round: Option<u64>,
    /// The rounds in the background stopped because one had more than half of what the round
    /// before copied: the rest is caught up at normal priority ([`MailboxLog::catch_up`]).
    behind: bool,
    snapshot_len: u64,
    times: CompactionTimes,
}

/// How a compaction's catch-up copies one entry of the old file ([`MailboxLog::copies`]).
enum Copy {
    /// Not at all: the state of its mailbox in the new file holds it.
    Not,
    /// As it is.
    Whole,
    /// An append acked by now, without its record: the length of the plaintext kept.
    WithoutRecord(usize),
}

/// A catch-up reads the old file this much at a time (and a longer batch whole), so copying
/// a long tail does not hold all of it in memory.
/// Tests read 256 bytes at a time, so their catch-ups cross chunks and read batches longer
/// than one.
const COPY_CHUNK: u64 = if cfg!(test) { 256 } else { 8 * 1024 * 1024 };

/// `len` bytes of the old log file from `at`.
fn read_old(old: &LogFile, at: u64, len: u64) -> Result<Vec<u8>, StoreError> {
    let mut bytes = vec![0u8; len as usize];
    old.file
        .read_exact_at(&mut bytes, at)
        .map_err(|e| StoreError::Backend(format!("cannot read the mailbox log: {e}")))?;
    Ok(bytes)
}

/// A tail of the old file copied into the new one below this many bytes is done by the
/// compaction's final step (which holds up writes); above it, the compactor catches up again,
/// at most [`CATCH_UP_ROUNDS`] times. Tests set it to 1 byte to run the catch-up rounds.
const CATCH_UP_BYTES: u64 = if cfg!(test) { 1 } else { 256 * 1024 };
pub(super) const CATCH_UP_ROUNDS: usize = 8;

/// What a batch's commit answers.
type BatchResults = (
    Vec<Result<u64, StoreError>>,
    Vec<Result<AppendOutcome, StoreError>>,
);

impl MailboxLog {
    /// Opens `dir/mailboxes.log` (which must exist: see [`write_log`]) and replays it.
    pub(super) fn open(
        dir: &Path,
        keys: &DataKeyRing,
        dedup_window: u64,
        dedup_idle: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let path = dir.join(LOG_FILE);
        // A second name of a replaced log (or of this one, after a crash between the link
        // and the rename): never read, and not zeroed yet.
        match std::fs::remove_file(dir.join(OLD_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("cannot remove", &dir.join(OLD_FILE), e));
            }
            _ => {}
        }
        let Replayed { mut index, torn } = replay(&path, keys, dedup_window)?;
        if torn > 0 {
            tracing::warn!(
                bytes = torn,
                "mailbox log: cut off a torn last batch (writes never acknowledged)"
            );
        }
        // Compaction is due once the file is four times what the last one wrote. Counting the
        // whole replayed file as that made each restart push the next compaction out by 4x
        // (a 380 MB log, mostly acked, grew past 1.1 GB uncompacted after one restart).
        index.snapshot_len = index.live_len();
        Ok(MailboxLog {
            dir: dir.to_owned(),
            dedup_window,
            dedup_idle,
            opened: Instant::now(),
            index: Mutex::new(index),
            queue: Mutex::new(WriteQueue::default()),
            write_gate: Mutex::new(()),
            compacting: std::sync::atomic::AtomicBool::new(false),
            disk_latency: Histogram::default(),
            committed_entries: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Queues appends (in order, under one lock) for the group committer; `start` is called
    /// when no committer is running and one must be started.
    pub(super) fn enqueue_appends(
        &self,
        appends: Vec<AppendRequest>,
        start: impl FnOnce(),
    ) -> Vec<tokio::sync::oneshot::Receiver<Result<AppendOutcome, StoreError>>> {
        let mut answers = Vec::with_capacity(appends.len());
        if appends.is_empty() {
            return answers;
        }
        self.enqueue(
            |queue| {
                for request in appends {
                    let (done, answer) = tokio::sync::oneshot::channel();
                    queue.appends.push(PendingAppend { request, done });
                    answers.push(answer);
                }
            },
            start,
        );
        answers
    }

    pub(super) fn enqueue_ack(
        &self,
        mailbox: &MailboxId,
        up_to_seq: u64,
        start: impl FnOnce(),
    ) -> tokio::sync::oneshot::Receiver<Result<u64, StoreError>> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.enqueue(
            |queue| {
                queue.acks.push(PendingAck {
                    mailbox: mailbox.clone(),
                    up_to_seq,
                    done,
                })
            },
            start,
        );
        answer
    }

    fn enqueue(&self, add: impl FnOnce(&mut WriteQueue), start: impl FnOnce()) {
        let start_committer = {
            let mut queue = lock(&self.queue);
            add(&mut queue);
            !std::mem::replace(&mut queue.committing, true)
        };
        if start_committer {
            start();
        }
    }

    /// The committer: commits queued acks and appends, a batch per write, until the queue is
    /// empty. Runs on a blocking thread. When the log is due for compaction it calls
    /// `start_compaction`, which runs [`MailboxLog::compact`] on another thread (or, if it
    /// cannot start one, [`MailboxLog::compaction_not_started`]).
    pub(super) fn commit_queued(&self, keys: &DataKeyRing, start_compaction: &dyn Fn()) {
        struct Guard<'a>(&'a MailboxLog);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    lock(&self.0.queue).committing = false;
                }
            }
        }
        let _guard = Guard(self);
        loop {
            let (acks, appends) = {
                let mut queue = lock(&self.queue);
                if queue.appends.is_empty() && queue.acks.is_empty() {
                    queue.committing = false;
                    return;
                }
                let n = queue.appends.len().min(MAX_BATCH);
                (
                    std::mem::take(&mut queue.acks),
                    queue.appends.drain(..n).collect::<Vec<_>>(),
                )
            };
            let (ack_results, append_results) = match self.commit_batch(keys, &acks, &appends) {
                Ok(results) => results,
                Err(e) => {
                    let message = e.to_string();
                    let again = || StoreError::Backend(message.clone());
                    (
                        acks.iter().map(|_| Err(again())).collect(),
                        appends.iter().map(|_| Err(again())).collect(),
                    )
                }
            };
            for (pending, result) in acks.into_iter().zip(ack_results) {
                let _ = pending.done.send(result);
            }
            for (pending, result) in appends.into_iter().zip(append_results) {
                let _ = pending.done.send(result);
            }
            if self.compaction_due() {
                start_compaction();
            }
        }
    }

    /// Applies the acks, then the appends, to the index, writes them as one batch and fsyncs
    /// it. A full mailbox refuses its own append only; a failed write fails the whole batch.
    fn commit_batch(
        &self,
        keys: &DataKeyRing,
        acks: &[PendingAck],
        appends: &[PendingAppend],
    ) -> Result<BatchResults, StoreError> {
        let _gate = lock(&self.write_gate);
        let mut index = lock(&self.index);
        index.check()?;
        index.now_ms = self.now_ms();
        let file = Arc::clone(&index.file);
        let start = index.len;
        let allocated = index.allocated;
        // Room for every entry up front (length prefix, sealing overhead, plaintext), so
        // the batch is not copied again as it grows.
        let entry = 4 + MIN_RECORD_LEN;
        let room = acks
            .iter()
            .map(|a| entry + ack_plain_len(&a.mailbox))
            .chain(
                appends
                    .iter()
                    .map(|p| entry + append_plain_len(&p.request.mailbox, &p.request.record)),
            )
            .sum::<usize>();
        let mut batch = BatchWriter::with_capacity(keys, file.generation, start, room);
        let mut ack_results = Vec::with_capacity(acks.len());
        let mut append_results = Vec::with_capacity(appends.len());
        // (index into `appends`, seq) of each append written.
        let mut written: Vec<(usize, u64)> = Vec::with_capacity(appends.len());
        let mut ack_entries = 0usize;
        let staged = (|| -> Result<(), StoreError> {
            for a in acks {
                let removed = index.apply_ack(&a.mailbox, a.up_to_seq, self.dedup_window);
                if removed > 0 {
                    batch.push(&ack_plain(&a.mailbox, a.up_to_seq)?)?;
                    ack_entries += 1;
                }
                ack_results.push(Ok(removed));
            }
            for (i, p) in appends.iter().enumerate() {
                let r = &p.request;
                let (last_seq, depth, known) = match index.mailboxes.get(&r.mailbox) {
                    Some(m) => (
                        m.last_seq,
                        m.live.len() as u64,
                        m.remembered_seq(&r.message_id),
                    ),
                    None => (0, 0, None),
                };
                if let Some(seq) = known {
                    append_results.push(Ok(AppendOutcome {
                        seq,
                        duplicate: true,
                    }));
                    continue;
                }
                let seq =
                    match super::next_seq_unless_full(&r.mailbox, last_seq, depth, r.max_depth) {
                        Ok(seq) => seq,
                        Err(e) => {
                            append_results.push(Err(e));
                            continue;
                        }
                    };
                let (offset, sealed_len) =
                    batch.push_append(&r.mailbox, seq, &r.message_id, &r.record)?;
                index.remember_recent(offset, &r.record);
                index.apply_append(
                    &r.mailbox,
                    Live {
                        seq,
                        message_id: r.message_id,
                        offset,
                        sealed_len,
                    },
                );
                written.push((i, seq));
                append_results.push(Ok(AppendOutcome {
                    seq,
                    duplicate: false,
                }));
            }
            Ok(())
        })();
        if let Err(e) = staged {
            self.rebuild(keys, &mut index, start);
            return Err(e);
        }
        if batch.is_empty() {
            return Ok((ack_results, append_results));
        }
        // The sealing, the write and the fsync run without the index lock, so fetches go on
        // meanwhile (they show only what is durable). Sealing under it made the committer
        // hold the index 76 µs per batch on average instead of 48 at half the maximum rate,
        // and connections that fetch wait for it (docs/BENCHMARKS.md, session 19).
        drop(index);
        let bytes = match batch.finish() {
            Ok(bytes) => bytes,
            Err(e) => {
                self.rebuild(keys, &mut lock(&self.index), start);
                return Err(e);
            }
        };
        let end = start + bytes.len() as u64;
        let grown =
            (end > allocated).then(|| end.div_ceil(PREALLOCATE) * PREALLOCATE + PREALLOCATE);
        let disk = Instant::now();
        let wrote = grown
            .map_or(Ok(()), |to| {
                file.file.write_all_at(&vec![0u8; (to - end) as usize], end)
            })
            .and_then(|()| file.file.write_all_at(&bytes, start))
            .and_then(|()| file.file.sync_data());
        #[cfg(test)]
        let wrote = match self.fail_next_write.swap(false, SeqCst) {
            true => Err(std::io::Error::other("injected write failure")),
            false => wrote,
        };
        self.disk_latency.observe(disk.elapsed());
        let mut index = lock(&self.index);
        if let Err(e) = wrote {
            let path = self.dir.join(LOG_FILE);
            self.rebuild(keys, &mut index, start);
            return Err(io_err("cannot write", &path, e));
        }
        index.len = end;
        if let Some(to) = grown {
            index.allocated = to;
        }
        self.commits.fetch_add(1, Relaxed);
        self.committed_entries
            .fetch_add((ack_entries + written.len()) as u64, Relaxed);
        for (i, seq) in written {
            if let Some(m) = index.mailboxes.get_mut(&appends[i].request.mailbox) {
                m.durable_seq = m.durable_seq.max(seq);
            }
        }
        Ok((ack_results, append_results))
    }

    /// Milliseconds since the log was opened: the clock of `Mailbox::active_at_ms`.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// After a failed batch: cuts the file back to `good_len` and rebuilds the index from it,
    /// forgetting what the batch applied; if even that fails, the log refuses every call.
    fn rebuild(&self, keys: &DataKeyRing, index: &mut Index, good_len: u64) {
        let path = self.dir.join(LOG_FILE);
        let result = index
            .file
            .file
            .set_len(good_len)
            .map_err(|e| io_err("cannot cut back", &path, e))
            .and_then(|()| replay(&path, keys, self.dedup_window));
        match result {
            Ok(Replayed { index: fresh, .. }) => {
                let snapshot_len = index.snapshot_len;
                *index = fresh;
                index.snapshot_len = snapshot_len;
                // Replayed mailboxes count as touched now, not at the open.
                index.now_ms = self.now_ms();
                let now_ms = index.now_ms;
                for m in index.mailboxes.values_mut() {
                    m.active_at_ms = now_ms;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "mailbox log: cannot recover from a failed write");
                index.failed = Some(e.to_string());
            }
        }
    }

    /// Whether a compaction is due (the log has grown enough and none is running); if so, it
    /// is marked running.
    fn compaction_due(&self) -> bool {
        let index = lock(&self.index);
        index.failed.is_none()
            && index.len >= COMPACT_MIN_BYTES
            && index.len >= index.snapshot_len.saturating_mul(4)
            && !self.compacting.swap(true, SeqCst)
    }

    /// After [`MailboxLog::compaction_due`] said yes but no thread could run the compaction:
    /// the next commit tries again.
    pub(super) fn compaction_not_started(&self) {
        self.compacting.store(false, SeqCst);
    }

    /// The index, for a compaction to write: taken in steps of at most about [`PLAN_STEP`]
    /// each with writes held, so the committer waits for one step and not for a copy of every
    /// mailbox's remembered ids (which grows with the number of mailboxes: 4-9 ms with 80 busy
    /// ones, docs/BENCHMARKS.md). Each mailbox is taken as of the file's end at its step
    /// (`PlannedMailbox::upto`): with writes held no batch is in flight, so that is where
    /// the mailbox's state stands. The catch-up copies from the first step's end and leaves out
    /// each mailbox's entries before its own step.
    fn plan_in_steps(&self) -> Result<CompactionPlan, StoreError> {
        self.plan_in_steps_then(&mut || {})
    }

    /// [`MailboxLog::plan_in_steps`], calling `after_step` after each step, with writes let go
    /// (tests commit between the steps).
    fn plan_in_steps_then(
        &self,
        after_step: &mut dyn FnMut(),
    ) -> Result<CompactionPlan, StoreError> {
        let mut plan: Option<CompactionPlan> = None;
        let mut next = 0;
        loop {
            let gate = lock(&self.write_gate);
            let mut index = lock(&self.index);
            let step = Instant::now();
            index.check()?;
            let plan = plan.get_or_insert_with(|| CompactionPlan {
                old: Arc::clone(&index.file),
                upto: index.len,
                mailboxes: Vec::with_capacity(index.mailboxes.len()),
                longest_step: std::time::Duration::ZERO,
                steps: 0,
                forgotten_mailboxes: 0,
                forgotten_ids: 0,
            });
            if !Arc::ptr_eq(&index.file, &plan.old) {
                return Err(StoreError::Backend(
                    "the log was rebuilt while a compaction planned".into(),
                ));
            }
            let (now_ms, upto) = (self.now_ms(), index.len);
            while let Some((mailbox, m)) = index.mailboxes.get_index_mut(next) {
                // A mailbox idle for `dedup_idle` forgets its acked ids here, in memory and
                // in the file this compaction writes (the old file still holds them until the
                // switch; remembering an id longer is always safe).
                let idle_ms = now_ms.saturating_sub(m.active_at_ms);
                if !m.acked.is_empty() && u128::from(idle_ms) >= self.dedup_idle.as_millis() {
                    plan.forgotten_ids += m.forget_acked();
                    plan.forgotten_mailboxes += 1;
                }
                plan.mailboxes.push(PlannedMailbox {
                    mailbox: mailbox.clone(),
                    last_seq: m.last_seq,
                    acked: m.acked.clone(),
                    live: m.live.clone(),
                    upto,
                });
                next += 1;
                if cfg!(test) || step.elapsed() >= PLAN_STEP {
                    break;
                }
            }
            plan.steps += 1;
            plan.longest_step = plan.longest_step.max(step.elapsed());
            let done = next >= index.mailboxes.len();
            drop(index);
            drop(gate);
            after_step();
            if done {
                break;
            }
        }
        plan.ok_or_else(|| StoreError::Backend("no compaction plan".into()))
    }

    /// Rewrites the log with only what it must keep, while the committer goes on writing to
    /// the old file: the index is taken in steps ([`MailboxLog::plan_in_steps`]), its state
    /// is written to `mailboxes.log.tmp` first, then what was
    /// written to the old file since is copied after it (entries opened and sealed again for
    /// their new offsets) until little is left; the last part is copied with the write gate
    /// held, and the new file is renamed over the old one and the index switched to it.
    ///
    /// The new file is written over a spare of zeros made ahead of time, so the committer's
    /// writes to it overwrite blocks the file already has until the next compaction is due.
    /// A write that grows the file makes its `fdatasync` wait for a commit of the file
    /// system's journal, and with online discard (`mount -o discard`) a journal commit after a
    /// large file was freed waited for that discard: 90-215 ms, the worst p99s of issue #8
    /// (docs/BENCHMARKS.md). The first compaction (or the first after a restart) makes a
    /// spare before it plans; every compaction makes the next one after.
    pub(super) fn compact(&self, keys: &DataKeyRing) {
        let tmp = self.dir.join(TMP_FILE);
        if !self.dir.join(SPARE_FILE).exists() {
            if let Err(e) = in_background(|| fill_spare(&self.dir, SPARE_BYTES)) {
                tracing::warn!(error = %e, "mailbox log: cannot make a spare; compacting without");
            }
        }
        // The plan is made at this thread's priority: its steps hold writes.
        let planned = self.plan_in_steps();
        // Writing the new file shares the machine with the committer; only the switch holds
        // it up, and runs at this thread's priority (see `in_background`).
        match planned
            .and_then(|plan| in_background(|| self.prepare(keys, plan, &mut |_| {})))
            .and_then(|p| self.catch_up_behind(keys, p, &mut |_| {}))
            .and_then(|p| self.switch(keys, p))
        {
            Ok((before, after, old, times)) => {
                tracing::info!(
                    before,
                    after,
                    planned_ms = CompactionTimes::ms(times.planned),
                    plan_steps = times.plan_steps,
                    idle_mailboxes = times.idle_mailboxes,
                    forgotten_ids = times.forgotten_ids,
                    snapshot_ms = CompactionTimes::ms(times.snapshot),
                    catch_up_ms = CompactionTimes::ms(times.catch_up),
                    catch_up_rounds = times.catch_up_rounds,
                    rounds_at_normal_priority = times.rounds_at_normal_priority,
                    records_left_out = times.records_left_out,
                    held_ms = CompactionTimes::ms(times.held),
                    "mailbox log compacted"
                );
                let recycling = Instant::now();
                let spare = in_background(|| match recycle(&self.dir, old, SPARE_BYTES) {
                    Ok(true) => Ok(()),
                    Ok(false) => fill_spare(&self.dir, SPARE_BYTES),
                    Err(e) => {
                        let _ = std::fs::remove_file(self.dir.join(OLD_FILE));
                        Err(e)
                    }
                });
                match spare {
                    Ok(()) => tracing::info!(
                        took_ms = CompactionTimes::ms(recycling.elapsed()),
                        "mailbox log: spare ready for the next compaction"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "mailbox log: cannot make a spare for the next compaction")
                    }
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::error!(error = %e, "mailbox log compaction failed; the log keeps growing");
            }
        }
        self.compacting.store(false, SeqCst);
    }

    /// Compacts now, on this thread (tests); into the spare if there is one. With
    /// `spare_size`, the replaced file becomes the next spare of that size, as
    /// [`MailboxLog::compact`] does; without, it is let go.
    #[cfg(test)]
    pub(super) fn compact_now(
        &self,
        keys: &DataKeyRing,
        spare_size: Option<u64>,
    ) -> Result<(), StoreError> {
        self.compact_now_then(keys, spare_size, &mut || {})
    }

    /// [`MailboxLog::compact_now`], calling `after_step` after each step of the plan (see
    /// [`MailboxLog::plan_in_steps_then`]).
    #[cfg(test)]
    pub(super) fn compact_now_then(
        &self,
        keys: &DataKeyRing,
        spare_size: Option<u64>,
        after_step: &mut dyn FnMut(),
    ) -> Result<(), StoreError> {
        self.compact_now_with(keys, spare_size, after_step, &mut |_| {})
            .map(|_| ())
    }

    /// [`MailboxLog::compact_now_then`], also calling `before_round` with the number of
    /// catch-up rounds done before each look at what is left to copy; where the time went.
    #[cfg(test)]
    pub(super) fn compact_now_with(
        &self,
        keys: &DataKeyRing,
        spare_size: Option<u64>,
        after_step: &mut dyn FnMut(),
        before_round: &mut dyn FnMut(usize),
    ) -> Result<CompactionTimes, StoreError> {
        self.compacting.store(true, SeqCst);
        let plan = self.plan_in_steps_then(after_step);
        let result = plan
            .and_then(|plan| self.prepare(keys, plan, before_round))
            .and_then(|p| self.catch_up_behind(keys, p, before_round))
            .and_then(|p| self.switch(keys, p));
        self.compacting.store(false, SeqCst);
        let (_, _, old, times) = result?;
        if let Some(size) = spare_size {
            recycle(&self.dir, old, size)?;
        } else {
            let _ = std::fs::remove_file(self.dir.join(OLD_FILE));
            release_gently(old);
        }
        Ok(times)
    }

    /// The part of a compaction that runs beside the committer: writes the plan's state to
    /// `mailboxes.log.tmp`, then catches up with what the committer wrote meanwhile until
    /// little is left.
    fn prepare<'k>(
        &self,
        keys: &'k DataKeyRing,
        plan: CompactionPlan,
        before_round: &mut dyn FnMut(usize),
    ) -> Result<Prepared<'k>, StoreError> {
        let mut times = CompactionTimes {
            planned: plan.longest_step,
            plan_steps: plan.steps,
            idle_mailboxes: plan.forgotten_mailboxes,
            forgotten_ids: plan.forgotten_ids,
            ..CompactionTimes::default()
        };
        let phase = Instant::now();
        let old = plan.old;
        let tmp = self.dir.join(TMP_FILE);
        // Over the spare's zeros if there is one (it replaces a `tmp` a crash left).
        let over_zeros = std::fs::rename(self.dir.join(SPARE_FILE), &tmp).is_ok();
        let mut out = LogWriter::create_in(tmp, keys, old.generation.wrapping_add(1), over_zeros)?;
        // Old offset of every unacked message's entry -> where it is in the new file.
        let mut moved: HashMap<u64, (u64, u32)> = HashMap::new();
        // Mailboxes taken after the plan's first step, and where each was taken.
        let mut later: HashMap<MailboxId, u64> = HashMap::new();
        for PlannedMailbox {
            mailbox,
            last_seq,
            acked,
            live,
            upto,
        } in plan.mailboxes
        {
            if upto > plan.upto {
                later.insert(mailbox.clone(), upto);
            }
            let messages = live
                .iter()
                .map(|l| read_message(keys, &old, &mailbox, *l))
                .collect::<Result<Vec<_>, _>>()?;
            let snapshot = MailboxSnapshot {
                mailbox,
                last_seq,
                acked: acked.into(),
                live: messages,
            };
            let written = out.push_snapshot(&snapshot)?;
            for (l, at) in live.iter().zip(written) {
                moved.insert(l.offset, at);
            }
        }
        out.sync()?;
        let snapshot_len = out.len;
        times.snapshot = phase.elapsed();
        let mut prepared = Prepared {
            old,
            out,
            moved,
            later,
            copied: plan.upto,
            last_round: None,
            behind: false,
            snapshot_len,
            times,
        };
        self.catch_up(keys, &mut prepared, true, before_round)?;
        Ok(prepared)
    }

    /// Copies what the committer wrote to the old file since `p.copied`, a round at a time,
    /// until what is left is small enough for the final step, or after [`CATCH_UP_ROUNDS`]
    /// rounds in all. With `stop_when_behind` (in the background), it stops early when a round
    /// finds more than half of what the round before copied, and marks `p.behind`: a thread
    /// in the idle class is not catching up with the committer, and more such rounds would
    /// only leave the final step a long tail to copy with writes held (a saturated server at
    /// nice 19 once caught up for 37 s; in the idle class, 8 rounds left 212 ms of copying
    /// for the final step; docs/BENCHMARKS.md, session 18).
    fn catch_up(
        &self,
        keys: &DataKeyRing,
        p: &mut Prepared<'_>,
        stop_when_behind: bool,
        before_round: &mut dyn FnMut(usize),
    ) -> Result<(), StoreError> {
        let phase = Instant::now();
        while p.times.catch_up_rounds < CATCH_UP_ROUNDS {
            before_round(p.times.catch_up_rounds);
            let upto = {
                let index = lock(&self.index);
                if !Arc::ptr_eq(&index.file, &p.old) {
                    return Err(StoreError::Backend("the log was rebuilt meanwhile".into()));
                }
                index.len
            };
            let tail = upto.saturating_sub(p.copied);
            if tail <= CATCH_UP_BYTES {
                break;
            }
            if stop_when_behind && p.last_round.is_some_and(|last| tail > last / 2) {
                p.behind = true;
                break;
            }
            p.times.records_left_out += self.copy_tail(
                keys,
                &p.old,
                p.copied,
                upto,
                &p.later,
                &mut p.out,
                &mut p.moved,
            )?;
            p.out.sync()?;
            p.copied = upto;
            p.last_round = Some(tail);
            p.times.catch_up_rounds += 1;
            if !stop_when_behind {
                p.times.rounds_at_normal_priority += 1;
            }
        }
        p.times.catch_up += phase.elapsed();
        Ok(())
    }

    /// After [`MailboxLog::prepare`]: if its rounds fell behind, the rest of the catch-up at
    /// this thread's priority, so the final step does not copy a long tail with writes held.
    fn catch_up_behind<'k>(
        &self,
        keys: &DataKeyRing,
        mut p: Prepared<'k>,
        before_round: &mut dyn FnMut(usize),
    ) -> Result<Prepared<'k>, StoreError> {
        if p.behind {
            self.catch_up(keys, &mut p, false, before_round)?;
        }
        Ok(p)
    }

    /// The final step of a compaction, with writes held: copies the rest of the old file,
    /// renames the new file over the log and switches the index to it. Returns the file sizes
    /// before and after, the replaced file, and where the time went.
    fn switch(
        &self,
        keys: &DataKeyRing,
        prepared: Prepared<'_>,
    ) -> Result<(u64, u64, Arc<LogFile>, CompactionTimes), StoreError> {
        let Prepared {
            old,
            mut out,
            mut moved,
            later,
            copied,
            snapshot_len,
            mut times,
            ..
        } = prepared;
        // The rest with writes held: no batch is in flight, so `index.len` is the file's end.
        let _gate = lock(&self.write_gate);
        let phase = Instant::now();
        let upto = lock(&self.index).len;
        times.records_left_out +=
            self.copy_tail(keys, &old, copied, upto, &later, &mut out, &mut moved)?;
        let mut index = lock(&self.index);
        if !Arc::ptr_eq(&index.file, &old) {
            return Err(StoreError::Backend("the log was rebuilt meanwhile".into()));
        }
        // Every unacked message must have been moved; check before the rename.
        let mut relocated: Vec<(MailboxId, Vec<Live>)> = Vec::with_capacity(index.mailboxes.len());
        for (mailbox, m) in &index.mailboxes {
            let mut lives = Vec::with_capacity(m.live.len());
            for l in &m.live {
                let &(offset, sealed_len) = moved.get(&l.offset).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "compaction: message {} of {mailbox} was not copied",
                        l.seq
                    ))
                })?;
                lives.push(Live {
                    offset,
                    sealed_len,
                    ..*l
                });
            }
            relocated.push((mailbox.clone(), lives));
        }
        out.flush()?;
        let len = out.len;
        let (new, allocated) = match out.install(&self.dir) {
            Ok(new) => new,
            Err(e) => {
                // The rename may or may not have happened: refuse further writes rather than
                // risk acknowledging them into a file the next start will not read.
                index.failed = Some(format!("compaction could not install the new log: {e}"));
                return Err(e);
            }
        };
        for (mailbox, lives) in relocated {
            if let Some(m) = index.mailboxes.get_mut(&mailbox) {
                m.live = lives.into();
            }
        }
        let before = index.len;
        index.file = Arc::new(new);
        index.len = len;
        index.allocated = allocated;
        // Offsets changed; the cache refills with the next appends.
        index.forget_recent();
        index.snapshot_len = snapshot_len;
        drop(index);
        times.held = phase.elapsed();
        Ok((before, len, old, times))
    }

    /// Copies the entries of the old file in `from..upto` (whole batches) to `out`, sealed
    /// again for their new offsets, as [`MailboxLog::copies`] says; records where each append
    /// copied whole went. Returns how many appends it copied without their records.
    #[allow(clippy::too_many_arguments)]
    fn copy_tail(
        &self,
        keys: &DataKeyRing,
        old: &LogFile,
        from: u64,
        upto: u64,
        later: &HashMap<MailboxId, u64>,
        out: &mut LogWriter<'_>,
        moved: &mut HashMap<u64, (u64, u32)>,
    ) -> Result<usize, StoreError> {
        let mut records_left_out = 0;
        let mut at = from;
        while at < upto {
            let mut bytes = read_old(old, at, (upto - at).min(COPY_CHUNK))?;
            // A batch longer than a chunk is read whole.
            if let Some(body) = read_u32(&bytes, 0) {
                let batch = 4 + u64::from(body);
                if batch > bytes.len() as u64 && at + batch <= upto {
                    bytes = read_old(old, at, batch)?;
                }
            }
            let mut pos = 0;
            loop {
                let (entries, end) = parse_batch(&bytes, pos, at, old.generation, keys)?;
                let copies = self.copies(&entries, later)?;
                for (entry, copy) in entries.into_iter().zip(copies) {
                    match copy {
                        Copy::Not => {}
                        Copy::WithoutRecord(len) => {
                            out.push(&entry.plain[..len])?;
                            records_left_out += 1;
                        }
                        Copy::Whole => {
                            let at = out.push(&entry.plain)?;
                            if entry.plain.first() == Some(&KIND_APPEND) {
                                moved.insert(entry.offset, at);
                            }
                        }
                    }
                }
                pos = end;
                // The next batch, if it is whole in this chunk; else the next chunk starts
                // with it.
                match read_u32(&bytes, pos) {
                    Some(body) if pos + 4 + body as usize <= bytes.len() => {}
                    _ => break,
                }
            }
            at += pos as u64;
        }
        Ok(records_left_out)
    }

    /// How [`MailboxLog::copy_tail`] copies each of `entries`, one batch of the old file; each
    /// entry's head is read once, and the index is looked at once for the batch. An entry of a
    /// mailbox in `later` written before that mailbox was taken for the plan is not copied.
    /// An append whose message has been acked by now is copied without its record: acks only
    /// ever drop a mailbox's oldest unacked messages, so an appended seq older than the oldest
    /// unacked one was acked. An ack the index holds may still be in a batch being written;
    /// should that write fail, the log is rebuilt and the compaction gives up (its final step
    /// checks), so no record is left out for an ack that was not kept.
    fn copies(
        &self,
        entries: &[RawEntry],
        later: &HashMap<MailboxId, u64>,
    ) -> Result<Vec<Copy>, StoreError> {
        // Per entry: its mailbox and, for an append, its seq and the length of its plaintext
        // without the record; `None` for an entry copied whole without a look.
        let heads = entries
            .iter()
            .map(|e| {
                let append = e.plain.first() == Some(&KIND_APPEND);
                if !append && later.is_empty() {
                    return Ok(None);
                }
                let (_, mailbox, mut r) = entry_head(&e.plain)?;
                if !append {
                    return Ok(Some((mailbox, None)));
                }
                let seq = r.u64()?;
                r.id()?;
                Ok(Some((mailbox, Some((seq, e.plain.len() - r.0.len())))))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let index = lock(&self.index);
        Ok(heads
            .into_iter()
            .zip(entries)
            .map(|(head, e)| {
                let Some((mailbox, append)) = head else {
                    return Copy::Whole;
                };
                if later.get(&mailbox).is_some_and(|&taken| e.offset < taken) {
                    return Copy::Not;
                }
                let Some((seq, len)) = append else {
                    return Copy::Whole;
                };
                let acked = index.mailboxes.get(&mailbox).is_some_and(|m| {
                    seq <= m.last_seq && m.live.front().is_none_or(|l| l.seq > seq)
                });
                if acked {
                    // Nothing reads the record again. Replayed, the append still counts its
                    // seq, and the ack after it in the file remembers its id.
                    Copy::WithoutRecord(len)
                } else {
                    Copy::Whole
                }
            })
            .collect())
    }

    /// Up to `limit` durable messages with `seq > after_seq`, in seq order.
    pub(super) fn fetch(
        &self,
        keys: &DataKeyRing,
        mailbox: &MailboxId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let (file, wanted) = {
            let index = lock(&self.index);
            index.check()?;
            let Some(m) = index.mailboxes.get(mailbox) else {
                return Ok(Vec::new());
            };
            let first = m.live.partition_point(|l| l.seq <= after_seq);
            let wanted: Vec<(Live, Option<Arc<[u8]>>)> = m
                .live
                .range(first..)
                .take_while(|l| l.seq <= m.durable_seq)
                .take(limit)
                .map(|l| (*l, index.recent.get(&l.offset).cloned()))
                .collect();
            (Arc::clone(&index.file), wanted)
        };
        wanted
            .into_iter()
            .map(|(l, recent)| match recent {
                Some(record) => Ok(StoredMessage {
                    seq: l.seq,
                    message_id: l.message_id,
                    record: record.to_vec(),
                }),
                None => read_message(keys, &file, mailbox, l),
            })
            .collect()
    }

    /// The next batch finds its write failed (tests).
    #[cfg(test)]
    pub(super) fn inject_write_failure(&self) {
        self.fail_next_write.store(true, SeqCst);
    }

    /// Records kept in memory for delivery (tests).
    #[cfg(test)]
    pub(super) fn recent_count(&self) -> usize {
        lock(&self.index).recent.len()
    }

    pub(super) fn depth(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        let index = lock(&self.index);
        index.check()?;
        Ok(index
            .mailboxes
            .get(mailbox)
            .map_or(0, |m| m.live.len() as u64))
    }

    pub(super) fn next_seq(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        let index = lock(&self.index);
        index.check()?;
        Ok(index
            .mailboxes
            .get(mailbox)
            .map_or(0, |m| m.last_seq)
            .saturating_add(1))
    }

    /// Where the next batch goes (tests).
    #[cfg(test)]
    pub(super) fn end(&self) -> u64 {
        lock(&self.index).len
    }

    /// What the last compaction wrote, or the live part of the file when opened (tests).
    #[cfg(test)]
    pub(super) fn snapshot_len(&self) -> u64 {
        lock(&self.index).snapshot_len
    }

    /// Remembered acked ids of a mailbox (tests).
    #[cfg(test)]
    pub(super) fn remembered(&self, mailbox: &MailboxId) -> usize {
        lock(&self.index)
            .mailboxes
            .get(mailbox)
            .map_or(0, |m| m.acked.len())
    }
}

/// Lets go of a log file a compaction replaced (already unlinked by the rename), cutting it
/// down gently first (see [`cut_gently`]).
fn release_gently(old: Arc<LogFile>) {
    if let Some(file) = sole_owner(old) {
        let len = file.file.metadata().map_or(0, |m| m.len());
        cut_gently(&file.file, len, 0);
    }
}

/// The replaced log once no fetch that began before the switch reads it any more (`None` if
/// one still does after about a second).
fn sole_owner(old: Arc<LogFile>) -> Option<LogFile> {
    let mut old = old;
    for _ in 0..1000 {
        match Arc::try_unwrap(old) {
            Ok(file) => return Some(file),
            Err(still_shared) => {
                old = still_shared;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    None
}

/// Cuts `file` from `len` down to `to` a slice at a time: freeing a 256 MiB file in one go
/// held the file system's journal long enough to stall the committer's fsyncs by tens of
/// milliseconds. 1 MiB every 8 ms (a 256 MiB file in about 2 s) kept p99 at 3.3-5.3 ms at
/// half the maximum rate where 8 MiB every 2 ms gave 26 ms on the same machine
/// (docs/BENCHMARKS.md).
fn cut_gently(file: &File, len: u64, to: u64) {
    const SLICE: u64 = 1024 * 1024;
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(8);
    let mut len = len;
    while len > to.saturating_add(SLICE) {
        len -= SLICE;
        if file.set_len(len).is_err() {
            return;
        }
        std::thread::sleep(PAUSE);
    }
    if len > to {
        let _ = file.set_len(to);
    }
}

/// Reads and opens the entry of one unacked message, checking it is the one the index says.
fn read_message(
    keys: &DataKeyRing,
    file: &LogFile,
    mailbox: &MailboxId,
    at: Live,
) -> Result<StoredMessage, StoreError> {
    let mut sealed = vec![0u8; at.sealed_len as usize];
    file.file
        .read_exact_at(&mut sealed, at.offset + 4)
        .map_err(|e| StoreError::Backend(format!("cannot read the mailbox log: {e}")))?;
    let plain = keys.open(
        Table::MailboxFile,
        &entry_slot(file.generation, at.offset),
        &sealed,
    )?;
    match decode_entry(&plain)? {
        Entry::Append {
            mailbox: m,
            seq,
            message_id,
            record,
        } if &m == mailbox && seq == at.seq => Ok(StoredMessage {
            seq,
            message_id,
            record,
        }),
        _ => Err(StoreError::Corrupt(format!(
            "mailbox log: the entry of {mailbox} seq {} holds something else",
            at.seq
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_work_runs_in_the_idle_class_and_the_caller_keeps_its_own() {
        use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};
        let policy = || thread_priority::unix::thread_schedule_policy().expect("own policy");
        let caller = policy();
        let (inside, thread) =
            in_background(|| Ok((policy(), std::thread::current().id()))).expect("background work");
        assert_eq!(
            inside,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
            "the work ran as {inside:?}"
        );
        assert_ne!(
            thread,
            std::thread::current().id(),
            "the work ran on the caller's thread"
        );
        assert_eq!(policy(), caller, "the caller's class changed");
    }

    /// Many acks past a small window: every remembered id answers with its seq, every
    /// forgotten one as unknown, and the table of ids holds few forgotten ones.
    #[test]
    fn forgotten_ids_stay_forgotten_and_the_table_of_ids_stays_small() {
        let window = 100u64;
        let mut m = Mailbox::default();
        let id = |seq: u64| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&seq.to_be_bytes());
            id
        };
        let mut largest_table = 0;
        let live = |seq: u64, message_id: MessageId| Live {
            seq,
            message_id,
            offset: 0,
            sealed_len: 0,
        };
        for seq in 1..=5000u64 {
            m.append(live(seq, id(seq)));
            if seq % 32 == 0 {
                m.ack(seq - 3, window, |_| {});
                largest_table = largest_table.max(m.ids.len());
            }
        }
        // Acked up to 4989: 4890..=4989 acked and remembered, 4990..=5000 unacked.
        assert_eq!(m.acked.len() as u64, window);
        for seq in 1..=5000u64 {
            let expected = (seq >= 4890).then_some(seq);
            assert_eq!(m.remembered_seq(&id(seq)), expected, "id of seq {seq}");
        }
        let remembered = (window + 32) as usize;
        assert!(
            largest_table <= remembered + remembered / 4 + PURGE_SLACK + 32,
            "the table grew to {largest_table} ids"
        );
        // An id sent again after it was forgotten is remembered under its new seq.
        m.append(live(5001, id(7)));
        assert_eq!(m.remembered_seq(&id(7)), Some(5001));
        // With nothing left to remember, nothing is.
        m.ack(5001, 0, |_| {});
        assert_eq!(m.remembered_seq(&id(7)), None);
        assert_eq!(m.remembered_seq(&id(5000)), None);
        assert!(m.ids.len() <= PURGE_SLACK, "{} ids kept", m.ids.len());
    }

    #[test]
    fn background_work_hands_back_its_error() {
        let result: Result<(), _> =
            in_background(|| Err(StoreError::Backend("the disk is full".into())));
        assert!(matches!(result, Err(StoreError::Backend(m)) if m == "the disk is full"));
    }
}
