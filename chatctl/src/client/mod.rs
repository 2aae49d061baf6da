//! The native chat client: chat-core's protocol driven over tokio, with its state on disk.
//!
//! Every key it uses is checked against the key directory first: the signed tree head must be
//! signed by the directory key, fresh and consistent with every head this client saw; the peer's
//! device leaf must be included under it and match the bundle the server handed out; and an
//! identity seen before must not have changed (a change is reported, never used silently).
//!
//! State of a user, under `HOME/NAME/` (secret files 0600): `device.key` (identity, prekeys),
//! `directory.state` (heads seen), `sessions/PEER.DEVICE` (ratchet states), `peers` (pinned
//! identities), `seen` (ids of recently received messages, for exactly-once display),
//! `counters` (per-conversation message counters, sent and received), `latest.head` (the newest
//! signed tree head, gossiped inside every message).
//!
//! What the server cannot hide: every message carries a per-conversation counter, so dropped,
//! reordered and replayed envelopes are reported as [`Alert`]s; and the sender's latest signed
//! tree head, which the receiver checks against its own view of the directory (split views).

pub mod conn;
pub mod reconnect;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use chat_core::codec::{DecodeError, Reader, Writer};
use chat_core::directory::DirectoryVerifier;
use chat_core::identity::{DeviceKeys, IdentityPublic, OneTimePreKey, PreKeyBundle, SignedPreKey};
use chat_core::ratchet::{self, Session, SessionError};
use chat_core::wire::{
    ClientFrame, DeviceBundle, DirectoryLeaf, Envelope, ErrorScope, MessageId, OneTimePrekey,
    ServerFrame, SignedPrekey,
};
use chat_signing::tree_head::{DirectoryPublicKey, SignedTreeHead};
use rand_core::{OsRng, RngCore};

use crate::files::{Mode, write_atomic};
use conn::Connection;

/// Device id of the one device `chatctl chat` registers per user.
pub const DEVICE_ID: u32 = 1;
/// One-time prekeys uploaded at registration.
pub const PREKEY_BATCH: usize = 50;
/// Received message ids remembered for de-duplication.
const SEEN_CAP: usize = 10_000;
/// Missing counters remembered per conversation (to tell a late message from a replay).
const MISSING_CAP: usize = 1000;
/// Version of [`TextMessage`] this client writes.
pub const TEXT_MESSAGE_VERSION: u8 = 2;
/// Largest signed tree head carried inside a message.
const MAX_GOSSIP_HEAD_BYTES: usize = chat_core::wire::MAX_TREE_HEAD_BYTES;

/// Where the client connects and keeps its state.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub server: String,
    pub ca: PathBuf,
    pub home: PathBuf,
    /// The directory public key every tree head must be signed with.
    pub directory_key: PathBuf,
}

/// The text message inside the encryption (`docs/PROTOCOL.md`, "Message content").
///
/// Version 1: `[1][sent_at u64][text str]`. Version 2 (written now): `[2][counter u64]
/// [sent_at u64][head opt<bytes<=512>][text str]`. Both decode; a version 1 message has
/// `counter` 0 (unchecked) and no head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextMessage {
    pub sent_at: u64,
    pub text: String,
    /// Position in the conversation from the sender device to the recipient device, from 1.
    pub counter: u64,
    /// The sender's latest signed tree head, for the receiver to compare with its own view.
    pub head: Option<Vec<u8>>,
}

impl TextMessage {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(TEXT_MESSAGE_VERSION)
            .u64(self.counter)
            .u64(self.sent_at);
        match &self.head {
            Some(head) => w.u8(1).bytes(head),
            None => w.u8(0),
        };
        w.str(&self.text);
        w.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let out = match r.u8()? {
            1 => Self {
                sent_at: r.u64()?,
                text: r.str(1 << 20)?.to_owned(),
                counter: 0,
                head: None,
            },
            2 => {
                let counter = r.u64()?;
                let sent_at = r.u64()?;
                let head = match r.u8()? {
                    0 => None,
                    1 => Some(r.bytes(MAX_GOSSIP_HEAD_BYTES)?.to_vec()),
                    _ => return Err(DecodeError::Invalid("text message head presence")),
                };
                Self {
                    sent_at,
                    text: r.str(1 << 20)?.to_owned(),
                    counter,
                    head,
                }
            }
            _ => return Err(DecodeError::Invalid("text message version")),
        };
        r.finish()?;
        Ok(out)
    }
}

/// What a receiving client noticed that the server did (or that went wrong on the way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Messages of a conversation are missing (dropped, or not arrived yet).
    Gap,
    /// A message reported missing arrived late (reordered).
    Reordered,
    /// A message arrived again (replayed or duplicated); it is not shown twice.
    Replay,
    /// An envelope did not decrypt or decode (tampered); it was dropped.
    Undecryptable,
    /// The tree head a peer saw contradicts this device's view of the key directory.
    SplitView,
}

/// One alert, naming the peer device involved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub from: String,
    pub from_device: u32,
    pub detail: String,
}

/// Per-conversation counters: the next one to send, and what was received.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counters {
    next_out: BTreeMap<(String, u32), u64>,
    /// Highest counter received, and the lower ones still missing.
    received: BTreeMap<(String, u32), (u64, BTreeSet<u64>)>,
}

/// What a received counter means.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CounterCheck {
    InOrder,
    /// Counters in the range were skipped.
    Gap(u64, u64),
    /// A counter reported missing arrived.
    Late,
    /// A counter already received.
    Replay,
}

impl Counters {
    fn take_next(&mut self, peer: &str, device: u32) -> u64 {
        let next = self.next_out.entry((peer.to_owned(), device)).or_insert(1);
        let counter = *next;
        *next += 1;
        counter
    }

    fn receive(&mut self, from: &str, device: u32, counter: u64) -> CounterCheck {
        if counter == 0 {
            return CounterCheck::InOrder; // version 1 message: no counter
        }
        let (highest, missing) = self.received.entry((from.to_owned(), device)).or_default();
        if counter > *highest {
            let gap = (counter > *highest + 1).then(|| (*highest + 1, counter - 1));
            if let Some((first, last)) = gap {
                let start = first.max(last.saturating_sub(MISSING_CAP as u64 - 1));
                missing.extend(start..=last);
                while missing.len() > MISSING_CAP {
                    missing.pop_first();
                }
            }
            *highest = counter;
            gap.map_or(CounterCheck::InOrder, |(a, b)| CounterCheck::Gap(a, b))
        } else if missing.remove(&counter) {
            CounterCheck::Late
        } else {
            CounterCheck::Replay
        }
    }

    fn to_text(&self) -> String {
        let mut out = String::new();
        for ((user, device), next) in &self.next_out {
            out.push_str(&format!("out {user} {device} {next}\n"));
        }
        for ((user, device), (highest, missing)) in &self.received {
            let missing: Vec<String> = missing.iter().map(u64::to_string).collect();
            let missing = if missing.is_empty() {
                "-".to_owned()
            } else {
                missing.join(",")
            };
            out.push_str(&format!("in {user} {device} {highest} {missing}\n"));
        }
        out
    }

    /// Reads [`Self::to_text`]; unreadable lines are skipped (counters only feed alerts).
    fn from_text(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["out", user, device, next] => {
                    if let (Ok(d), Ok(n)) = (device.parse(), next.parse()) {
                        out.next_out.insert(((*user).to_owned(), d), n);
                    }
                }
                ["in", user, device, highest, missing] => {
                    if let (Ok(d), Ok(h)) = (device.parse(), highest.parse()) {
                        let missing = missing.split(',').filter_map(|m| m.parse().ok()).collect();
                        out.received.insert(((*user).to_owned(), d), (h, missing));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// A message as shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Received {
    pub from: String,
    pub from_device: u32,
    pub text: String,
    /// Hex message id (client-generated by the sender).
    pub id: String,
    /// When the sender wrote it (Unix seconds, sender's clock).
    pub time: u64,
    pub server_time: u64,
    pub seq: u64,
    /// The sender's counter of this conversation (0 from clients that send none).
    pub counter: u64,
}

/// What `send_text` did.
#[derive(Debug, Clone)]
pub struct SendReport {
    pub devices: usize,
    pub message_ids: Vec<String>,
    pub duplicate: bool,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A logged-in client of one user.
pub struct Client {
    pub name: String,
    dir: PathBuf,
    keys: DeviceKeys,
    verifier: DirectoryVerifier,
    pub conn: Connection,
    peers: BTreeMap<(String, u32), [u8; IdentityPublic::ENCODED_LEN]>,
    seen: VecDeque<MessageId>,
    /// Accept a changed identity of a peer (after the user compared safety numbers).
    pub accept_key_change: bool,
    counters: Counters,
    /// The newest signed tree head accepted, sent inside every message.
    latest_head: Option<Vec<u8>>,
    /// Gossiped heads already checked (size, root).
    checked_heads: HashSet<(u64, [u8; 32])>,
    /// Everything noticed while receiving, oldest first (also printed as warnings).
    pub alerts: Vec<Alert>,
    /// Where it connected, to connect again ([`Client::reconnect`]).
    options: ClientOptions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn user_dir(opts: &ClientOptions, name: &str) -> Result<PathBuf> {
    chat_core::wire::validate_username(name).map_err(|e| anyhow!("{name:?}: {e}"))?;
    Ok(opts.home.join(name))
}

fn load_directory_key(path: &Path) -> Result<DirectoryPublicKey> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the directory public key {}: pass --directory-key or run `chatctl keys init`",
            path.display()
        )
    })?;
    DirectoryPublicKey::from_file_string(&text).with_context(|| path.display().to_string())
}

impl Client {
    /// Creates keys for a new user, registers them, and logs in.
    pub async fn register(opts: &ClientOptions, name: &str) -> Result<Self> {
        let dir = user_dir(opts, name)?;
        if dir.join("device.key").exists() {
            bail!(
                "{name} is already registered on this machine ({})",
                dir.display()
            );
        }
        let directory_key = load_directory_key(&opts.directory_key)?;
        let mut keys = DeviceKeys::generate(&mut OsRng);
        let prekeys = keys.generate_one_time_prekeys(PREKEY_BATCH, &mut OsRng);
        let identity = *keys.identity().public();
        let spk = *keys.signed_prekey();
        let mut conn = Connection::connect(&opts.server, &opts.ca).await?;
        let encoded = identity.encode();
        let frame = ClientFrame::Register {
            username: name.to_owned(),
            device_id: DEVICE_ID,
            identity_ed25519: *identity.signing_key().as_bytes(),
            identity_x25519: *identity.dh_key().as_bytes(),
            identity_signature: encoded[65..129].try_into().context("identity encoding")?,
            signed_prekey: wire_spk(&spk),
            one_time_prekeys: prekeys
                .iter()
                .map(|k| OneTimePrekey {
                    id: k.id,
                    public: *k.key.as_bytes(),
                })
                .collect(),
        };
        conn.send(&frame).await?;
        conn.wait_for(
            |f| matches!(f, ServerFrame::Registered { .. }),
            |s| *s == ErrorScope::Connection,
        )
        .await
        .with_context(|| format!("cannot register {name}"))?;
        write_atomic(&dir.join("device.key"), &keys.encode(), Mode::Secret)?;
        let mut client = Self {
            name: name.to_owned(),
            dir,
            keys,
            verifier: DirectoryVerifier::new(directory_key),
            conn,
            peers: BTreeMap::new(),
            seen: VecDeque::new(),
            accept_key_change: false,
            counters: Counters::default(),
            latest_head: None,
            checked_heads: HashSet::new(),
            alerts: Vec::new(),
            options: opts.clone(),
        };
        client.save_state()?;
        client.login().await?;
        client.check_own_entry().await?;
        Ok(client)
    }

    /// Opens a registered user's state, connects and logs in.
    pub async fn open(opts: &ClientOptions, name: &str) -> Result<Self> {
        let dir = user_dir(opts, name)?;
        let keys_path = dir.join("device.key");
        let bytes = std::fs::read(&keys_path).with_context(|| {
            format!("{name} is not registered here: run `chatctl chat register {name}`")
        })?;
        let keys =
            DeviceKeys::decode(&bytes).map_err(|e| anyhow!("{}: {e}", keys_path.display()))?;
        let directory_key = load_directory_key(&opts.directory_key)?;
        let verifier = match std::fs::read(dir.join("directory.state")) {
            Ok(b) => DirectoryVerifier::from_bytes(&b)
                .map_err(|e| anyhow!("{}: {e}", dir.join("directory.state").display()))?,
            Err(_) => DirectoryVerifier::new(directory_key.clone()),
        };
        if verifier.public_key().to_bytes() != directory_key.to_bytes() {
            bail!(
                "{} was recorded under another directory key; the server's directory key changed",
                dir.display()
            );
        }
        let peers = load_peers(&dir.join("peers"))?;
        let seen = load_seen(&dir.join("seen"));
        let counters =
            Counters::from_text(&std::fs::read_to_string(dir.join("counters")).unwrap_or_default());
        let latest_head = std::fs::read(dir.join("latest.head")).ok();
        let conn = Connection::connect(&opts.server, &opts.ca).await?;
        let mut client = Self {
            name: name.to_owned(),
            dir,
            keys,
            verifier,
            conn,
            peers,
            seen,
            accept_key_change: false,
            counters,
            latest_head,
            checked_heads: HashSet::new(),
            alerts: Vec::new(),
            options: opts.clone(),
        };
        client.login().await?;
        client.check_own_entry().await?;
        Ok(client)
    }

    async fn login(&mut self) -> Result<()> {
        self.conn
            .login(&self.name, DEVICE_ID, self.keys.identity())
            .await
    }

    fn save_state(&self) -> Result<()> {
        write_atomic(
            &self.dir.join("directory.state"),
            &self.verifier.to_bytes(),
            Mode::Public,
        )?;
        let peers: String = self
            .peers
            .iter()
            .map(|((user, device), id)| format!("{user} {device} {}\n", hex::encode(id)))
            .collect();
        write_atomic(&self.dir.join("peers"), peers.as_bytes(), Mode::Public)?;
        let seen: String = self
            .seen
            .iter()
            .map(|id| format!("{}\n", hex::encode(id)))
            .collect();
        write_atomic(&self.dir.join("seen"), seen.as_bytes(), Mode::Public)?;
        write_atomic(
            &self.dir.join("counters"),
            self.counters.to_text().as_bytes(),
            Mode::Public,
        )?;
        if let Some(head) = &self.latest_head {
            write_atomic(&self.dir.join("latest.head"), head, Mode::Public)?;
        }
        Ok(())
    }

    fn session_path(&self, peer: &str, device: u32) -> PathBuf {
        self.dir.join("sessions").join(format!("{peer}.{device}"))
    }

    /// The stored ratchet session with a peer device, if any.
    pub fn load_session(&self, peer: &str, device: u32) -> Result<Option<Session>> {
        match std::fs::read(self.session_path(peer, device)) {
            Ok(bytes) => Session::decode(&bytes)
                .map(Some)
                .map_err(|e| anyhow!("session with {peer}.{device}: {e}")),
            Err(_) => Ok(None),
        }
    }

    /// Stores a ratchet session (mode 0600, atomically).
    pub fn save_session(&self, peer: &str, device: u32, session: &Session) -> Result<()> {
        write_atomic(
            &self.session_path(peer, device),
            &session.encode(),
            Mode::Secret,
        )
    }

    /// Asks for the latest head with the consistency proof from `known_size`; checks nothing.
    async fn fetch_head(
        &mut self,
        known_size: Option<u64>,
    ) -> Result<(SignedTreeHead, Vec<u8>, Vec<[u8; 32]>)> {
        let (bytes, proof) = match self
            .conn
            .request(|id| ClientFrame::GetTreeHead {
                request_id: id,
                known_size,
            })
            .await?
        {
            ServerFrame::TreeHead {
                signed_head,
                consistency_proof,
                ..
            } => (signed_head, consistency_proof),
            other => bail!("expected TreeHead, got {}", other.name()),
        };
        let head = SignedTreeHead::from_bytes(&bytes)
            .map_err(|e| anyhow!("the server sent a bad tree head: {e}"))?;
        Ok((head, bytes, proof))
    }

    /// Fetches the latest head, checks it (signature, freshness, consistency) and remembers it.
    pub async fn refresh_head(&mut self) -> Result<SignedTreeHead> {
        let known_size = self
            .verifier
            .latest()
            .map(|(size, _)| size)
            .filter(|s| *s > 0);
        let (head, bytes, proof) = self.fetch_head(known_size).await?;
        self.verifier
            .accept_head(&head, &proof, unix_now())
            .map_err(|e| anyhow!("key directory check failed: {e}"))?;
        self.latest_head = Some(bytes);
        self.save_state()?;
        Ok(head)
    }

    /// Records an alert and prints it as a warning.
    fn alert(&mut self, kind: AlertKind, from: &str, from_device: u32, detail: String) {
        tracing_warn(&detail);
        self.alerts.push(Alert {
            kind,
            from: from.to_owned(),
            from_device,
            detail,
        });
    }

    /// Checks a tree head a peer put inside a message against this device's view of the
    /// directory: it must be consistent with every head this device accepted. A contradiction is
    /// a [`AlertKind::SplitView`] alert (the server shows the two devices different logs).
    async fn check_gossiped_head(&mut self, from: &str, device: u32, bytes: &[u8]) -> Result<()> {
        let head = match SignedTreeHead::from_bytes(bytes) {
            Ok(h) => h,
            Err(e) => {
                let detail = format!("{from} sent an unreadable tree head: {e}");
                self.alert(AlertKind::SplitView, from, device, detail);
                return Ok(());
            }
        };
        if !self.checked_heads.insert((head.tree_size, head.root)) {
            return Ok(());
        }
        if let Err(e) = head.verify(self.verifier.public_key()) {
            let detail = format!(
                "the key directory head {from} saw is not signed by the directory key: {e}"
            );
            self.alert(AlertKind::SplitView, from, device, detail);
            return Ok(());
        }
        let now = unix_now();
        if now.saturating_sub(head.timestamp) > 86_400 || head.timestamp > now + 300 {
            return Ok(()); // too old (or new) to compare: freshness rules would refuse it
        }
        for _ in 0..3 {
            let latest = self.refresh_head().await?;
            if head.tree_size > latest.tree_size {
                let detail = format!(
                    "SPLIT VIEW: {from} saw a key directory of {} entries, but the server shows this device only {}:                      the server shows different logs to different users (run `chatctl audit`)",
                    head.tree_size, latest.tree_size
                );
                self.alert(AlertKind::SplitView, from, device, detail);
                return Ok(());
            }
            let known = Some(head.tree_size).filter(|s| *s > 0);
            let (now_head, _, proof) = self.fetch_head(known).await?;
            if now_head.tree_size != latest.tree_size || now_head.root != latest.root {
                continue; // the log grew in between
            }
            let mut verifier = self.verifier.clone();
            return match verifier.accept_head(&head, &proof, now) {
                Ok(()) => {
                    self.verifier = verifier;
                    self.save_state()
                }
                Err(e) => {
                    let detail = format!(
                        "SPLIT VIEW: the key directory {from} saw (size {}) contradicts the one this device sees                          (size {}): {e}; the server shows different logs to different users (run `chatctl audit`)",
                        head.tree_size, latest.tree_size
                    );
                    self.alert(AlertKind::SplitView, from, device, detail);
                    Ok(())
                }
            };
        }
        Ok(())
    }

    /// The directory leaf of a device, proven included under a fresh, consistent head.
    pub async fn verified_leaf(&mut self, user: &str, device: u32) -> Result<DirectoryLeaf> {
        for _ in 0..3 {
            let head = self.refresh_head().await?;
            let answer = self
                .conn
                .request(|id| ClientFrame::GetInclusion {
                    request_id: id,
                    username: user.to_owned(),
                    device_id: device,
                })
                .await?;
            let ServerFrame::Inclusion {
                leaf,
                leaf_index,
                tree_size,
                proof,
                ..
            } = answer
            else {
                bail!("expected Inclusion, got {}", answer.name());
            };
            if tree_size != head.tree_size {
                continue; // the log grew in between: fetch the new head and ask again
            }
            self.verifier
                .verify_key_entry(&leaf, leaf_index, &proof, &head, unix_now())
                .map_err(|e| {
                    anyhow!("the directory does not prove the keys of {user}.{device}: {e}")
                })?;
            let leaf = DirectoryLeaf::decode(&leaf)
                .map_err(|e| anyhow!("directory leaf of {user}: {e}"))?;
            if leaf.username != user || leaf.device_id != device {
                bail!(
                    "the directory proved a leaf of {}.{} when asked for {user}.{device}",
                    leaf.username,
                    leaf.device_id
                );
            }
            return Ok(leaf);
        }
        bail!("the key directory kept changing while checking {user}.{device}")
    }

    /// At login: our own current leaf in the directory must hold our keys.
    async fn check_own_entry(&mut self) -> Result<()> {
        let leaf = self.verified_leaf(&self.name.clone(), DEVICE_ID).await?;
        let mine = self.keys.identity().public();
        if leaf.identity_ed25519 != *mine.signing_key().as_bytes()
            || leaf.identity_x25519 != *mine.dh_key().as_bytes()
        {
            bail!(
                "the key directory lists keys for {} that are not this device's: someone replaced them",
                self.name
            );
        }
        Ok(())
    }

    /// Checks a peer identity against the pinned one; pins it when new.
    fn pin(&mut self, user: &str, device: u32, identity: &IdentityPublic) -> Result<()> {
        let encoded: [u8; IdentityPublic::ENCODED_LEN] = identity
            .encode()
            .try_into()
            .map_err(|_| anyhow!("identity encoding has an unexpected length"))?;
        let key = (user.to_owned(), device);
        match self.peers.get(&key) {
            Some(pinned) if *pinned != encoded && !self.accept_key_change => bail!(
                "the identity key of {user} (device {device}) CHANGED since you last talked; compare safety numbers \
                 (`chatctl chat safety-number --as {} {user}`) and resend with --accept-key-change if they match",
                self.name
            ),
            _ => {
                self.peers.insert(key, encoded);
                Ok(())
            }
        }
    }

    /// The identity of a peer device from the directory, after every check, pinned.
    async fn verified_identity(
        &mut self,
        user: &str,
        device: u32,
    ) -> Result<(DirectoryLeaf, IdentityPublic)> {
        let leaf = self.verified_leaf(user, device).await?;
        let identity = identity_from_parts(
            &leaf.identity_ed25519,
            &leaf.identity_x25519,
            &leaf.identity_signature,
        )?;
        self.pin(user, device, &identity)?;
        Ok((leaf, identity))
    }

    /// Encrypts `text` to every device of `peer` and stores it in their mailboxes.
    pub async fn send_text(&mut self, peer: &str, text: &str) -> Result<SendReport> {
        let answer = self
            .conn
            .request(|id| ClientFrame::FetchBundle {
                request_id: id,
                username: peer.to_owned(),
            })
            .await
            .with_context(|| format!("cannot fetch the keys of {peer}"))?;
        let ServerFrame::Bundle { devices, .. } = answer else {
            bail!("expected Bundle, got {}", answer.name());
        };
        if devices.is_empty() {
            bail!("{peer} has no devices");
        }
        let sent_at = unix_now();
        let mut report = SendReport {
            devices: 0,
            message_ids: Vec::new(),
            duplicate: false,
        };
        for device in &devices {
            let mut session = match self.load_session(peer, device.device_id)? {
                Some(s) => {
                    // Still re-check the directory: a key change must be noticed.
                    let (_, identity) = self.verified_identity(peer, device.device_id).await?;
                    if s.remote_identity().encode() != identity.encode() {
                        bail!(
                            "{peer}'s device {} has a new identity in the directory; see its safety number",
                            device.device_id
                        );
                    }
                    s
                }
                None => {
                    let (leaf, identity) = self.verified_identity(peer, device.device_id).await?;
                    let bundle = bundle_matching_leaf(device, &leaf, identity)?;
                    Session::initiate(self.keys.identity(), &bundle, &mut OsRng)
                        .map_err(|e| anyhow!("cannot start a session with {peer}: {e}"))?
                }
            };
            let plaintext = TextMessage {
                sent_at,
                text: text.to_owned(),
                counter: self.counters.take_next(peer, device.device_id),
                head: self.latest_head.clone(),
            }
            .encode();
            let ciphertext = session
                .encrypt(&plaintext, &mut OsRng)
                .map_err(|e| anyhow!("cannot encrypt: {e}"))?;
            self.save_session(peer, device.device_id, &session)?;
            let envelope = Envelope::RatchetMessage {
                message: ciphertext,
            }
            .encode();
            let mut message_id = [0u8; 16];
            OsRng.fill_bytes(&mut message_id);
            let ack = self
                .send_envelope(message_id, peer, device.device_id, envelope)
                .await?;
            report.duplicate |= ack;
            report.devices += 1;
            report.message_ids.push(hex::encode(message_id));
        }
        self.save_state()?;
        Ok(report)
    }

    /// Sends one envelope and waits for its durable `SendAck`; returns `duplicate`.
    pub async fn send_envelope(
        &mut self,
        message_id: MessageId,
        to: &str,
        device: u32,
        envelope: Vec<u8>,
    ) -> Result<bool> {
        self.conn
            .send(&ClientFrame::Send {
                message_id,
                to_user: to.to_owned(),
                to_device: device,
                envelope,
            })
            .await?;
        let ack = self
            .conn
            .wait_for(
                |f| matches!(f, ServerFrame::SendAck { message_id: m, .. } if *m == message_id),
                |s| *s == ErrorScope::Message(message_id),
            )
            .await?;
        Ok(matches!(
            ack,
            ServerFrame::SendAck {
                duplicate: true,
                ..
            }
        ))
    }

    /// Receives until nothing arrives for `idle`; decrypts, records, acknowledges.
    pub async fn receive(&mut self, idle: Duration) -> Result<Vec<Received>> {
        let mut out = Vec::new();
        loop {
            let frame = match self.conn.next_frame(idle).await {
                Ok(f) => f,
                Err(e) if e.to_string().starts_with("no answer") => break,
                Err(e) => return Err(e),
            };
            let ServerFrame::Deliver {
                seq,
                message_id,
                from_user,
                from_device,
                server_time,
                envelope,
            } = frame
            else {
                continue;
            };
            if let Some(text) = self
                .open_envelope(&message_id, &from_user, from_device, &envelope)
                .await?
            {
                if let Some(head) = &text.head {
                    self.check_gossiped_head(&from_user, from_device, head)
                        .await?;
                }
                out.push(Received {
                    from: from_user,
                    from_device,
                    text: text.text,
                    id: hex::encode(message_id),
                    time: text.sent_at,
                    server_time,
                    seq,
                    counter: text.counter,
                });
            }
            // Everything up to here is decrypted and saved: the server may delete it.
            self.conn.send(&ClientFrame::Ack { up_to_seq: seq }).await?;
        }
        Ok(out)
    }

    /// Decrypts one delivered envelope; `None` for a duplicate (already shown).
    async fn open_envelope(
        &mut self,
        id: &MessageId,
        from: &str,
        device: u32,
        envelope: &[u8],
    ) -> Result<Option<TextMessage>> {
        if self.seen.contains(id) {
            return Ok(None);
        }
        let message = match Envelope::decode(envelope) {
            Ok(Envelope::RatchetMessage { message }) => message,
            Ok(_) => {
                tracing_warn(&format!(
                    "ignoring an unsupported envelope kind from {from}"
                ));
                return Ok(None);
            }
            Err(e) => {
                tracing_warn(&format!("undecodable envelope from {from}: {e}"));
                return Ok(None);
            }
        };
        let initial = ratchet::initial_header(&message).ok().flatten();
        let existing = self.load_session(from, device)?;
        let (session, plaintext) = match (existing, initial) {
            (Some(mut session), None) => match session.decrypt(&message) {
                Ok(p) => (session, p),
                Err(SessionError::Replay) => {
                    let detail = format!(
                        "a message from {from} (device {device}) arrived again (replayed or duplicated); not shown twice"
                    );
                    self.alert(AlertKind::Replay, from, device, detail);
                    return Ok(None);
                }
                Err(e) => {
                    let detail = format!(
                        "cannot decrypt a message from {from} (device {device}), dropped: {e}"
                    );
                    self.alert(AlertKind::Undecryptable, from, device, detail);
                    return Ok(None);
                }
            },
            (existing, Some(header)) => {
                // A (new) session from this sender: its identity must be the one in the directory.
                let (_, identity) = self.verified_identity(from, device).await?;
                if header.sender.encode() != identity.encode() {
                    bail!(
                        "{from} sent a session start under an identity that is not in the key directory"
                    );
                }
                if let Some(mut session) = existing {
                    match session.decrypt(&message) {
                        Ok(p) => {
                            self.save_session(from, device, &session)?;
                            return self.record(id, from, device, p);
                        }
                        Err(SessionError::Replay) => {
                            let detail = format!(
                                "a message from {from} (device {device}) arrived again (replayed or duplicated); not shown twice"
                            );
                            self.alert(AlertKind::Replay, from, device, detail);
                            return Ok(None);
                        }
                        Err(_) => {} // perhaps a new session from the peer
                    }
                }
                let (session, p) = match Session::accept(&mut self.keys, &message) {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        let detail = format!(
                            "cannot decrypt a session start from {from} (device {device}), dropped: {e}"
                        );
                        self.alert(AlertKind::Undecryptable, from, device, detail);
                        return Ok(None);
                    }
                };
                write_atomic(
                    &self.dir.join("device.key"),
                    &self.keys.encode(),
                    Mode::Secret,
                )?;
                (session, p)
            }
            (None, None) => {
                tracing_warn(&format!(
                    "a message from {from} arrived without a session; ignored"
                ));
                return Ok(None);
            }
        };
        self.save_session(from, device, &session)?;
        self.record(id, from, device, plaintext)
    }

    /// Checks the counter of a decrypted message and remembers its id; `None` for a replay.
    fn record(
        &mut self,
        id: &MessageId,
        from: &str,
        device: u32,
        plaintext: Vec<u8>,
    ) -> Result<Option<TextMessage>> {
        self.seen.push_back(*id);
        while self.seen.len() > SEEN_CAP {
            self.seen.pop_front();
        }
        let text = match TextMessage::decode(&plaintext) {
            Ok(text) => text,
            Err(e) => {
                let detail = format!("a message from {from} has unreadable content, dropped: {e}");
                self.alert(AlertKind::Undecryptable, from, device, detail);
                self.save_state()?;
                return Ok(None);
            }
        };
        let shown = match self.counters.receive(from, device, text.counter) {
            CounterCheck::InOrder => true,
            CounterCheck::Gap(first, last) => {
                let detail = format!(
                    "messages {first}..={last} from {from} (device {device}) are missing: dropped by the server, or late"
                );
                self.alert(AlertKind::Gap, from, device, detail);
                true
            }
            CounterCheck::Late => {
                let detail = format!(
                    "message {} from {from} (device {device}) arrived late, out of order",
                    text.counter
                );
                self.alert(AlertKind::Reordered, from, device, detail);
                true
            }
            CounterCheck::Replay => {
                let detail = format!(
                    "message {} from {from} (device {device}) arrived again (replayed); not shown twice",
                    text.counter
                );
                self.alert(AlertKind::Replay, from, device, detail);
                false
            }
        };
        self.save_state()?;
        Ok(shown.then_some(text))
    }

    /// The 60-digit safety number with a peer (first device), from directory-verified keys.
    pub async fn safety_number(&mut self, peer: &str) -> Result<String> {
        let (_, identity) = self.verified_identity(peer, DEVICE_ID).await?;
        self.save_state()?;
        let number = chat_core::safety::SafetyNumber::compute(
            self.keys.identity().public(),
            self.name.as_bytes(),
            &identity,
            peer.as_bytes(),
        );
        Ok(number.display())
    }
}

fn tracing_warn(message: &str) {
    eprintln!("chatctl: warning: {message}");
}

fn wire_spk(spk: &SignedPreKey) -> SignedPrekey {
    SignedPrekey {
        id: spk.id,
        public: *spk.key.as_bytes(),
        signature: spk.signature.to_bytes(),
    }
}

/// Rebuilds and verifies an identity from its three published parts.
pub fn identity_from_parts(
    ed25519: &[u8; 32],
    x25519: &[u8; 32],
    signature: &[u8; 64],
) -> Result<IdentityPublic> {
    IdentityPublic::from_parts(ed25519, x25519, signature)
        .map_err(|e| anyhow!("invalid identity key: {e}"))
}

/// The server's bundle must carry exactly the keys the directory proves.
fn bundle_matching_leaf(
    device: &DeviceBundle,
    leaf: &DirectoryLeaf,
    identity: IdentityPublic,
) -> Result<PreKeyBundle> {
    let same = device.identity_ed25519 == leaf.identity_ed25519
        && device.identity_x25519 == leaf.identity_x25519
        && device.identity_signature == leaf.identity_signature
        && device.signed_prekey.id == leaf.signed_prekey_id
        && device.signed_prekey.public == leaf.signed_prekey_public
        && device.signed_prekey.signature == leaf.signed_prekey_signature;
    if !same {
        bail!(
            "the server handed out keys for {} device {} that differ from the key directory: refusing to use them",
            leaf.username,
            leaf.device_id
        );
    }
    let bundle = PreKeyBundle {
        identity,
        signed_prekey: SignedPreKey {
            id: device.signed_prekey.id,
            key: device.signed_prekey.public.into(),
            signature: ed25519_dalek::Signature::from_bytes(&device.signed_prekey.signature),
        },
        one_time_prekey: device.one_time_prekey.as_ref().map(|k| OneTimePreKey {
            id: k.id,
            key: k.public.into(),
        }),
    };
    bundle
        .verify()
        .map_err(|e| anyhow!("the bundle of {} does not verify: {e}", leaf.username))?;
    Ok(bundle)
}

fn load_peers(path: &Path) -> Result<BTreeMap<(String, u32), [u8; IdentityPublic::ENCODED_LEN]>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = || {
            anyhow!(
                "{}:{}: expected `user device identity-hex`",
                path.display(),
                n + 1
            )
        };
        let mut parts = line.split_whitespace();
        let user = parts.next().ok_or_else(bad)?;
        let device: u32 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let id: [u8; IdentityPublic::ENCODED_LEN] = hex::decode(parts.next().ok_or_else(bad)?)
            .map_err(|_| bad())?
            .try_into()
            .map_err(|_| bad())?;
        out.insert((user.to_owned(), device), id);
    }
    Ok(out)
}

fn load_seen(path: &Path) -> VecDeque<MessageId> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| hex::decode(l.trim()).ok()?.try_into().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_message_round_trips_and_refuses_garbage() {
        let m = TextMessage {
            sent_at: 7,
            text: "héllo".into(),
            counter: 3,
            head: Some(vec![1; 121]),
        };
        assert_eq!(TextMessage::decode(&m.encode()), Ok(m));
        assert!(TextMessage::decode(&[2, 0, 0]).is_err());
        assert!(TextMessage::decode(&[3, 0, 0]).is_err());
    }

    #[test]
    fn version_1_text_messages_still_decode_without_counter_or_head() {
        let mut w = Writer::new();
        w.u8(1).u64(7).str("old");
        let m = TextMessage::decode(&w.into_bytes()).expect("v1");
        assert_eq!((m.counter, m.head, m.text.as_str()), (0, None, "old"));
    }

    #[test]
    fn counters_report_gaps_late_arrivals_and_replays() {
        let mut c = Counters::default();
        assert_eq!(c.receive("a", 1, 1), CounterCheck::InOrder);
        assert_eq!(c.receive("a", 1, 4), CounterCheck::Gap(2, 3));
        assert_eq!(c.receive("a", 1, 3), CounterCheck::Late);
        assert_eq!(c.receive("a", 1, 3), CounterCheck::Replay);
        assert_eq!(c.receive("a", 1, 1), CounterCheck::Replay);
        assert_eq!(c.receive("a", 2, 1), CounterCheck::InOrder);
        let again = Counters::from_text(&c.to_text());
        assert_eq!(again, c);
    }

    #[test]
    fn sent_counters_start_at_one_per_conversation() {
        let mut c = Counters::default();
        assert_eq!(c.take_next("b", 1), 1);
        assert_eq!(c.take_next("b", 1), 2);
        assert_eq!(c.take_next("b", 2), 1);
    }
}
