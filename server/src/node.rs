//! The state of one server and the handling of every client frame, independent of the socket.
//!
//! A [`Session`] is one connection's protocol state (hello, login challenge, authenticated
//! device); [`Node::handle`] takes a decoded `ClientFrame` and returns the `ServerFrame`s to
//! send back. Delivery of mailbox contents is pushed separately by the WebSocket layer, woken
//! through the [`Backplane`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_core::codec::{DecodeError, Reader, Writer};
use chat_core::identity::{IdentityPublic, SignedPreKey};
use chat_core::wire::{
    ClientFrame, DeviceBundle, DirectoryLeaf, ErrorCode, ErrorScope, MAX_LEAVES_PER_FRAME,
    MessageId, OneTimePrekey, PROTOCOL_VERSION, ServerFrame, SignedPrekey, login_challenge_message,
    validate_username,
};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use rand_core::{OsRng, RngCore};
use tokio::sync::{oneshot, watch};

use crate::accounts::{AccountRecord, DeviceRecord};
use crate::backplane::Backplane;
use crate::bundle::Bundle;
use crate::config::ServerConfig;
use crate::directory::{Directory, unix_now};
use crate::metrics::Metrics;
use crate::store::{AppendOutcome, AppendRequest, MailboxId, Store, StoreError};

/// What is stored in a mailbox per envelope: what `Deliver` needs besides the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxRecord {
    pub from_user: String,
    pub from_device: u32,
    pub server_time: u64,
    pub envelope: Vec<u8>,
}

impl MailboxRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.envelope.len() + self.from_user.len() + 24);
        w.u8(1)
            .str(&self.from_user)
            .u32(self.from_device)
            .u64(self.server_time)
            .bytes(&self.envelope);
        w.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != 1 {
            return Err(DecodeError::UnsupportedVersion {
                what: "mailbox record",
                version,
            });
        }
        let record = Self {
            from_user: r.str(chat_core::wire::MAX_USERNAME_BYTES)?.to_owned(),
            from_device: r.u32()?,
            server_time: r.u64()?,
            envelope: r.bytes(chat_core::wire::MAX_ENVELOPE_BYTES)?.to_vec(),
        };
        r.finish()?;
        Ok(record)
    }
}

/// Per-address registration counter (fixed one-minute windows).
#[derive(Debug, Default)]
struct RateLimiter {
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl RateLimiter {
    fn allow(&self, addr: IpAddr, per_minute: u32) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if windows.len() > 100_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let entry = windows.entry(addr).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= per_minute
    }
}

/// Everything one server process shares between connections.
pub struct Node {
    pub config: ServerConfig,
    pub store: Arc<dyn Store>,
    pub directory: Directory,
    pub metrics: Metrics,
    /// Wakes delivery loops here and, with NATS, on the other instances.
    pub backplane: Backplane,
    pub bundle: Option<Bundle>,
    draining: AtomicBool,
    /// Flips to `true` when the server shuts down or drains: sessions close with `Reconnect`.
    pub shutdown: watch::Sender<bool>,
    /// Open WebSocket sessions a gradual drain closes batch by batch.
    sessions: SessionRegistry,
    registrations: RateLimiter,
    #[cfg(feature = "hostile")]
    pub hostile: Option<crate::hostile::Hostile>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

/// Sends gathered for [`Node::send_many`]: the fields of a `ClientFrame::Send`.
struct PendingSend {
    message_id: MessageId,
    to_user: String,
    to_device: u32,
    envelope: Vec<u8>,
}

/// Whether runs of sends are batched; the hostile test server intercepts each send alone.
const PIPELINE_SENDS: bool = !cfg!(feature = "hostile");

/// How a gradual drain closes sessions ([`Node::start_gradual_drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    /// Sessions closed per batch.
    pub batch: usize,
    /// Pause between batches.
    pub every: Duration,
    /// Pause before the first batch.
    pub delay: Duration,
}

impl Default for DrainPlan {
    fn default() -> Self {
        Self {
            batch: 50,
            every: Duration::from_millis(250),
            delay: Duration::from_millis(1500),
        }
    }
}

/// The sessions of a node, each with the sender that asks it to close.
#[derive(Debug, Default)]
struct SessionRegistry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

/// Resolves once `rx` reads `true` (the guard of the watch value is dropped before returning,
/// so the future stays `Send`).
pub async fn flipped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}

/// Where a connection is in the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Waiting for `Hello`.
    New,
    /// `Hello` received; may register or log in.
    Greeted,
    /// A login challenge is outstanding.
    Challenged {
        username: String,
        device_id: u32,
        nonce: [u8; 32],
        expires: Instant,
    },
    /// Logged in as this device.
    Authenticated { username: String, device_id: u32 },
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    pub peer: IpAddr,
    pub state: SessionState,
    /// Set when the session just became authenticated; the transport starts delivery.
    pub start_delivery: Option<MailboxId>,
    /// Recipients this session's sends were checked against.
    recipients: KnownRecipients,
}

impl Session {
    pub fn new(peer: IpAddr) -> Self {
        Self {
            peer,
            state: SessionState::New,
            start_delivery: None,
            recipients: KnownRecipients::default(),
        }
    }

    pub fn authenticated(&self) -> Option<(&str, u32)> {
        match &self.state {
            SessionState::Authenticated {
                username,
                device_id,
            } => Some((username, *device_id)),
            _ => None,
        }
    }
}

/// Recipients (user and device) a session has found to exist, so that its later sends to them
/// skip reading the recipient's account: a store read and an unseal per send, or per run of
/// sends, which was 6% of a server's CPU at 30 000 msgs/s (docs/BENCHMARKS.md, issue #8).
/// Accounts are never deleted and their devices only added, so a recipient found once stays
/// valid; a recipient not found is not kept, and is looked up again at its next send.
#[derive(Debug, Default)]
struct KnownRecipients(Vec<MailboxId>);

impl KnownRecipients {
    /// Kept at most; the one found longest ago makes room. A client mostly writes to a few
    /// peers at a time (a group's members are each a recipient).
    const MAX: usize = 32;

    fn contains(&self, username: &str, device_id: u32) -> bool {
        self.0
            .iter()
            .any(|m| m.device_id == device_id && m.username == username)
    }

    fn remember(&mut self, mailbox: &MailboxId) {
        if self.0.len() >= Self::MAX {
            self.0.remove(0);
        }
        self.0.push(mailbox.clone());
    }
}

fn err(scope: ErrorScope, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame::error(scope, code, message)
}

const CONN: ErrorScope = ErrorScope::Connection;

impl Node {
    /// A node whose deliveries are notified within this process only.
    pub fn new(config: ServerConfig, store: Arc<dyn Store>, directory: Directory) -> Self {
        Self::with_backplane(config, store, directory, Backplane::in_process())
    }

    /// A node whose deliveries are notified through `backplane`.
    pub fn with_backplane(
        config: ServerConfig,
        store: Arc<dyn Store>,
        directory: Directory,
        backplane: Backplane,
    ) -> Self {
        let bundle = config.bundle_dir.clone().map(Bundle::new);
        #[cfg(feature = "hostile")]
        let hostile = config
            .hostile
            .map(|mode| crate::hostile::Hostile::new(mode, &config));
        Self {
            config,
            store,
            directory,
            metrics: Metrics::default(),
            backplane,
            bundle,
            draining: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            sessions: SessionRegistry::default(),
            registrations: RateLimiter::default(),
            #[cfg(feature = "hostile")]
            hostile,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Stop taking new work and tell every session to close with the reconnect code.
    pub fn start_draining(&self) {
        self.draining.store(true, Relaxed);
        self.shutdown.send_replace(true);
    }

    /// Registers an open WebSocket session; the receiver fires when a gradual drain reaches
    /// it (the session then closes with the reconnect code). Pair with [`Node::session_ended`].
    pub fn session_started(&self) -> (u64, oneshot::Receiver<()>) {
        let id = self.sessions.next.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut open) = self.sessions.open.lock() {
            open.insert(id, tx);
        }
        (id, rx)
    }

    pub fn session_ended(&self, id: u64) {
        if let Ok(mut open) = self.sessions.open.lock() {
            open.remove(&id);
        }
    }

    /// Drains without a shutdown: not ready at once (`/readyz` 503, `chatapp_ready` 0, no new
    /// WebSockets or logins), then, after `plan.delay` (time for the gateway to notice), closes
    /// the open sessions with the reconnect code `plan.batch` at a time every `plan.every`, so
    /// their clients come back through the gateway spread out instead of all at once. Returns
    /// the number of sessions open when it started; a second call only reports that number.
    pub fn start_gradual_drain(self: &Arc<Self>, plan: DrainPlan) -> usize {
        let open = self.sessions.open.lock().map(|o| o.len()).unwrap_or(0);
        if self.draining.swap(true, Relaxed) {
            return open;
        }
        tracing::info!(sessions = open, batch = plan.batch, every = ?plan.every, "draining in batches");
        let node = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(plan.delay).await;
            loop {
                let batch: Vec<oneshot::Sender<()>> = match node.sessions.open.lock() {
                    Ok(mut open) => {
                        let ids: Vec<u64> = open.keys().take(plan.batch.max(1)).copied().collect();
                        ids.iter().filter_map(|id| open.remove(id)).collect()
                    }
                    Err(_) => break,
                };
                if batch.is_empty() {
                    break;
                }
                for tx in batch {
                    let _ = tx.send(());
                }
                tokio::time::sleep(plan.every).await;
            }
            tracing::info!("drain: every session was asked to reconnect");
        });
        open
    }

    async fn timed<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        let start = Instant::now();
        let out = fut.await;
        self.metrics.store_latency.observe(start.elapsed());
        out
    }

    /// Handles frames that arrived together on one connection, in order, and returns the
    /// answers in order. A run of `Send` frames of a logged-in session is appended with one
    /// [`Store::append_many`] (one durable group commit on the embedded store) instead of one
    /// commit each; every other frame goes through [`Node::handle`] as if it came alone.
    pub async fn handle_encoded<B: AsRef<[u8]>>(
        &self,
        session: &mut Session,
        frames: &[B],
    ) -> Vec<ServerFrame> {
        let mut out = Vec::new();
        let mut sends = Vec::new();
        for bytes in frames {
            let decoded = ClientFrame::decode(bytes.as_ref());
            match decoded {
                Ok(ClientFrame::Send {
                    message_id,
                    to_user,
                    to_device,
                    envelope,
                }) if PIPELINE_SENDS && session.authenticated().is_some() => {
                    sends.push(PendingSend {
                        message_id,
                        to_user,
                        to_device,
                        envelope,
                    });
                    continue;
                }
                _ => {}
            }
            if !sends.is_empty() {
                out.extend(self.send_many(session, std::mem::take(&mut sends)).await);
            }
            match decoded {
                Ok(frame) => out.extend(self.handle(session, frame).await),
                Err(e) => out.push(ServerFrame::error(
                    CONN,
                    ErrorCode::for_decode_error(&e),
                    e.to_string(),
                )),
            }
        }
        if !sends.is_empty() {
            out.extend(self.send_many(session, sends).await);
        }
        out
    }

    /// Handles one frame; returns the frames to send back in order.
    pub async fn handle(&self, session: &mut Session, frame: ClientFrame) -> Vec<ServerFrame> {
        #[cfg(feature = "hostile")]
        if let Some(out) = crate::hostile::intercept(self, session, &frame).await {
            return out;
        }
        let out = match frame {
            ClientFrame::Hello {
                protocol_version, ..
            } => self.hello(session, protocol_version),
            _ if session.state == SessionState::New => vec![err(
                CONN,
                ErrorCode::UnexpectedFrame,
                "the first frame must be Hello",
            )],
            ClientFrame::Register {
                username,
                device_id,
                identity_ed25519,
                identity_x25519,
                identity_signature,
                signed_prekey,
                one_time_prekeys,
            } => {
                let device = DeviceRecord {
                    device_id,
                    identity_ed25519,
                    identity_x25519,
                    identity_signature,
                    signed_prekey,
                    leaf_index: 0,
                };
                self.register(session, username, device, one_time_prekeys)
                    .await
            }
            ClientFrame::Login {
                username,
                device_id,
            } => self.login(session, username, device_id).await,
            ClientFrame::LoginProof { signature } => self.login_proof(session, signature).await,
            ClientFrame::UploadPrekeys { one_time_prekeys } => {
                self.upload_prekeys(session, one_time_prekeys).await
            }
            ClientFrame::Send {
                message_id,
                to_user,
                to_device,
                envelope,
            } => {
                self.send(session, message_id, to_user, to_device, envelope)
                    .await
            }
            ClientFrame::Ack { up_to_seq } => self.ack(session, up_to_seq).await,
            ClientFrame::FetchBundle {
                request_id,
                username,
            } => self.fetch_bundle(session, request_id, username).await,
            ClientFrame::GetTreeHead {
                request_id,
                known_size,
            } => self.tree_head(request_id, known_size).await,
            ClientFrame::GetInclusion {
                request_id,
                username,
                device_id,
            } => self.inclusion(request_id, username, device_id).await,
            ClientFrame::GetLeaves {
                request_id,
                start,
                count,
            } => self.get_leaves(request_id, start, count).await,
            ClientFrame::Ping { nonce } => vec![ServerFrame::Pong { nonce }],
        };
        self.count_errors(&out);
        out
    }

    fn count_errors(&self, frames: &[ServerFrame]) {
        let errors = frames
            .iter()
            .filter(|f| matches!(f, ServerFrame::Error { .. }))
            .count();
        self.metrics.errors_sent.fetch_add(errors as u64, Relaxed);
    }

    fn hello(&self, session: &mut Session, version: u8) -> Vec<ServerFrame> {
        if version != PROTOCOL_VERSION {
            return vec![err(
                CONN,
                ErrorCode::UnsupportedVersion,
                format!("this server speaks protocol version {PROTOCOL_VERSION}"),
            )];
        }
        if session.state == SessionState::New {
            session.state = SessionState::Greeted;
        }
        vec![ServerFrame::ServerHello {
            protocol_version: PROTOCOL_VERSION,
            server_name: self.config.server_name.clone(),
            max_envelope_bytes: self.config.limits.max_envelope_bytes,
        }]
    }

    async fn register(
        &self,
        session: &mut Session,
        username: String,
        device: DeviceRecord,
        prekeys: Vec<OneTimePrekey>,
    ) -> Vec<ServerFrame> {
        if let Err(e) = validate_username(&username) {
            return vec![err(CONN, ErrorCode::UsernameInvalid, e.to_string())];
        }
        if let Err(reason) = verify_device_keys(&device) {
            return vec![err(CONN, ErrorCode::BadSignature, reason)];
        }
        if !self
            .registrations
            .allow(session.peer, self.config.limits.registrations_per_minute)
        {
            return vec![err(
                CONN,
                ErrorCode::RateLimited,
                "too many registrations from this address; try again in a minute",
            )];
        }
        let owner = session.authenticated().map(|(u, _)| u.to_owned());
        let existing = match self.timed(self.store.get_account(&username)).await {
            Ok(found) => found,
            Err(e) => return vec![internal(CONN, e)],
        };
        let mut record = match existing {
            None => AccountRecord::default(),
            // Adding a device or changing keys needs a login as that user.
            Some(bytes) if owner.as_deref() == Some(username.as_str()) => {
                match AccountRecord::decode(&bytes) {
                    Ok(r) => r,
                    Err(e) => return vec![internal(CONN, e)],
                }
            }
            Some(_) => {
                return vec![err(
                    CONN,
                    ErrorCode::UsernameTaken,
                    format!("{username} is taken"),
                )];
            }
        };
        if record.device(device.device_id).is_none()
            && record.devices.len() >= crate::accounts::MAX_DEVICES
        {
            return vec![err(CONN, ErrorCode::OutOfRange, "too many devices")];
        }
        if record.devices.is_empty() {
            // Reserve the name first so two concurrent registrations cannot both win.
            if let Err(e) = self
                .timed(
                    self.store
                        .create_account(&username, AccountRecord::default().encode()),
                )
                .await
            {
                return match e {
                    StoreError::AlreadyExists(_) => vec![err(
                        CONN,
                        ErrorCode::UsernameTaken,
                        format!("{username} is taken"),
                    )],
                    other => vec![internal(CONN, other)],
                };
            }
        }
        let leaf = DirectoryLeaf {
            username: username.clone(),
            device_id: device.device_id,
            identity_ed25519: device.identity_ed25519,
            identity_x25519: device.identity_x25519,
            identity_signature: device.identity_signature,
            signed_prekey_id: device.signed_prekey.id,
            signed_prekey_public: device.signed_prekey.public,
            signed_prekey_signature: device.signed_prekey.signature,
            version: 0,
            timestamp: unix_now(),
        };
        let leaf_index = match self.directory.append(leaf).await {
            Ok(i) => i,
            Err(e) => return vec![internal(CONN, e)],
        };
        let device_id = device.device_id;
        record.upsert(DeviceRecord {
            leaf_index,
            ..device
        });
        if let Err(e) = self
            .timed(self.store.put_account(&username, record.encode()))
            .await
        {
            return vec![internal(CONN, e)];
        }
        let keys = prekeys.into_iter().map(|k| (k.id, k.public)).collect();
        if let Err(e) = self
            .timed(self.store.add_prekeys(&username, device_id, keys))
            .await
        {
            return vec![internal(CONN, e)];
        }
        self.metrics.registrations.fetch_add(1, Relaxed);
        tracing::info!(user = %username, device = device_id, leaf = leaf_index, "registered device");
        vec![ServerFrame::Registered {
            username,
            device_id,
            leaf_index,
        }]
    }

    async fn login(
        &self,
        session: &mut Session,
        username: String,
        device_id: u32,
    ) -> Vec<ServerFrame> {
        if self.is_draining() {
            return vec![err(
                CONN,
                ErrorCode::Draining,
                "this server is draining; reconnect",
            )];
        }
        let record = match self.account(&username).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return vec![err(
                    CONN,
                    ErrorCode::UnknownUser,
                    format!("no user {username}"),
                )];
            }
            Err(e) => return vec![e],
        };
        if record.device(device_id).is_none() {
            return vec![err(
                CONN,
                ErrorCode::UnknownDevice,
                format!("{username} has no device {device_id}"),
            )];
        }
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        session.state = SessionState::Challenged {
            username,
            device_id,
            nonce,
            expires: Instant::now() + Duration::from_secs(self.config.limits.challenge_ttl_secs),
        };
        vec![ServerFrame::Challenge { nonce }]
    }

    async fn login_proof(&self, session: &mut Session, signature: [u8; 64]) -> Vec<ServerFrame> {
        // The challenge is consumed by the first proof, right or wrong: it can never be replayed.
        let (username, device_id, nonce, expires) =
            match std::mem::replace(&mut session.state, SessionState::Greeted) {
                SessionState::Challenged {
                    username,
                    device_id,
                    nonce,
                    expires,
                } => (username, device_id, nonce, expires),
                other => {
                    session.state = other;
                    return vec![err(
                        CONN,
                        ErrorCode::ChallengeExpiredOrReplayed,
                        "no outstanding login challenge: send Login first",
                    )];
                }
            };
        if Instant::now() > expires {
            return vec![err(
                CONN,
                ErrorCode::ChallengeExpiredOrReplayed,
                "the login challenge expired",
            )];
        }
        let record = match self.account(&username).await {
            Ok(Some(r)) => r,
            Ok(None) => return vec![err(CONN, ErrorCode::UnknownUser, "unknown user")],
            Err(e) => return vec![e],
        };
        let Some(device) = record.device(device_id) else {
            return vec![err(CONN, ErrorCode::UnknownDevice, "unknown device")];
        };
        let valid = VerifyingKey::from_bytes(&device.identity_ed25519)
            .map(|key| {
                key.verify(
                    &login_challenge_message(&nonce, &username, device_id),
                    &Signature::from_bytes(&signature),
                )
                .is_ok()
            })
            .unwrap_or(false);
        if !valid {
            return vec![err(
                CONN,
                ErrorCode::BadSignature,
                "the login proof does not verify",
            )];
        }
        let mailbox = MailboxId::new(&username, device_id);
        let next_seq = match self.timed(self.store.fetch(&mailbox, 0, 1)).await {
            Ok(pending) => match pending.first() {
                Some(first) => first.seq,
                None => match self.store.next_seq(&mailbox).await {
                    Ok(seq) => seq,
                    Err(e) => return vec![internal(CONN, e)],
                },
            },
            Err(e) => return vec![internal(CONN, e)],
        };
        let available = self
            .store
            .prekey_count(&username, device_id)
            .await
            .unwrap_or(0);
        session.state = SessionState::Authenticated {
            username: username.clone(),
            device_id,
        };
        session.start_delivery = Some(mailbox);
        self.metrics.logins.fetch_add(1, Relaxed);
        vec![
            ServerFrame::Welcome {
                username,
                device_id,
                mailbox_next_seq: next_seq,
            },
            ServerFrame::PrekeyStatus {
                available: u32::try_from(available).unwrap_or(u32::MAX),
            },
        ]
    }

    async fn account(&self, username: &str) -> Result<Option<AccountRecord>, ServerFrame> {
        match self.timed(self.store.get_account(username)).await {
            Ok(Some(bytes)) => AccountRecord::decode(&bytes)
                .map(Some)
                .map_err(|e| internal(CONN, e)),
            Ok(None) => Ok(None),
            Err(e) => Err(internal(CONN, e)),
        }
    }

    async fn upload_prekeys(
        &self,
        session: &Session,
        keys: Vec<OneTimePrekey>,
    ) -> Vec<ServerFrame> {
        let Some((user, device)) = session.authenticated() else {
            return vec![not_authenticated(CONN)];
        };
        let keys = keys.into_iter().map(|k| (k.id, k.public)).collect();
        if let Err(e) = self.store.add_prekeys(user, device, keys).await {
            return vec![internal(CONN, e)];
        }
        match self.store.prekey_count(user, device).await {
            Ok(n) => vec![ServerFrame::PrekeyStatus {
                available: u32::try_from(n).unwrap_or(u32::MAX),
            }],
            Err(e) => vec![internal(CONN, e)],
        }
    }

    async fn send(
        &self,
        session: &mut Session,
        message_id: MessageId,
        to_user: String,
        to_device: u32,
        envelope: Vec<u8>,
    ) -> Vec<ServerFrame> {
        let (mailbox, record) = match self
            .prepare_send(session, message_id, &to_user, to_device, envelope)
            .await
        {
            Ok(prepared) => prepared,
            Err(frame) => return vec![frame],
        };
        #[cfg(feature = "hostile")]
        if let Some(out) = crate::hostile::intercept_send(self, &mailbox, message_id, &record).await
        {
            return out;
        }
        let result = self
            .timed(self.store.append(
                &mailbox,
                message_id,
                record.encode(),
                self.config.limits.max_mailbox_depth,
            ))
            .await;
        // A resend of a stored message wakes the recipient too: the instance that stored it
        // may have died before it could.
        if result.is_ok() {
            self.backplane.notify(&mailbox).await;
        }
        vec![self.send_answer(&mailbox, message_id, result)]
    }

    /// Sends of one connection that arrived together: checked one by one as [`Node::send`]
    /// does, appended with one [`Store::append_many`] in their order, answered in their order.
    async fn send_many(&self, session: &mut Session, sends: Vec<PendingSend>) -> Vec<ServerFrame> {
        let mut answers: Vec<Option<ServerFrame>> = Vec::with_capacity(sends.len());
        let mut appends = Vec::new();
        for send in sends {
            match self
                .prepare_send(
                    session,
                    send.message_id,
                    &send.to_user,
                    send.to_device,
                    send.envelope,
                )
                .await
            {
                Ok((mailbox, record)) => {
                    appends.push(AppendRequest {
                        mailbox,
                        message_id: send.message_id,
                        record: record.encode(),
                        max_depth: self.config.limits.max_mailbox_depth,
                    });
                    answers.push(None);
                }
                Err(frame) => answers.push(Some(frame)),
            }
        }
        let keys: Vec<(MailboxId, MessageId)> = appends
            .iter()
            .map(|a| (a.mailbox.clone(), a.message_id))
            .collect();
        let results = if appends.is_empty() {
            Vec::new()
        } else {
            self.timed(self.store.append_many(appends)).await
        };
        // Mailboxes whose recipients to wake: stored now, or stored before (a resend).
        let mut to_notify: Vec<&MailboxId> = Vec::new();
        // A store answers every append; should one not, that send is refused, never dropped.
        let mut results = results.into_iter();
        let mut keys = keys.iter();
        for answer in answers.iter_mut().filter(|a| a.is_none()) {
            let Some((mailbox, message_id)) = keys.next() else {
                break;
            };
            let result = results.next().unwrap_or_else(|| {
                Err(StoreError::Backend(
                    "the store gave no outcome for this append".into(),
                ))
            });
            if result.is_ok() && !to_notify.contains(&mailbox) {
                to_notify.push(mailbox);
            }
            *answer = Some(self.send_answer(mailbox, *message_id, result));
        }
        for mailbox in to_notify {
            self.backplane.notify(mailbox).await;
        }
        let answers: Vec<ServerFrame> = answers.into_iter().flatten().collect();
        self.count_errors(&answers);
        answers
    }

    /// Checks a send and builds the record to store, or the error frame that answers it. The
    /// recipient's account is read unless the session already found the recipient.
    async fn prepare_send(
        &self,
        session: &mut Session,
        message_id: MessageId,
        to_user: &str,
        to_device: u32,
        envelope: Vec<u8>,
    ) -> Result<(MailboxId, MailboxRecord), ServerFrame> {
        let scope = ErrorScope::Message(message_id);
        let Some((from_user, from_device)) = session.authenticated() else {
            return Err(not_authenticated(scope));
        };
        if envelope.len() > self.config.limits.max_envelope_bytes as usize {
            return Err(err(
                scope,
                ErrorCode::EnvelopeTooLarge,
                format!(
                    "envelope of {} bytes exceeds the limit of {}",
                    envelope.len(),
                    self.config.limits.max_envelope_bytes
                ),
            ));
        }
        let record = MailboxRecord {
            from_user: from_user.to_owned(),
            from_device,
            server_time: unix_now(),
            envelope,
        };
        let mailbox = MailboxId::new(to_user, to_device);
        if session.recipients.contains(to_user, to_device) {
            return Ok((mailbox, record));
        }
        match self.account(to_user).await? {
            Some(account) if account.device(to_device).is_some() => {
                session.recipients.remember(&mailbox);
                Ok((mailbox, record))
            }
            Some(_) => Err(err(
                scope,
                ErrorCode::UnknownDevice,
                format!("{to_user} has no device {to_device}"),
            )),
            None => Err(err(
                scope,
                ErrorCode::UnknownUser,
                format!("no user {to_user}"),
            )),
        }
    }

    /// The answer to a send once the store has answered; counts it.
    fn send_answer(
        &self,
        mailbox: &MailboxId,
        message_id: MessageId,
        result: Result<AppendOutcome, StoreError>,
    ) -> ServerFrame {
        let scope = ErrorScope::Message(message_id);
        match result {
            Ok(outcome) => {
                if outcome.duplicate {
                    self.metrics.envelopes_duplicate.fetch_add(1, Relaxed);
                } else {
                    self.metrics.envelopes_stored.fetch_add(1, Relaxed);
                }
                ServerFrame::SendAck {
                    message_id,
                    duplicate: outcome.duplicate,
                }
            }
            Err(StoreError::MailboxFull { limit }) => err(
                scope,
                ErrorCode::MailboxFull,
                format!(
                    "{}'s device {} has {limit} undelivered envelopes",
                    mailbox.username, mailbox.device_id
                ),
            ),
            Err(e) => internal(scope, e),
        }
    }

    async fn ack(&self, session: &Session, up_to_seq: u64) -> Vec<ServerFrame> {
        let Some((user, device)) = session.authenticated() else {
            return vec![not_authenticated(CONN)];
        };
        match self
            .timed(self.store.ack(&MailboxId::new(user, device), up_to_seq))
            .await
        {
            Ok(removed) => {
                self.metrics.envelopes_acked.fetch_add(removed, Relaxed);
                vec![]
            }
            Err(e) => vec![internal(CONN, e)],
        }
    }

    async fn fetch_bundle(
        &self,
        session: &Session,
        request_id: u32,
        username: String,
    ) -> Vec<ServerFrame> {
        let scope = ErrorScope::Request(request_id);
        if session.authenticated().is_none() {
            return vec![not_authenticated(scope)];
        }
        let record = match self.account(&username).await {
            Ok(Some(r)) if !r.devices.is_empty() => r,
            Ok(_) => {
                return vec![err(
                    scope,
                    ErrorCode::UnknownUser,
                    format!("no user {username}"),
                )];
            }
            Err(e) => return vec![e],
        };
        let mut devices = Vec::with_capacity(record.devices.len());
        for device in &record.devices {
            let one_time = match self
                .timed(self.store.take_prekey(&username, device.device_id))
                .await
            {
                Ok(k) => k.map(|(id, public)| OneTimePrekey { id, public }),
                Err(e) => return vec![internal(scope, e)],
            };
            let bundle = DeviceBundle {
                device_id: device.device_id,
                identity_ed25519: device.identity_ed25519,
                identity_x25519: device.identity_x25519,
                identity_signature: device.identity_signature,
                signed_prekey: device.signed_prekey.clone(),
                one_time_prekey: one_time,
                leaf_index: device.leaf_index,
            };
            #[cfg(feature = "hostile")]
            let bundle = match &self.hostile {
                Some(h) => h.bundle(&username, bundle),
                None => bundle,
            };
            devices.push(bundle);
        }
        vec![ServerFrame::Bundle {
            request_id,
            username,
            devices,
        }]
    }

    async fn tree_head(&self, request_id: u32, known_size: Option<u64>) -> Vec<ServerFrame> {
        let scope = ErrorScope::Request(request_id);
        let head = match self.directory.head().await {
            Ok(h) => h,
            Err(e) => return vec![internal(scope, e)],
        };
        let proof = match known_size {
            Some(k) if k > head.tree_size => {
                return vec![err(
                    scope,
                    ErrorCode::OutOfRange,
                    format!("known size {k} is larger than the log ({})", head.tree_size),
                )];
            }
            Some(k) if k > 0 && k < head.tree_size => {
                match self.directory.consistency(k, &head).await {
                    Ok(p) => p,
                    Err(e) => return vec![internal(scope, e)],
                }
            }
            _ => Vec::new(),
        };
        #[cfg(feature = "hostile")]
        let (head, proof) = self.forge_head(head, proof, known_size).await;
        vec![ServerFrame::TreeHead {
            request_id,
            signed_head: head.to_bytes().to_vec(),
            consistency_proof: proof,
        }]
    }

    #[cfg(feature = "hostile")]
    async fn forge_head(
        &self,
        head: chat_signing::tree_head::SignedTreeHead,
        proof: Vec<[u8; 32]>,
        known_size: Option<u64>,
    ) -> (chat_signing::tree_head::SignedTreeHead, Vec<[u8; 32]>) {
        use crate::hostile::ForgedHead;
        let Some(h) = &self.hostile else {
            return (head, proof);
        };
        let leaves = self.directory.leaves(0, u32::MAX).await.unwrap_or_default();
        match h.head(&head, &leaves, known_size) {
            ForgedHead::Honest => (head, proof),
            ForgedHead::Signed(forged) => (forged, proof),
            ForgedHead::Unsigned { size, root, proof } => {
                (self.directory.sign_forged(size, &root), proof)
            }
        }
    }

    async fn inclusion(
        &self,
        request_id: u32,
        username: String,
        device_id: u32,
    ) -> Vec<ServerFrame> {
        let scope = ErrorScope::Request(request_id);
        let head = match self.directory.head().await {
            Ok(h) => h,
            Err(e) => return vec![internal(scope, e)],
        };
        let (leaf_index, proof) = match self.directory.inclusion(&username, device_id, &head).await
        {
            Ok(Some(found)) => found,
            Ok(None) => {
                return vec![err(
                    scope,
                    ErrorCode::UnknownDevice,
                    format!("{username} device {device_id} is not in the directory"),
                )];
            }
            Err(e) => return vec![internal(scope, e)],
        };
        let leaf = match self.directory.leaves(leaf_index, 1).await {
            Ok(mut leaves) if leaves.len() == 1 => leaves.remove(0),
            Ok(_) => return vec![internal(scope, "leaf missing from the store")],
            Err(e) => return vec![internal(scope, e)],
        };
        #[cfg(feature = "hostile")]
        let leaf = match &self.hostile {
            Some(h) => h.leaf(leaf),
            None => leaf,
        };
        vec![ServerFrame::Inclusion {
            request_id,
            leaf,
            leaf_index,
            tree_size: head.tree_size,
            proof,
        }]
    }

    async fn get_leaves(&self, request_id: u32, start: u64, count: u32) -> Vec<ServerFrame> {
        let scope = ErrorScope::Request(request_id);
        let count = count.min(MAX_LEAVES_PER_FRAME as u32);
        match self.directory.leaves(start, count).await {
            Ok(leaves) => vec![ServerFrame::Leaves {
                request_id,
                start,
                leaves,
            }],
            Err(e) => vec![internal(scope, e)],
        }
    }
}

fn not_authenticated(scope: ErrorScope) -> ServerFrame {
    err(scope, ErrorCode::NotAuthenticated, "log in first")
}

/// An internal error: logged with detail, reported without it.
fn internal(scope: ErrorScope, e: impl std::fmt::Display) -> ServerFrame {
    tracing::error!(error = %e, "internal error");
    err(scope, ErrorCode::Internal, "internal server error")
}

/// The identity binding (Ed25519 over X25519) and the signed prekey must verify.
fn verify_device_keys(device: &DeviceRecord) -> Result<(), String> {
    let identity = IdentityPublic::from_parts(
        &device.identity_ed25519,
        &device.identity_x25519,
        &device.identity_signature,
    )
    .map_err(|e| format!("identity keys: {e}"))?;
    let spk = signed_prekey(&device.signed_prekey);
    spk.verify(&identity)
        .map_err(|e| format!("signed prekey: {e}"))
}

fn signed_prekey(wire: &SignedPrekey) -> SignedPreKey {
    SignedPreKey {
        id: wire.id,
        key: x25519_dalek::PublicKey::from(wire.public),
        signature: Signature::from_bytes(&wire.signature),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_recipients_are_a_user_and_device_and_the_oldest_makes_room() {
        let mut known = KnownRecipients::default();
        known.remember(&MailboxId::new("bob", 1));
        assert!(known.contains("bob", 1));
        assert!(!known.contains("bob", 2), "another device of bob");
        assert!(!known.contains("bo", 1), "a prefix of bob");
        for n in 0..KnownRecipients::MAX {
            known.remember(&MailboxId::new(format!("u{n}"), 1));
        }
        assert_eq!(known.0.len(), KnownRecipients::MAX);
        assert!(!known.contains("bob", 1), "the oldest made room");
        assert!(
            known.contains("u0", 1) && known.contains(&format!("u{}", KnownRecipients::MAX - 1), 1)
        );
    }

    #[test]
    fn mailbox_record_round_trips_and_refuses_truncation() {
        let record = MailboxRecord {
            from_user: "alice".into(),
            from_device: 1,
            server_time: 1_800_000_000,
            envelope: vec![7; 100],
        };
        let bytes = record.encode();
        assert_eq!(MailboxRecord::decode(&bytes), Ok(record));
        for cut in 0..bytes.len() {
            assert!(MailboxRecord::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn rate_limiter_allows_the_limit_then_refuses() {
        let limiter = RateLimiter::default();
        let addr: IpAddr = [127, 0, 0, 1].into();
        assert!((0..3).all(|_| limiter.allow(addr, 3)));
        assert!(!limiter.allow(addr, 3));
        assert!(limiter.allow([127, 0, 0, 2].into(), 3));
    }
}
