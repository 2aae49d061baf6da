//! Data-at-rest sealing: the `data.key` key ring and the sealed record format.
//!
//! Every value a store backend writes is a sealed record (XChaCha20-Poly1305, fresh random
//! 192-bit nonce, key id in the header) whose associated data names the table and the row key
//! it was written for, so a record copied into another row or table fails to open. The record
//! format:
//!
//! ```text
//! record = version u8 (= 2) || key id u32 BE || nonce [24] || ciphertext || tag [16]
//! aad    = "chatapp/store/v1" || version || key id u32 BE
//!          || table name len u8 || table name || slot
//! slot   = the row key, each part in order: strings as u32 BE length + UTF-8 bytes,
//!          integers as fixed-width BE, byte arrays as their bytes
//! ```
//!
//! Version 1 records (ChaCha20-Poly1305, nonce [12], written before version 2) still open;
//! nothing new is sealed as version 1. Why the change: a random 96-bit nonce under one key is
//! safe for about 2^32 records (the chance of a repeat is then 2^-33 and grows with the square
//! of the count), and a busy server seals a record per message and per ack: at the 170 000
//! messages a second of docs/BENCHMARKS.md that budget is spent in some 7 hours, while the
//! data key changes only when an operator rotates it. A 192-bit random nonce (XChaCha20) keeps
//! the chance negligible for any number of records a key will ever seal. The version byte is
//! part of the associated data, so a record cannot be made to open as the other version.
//!
//! `data.key` (written by `chatctl keys init`, extended by `chatctl keys rotate data`):
//! first line `chatapp data-at-rest keys v1`, then one line `<id u32> <base64 32-byte key>`
//! per key; the last line is the active key that new records are sealed with. Older keys stay
//! in the file so records sealed under them stay readable. Key bytes are zeroized on drop and
//! never appear in `Debug` output.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, AeadInPlace, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, XChaCha20Poly1305, XNonce};
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, OsRng, RngCore, SeedableRng};
use zeroize::Zeroizing;

use super::StoreError;

/// First line of a `data.key` file.
pub const DATA_KEY_FILE_HEADER: &str = "chatapp data-at-rest keys v1";

/// Version byte of the records sealed now (XChaCha20-Poly1305), see the module doc.
pub const RECORD_VERSION: u8 = 2;
/// Version byte of the records sealed before version 2 (ChaCha20-Poly1305): read only.
const RECORD_VERSION_1: u8 = 1;

const AAD_CONTEXT: &[u8] = b"chatapp/store/v1";
const HEADER_LEN: usize = 1 + 4;
/// XChaCha20-Poly1305's nonce (version 2).
const NONCE_LEN: usize = 24;
/// ChaCha20-Poly1305's nonce (version 1).
const NONCE_LEN_V1: usize = 12;
const TAG_LEN: usize = 16;

/// What sealing adds to a plaintext now: header, nonce and tag (a record sealed now is this
/// much longer than its plaintext).
pub const MIN_RECORD_LEN: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// A random nonce for one record, from a ChaCha20 generator of the calling thread seeded once
/// from the operating system. A nonce must never repeat under its key and need not be secret;
/// 192 random bits from a cryptographic generator give that, as `OsRng` did, without its
/// `getrandom` system call per record (2.5% of a loaded server's CPU, docs/BENCHMARKS.md,
/// issue #8). Random rather than derived from the row: a torn batch is rewritten at the same
/// offset with other contents, and a derived nonce would then repeat.
fn fresh_nonce() -> [u8; NONCE_LEN] {
    thread_local! {
        static NONCES: std::cell::RefCell<ChaCha20Rng> = std::cell::RefCell::new({
            let mut seed = Zeroizing::new([0u8; 32]);
            OsRng.fill_bytes(seed.as_mut());
            ChaCha20Rng::from_seed(*seed)
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    NONCES.with(|rng| rng.borrow_mut().fill_bytes(&mut nonce));
    nonce
}

/// The logical tables a store keeps. Their names are part of every record's associated data,
/// so they are the same in every backend and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// username -> account record.
    Accounts,
    /// (username, device id, prekey id) -> one-time prekey.
    Prekeys,
    /// leaf index -> directory log leaf.
    Leaves,
    /// name -> singleton values such as the latest signed tree head.
    Meta,
    /// (username, device id, seq) -> message id || envelope.
    MailboxMessages,
    /// (username, device id) -> mailbox counters.
    MailboxState,
    /// (username, device id, message id) -> seq, for duplicate detection.
    MailboxIds,
    /// (username, device id, seq) -> message id of an acked message still remembered.
    MailboxAcked,
    /// (username, device id) -> the whole one-time prekey pool of a device (NATS store: one
    /// compare-and-swap per hand-out).
    PrekeyPools,
    /// (username, device id, entry) -> one entry of a mailbox log (NATS store: a message with
    /// the mailbox counters after it, or an ack marker).
    MailboxLog,
    /// (log generation, byte offset) -> one entry of the embedded store's mailbox log file (a
    /// message, an ack, or a mailbox's counters and remembered ids after a compaction).
    MailboxFile,
}

impl Table {
    /// The table's name as it appears in associated data (and in redb).
    pub const fn name(self) -> &'static str {
        match self {
            Table::Accounts => "accounts",
            Table::Prekeys => "prekeys",
            Table::Leaves => "leaves",
            Table::Meta => "meta",
            Table::MailboxMessages => "mailbox_messages",
            Table::MailboxState => "mailbox_state",
            Table::MailboxIds => "mailbox_ids",
            Table::MailboxAcked => "mailbox_acked",
            Table::PrekeyPools => "prekey_pools",
            Table::MailboxLog => "mailbox_log",
            Table::MailboxFile => "mailbox_file",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The row key a record is bound to, encoded without ambiguity (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot(Vec<u8>);

impl Slot {
    pub fn new() -> Self {
        Slot(Vec::with_capacity(48))
    }

    /// Appends a string part (length-prefixed).
    pub fn str(mut self, part: &str) -> Self {
        // Parts are row keys; a row key over 4 GiB cannot be stored, so saturating is safe.
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(part.as_bytes());
        self
    }

    pub fn u32(mut self, part: u32) -> Self {
        self.0.extend_from_slice(&part.to_be_bytes());
        self
    }

    pub fn u64(mut self, part: u64) -> Self {
        self.0.extend_from_slice(&part.to_be_bytes());
        self
    }

    /// Appends a fixed-size byte part (its size is fixed by the table's schema).
    pub fn bytes(mut self, part: &[u8]) -> Self {
        self.0.extend_from_slice(part);
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Why a `data.key` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("not a data key file: the first line must be {DATA_KEY_FILE_HEADER:?}")]
    Header,
    #[error("line {line}: expected `<key id> <base64 32-byte key>`")]
    Syntax { line: usize },
    #[error("line {line}: the key id is not a number from 0 to 4294967295")]
    BadId { line: usize },
    #[error("line {line}: the key is not valid base64")]
    BadBase64 { line: usize },
    #[error("line {line}: a data key must be 32 bytes, this one has {len}")]
    BadLength { line: usize, len: usize },
    #[error("line {line}: key id {id} is listed twice")]
    DuplicateId { line: usize, id: u32 },
    #[error("no data keys listed")]
    Empty,
    #[error("key id {0} is the largest possible; cannot add a key after it")]
    IdsExhausted(u32),
    #[error("cannot read {path}: {source}; run `chatctl keys init` to create it")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

struct DataKey {
    id: u32,
    key: Zeroizing<[u8; 32]>,
}

/// The data-at-rest keys: every key that may have sealed a stored record, and the active one
/// that seals new records. Parse it with [`DataKeyRing::from_file_string`] or
/// [`DataKeyRing::load`].
pub struct DataKeyRing {
    /// In file order; the last one is active. Never empty.
    keys: Vec<DataKey>,
}

impl fmt::Debug for DataKeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKeyRing")
            .field("ids", &self.ids())
            .field("active", &self.active_id())
            .finish_non_exhaustive()
    }
}

impl DataKeyRing {
    /// A ring with one fresh key, id 1.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(key.as_mut());
        DataKeyRing {
            keys: vec![DataKey { id: 1, key }],
        }
    }

    /// Reads and parses a `data.key` file, naming it in the error.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Self::from_file_string(&text)
    }

    /// Parses the text of a `data.key` file (format in the module doc).
    pub fn from_file_string(text: &str) -> Result<Self, KeyFileError> {
        let mut lines = text.lines();
        if lines.next().map(str::trim_end) != Some(DATA_KEY_FILE_HEADER) {
            return Err(KeyFileError::Header);
        }
        let mut keys: Vec<DataKey> = Vec::new();
        for (index, raw) in lines.enumerate() {
            let line = index + 2;
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let (id, key) = raw.split_once(' ').ok_or(KeyFileError::Syntax { line })?;
            let id: u32 = id.parse().map_err(|_| KeyFileError::BadId { line })?;
            let decoded = Zeroizing::new(
                BASE64
                    .decode(key.trim())
                    .map_err(|_| KeyFileError::BadBase64 { line })?,
            );
            let bytes: [u8; 32] =
                decoded
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyFileError::BadLength {
                        line,
                        len: decoded.len(),
                    })?;
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyFileError::DuplicateId { line, id });
            }
            keys.push(DataKey {
                id,
                key: Zeroizing::new(bytes),
            });
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        Ok(DataKeyRing { keys })
    }

    /// The text of the `data.key` file for this ring (secret: write it 0600).
    pub fn to_file_string(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(
            DATA_KEY_FILE_HEADER.len() + 1 + self.keys.len() * 64,
        ));
        out.push_str(DATA_KEY_FILE_HEADER);
        out.push('\n');
        for key in &self.keys {
            let encoded = Zeroizing::new(BASE64.encode(key.key.as_ref()));
            out.push_str(&key.id.to_string());
            out.push(' ');
            out.push_str(&encoded);
            out.push('\n');
        }
        out
    }

    /// Adds a fresh key with id = largest id + 1 and makes it the active one. Returns its id.
    /// Every older key is kept, so records sealed with them stay readable.
    pub fn rotate(&mut self, rng: &mut (impl RngCore + CryptoRng)) -> Result<u32, KeyFileError> {
        let max = self.keys.iter().map(|k| k.id).max().unwrap_or(0);
        let id = max.checked_add(1).ok_or(KeyFileError::IdsExhausted(max))?;
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(key.as_mut());
        self.keys.push(DataKey { id, key });
        Ok(id)
    }

    /// The id new records are sealed with.
    pub fn active_id(&self) -> u32 {
        self.active().id
    }

    /// Every key id, in file order (the last is active).
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    fn active(&self) -> &DataKey {
        // `keys` is never empty: every constructor guarantees at least one key.
        &self.keys[self.keys.len() - 1]
    }

    fn key(&self, id: u32) -> Option<&DataKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Seals `plaintext` for row `slot` of `table` under the active key.
    pub fn seal(&self, table: Table, slot: &Slot, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut record = Vec::with_capacity(MIN_RECORD_LEN + plaintext.len());
        self.seal_written(table, slot, &mut record, plaintext.len(), |out| {
            out.extend_from_slice(plaintext);
            Ok(())
        })?;
        Ok(record)
    }

    /// [`DataKeyRing::seal`] that appends the record to `out` (encrypted in place, no buffer
    /// of its own) and returns its length. The plaintext, about `len_hint` bytes, is what
    /// `write` appends to `out` itself, so it is never copied out of a buffer of its own.
    /// Should `write` fail, `out` is left as it was.
    pub fn seal_written(
        &self,
        table: Table,
        slot: &Slot,
        out: &mut Vec<u8>,
        len_hint: usize,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        let start = out.len();
        let len = write_to_seal(out, len_hint, write)?;
        self.seal_in_place(table, slot, &mut out[start..])
            .inspect_err(|_| out.truncate(start))?;
        Ok(len)
    }

    /// Seals a record laid out by [`write_to_seal`] where it is: fills in the header and a
    /// fresh nonce, encrypts the plaintext and writes the tag after it. `record` is exactly
    /// the record ([`MIN_RECORD_LEN`] longer than its plaintext). Splitting the layout from
    /// the sealing lets a caller place records (their lengths are known) while it holds a
    /// lock, and seal them after (the mailbox log's group committer, docs/BENCHMARKS.md).
    pub fn seal_in_place(
        &self,
        table: Table,
        slot: &Slot,
        record: &mut [u8],
    ) -> Result<(), StoreError> {
        let too_short = || {
            StoreError::Backend(format!(
                "cannot seal a record for table {table}: {} bytes is shorter than its frame",
                record.len()
            ))
        };
        let body_len = record
            .len()
            .checked_sub(MIN_RECORD_LEN)
            .ok_or_else(too_short)?;
        let key = self.active();
        let nonce = fresh_nonce();
        let header = header(key.id);
        let aad = associated_data(&header, table, slot);
        let cipher = XChaCha20Poly1305::new(Key::from_slice(key.key.as_ref()));
        let (head, rest) = record.split_at_mut(HEADER_LEN + NONCE_LEN);
        head[..HEADER_LEN].copy_from_slice(&header);
        head[HEADER_LEN..].copy_from_slice(&nonce);
        let (body, tag_out) = rest.split_at_mut(body_len);
        let tag = cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, body)
            .map_err(|_| {
                StoreError::Backend(format!("cannot seal a record for table {table}: too long"))
            })?;
        tag_out.copy_from_slice(&tag);
        Ok(())
    }

    /// Opens a record read from row `slot` of `table`. Fails with [`StoreError::Unseal`] when
    /// the record is malformed, names a key this ring does not have, or does not authenticate
    /// (wrong key, tampered, or moved from another row or table).
    pub fn open(&self, table: Table, slot: &Slot, record: &[u8]) -> Result<Vec<u8>, StoreError> {
        let unseal = |reason: String| StoreError::Unseal { table, reason };
        let Some(&version) = record.first() else {
            return Err(unseal("record is empty".into()));
        };
        let nonce_len = match version {
            RECORD_VERSION => NONCE_LEN,
            RECORD_VERSION_1 => NONCE_LEN_V1,
            other => return Err(unseal(format!("unknown record version {other}"))),
        };
        let min = HEADER_LEN + nonce_len + TAG_LEN;
        if record.len() < min {
            return Err(unseal(format!(
                "record is {} bytes, shorter than the {min}-byte minimum of version {version}",
                record.len()
            )));
        }
        let (header_bytes, rest) = record.split_at(HEADER_LEN);
        let (nonce, ciphertext) = rest.split_at(nonce_len);
        let id = u32::from_be_bytes([
            header_bytes[1],
            header_bytes[2],
            header_bytes[3],
            header_bytes[4],
        ]);
        let key = self.key(id).ok_or_else(|| {
            unseal(format!(
                "sealed with data key id {id}, which data.key does not list (it has {:?})",
                self.ids()
            ))
        })?;
        let aad = associated_data(&header_of(version, id), table, slot);
        let payload = Payload {
            msg: ciphertext,
            aad: &aad,
        };
        let key = Key::from_slice(key.key.as_ref());
        let opened = if version == RECORD_VERSION {
            XChaCha20Poly1305::new(key).decrypt(XNonce::from_slice(nonce), payload)
        } else {
            ChaCha20Poly1305::new(key).decrypt(Nonce::from_slice(nonce), payload)
        };
        opened.map_err(|_| {
            unseal(format!(
                "authentication failed under data key id {id}: wrong key, tampered record, \
                     or a record moved from another row"
            ))
        })
    }
}

/// The header of a record sealed now.
fn header(key_id: u32) -> [u8; HEADER_LEN] {
    header_of(RECORD_VERSION, key_id)
}

fn header_of(version: u8, key_id: u32) -> [u8; HEADER_LEN] {
    let id = key_id.to_be_bytes();
    [version, id[0], id[1], id[2], id[3]]
}

/// Appends to `out` the frame of a record to be sealed by [`DataKeyRing::seal_in_place`]:
/// room for the header and nonce, the plaintext that `write` appends (about `len_hint`
/// bytes), room for the tag. Returns the record's length. Should `write` fail, `out` is left
/// as it was.
pub fn write_to_seal(
    out: &mut Vec<u8>,
    len_hint: usize,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
) -> Result<usize, StoreError> {
    let start = out.len();
    out.reserve(MIN_RECORD_LEN + len_hint);
    out.resize(start + HEADER_LEN + NONCE_LEN, 0);
    if let Err(e) = write(out) {
        out.truncate(start);
        return Err(e);
    }
    out.resize(out.len() + TAG_LEN, 0);
    Ok(out.len() - start)
}

fn associated_data(header: &[u8; HEADER_LEN], table: Table, slot: &Slot) -> Vec<u8> {
    let name = table.name().as_bytes();
    let mut aad =
        Vec::with_capacity(AAD_CONTEXT.len() + HEADER_LEN + 1 + name.len() + slot.0.len());
    aad.extend_from_slice(AAD_CONTEXT);
    aad.extend_from_slice(header);
    // Table names are short constants; the cast cannot truncate.
    aad.push(name.len() as u8);
    aad.extend_from_slice(name);
    aad.extend_from_slice(&slot.0);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> DataKeyRing {
        DataKeyRing::generate(&mut OsRng)
    }

    fn alice() -> Slot {
        Slot::new().str("alice")
    }

    #[test]
    fn sealed_record_opens_to_the_plaintext_and_has_the_documented_layout() {
        let keys = ring();
        let record = keys
            .seal(Table::Accounts, &alice(), b"hello")
            .expect("seal");
        assert_eq!(record.len(), MIN_RECORD_LEN + 5);
        assert_eq!(record[0], RECORD_VERSION);
        assert_eq!(&record[1..5], &1u32.to_be_bytes());
        assert_eq!(
            keys.open(Table::Accounts, &alice(), &record).expect("open"),
            b"hello"
        );
    }

    #[test]
    fn records_are_sealed_as_version_2_with_a_192_bit_nonce() {
        let record = ring().seal(Table::Meta, &alice(), b"").expect("seal");
        assert_eq!(record[0], 2);
        // version, key id, 24-byte nonce, 16-byte tag around the empty plaintext.
        assert_eq!(record.len(), 1 + 4 + 24 + 16);
    }

    /// A record in the version 1 layout (ChaCha20-Poly1305, 12-byte nonce), built here from the
    /// module doc's layout byte by byte rather than with this module's helpers.
    fn version_1_record(keys: &DataKeyRing, plaintext: &[u8]) -> Vec<u8> {
        let key = keys.active();
        let header = [1, 0, 0, 0, 1];
        let nonce = [7u8; 12];
        let mut aad = b"chatapp/store/v1".to_vec();
        aad.extend_from_slice(&header);
        aad.push(8);
        aad.extend_from_slice(b"accounts");
        aad.extend_from_slice(&5u32.to_be_bytes());
        aad.extend_from_slice(b"alice");
        let sealed = ChaCha20Poly1305::new(Key::from_slice(key.key.as_ref()))
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("encrypt");
        [&header[..], &nonce, &sealed].concat()
    }

    #[test]
    fn version_1_records_written_before_still_open() {
        let keys = ring();
        let old = version_1_record(&keys, b"from before");
        assert_eq!(
            keys.open(Table::Accounts, &alice(), &old)
                .expect("v1 opens"),
            b"from before"
        );
        // Still bound to its row, and not to be passed off as the other version.
        assert!(
            keys.open(Table::Accounts, &Slot::new().str("bob"), &old)
                .is_err()
        );
        let mut relabelled = old.clone();
        relabelled[0] = RECORD_VERSION;
        assert!(keys.open(Table::Accounts, &alice(), &relabelled).is_err());
        let mut new = keys.seal(Table::Accounts, &alice(), b"now").expect("seal");
        new[0] = 1;
        assert!(keys.open(Table::Accounts, &alice(), &new).is_err());
    }

    #[test]
    fn short_empty_and_unknown_version_records_are_refused_with_a_reason() {
        let keys = ring();
        for (record, says) in [
            (Vec::new(), "empty"),
            (vec![3; 60], "unknown record version 3"),
            (vec![2; 44], "45-byte minimum of version 2"),
            (vec![1; 32], "33-byte minimum of version 1"),
        ] {
            let err = keys
                .open(Table::Accounts, &alice(), &record)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn sealing_twice_uses_fresh_nonces() {
        let keys = ring();
        let a = keys.seal(Table::Accounts, &alice(), b"same").expect("seal");
        let b = keys.seal(Table::Accounts, &alice(), b"same").expect("seal");
        assert_ne!(a, b);
    }

    #[test]
    fn a_plaintext_written_in_place_opens_and_a_failed_write_leaves_the_buffer_as_it_was() {
        let keys = ring();
        let mut out = b"before".to_vec();
        let len = keys
            .seal_written(Table::Accounts, &alice(), &mut out, 5, |out| {
                out.extend_from_slice(b"hello");
                Ok(())
            })
            .expect("seal");
        assert_eq!(out.len(), 6 + len);
        let opened = keys
            .open(Table::Accounts, &alice(), &out[6..])
            .expect("open");
        assert_eq!(opened.as_slice(), b"hello");

        let refused = keys.seal_written(Table::Accounts, &alice(), &mut out, 5, |out| {
            out.extend_from_slice(b"half");
            Err(StoreError::Backend("no".into()))
        });
        assert!(refused.is_err());
        assert_eq!(
            out.len(),
            6 + len,
            "a failed write must leave nothing behind"
        );
    }

    #[test]
    fn a_record_laid_out_first_and_sealed_later_opens_only_in_its_own_row() {
        let keys = ring();
        let mut out = b"before".to_vec();
        let len = write_to_seal(&mut out, 5, |out| {
            out.extend_from_slice(b"hello");
            Ok(())
        })
        .expect("layout");
        assert_eq!(len, MIN_RECORD_LEN + 5);
        assert_eq!(out.len(), 6 + len);
        // Laid out but not sealed: the plaintext is there, and it does not open.
        assert!(keys.open(Table::Accounts, &alice(), &out[6..]).is_err());
        keys.seal_in_place(Table::Accounts, &alice(), &mut out[6..])
            .expect("seal");
        assert_eq!(&out[..6], b"before", "sealing stays inside its record");
        assert!(
            !out[6..].windows(5).any(|w| w == b"hello"),
            "the plaintext is encrypted in place"
        );
        let opened = keys
            .open(Table::Accounts, &alice(), &out[6..])
            .expect("open");
        assert_eq!(opened.as_slice(), b"hello");
        assert!(
            keys.open(Table::Accounts, &Slot::new().str("bob"), &out[6..])
                .is_err(),
            "bound to its row"
        );

        // A slice too short to hold a record is refused, not sealed past its end.
        let mut short = [0u8; MIN_RECORD_LEN - 1];
        assert!(
            keys.seal_in_place(Table::Accounts, &alice(), &mut short)
                .is_err()
        );
        assert_eq!(short, [0u8; MIN_RECORD_LEN - 1]);
    }

    #[test]
    fn threads_draw_different_nonces() {
        // Each thread seeds its own generator: a fixed or shared seed would repeat nonces
        // across the blocking pool's threads.
        let nonce_of = |record: &[u8]| record[HEADER_LEN..HEADER_LEN + NONCE_LEN].to_vec();
        let keys = std::sync::Arc::new(ring());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let keys = keys.clone();
            let record = std::thread::spawn(move || keys.seal(Table::Accounts, &alice(), b"x"))
                .join()
                .expect("thread")
                .expect("seal");
            assert!(seen.insert(nonce_of(&record)), "a thread repeated a nonce");
        }
    }

    #[test]
    fn record_moved_to_another_row_does_not_open() {
        let keys = ring();
        let record = keys.seal(Table::Accounts, &alice(), b"x").expect("seal");
        let err = keys
            .open(Table::Accounts, &Slot::new().str("bob"), &record)
            .expect_err("moved record must not open");
        assert!(matches!(err, StoreError::Unseal { .. }), "{err}");
    }

    #[test]
    fn record_moved_to_another_table_does_not_open() {
        let keys = ring();
        let record = keys.seal(Table::Accounts, &alice(), b"x").expect("seal");
        assert!(matches!(
            keys.open(Table::Meta, &alice(), &record),
            Err(StoreError::Unseal { .. })
        ));
    }

    #[test]
    fn slot_parts_are_unambiguous() {
        assert_ne!(
            Slot::new().str("ab").str("c"),
            Slot::new().str("a").str("bc")
        );
    }

    #[test]
    fn tampered_byte_anywhere_makes_the_record_unreadable() {
        let keys = ring();
        let record = keys
            .seal(Table::Leaves, &Slot::new().u64(0), b"leaf")
            .expect("seal");
        for i in 0..record.len() {
            let mut bad = record.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(
                    keys.open(Table::Leaves, &Slot::new().u64(0), &bad),
                    Err(StoreError::Unseal { .. })
                ),
                "flipping byte {i} was not detected"
            );
        }
    }

    #[test]
    fn truncated_and_empty_records_are_unseal_errors() {
        let keys = ring();
        let record = keys.seal(Table::Meta, &alice(), b"").expect("seal");
        for len in 0..record.len() {
            assert!(matches!(
                keys.open(Table::Meta, &alice(), &record[..len]),
                Err(StoreError::Unseal { .. })
            ));
        }
    }

    #[test]
    fn record_under_an_unknown_key_id_names_the_id() {
        let mut writer = ring();
        writer.rotate(&mut OsRng).expect("rotate");
        let record = writer.seal(Table::Accounts, &alice(), b"x").expect("seal");
        let err = ring()
            .open(Table::Accounts, &alice(), &record)
            .expect_err("unknown id");
        assert!(err.to_string().contains("key id 2"), "{err}");
    }

    #[test]
    fn rotation_adds_max_plus_one_and_old_records_stay_readable() {
        let mut keys = ring();
        let old = keys.seal(Table::Accounts, &alice(), b"old").expect("seal");
        assert_eq!(keys.rotate(&mut OsRng).expect("rotate"), 2);
        assert_eq!(keys.active_id(), 2);
        let new = keys.seal(Table::Accounts, &alice(), b"new").expect("seal");
        assert_eq!(&new[1..5], &2u32.to_be_bytes());
        assert_eq!(
            keys.open(Table::Accounts, &alice(), &old).expect("old"),
            b"old"
        );
        assert_eq!(
            keys.open(Table::Accounts, &alice(), &new).expect("new"),
            b"new"
        );
    }

    #[test]
    fn key_file_round_trips_and_last_line_is_active() {
        let mut keys = ring();
        keys.rotate(&mut OsRng).expect("rotate");
        let text = keys.to_file_string();
        assert!(text.starts_with("chatapp data-at-rest keys v1\n1 "));
        let parsed = DataKeyRing::from_file_string(&text).expect("parse");
        assert_eq!(parsed.ids(), vec![1, 2]);
        assert_eq!(parsed.active_id(), 2);
        let record = keys.seal(Table::Accounts, &alice(), b"x").expect("seal");
        assert_eq!(
            parsed
                .open(Table::Accounts, &alice(), &record)
                .expect("open"),
            b"x"
        );
    }

    #[test]
    fn key_file_written_by_chatctl_init_parses() {
        let text = format!("{DATA_KEY_FILE_HEADER}\n1 {}\n", BASE64.encode([7u8; 32]));
        let keys = DataKeyRing::from_file_string(&text).expect("parse");
        assert_eq!(keys.ids(), vec![1]);
    }

    #[test]
    fn active_key_is_the_last_line_even_when_its_id_is_smaller() {
        let text = format!(
            "{DATA_KEY_FILE_HEADER}\n5 {}\n3 {}\n",
            BASE64.encode([1u8; 32]),
            BASE64.encode([2u8; 32])
        );
        let mut keys = DataKeyRing::from_file_string(&text).expect("parse");
        assert_eq!(keys.active_id(), 3);
        assert_eq!(keys.rotate(&mut OsRng).expect("rotate"), 6);
    }

    #[test]
    fn malformed_key_files_are_refused_with_the_line() {
        let good = BASE64.encode([1u8; 32]);
        let cases = [
            (String::new(), "first line"),
            ("wrong header\n1 x\n".to_owned(), "first line"),
            (format!("{DATA_KEY_FILE_HEADER}\n"), "no data keys"),
            (format!("{DATA_KEY_FILE_HEADER}\n1\n"), "line 2"),
            (format!("{DATA_KEY_FILE_HEADER}\nx {good}\n"), "line 2"),
            (format!("{DATA_KEY_FILE_HEADER}\n1 !!!\n"), "line 2"),
            (
                format!("{DATA_KEY_FILE_HEADER}\n1 {}\n", BASE64.encode([1u8; 16])),
                "32 bytes",
            ),
            (
                format!("{DATA_KEY_FILE_HEADER}\n1 {good}\n1 {good}\n"),
                "listed twice",
            ),
        ];
        for (text, expected) in cases {
            let err = DataKeyRing::from_file_string(&text).expect_err(&text);
            assert!(err.to_string().contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn rotation_refuses_when_ids_are_exhausted() {
        let text = format!(
            "{DATA_KEY_FILE_HEADER}\n4294967295 {}\n",
            BASE64.encode([1u8; 32])
        );
        let mut keys = DataKeyRing::from_file_string(&text).expect("parse");
        assert!(matches!(
            keys.rotate(&mut OsRng),
            Err(KeyFileError::IdsExhausted(u32::MAX))
        ));
    }

    #[test]
    fn debug_output_shows_ids_but_never_key_bytes() {
        let text = format!("{DATA_KEY_FILE_HEADER}\n1 {}\n", BASE64.encode([0xAB; 32]));
        let keys = DataKeyRing::from_file_string(&text).expect("parse");
        let debug = format!("{keys:?}");
        assert!(debug.contains("ids: [1]"), "{debug}");
        assert!(!debug.contains("171") && !debug.to_lowercase().contains("ab, "));
        assert!(!debug.contains(&BASE64.encode([0xAB; 32])));
    }
}
