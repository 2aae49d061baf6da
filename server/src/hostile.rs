//! Test-only hostile behaviours (cargo feature `hostile`, binary `chat-server-hostile`): the
//! attacks of `docs/THREAT_MODEL.md` that a malicious server can try, so tests can show that
//! clients catch each one. Never compiled into release builds.
//!
//! The hooks are called from `node.rs`: [`intercept`] sees every frame before the honest
//! handling (split views, key replacement, snooping), [`intercept_send`] every envelope before it
//! is stored (drop, reorder, replay, duplicate, tamper), and [`Hostile::bundle`],
//! [`Hostile::leaf`] and [`Hostile::head`] rewrite answers.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use chat_core::identity::DeviceKeys;
use chat_core::wire::{
    ClientFrame, DeviceBundle, DirectoryLeaf, ErrorCode, ErrorScope, MAX_LEAVES_PER_FRAME,
    MessageId, OneTimePrekey, ServerFrame, SignedPrekey,
};
use chat_signing::merkle::MerkleLog;
use chat_signing::tree_head::{DirectorySigningKey, SignedTreeHead};
use rand_core::{OsRng, RngCore};

use crate::config::ServerConfig;
use crate::directory::unix_now;
use crate::node::{MailboxRecord, Node, Session};
use crate::store::MailboxId;

/// How far back [`HostileMode::StaleHead`] dates its heads: beyond the clients' 24 h limit.
pub const BACKDATE_SECS: u64 = 25 * 3600;

/// A low-order X25519 point (order 8): any DH with it is not contributory.
pub const LOW_ORDER_POINT: [u8; 32] = [
    0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a,
    0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
];

/// Which attack the server mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostileMode {
    /// Hand out attacker keys in bundles; the directory still holds the real ones.
    SubstituteBundle,
    /// Hand out attacker keys and claim they are the directory leaf, with the real proof.
    BadInclusion,
    /// Sign tree heads with a key that is not the directory key.
    ForeignHead,
    /// Present a forked history: heads over a log whose first leaf was rewritten.
    Fork,
    /// Sign every head with the real key but a timestamp 25 h in the past (a frozen directory).
    StaleHead,
    /// Show two views of the log: the first registered user sees the honest log, every other
    /// logged-in user a log with a ghost leaf in front (signed with the real key).
    SplitView,
    /// At a user's second login, append a leaf with attacker keys for that device.
    ReplaceKeys,
    /// At a user's second login, append an invalid leaf for that device (signed into the log
    /// with the real key): attacker keys with a broken identity signature, dated 1970.
    InvalidLeaf,
    /// Record every relayed envelope in `DATA/snooped` and in the log (a curious server).
    Snoop,
    /// Replace the (unsigned) one-time prekey of every bundle with a low-order point.
    LowOrderPrekey,
    /// Acknowledge the second envelope sent to each mailbox, but never store it.
    DropEnvelope,
    /// Hold the second envelope sent to each mailbox back and store it after the third.
    ReorderEnvelopes,
    /// Store the second envelope to each mailbox again, under a new id, after the third.
    ReplayEnvelope,
    /// Store the second envelope to each mailbox twice in a row, under two ids.
    DuplicateEnvelope,
    /// Flip the last byte (in the AEAD tag) of the second envelope sent to each mailbox.
    TamperCiphertext,
}

/// Attacker state: the substituted device keys, a foreign signing key, the real directory key
/// (a compromised server holds it), and per-mailbox bookkeeping of the envelope attacks.
pub struct Hostile {
    pub mode: HostileMode,
    substitutes: Mutex<HashMap<(String, u32), DeviceKeys>>,
    foreign_key: DirectorySigningKey,
    directory_key: Option<DirectorySigningKey>,
    /// Envelopes sent per mailbox, and the ones held back or kept for a replay.
    sends: Mutex<HashMap<String, (u64, Vec<MailboxRecord>)>>,
    logins: Mutex<HashMap<String, u32>>,
    snoop_file: PathBuf,
}

impl std::fmt::Debug for Hostile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hostile")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hostile {
    pub fn new(mode: HostileMode, config: &ServerConfig) -> Self {
        tracing::warn!(
            ?mode,
            "HOSTILE SERVER MODE: this server attacks its clients (tests only)"
        );
        let key_path = config.keys_dir.join(crate::server::DIRECTORY_KEY_FILE);
        let directory_key = std::fs::read_to_string(&key_path)
            .ok()
            .and_then(|text| DirectorySigningKey::from_file_string(&text).ok());
        Self {
            mode,
            substitutes: Mutex::new(HashMap::new()),
            foreign_key: DirectorySigningKey::generate(&mut OsRng),
            directory_key,
            sends: Mutex::new(HashMap::new()),
            logins: Mutex::new(HashMap::new()),
            snoop_file: config.data_dir.join("snooped"),
        }
    }

    fn substitute(
        &self,
        user: &str,
        device: u32,
    ) -> (
        chat_core::identity::IdentityPublic,
        chat_core::identity::SignedPreKey,
    ) {
        let mut map = lock(&self.substitutes);
        let keys = map
            .entry((user.to_owned(), device))
            .or_insert_with(|| DeviceKeys::generate(&mut OsRng));
        (*keys.identity().public(), *keys.signed_prekey())
    }

    /// `leaf` with its keys replaced by the attacker's keys for that device.
    fn substituted_leaf(&self, mut leaf: DirectoryLeaf) -> DirectoryLeaf {
        let (identity, spk) = self.substitute(&leaf.username, leaf.device_id);
        leaf.identity_ed25519 = *identity.signing_key().as_bytes();
        leaf.identity_x25519 = *identity.dh_key().as_bytes();
        leaf.identity_signature = identity.dh_signature().to_bytes();
        leaf.signed_prekey_id = spk.id;
        leaf.signed_prekey_public = *spk.key.as_bytes();
        leaf.signed_prekey_signature = spk.signature.to_bytes();
        leaf
    }

    /// Rewrites a bundle (modes that substitute keys or prekeys).
    pub fn bundle(&self, user: &str, mut device: DeviceBundle) -> DeviceBundle {
        if self.mode == HostileMode::LowOrderPrekey {
            let id = device.one_time_prekey.as_ref().map_or(1, |k| k.id);
            device.one_time_prekey = Some(OneTimePrekey {
                id,
                public: LOW_ORDER_POINT,
            });
            return device;
        }
        if !matches!(
            self.mode,
            HostileMode::SubstituteBundle | HostileMode::BadInclusion
        ) {
            return device;
        }
        let (identity, spk) = self.substitute(user, device.device_id);
        device.identity_ed25519 = *identity.signing_key().as_bytes();
        device.identity_x25519 = *identity.dh_key().as_bytes();
        device.identity_signature = identity.dh_signature().to_bytes();
        device.signed_prekey = SignedPrekey {
            id: spk.id,
            public: *spk.key.as_bytes(),
            signature: spk.signature.to_bytes(),
        };
        device.one_time_prekey = None;
        device
    }

    /// Rewrites an inclusion answer's leaf to the attacker keys (mode `BadInclusion`).
    pub fn leaf(&self, leaf_bytes: Vec<u8>) -> Vec<u8> {
        if self.mode != HostileMode::BadInclusion {
            return leaf_bytes;
        }
        match DirectoryLeaf::decode(&leaf_bytes) {
            Ok(leaf) => self.substituted_leaf(leaf).encode(),
            Err(_) => leaf_bytes,
        }
    }

    /// What to answer instead of the honest head, in the head-forging modes.
    pub fn head(
        &self,
        honest: &SignedTreeHead,
        leaves: &[Vec<u8>],
        known_size: Option<u64>,
    ) -> ForgedHead {
        match self.mode {
            HostileMode::ForeignHead => ForgedHead::Signed(self.foreign_key.sign_tree_head(
                honest.tree_size,
                &honest.root,
                honest.timestamp,
            )),
            HostileMode::StaleHead => {
                let key = self.directory_key.as_ref().unwrap_or(&self.foreign_key);
                ForgedHead::Signed(key.sign_tree_head(
                    honest.tree_size,
                    &honest.root,
                    honest.timestamp.saturating_sub(BACKDATE_SECS),
                ))
            }
            HostileMode::Fork => {
                // Same size, but leaf 0 rewritten: a history the client never saw, signed with
                // the real directory key (a compromised server holds it).
                let mut forked = MerkleLog::new();
                for (i, leaf) in leaves.iter().enumerate() {
                    forked.push(if i == 0 {
                        b"forged first leaf".as_slice()
                    } else {
                        leaf
                    });
                }
                let size = forked.len();
                let proof = match known_size {
                    Some(k) if k > 0 && k < size => {
                        forked.consistency_proof(k, size).unwrap_or_default()
                    }
                    _ => Vec::new(),
                };
                ForgedHead::Unsigned {
                    size,
                    root: forked.root(),
                    proof,
                }
            }
            _ => ForgedHead::Honest,
        }
    }

    /// The ghost leaf the split view puts in front of the log.
    fn ghost_leaf(&self, timestamp: u64) -> Vec<u8> {
        let (identity, spk) = self.substitute("ghost", 1);
        DirectoryLeaf {
            username: "ghost".into(),
            device_id: 1,
            identity_ed25519: *identity.signing_key().as_bytes(),
            identity_x25519: *identity.dh_key().as_bytes(),
            identity_signature: identity.dh_signature().to_bytes(),
            signed_prekey_id: spk.id,
            signed_prekey_public: *spk.key.as_bytes(),
            signed_prekey_signature: spk.signature.to_bytes(),
            version: 1,
            timestamp,
        }
        .encode()
    }
}

/// The head a hostile server answers with.
#[derive(Debug)]
pub enum ForgedHead {
    Honest,
    /// A complete forged head (signed by a foreign key, or backdated).
    Signed(SignedTreeHead),
    /// A forged tree to be signed with the real directory key.
    Unsigned {
        size: u64,
        root: [u8; 32],
        proof: Vec<[u8; 32]>,
    },
}

fn request_error(request_id: u32, code: ErrorCode, message: &str) -> Vec<ServerFrame> {
    vec![ServerFrame::error(
        ErrorScope::Request(request_id),
        code,
        message,
    )]
}

/// Sees every frame before the honest handling; `Some` replaces the honest answer.
pub async fn intercept(
    node: &Node,
    session: &Session,
    frame: &ClientFrame,
) -> Option<Vec<ServerFrame>> {
    let hostile = node.hostile.as_ref()?;
    match (hostile.mode, frame) {
        (
            HostileMode::ReplaceKeys | HostileMode::InvalidLeaf,
            ClientFrame::Login {
                username,
                device_id,
            },
        ) => {
            let count = {
                let mut logins = lock(&hostile.logins);
                let n = logins.entry(format!("{username}/{device_id}")).or_default();
                *n += 1;
                *n
            };
            if count == 2 {
                replace_keys(node, hostile, username, *device_id).await;
            }
            None
        }
        (
            HostileMode::Snoop,
            ClientFrame::Send {
                to_user,
                to_device,
                envelope,
                ..
            },
        ) => {
            tracing::info!(to = %to_user, device = to_device, envelope = %hex::encode(envelope), "snooped an envelope");
            let line = format!("{to_user} {to_device} {}\n", hex::encode(envelope));
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&hostile.snoop_file)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                tracing::error!(error = %e, "cannot record a snooped envelope");
            }
            None
        }
        (HostileMode::SplitView, _) => split_view(node, hostile, session, frame).await,
        _ => None,
    }
}

/// Appends a leaf with attacker keys for the device: a real, provable log entry.
async fn replace_keys(node: &Node, hostile: &Hostile, username: &str, device_id: u32) {
    let Some(current) = node.directory.device(username, device_id).await else {
        return;
    };
    let leaf = match node.directory.leaves(current.leaf_index, 1).await {
        Ok(mut leaves) if leaves.len() == 1 => leaves.remove(0),
        _ => return,
    };
    let Ok(leaf) = DirectoryLeaf::decode(&leaf) else {
        return;
    };
    let mut forged = hostile.substituted_leaf(leaf);
    forged.timestamp = unix_now();
    if hostile.mode == HostileMode::InvalidLeaf {
        forged.identity_signature = [0u8; 64];
        forged.timestamp = 1;
    }
    match node.directory.append(forged).await {
        Ok(index) => {
            tracing::warn!(user = %username, device = device_id, index, "replaced the keys of a device")
        }
        Err(e) => tracing::error!(error = %e, "cannot replace keys"),
    }
}

/// Answers directory reads of every logged-in user but the first registered one from a log
/// with a ghost leaf in front: two views of one directory, both signed with the real key.
async fn split_view(
    node: &Node,
    hostile: &Hostile,
    session: &Session,
    frame: &ClientFrame,
) -> Option<Vec<ServerFrame>> {
    let (user, _) = session.authenticated()?;
    if !matches!(
        frame,
        ClientFrame::GetTreeHead { .. }
            | ClientFrame::GetInclusion { .. }
            | ClientFrame::GetLeaves { .. }
    ) {
        return None;
    }
    let honest = node.directory.leaves(0, u32::MAX).await.ok()?;
    let first = DirectoryLeaf::decode(honest.first()?).ok()?;
    if first.username == user {
        return None;
    }
    let mut leaves = Vec::with_capacity(honest.len() + 1);
    leaves.push(hostile.ghost_leaf(first.timestamp));
    leaves.extend(honest);
    let mut log = MerkleLog::new();
    for leaf in &leaves {
        log.push(leaf);
    }
    let size = log.len();
    let answer = match frame {
        ClientFrame::GetTreeHead {
            request_id,
            known_size,
        } => {
            let proof = match *known_size {
                Some(k) if k > size => {
                    return Some(request_error(
                        *request_id,
                        ErrorCode::OutOfRange,
                        "known size is larger than the log",
                    ));
                }
                Some(k) if k > 0 && k < size => log.consistency_proof(k, size).ok()?,
                _ => Vec::new(),
            };
            ServerFrame::TreeHead {
                request_id: *request_id,
                signed_head: node
                    .directory
                    .sign_forged(size, &log.root())
                    .to_bytes()
                    .to_vec(),
                consistency_proof: proof,
            }
        }
        ClientFrame::GetInclusion {
            request_id,
            username,
            device_id,
        } => {
            let found = leaves.iter().enumerate().rev().find(|(_, bytes)| {
                DirectoryLeaf::decode(bytes)
                    .is_ok_and(|l| l.username == *username && l.device_id == *device_id)
            });
            let Some((index, leaf)) = found else {
                return Some(request_error(
                    *request_id,
                    ErrorCode::UnknownDevice,
                    "not in the directory",
                ));
            };
            let index = index as u64;
            ServerFrame::Inclusion {
                request_id: *request_id,
                leaf: leaf.clone(),
                leaf_index: index,
                tree_size: size,
                proof: log.inclusion_proof(index, size).ok()?,
            }
        }
        ClientFrame::GetLeaves {
            request_id,
            start,
            count,
        } => {
            let start_index = usize::try_from(*start).ok()?;
            let count = (*count as usize).min(MAX_LEAVES_PER_FRAME);
            ServerFrame::Leaves {
                request_id: *request_id,
                start: *start,
                leaves: leaves
                    .iter()
                    .skip(start_index)
                    .take(count)
                    .cloned()
                    .collect(),
            }
        }
        _ => return None,
    };
    Some(vec![answer])
}

/// Sees every envelope before it is stored; `Some` is the answer to the `Send` when the attack
/// took over storing it.
pub async fn intercept_send(
    node: &Node,
    mailbox: &MailboxId,
    message_id: MessageId,
    record: &MailboxRecord,
) -> Option<Vec<ServerFrame>> {
    let hostile = node.hostile.as_ref()?;
    let mode = hostile.mode;
    if !matches!(
        mode,
        HostileMode::DropEnvelope
            | HostileMode::ReorderEnvelopes
            | HostileMode::ReplayEnvelope
            | HostileMode::DuplicateEnvelope
            | HostileMode::TamperCiphertext
    ) {
        return None;
    }
    let (n, kept) = {
        let mut sends = lock(&hostile.sends);
        let entry = sends.entry(mailbox.to_string()).or_default();
        entry.0 += 1;
        let kept = if entry.0 == 3 {
            std::mem::take(&mut entry.1)
        } else {
            Vec::new()
        };
        if entry.0 == 2
            && matches!(
                mode,
                HostileMode::ReorderEnvelopes | HostileMode::ReplayEnvelope
            )
        {
            entry.1.push(record.clone());
        }
        (entry.0, kept)
    };
    let ack = vec![ServerFrame::SendAck {
        message_id,
        duplicate: false,
    }];
    match (mode, n) {
        (HostileMode::DropEnvelope, 2) | (HostileMode::ReorderEnvelopes, 2) => {
            tracing::warn!(%mailbox, ?mode, "acknowledged an envelope without storing it (yet)");
            Some(ack)
        }
        (HostileMode::ReorderEnvelopes | HostileMode::ReplayEnvelope, 3) => {
            store(node, mailbox, message_id, record).await;
            for old in &kept {
                store(node, mailbox, fresh_id(), old).await;
            }
            Some(ack)
        }
        (HostileMode::DuplicateEnvelope, 2) => {
            store(node, mailbox, message_id, record).await;
            store(node, mailbox, fresh_id(), record).await;
            Some(ack)
        }
        (HostileMode::TamperCiphertext, 2) => {
            let mut tampered = record.clone();
            if let Some(last) = tampered.envelope.last_mut() {
                *last ^= 0x01;
            }
            store(node, mailbox, message_id, &tampered).await;
            Some(ack)
        }
        _ => None,
    }
}

fn fresh_id() -> MessageId {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    id
}

async fn store(node: &Node, mailbox: &MailboxId, id: MessageId, record: &MailboxRecord) {
    let max = node.config.limits.max_mailbox_depth;
    match node.store.append(mailbox, id, record.encode(), max).await {
        Ok(_) => node.backplane.notify(mailbox).await,
        Err(e) => tracing::error!(error = %e, "hostile store failed"),
    }
}
