//! The client-server wire protocol v1: frames, error and close codes, the envelope and the
//! directory leaf, all written with the one codec in [`crate::codec`].
//!
//! One WebSocket binary message is one frame: `[version = 1][tag][fields...]`. Decoding never
//! panics, refuses trailing bytes, unknown tags and every field over its limit (the `MAX_*`
//! consts). Encoding is canonical: `encode(decode(x)) == x` for every accepted `x`. The byte
//! layout of each frame is specified in `docs/PROTOCOL.md`.

use std::fmt;

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};

/// The protocol version, the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// The version byte of every [`Envelope`].
pub const ENVELOPE_VERSION: u8 = 1;
/// The version byte of every [`DirectoryLeaf`].
pub const DIRECTORY_LEAF_VERSION: u8 = 1;

/// Domain separation prefix of the login challenge signature, see [`login_challenge_message`].
pub const LOGIN_CHALLENGE_DOMAIN: &[u8] = b"chatapp-login-v1";

/// Fewest characters in a username.
pub const USERNAME_MIN_LEN: usize = 3;
/// Most characters (= bytes, usernames are ASCII) in a valid username.
pub const USERNAME_MAX_LEN: usize = 32;

/// Wire limit of a username field. Deliberately above [`USERNAME_MAX_LEN`] so that a name that is
/// merely too long reaches the server and gets `username_invalid` rather than `malformed_frame`.
pub const MAX_USERNAME_BYTES: usize = 64;
/// Limit of `Hello.client_name` and `ServerHello.server_name`.
pub const MAX_PEER_NAME_BYTES: usize = 64;
/// Hard wire limit of an envelope (and of the message inside one). Servers enforce their own,
/// lower limit ([`DEFAULT_MAX_ENVELOPE_BYTES`] unless configured) with `envelope_too_large`.
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;
/// The default server limit on an envelope, announced in `ServerHello.max_envelope_bytes`.
pub const DEFAULT_MAX_ENVELOPE_BYTES: u32 = 64 * 1024;
/// Most one-time prekeys in one `Register` or `UploadPrekeys` frame.
pub const MAX_ONE_TIME_PREKEYS_PER_FRAME: usize = 100;
/// Most device bundles in one `Bundle` frame.
pub const MAX_DEVICES_PER_BUNDLE: usize = 16;
/// Limit of the opaque signed tree head in `TreeHead`.
pub const MAX_TREE_HEAD_BYTES: usize = 512;
/// Limit of one encoded directory leaf.
pub const MAX_LEAF_BYTES: usize = 512;
/// Most hashes in an inclusion proof (a tree of at most 2^64 leaves).
pub const MAX_INCLUSION_PROOF_HASHES: usize = 64;
/// Most hashes in a consistency proof.
pub const MAX_CONSISTENCY_PROOF_HASHES: usize = 128;
/// Most leaves requested by `GetLeaves` and returned in one `Leaves` frame.
pub const MAX_LEAVES_PER_FRAME: usize = 256;
/// Limit of the human-readable text in `Error`.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;
/// Limit of one whole frame: every frame built within the field limits fits. Servers and
/// clients set their WebSocket maximum message size to this.
pub const MAX_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES + 1024;

/// A client-generated message id: random, and the same on every resend of one message.
pub type MessageId = [u8; 16];
/// A group id, chosen by the group's creator.
pub type GroupId = [u8; 16];
/// A SHA-256 node hash of the directory's Merkle tree.
pub type NodeHash = [u8; 32];

/// The signed prekey of a device: an X25519 public key signed by the device's Ed25519 identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPrekey {
    pub id: u32,
    pub public: [u8; 32],
    pub signature: [u8; 64],
}

/// A one-time X25519 prekey, handed out by the server at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneTimePrekey {
    pub id: u32,
    pub public: [u8; 32],
}

/// The public keys of one device, as handed out in a `Bundle` frame.
///
/// `identity_signature` is the Ed25519 signature by `identity_ed25519` over
/// `"ChatApp_IdentityDH_v1" || identity_x25519` that binds the two identity keys. Wherever the
/// three fields travel together (`Register`, `DeviceBundle`, `DirectoryLeaf`, `PreKeyMessage`),
/// `[1] || ed25519 || x25519 || signature` is exactly the 129-byte encoding of
/// [`crate::identity::IdentityPublic`], whose `decode` (and `from_parts`, taking the three fields)
/// checks the binding. The codec here does not verify it: decoding stays a pure byte-format check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundle {
    pub device_id: u32,
    pub identity_ed25519: [u8; 32],
    pub identity_x25519: [u8; 32],
    /// Ed25519 signature by `identity_ed25519` binding `identity_x25519`, see [`DeviceBundle`].
    pub identity_signature: [u8; 64],
    pub signed_prekey: SignedPrekey,
    /// `None` when the device has run out of one-time prekeys.
    pub one_time_prekey: Option<OneTimePrekey>,
    /// Index of the directory leaf holding these identity and signed prekeys.
    pub leaf_index: u64,
}

/// Every frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "`Register` (~280 bytes of inline keys) is rare and frames are handled one at a \
              time, never stored in bulk; boxing would cost an allocation and clumsier matching"
)]
pub enum ClientFrame {
    /// The first frame of every connection.
    Hello {
        protocol_version: u8,
        client_name: String,
    },
    /// Create an account (or add a device); answered by `Registered`.
    Register {
        username: String,
        device_id: u32,
        identity_ed25519: [u8; 32],
        identity_x25519: [u8; 32],
        /// Ed25519 signature by `identity_ed25519` over `identity_x25519`, see [`DeviceBundle`].
        identity_signature: [u8; 64],
        signed_prekey: SignedPrekey,
        one_time_prekeys: Vec<OneTimePrekey>,
    },
    /// Start a login; answered by `Challenge`.
    Login { username: String, device_id: u32 },
    /// Ed25519 signature by the device identity over [`login_challenge_message`]; answered by `Welcome`.
    LoginProof { signature: [u8; 64] },
    /// Add one-time prekeys; answered by `PrekeyStatus`.
    UploadPrekeys {
        one_time_prekeys: Vec<OneTimePrekey>,
    },
    /// Store an envelope in a device mailbox; answered by `SendAck` once durable.
    Send {
        message_id: MessageId,
        to_user: String,
        to_device: u32,
        envelope: Vec<u8>,
    },
    /// Every delivered envelope with `seq <= up_to_seq` may be deleted.
    Ack { up_to_seq: u64 },
    /// Ask for the key bundles of every device of a user; answered by `Bundle`.
    FetchBundle { request_id: u32, username: String },
    /// Ask for the latest signed tree head, with a consistency proof from `known_size`.
    GetTreeHead {
        request_id: u32,
        known_size: Option<u64>,
    },
    /// Ask for the inclusion proof of a device's current directory leaf.
    GetInclusion {
        request_id: u32,
        username: String,
        device_id: u32,
    },
    /// Ask for a range of directory leaves (auditors).
    GetLeaves {
        request_id: u32,
        start: u64,
        count: u32,
    },
    /// Liveness check; answered by `Pong` with the same nonce.
    Ping { nonce: u64 },
}

/// Every frame a server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// Answer to `Hello`.
    ServerHello {
        protocol_version: u8,
        server_name: String,
        /// The server's envelope limit (at most [`MAX_ENVELOPE_BYTES`]).
        max_envelope_bytes: u32,
    },
    /// Answer to `Register`: the account and device exist and their keys are in the directory.
    Registered {
        username: String,
        device_id: u32,
        leaf_index: u64,
    },
    /// Answer to `Login`: sign [`login_challenge_message`] over this nonce.
    Challenge { nonce: [u8; 32] },
    /// Answer to a valid `LoginProof`: the connection is authenticated.
    Welcome {
        username: String,
        device_id: u32,
        /// Sequence of the next envelope to be delivered (last acknowledged + 1).
        mailbox_next_seq: u64,
    },
    /// How many one-time prekeys the server holds for this device; after `UploadPrekeys`,
    /// and pushed after `Welcome` or a bundle fetch when the supply runs low.
    PrekeyStatus { available: u32 },
    /// The envelope with this id is durably stored (or was already: `duplicate`).
    SendAck {
        message_id: MessageId,
        duplicate: bool,
    },
    /// An envelope from the mailbox, pushed by the server.
    Deliver {
        seq: u64,
        message_id: MessageId,
        from_user: String,
        from_device: u32,
        /// Unix seconds at which the server stored the envelope.
        server_time: u64,
        envelope: Vec<u8>,
    },
    /// Answer to `FetchBundle`.
    Bundle {
        request_id: u32,
        username: String,
        devices: Vec<DeviceBundle>,
    },
    /// Answer to `GetTreeHead`: the opaque signed tree head and the consistency proof from the
    /// requested `known_size` (empty when none was given).
    TreeHead {
        request_id: u32,
        signed_head: Vec<u8>,
        consistency_proof: Vec<NodeHash>,
    },
    /// Answer to `GetInclusion`: the leaf and its audit path in the tree of `tree_size` leaves,
    /// the size of the latest signed head.
    Inclusion {
        request_id: u32,
        leaf: Vec<u8>,
        leaf_index: u64,
        tree_size: u64,
        proof: Vec<NodeHash>,
    },
    /// Answer to `GetLeaves`: the encoded leaves from index `start` on (maybe fewer than asked).
    Leaves {
        request_id: u32,
        start: u64,
        leaves: Vec<Vec<u8>>,
    },
    /// Something went wrong; `scope` says what the error refers to.
    Error {
        scope: ErrorScope,
        code: ErrorCode,
        message: String,
    },
    /// Answer to `Ping`.
    Pong { nonce: u64 },
}

/// What an `Error` frame refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorScope {
    /// The connection or the handshake step in progress (`Hello`, `Register`, `Login`, ...).
    Connection,
    /// The request with this `request_id`.
    Request(u32),
    /// The `Send` with this `message_id`.
    Message(MessageId),
}

/// Stable error codes of the `Error` frame. Numbers never change meaning; new codes get new numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    MalformedFrame = 100,
    UnsupportedVersion = 101,
    UnexpectedFrame = 102,
    NotAuthenticated = 200,
    BadSignature = 201,
    ChallengeExpiredOrReplayed = 202,
    UsernameInvalid = 300,
    UsernameTaken = 301,
    UnknownUser = 302,
    UnknownDevice = 303,
    NoPrekeys = 304,
    OutOfRange = 400,
    EnvelopeTooLarge = 500,
    MailboxFull = 501,
    RateLimited = 600,
    Internal = 900,
    Draining = 901,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 17] = [
        Self::MalformedFrame,
        Self::UnsupportedVersion,
        Self::UnexpectedFrame,
        Self::NotAuthenticated,
        Self::BadSignature,
        Self::ChallengeExpiredOrReplayed,
        Self::UsernameInvalid,
        Self::UsernameTaken,
        Self::UnknownUser,
        Self::UnknownDevice,
        Self::NoPrekeys,
        Self::OutOfRange,
        Self::EnvelopeTooLarge,
        Self::MailboxFull,
        Self::RateLimited,
        Self::Internal,
        Self::Draining,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn from_u16(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == code)
    }

    /// The stable snake_case name, as used in logs, metrics and `docs/PROTOCOL.md`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedFrame => "malformed_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnexpectedFrame => "unexpected_frame",
            Self::NotAuthenticated => "not_authenticated",
            Self::BadSignature => "bad_signature",
            Self::ChallengeExpiredOrReplayed => "challenge_expired_or_replayed",
            Self::UsernameInvalid => "username_invalid",
            Self::UsernameTaken => "username_taken",
            Self::UnknownUser => "unknown_user",
            Self::UnknownDevice => "unknown_device",
            Self::NoPrekeys => "no_prekeys",
            Self::OutOfRange => "out_of_range",
            Self::EnvelopeTooLarge => "envelope_too_large",
            Self::MailboxFull => "mailbox_full",
            Self::RateLimited => "rate_limited",
            Self::Internal => "internal",
            Self::Draining => "draining",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether the same request may succeed if retried later (with backoff).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::MailboxFull | Self::Internal | Self::Draining
        )
    }

    /// The code a server answers a frame it could not decode with.
    pub fn for_decode_error(err: &DecodeError) -> Self {
        match err {
            DecodeError::UnsupportedVersion { .. } => Self::UnsupportedVersion,
            _ => Self::MalformedFrame,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes, in the private range 4000-4999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// Orderly end of the session; do not reconnect automatically.
    Normal = 4000,
    /// The server is draining or shutting down: reconnect with full-jitter backoff and resume.
    Reconnect = 4001,
    /// The peer broke the protocol (undecodable or unexpected frames); a bug, do not retry blindly.
    ProtocolError = 4002,
    /// Login failed; do not reconnect without new credentials.
    AuthFailed = 4003,
    /// The client read too slowly or the server is overloaded: reconnect with backoff.
    Overloaded = 4004,
}

impl CloseCode {
    /// Every code, in numeric order.
    pub const ALL: [CloseCode; 5] = [
        Self::Normal,
        Self::Reconnect,
        Self::ProtocolError,
        Self::AuthFailed,
        Self::Overloaded,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn from_u16(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Reconnect => "reconnect",
            Self::ProtocolError => "protocol_error",
            Self::AuthFailed => "auth_failed",
            Self::Overloaded => "overloaded",
        }
    }

    /// Whether a client should reconnect (with backoff) and resume after this close.
    pub fn should_reconnect(self) -> bool {
        matches!(self, Self::Reconnect | Self::Overloaded)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The bytes a device signs to answer a login `Challenge`:
/// `"chatapp-login-v1" || nonce (32) || u32 len || username || device_id (u32 BE)`.
pub fn login_challenge_message(nonce: &[u8; 32], username: &str, device_id: u32) -> Vec<u8> {
    let mut w = Writer::with_capacity(LOGIN_CHALLENGE_DOMAIN.len() + 32 + 4 + username.len() + 4);
    w.fixed(LOGIN_CHALLENGE_DOMAIN)
        .fixed(nonce)
        .str(username)
        .u32(device_id);
    w.into_bytes()
}

/// Why a username is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UsernameError {
    #[error("username is {len} characters long; it needs at least {USERNAME_MIN_LEN}")]
    TooShort { len: usize },
    #[error("username is {len} characters long; at most {USERNAME_MAX_LEN} are allowed")]
    TooLong { len: usize },
    #[error("username must start with a lowercase letter a-z")]
    MustStartWithLetter,
    #[error(
        "username contains {ch:?} at position {index}; only a-z, 0-9, '_', '-' and '.' are allowed"
    )]
    InvalidCharacter { ch: char, index: usize },
}

/// Checks the username rules: 3 to 32 characters, each a lowercase ASCII letter, a digit, `_`,
/// `-` or `.`, the first a letter. Names are compared byte for byte; there is no case folding
/// because upper case is not allowed.
pub fn validate_username(name: &str) -> Result<(), UsernameError> {
    let len = name.chars().count();
    if len < USERNAME_MIN_LEN {
        return Err(UsernameError::TooShort { len });
    }
    if len > USERNAME_MAX_LEN {
        return Err(UsernameError::TooLong { len });
    }
    if let Some((index, ch)) = name
        .chars()
        .enumerate()
        .find(|(_, ch)| !matches!(ch, 'a'..='z' | '0'..='9' | '_' | '-' | '.'))
    {
        return Err(UsernameError::InvalidCharacter { ch, index });
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(UsernameError::MustStartWithLetter);
    }
    Ok(())
}

/// One entry of the key directory's append-only Merkle log: a device's keys at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryLeaf {
    pub username: String,
    pub device_id: u32,
    pub identity_ed25519: [u8; 32],
    pub identity_x25519: [u8; 32],
    /// Ed25519 signature by `identity_ed25519` over `identity_x25519`, see [`DeviceBundle`].
    pub identity_signature: [u8; 64],
    pub signed_prekey_id: u32,
    pub signed_prekey_public: [u8; 32],
    pub signed_prekey_signature: [u8; 64],
    /// 1 for the first keys of this (username, device), +1 on every key change.
    pub version: u64,
    /// Unix seconds at which the server appended the leaf.
    pub timestamp: u64,
}

impl DirectoryLeaf {
    /// `[1][username][device_id][ed25519][x25519][identity signature][spk id][spk public]
    /// [spk signature][version][timestamp]`: 253 bytes plus the username.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        w.u8(DIRECTORY_LEAF_VERSION).str(&self.username);
        DeviceKeyFields {
            device_id: self.device_id,
            identity_ed25519: self.identity_ed25519,
            identity_x25519: self.identity_x25519,
            identity_signature: self.identity_signature,
            signed_prekey: SignedPrekey {
                id: self.signed_prekey_id,
                public: self.signed_prekey_public,
                signature: self.signed_prekey_signature,
            },
        }
        .write(&mut w);
        w.u64(self.version).u64(self.timestamp);
        w.into_bytes()
    }

    /// Decodes a leaf and checks its username against [`validate_username`]: the log is a
    /// permanent record, and a leaf with an invalid name is evidence of a misbehaving server.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_LEAF_BYTES {
            return Err(DecodeError::TooLong {
                offset: 0,
                len: bytes.len(),
                limit: MAX_LEAF_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != DIRECTORY_LEAF_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "directory leaf",
                version,
            });
        }
        let username = r.str(MAX_USERNAME_BYTES)?.to_owned();
        if validate_username(&username).is_err() {
            return Err(DecodeError::Invalid("username in directory leaf"));
        }
        let keys = DeviceKeyFields::read(&mut r)?;
        let leaf = Self {
            username,
            device_id: keys.device_id,
            identity_ed25519: keys.identity_ed25519,
            identity_x25519: keys.identity_x25519,
            identity_signature: keys.identity_signature,
            signed_prekey_id: keys.signed_prekey.id,
            signed_prekey_public: keys.signed_prekey.public,
            signed_prekey_signature: keys.signed_prekey.signature,
            version: r.u64()?,
            timestamp: r.u64()?,
        };
        r.finish()?;
        Ok(leaf)
    }
}

/// What the `envelope` of `Send` and `Deliver` carries: opaque to the server, read by the
/// recipient's chat-core. The ratchet and group byte formats belong to their own modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// The first message of a pairwise session: X3DH inputs and the first ratchet message.
    PreKeyMessage {
        sender_identity_ed25519: [u8; 32],
        sender_identity_x25519: [u8; 32],
        /// Ed25519 signature by the sender's identity key over its X25519 key, see [`DeviceBundle`].
        sender_identity_signature: [u8; 64],
        ephemeral_x25519: [u8; 32],
        signed_prekey_id: u32,
        one_time_prekey_id: Option<u32>,
        message: Vec<u8>,
    },
    /// A Double Ratchet message of an established pairwise session.
    RatchetMessage { message: Vec<u8> },
    /// A sender-key message to a group.
    GroupMessage { group_id: GroupId, message: Vec<u8> },
    /// A sender key for a group, encrypted over the pairwise session by the groups module.
    SenderKeyDistribution { group_id: GroupId, message: Vec<u8> },
}

impl Envelope {
    const TAG_PREKEY: u8 = 1;
    const TAG_RATCHET: u8 = 2;
    const TAG_GROUP: u8 = 3;
    const TAG_SENDER_KEY_DISTRIBUTION: u8 = 4;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(ENVELOPE_VERSION);
        match self {
            Self::PreKeyMessage {
                sender_identity_ed25519,
                sender_identity_x25519,
                sender_identity_signature,
                ephemeral_x25519,
                signed_prekey_id,
                one_time_prekey_id,
                message,
            } => {
                w.u8(Self::TAG_PREKEY)
                    .fixed(sender_identity_ed25519)
                    .fixed(sender_identity_x25519)
                    .fixed(sender_identity_signature)
                    .fixed(ephemeral_x25519)
                    .u32(*signed_prekey_id);
                write_opt_u32(&mut w, *one_time_prekey_id);
                w.bytes(message);
            }
            Self::RatchetMessage { message } => {
                w.u8(Self::TAG_RATCHET).bytes(message);
            }
            Self::GroupMessage { group_id, message } => {
                w.u8(Self::TAG_GROUP).fixed(group_id).bytes(message);
            }
            Self::SenderKeyDistribution { group_id, message } => {
                w.u8(Self::TAG_SENDER_KEY_DISTRIBUTION)
                    .fixed(group_id)
                    .bytes(message);
            }
        }
        w.into_bytes()
    }

    /// Decodes an envelope of at most [`MAX_ENVELOPE_BYTES`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::TooLong {
                offset: 0,
                len: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "envelope",
                version,
            });
        }
        let envelope = match r.u8()? {
            Self::TAG_PREKEY => Self::PreKeyMessage {
                sender_identity_ed25519: r.array()?,
                sender_identity_x25519: r.array()?,
                sender_identity_signature: r.array()?,
                ephemeral_x25519: r.array()?,
                signed_prekey_id: r.u32()?,
                one_time_prekey_id: read_opt_u32(&mut r)?,
                message: r.bytes(MAX_ENVELOPE_BYTES)?.to_vec(),
            },
            Self::TAG_RATCHET => Self::RatchetMessage {
                message: r.bytes(MAX_ENVELOPE_BYTES)?.to_vec(),
            },
            Self::TAG_GROUP => Self::GroupMessage {
                group_id: r.array()?,
                message: r.bytes(MAX_ENVELOPE_BYTES)?.to_vec(),
            },
            Self::TAG_SENDER_KEY_DISTRIBUTION => Self::SenderKeyDistribution {
                group_id: r.array()?,
                message: r.bytes(MAX_ENVELOPE_BYTES)?.to_vec(),
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "envelope",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(envelope)
    }
}

mod client_tag {
    pub const HELLO: u8 = 0x01;
    pub const REGISTER: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const LOGIN_PROOF: u8 = 0x04;
    pub const UPLOAD_PREKEYS: u8 = 0x05;
    pub const SEND: u8 = 0x10;
    pub const ACK: u8 = 0x11;
    pub const FETCH_BUNDLE: u8 = 0x20;
    pub const GET_TREE_HEAD: u8 = 0x21;
    pub const GET_INCLUSION: u8 = 0x22;
    pub const GET_LEAVES: u8 = 0x23;
    pub const PING: u8 = 0x30;
}

mod server_tag {
    pub const SERVER_HELLO: u8 = 0x81;
    pub const REGISTERED: u8 = 0x82;
    pub const CHALLENGE: u8 = 0x83;
    pub const WELCOME: u8 = 0x84;
    pub const PREKEY_STATUS: u8 = 0x85;
    pub const SEND_ACK: u8 = 0x90;
    pub const DELIVER: u8 = 0x91;
    pub const BUNDLE: u8 = 0xA0;
    pub const TREE_HEAD: u8 = 0xA1;
    pub const INCLUSION: u8 = 0xA2;
    pub const LEAVES: u8 = 0xA3;
    pub const PONG: u8 = 0xB0;
    pub const ERROR: u8 = 0xF0;
}

impl ClientFrame {
    /// The frame type tag, the second byte of the frame.
    pub fn tag(&self) -> u8 {
        use client_tag::*;
        match self {
            Self::Hello { .. } => HELLO,
            Self::Register { .. } => REGISTER,
            Self::Login { .. } => LOGIN,
            Self::LoginProof { .. } => LOGIN_PROOF,
            Self::UploadPrekeys { .. } => UPLOAD_PREKEYS,
            Self::Send { .. } => SEND,
            Self::Ack { .. } => ACK,
            Self::FetchBundle { .. } => FETCH_BUNDLE,
            Self::GetTreeHead { .. } => GET_TREE_HEAD,
            Self::GetInclusion { .. } => GET_INCLUSION,
            Self::GetLeaves { .. } => GET_LEAVES,
            Self::Ping { .. } => PING,
        }
    }

    /// The frame type's snake_case name, for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Register { .. } => "register",
            Self::Login { .. } => "login",
            Self::LoginProof { .. } => "login_proof",
            Self::UploadPrekeys { .. } => "upload_prekeys",
            Self::Send { .. } => "send",
            Self::Ack { .. } => "ack",
            Self::FetchBundle { .. } => "fetch_bundle",
            Self::GetTreeHead { .. } => "get_tree_head",
            Self::GetInclusion { .. } => "get_inclusion",
            Self::GetLeaves { .. } => "get_leaves",
            Self::Ping { .. } => "ping",
        }
    }

    /// The request id of the frames that carry one.
    pub fn request_id(&self) -> Option<u32> {
        match self {
            Self::FetchBundle { request_id, .. }
            | Self::GetTreeHead { request_id, .. }
            | Self::GetInclusion { request_id, .. }
            | Self::GetLeaves { request_id, .. } => Some(*request_id),
            _ => None,
        }
    }

    /// The frame's bytes. Limits are not checked here: a frame built over a limit is refused
    /// by the peer's `decode`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.u8(PROTOCOL_VERSION).u8(self.tag());
        match self {
            Self::Hello {
                protocol_version,
                client_name,
            } => {
                w.u8(*protocol_version).str(client_name);
            }
            Self::Register {
                username,
                device_id,
                identity_ed25519,
                identity_x25519,
                identity_signature,
                signed_prekey,
                one_time_prekeys,
            } => {
                w.str(username)
                    .u32(*device_id)
                    .fixed(identity_ed25519)
                    .fixed(identity_x25519)
                    .fixed(identity_signature);
                write_signed_prekey(&mut w, signed_prekey);
                write_one_time_prekeys(&mut w, one_time_prekeys);
            }
            Self::Login {
                username,
                device_id,
            } => {
                w.str(username).u32(*device_id);
            }
            Self::LoginProof { signature } => {
                w.fixed(signature);
            }
            Self::UploadPrekeys { one_time_prekeys } => {
                write_one_time_prekeys(&mut w, one_time_prekeys);
            }
            Self::Send {
                message_id,
                to_user,
                to_device,
                envelope,
            } => {
                w.fixed(message_id)
                    .str(to_user)
                    .u32(*to_device)
                    .bytes(envelope);
            }
            Self::Ack { up_to_seq } => {
                w.u64(*up_to_seq);
            }
            Self::FetchBundle {
                request_id,
                username,
            } => {
                w.u32(*request_id).str(username);
            }
            Self::GetTreeHead {
                request_id,
                known_size,
            } => {
                w.u32(*request_id);
                write_opt_u64(&mut w, *known_size);
            }
            Self::GetInclusion {
                request_id,
                username,
                device_id,
            } => {
                w.u32(*request_id).str(username).u32(*device_id);
            }
            Self::GetLeaves {
                request_id,
                start,
                count,
            } => {
                w.u32(*request_id).u64(*start).u32(*count);
            }
            Self::Ping { nonce } => {
                w.u64(*nonce);
            }
        }
        w.into_bytes()
    }

    /// Decodes one frame; every malformed input is a [`DecodeError`], never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        use client_tag::*;
        let mut r = frame_reader(bytes)?;
        let frame = match r.u8()? {
            HELLO => Self::Hello {
                protocol_version: r.u8()?,
                client_name: r.str(MAX_PEER_NAME_BYTES)?.to_owned(),
            },
            REGISTER => Self::Register {
                username: read_username(&mut r)?,
                device_id: r.u32()?,
                identity_ed25519: r.array()?,
                identity_x25519: r.array()?,
                identity_signature: r.array()?,
                signed_prekey: read_signed_prekey(&mut r)?,
                one_time_prekeys: read_one_time_prekeys(&mut r)?,
            },
            LOGIN => Self::Login {
                username: read_username(&mut r)?,
                device_id: r.u32()?,
            },
            LOGIN_PROOF => Self::LoginProof {
                signature: r.array()?,
            },
            UPLOAD_PREKEYS => Self::UploadPrekeys {
                one_time_prekeys: read_one_time_prekeys(&mut r)?,
            },
            SEND => Self::Send {
                message_id: r.array()?,
                to_user: read_username(&mut r)?,
                to_device: r.u32()?,
                envelope: r.bytes(MAX_ENVELOPE_BYTES)?.to_vec(),
            },
            ACK => Self::Ack {
                up_to_seq: r.u64()?,
            },
            FETCH_BUNDLE => Self::FetchBundle {
                request_id: r.u32()?,
                username: read_username(&mut r)?,
            },
            GET_TREE_HEAD => Self::GetTreeHead {
                request_id: r.u32()?,
                known_size: read_opt_u64(&mut r)?,
            },
            GET_INCLUSION => Self::GetInclusion {
                request_id: r.u32()?,
                username: read_username(&mut r)?,
                device_id: r.u32()?,
            },
            GET_LEAVES => Self::GetLeaves {
                request_id: r.u32()?,
                start: r.u64()?,
                count: read_count(&mut r, MAX_LEAVES_PER_FRAME)?,
            },
            PING => Self::Ping { nonce: r.u64()? },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "client frame",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(frame)
    }
}

impl ServerFrame {
    /// An `Error` frame whose message is cut (at a character boundary) to
    /// [`MAX_ERROR_MESSAGE_BYTES`], so that it always decodes.
    pub fn error(scope: ErrorScope, code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut end = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self::Error {
            scope,
            code,
            message,
        }
    }

    /// The frame type tag, the second byte of the frame.
    pub fn tag(&self) -> u8 {
        use server_tag::*;
        match self {
            Self::ServerHello { .. } => SERVER_HELLO,
            Self::Registered { .. } => REGISTERED,
            Self::Challenge { .. } => CHALLENGE,
            Self::Welcome { .. } => WELCOME,
            Self::PrekeyStatus { .. } => PREKEY_STATUS,
            Self::SendAck { .. } => SEND_ACK,
            Self::Deliver { .. } => DELIVER,
            Self::Bundle { .. } => BUNDLE,
            Self::TreeHead { .. } => TREE_HEAD,
            Self::Inclusion { .. } => INCLUSION,
            Self::Leaves { .. } => LEAVES,
            Self::Pong { .. } => PONG,
            Self::Error { .. } => ERROR,
        }
    }

    /// The frame type's snake_case name, for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ServerHello { .. } => "server_hello",
            Self::Registered { .. } => "registered",
            Self::Challenge { .. } => "challenge",
            Self::Welcome { .. } => "welcome",
            Self::PrekeyStatus { .. } => "prekey_status",
            Self::SendAck { .. } => "send_ack",
            Self::Deliver { .. } => "deliver",
            Self::Bundle { .. } => "bundle",
            Self::TreeHead { .. } => "tree_head",
            Self::Inclusion { .. } => "inclusion",
            Self::Leaves { .. } => "leaves",
            Self::Pong { .. } => "pong",
            Self::Error { .. } => "error",
        }
    }

    /// The request id of the answers to requests (and of request-scoped errors).
    pub fn request_id(&self) -> Option<u32> {
        match self {
            Self::Bundle { request_id, .. }
            | Self::TreeHead { request_id, .. }
            | Self::Inclusion { request_id, .. }
            | Self::Leaves { request_id, .. } => Some(*request_id),
            Self::Error {
                scope: ErrorScope::Request(request_id),
                ..
            } => Some(*request_id),
            _ => None,
        }
    }

    /// The frame's bytes. Limits are not checked here: a frame built over a limit is refused
    /// by the peer's `decode`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.u8(PROTOCOL_VERSION).u8(self.tag());
        match self {
            Self::ServerHello {
                protocol_version,
                server_name,
                max_envelope_bytes,
            } => {
                w.u8(*protocol_version)
                    .str(server_name)
                    .u32(*max_envelope_bytes);
            }
            Self::Registered {
                username,
                device_id,
                leaf_index,
            } => {
                w.str(username).u32(*device_id).u64(*leaf_index);
            }
            Self::Challenge { nonce } => {
                w.fixed(nonce);
            }
            Self::Welcome {
                username,
                device_id,
                mailbox_next_seq,
            } => {
                w.str(username).u32(*device_id).u64(*mailbox_next_seq);
            }
            Self::PrekeyStatus { available } => {
                w.u32(*available);
            }
            Self::SendAck {
                message_id,
                duplicate,
            } => {
                w.fixed(message_id).bool(*duplicate);
            }
            Self::Deliver {
                seq,
                message_id,
                from_user,
                from_device,
                server_time,
                envelope,
            } => {
                w.u64(*seq)
                    .fixed(message_id)
                    .str(from_user)
                    .u32(*from_device)
                    .u64(*server_time)
                    .bytes(envelope);
            }
            Self::Bundle {
                request_id,
                username,
                devices,
            } => {
                w.u32(*request_id).str(username);
                write_count(&mut w, devices.len());
                for device in devices {
                    write_device_bundle(&mut w, device);
                }
            }
            Self::TreeHead {
                request_id,
                signed_head,
                consistency_proof,
            } => {
                w.u32(*request_id).bytes(signed_head);
                write_hashes(&mut w, consistency_proof);
            }
            Self::Inclusion {
                request_id,
                leaf,
                leaf_index,
                tree_size,
                proof,
            } => {
                w.u32(*request_id)
                    .bytes(leaf)
                    .u64(*leaf_index)
                    .u64(*tree_size);
                write_hashes(&mut w, proof);
            }
            Self::Leaves {
                request_id,
                start,
                leaves,
            } => {
                w.u32(*request_id).u64(*start);
                write_count(&mut w, leaves.len());
                for leaf in leaves {
                    w.bytes(leaf);
                }
            }
            Self::Error {
                scope,
                code,
                message,
            } => {
                match scope {
                    ErrorScope::Connection => w.u8(0),
                    ErrorScope::Request(id) => w.u8(1).u32(*id),
                    ErrorScope::Message(id) => w.u8(2).fixed(id),
                };
                w.u16(code.as_u16()).str(message);
            }
            Self::Pong { nonce } => {
                w.u64(*nonce);
            }
        }
        w.into_bytes()
    }

    /// Decodes one frame; every malformed input is a [`DecodeError`], never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        use server_tag::*;
        let mut r = frame_reader(bytes)?;
        let frame = match r.u8()? {
            SERVER_HELLO => Self::ServerHello {
                protocol_version: r.u8()?,
                server_name: r.str(MAX_PEER_NAME_BYTES)?.to_owned(),
                max_envelope_bytes: r.u32()?,
            },
            REGISTERED => Self::Registered {
                username: read_username(&mut r)?,
                device_id: r.u32()?,
                leaf_index: r.u64()?,
            },
            CHALLENGE => Self::Challenge { nonce: r.array()? },
            WELCOME => Self::Welcome {
                username: read_username(&mut r)?,
                device_id: r.u32()?,
                mailbox_next_seq: r.u64()?,
            },
            PREKEY_STATUS => Self::PrekeyStatus {
                available: r.u32()?,
            },
            SEND_ACK => Self::SendAck {
                message_id: r.array()?,
                duplicate: r.bool()?,
            },
            DELIVER => Self::Deliver {
                seq: r.u64()?,
                message_id: r.array()?,
                from_user: read_username(&mut r)?,
                from_device: r.u32()?,
                server_time: r.u64()?,
                envelope: r.bytes(MAX_ENVELOPE_BYTES)?.to_vec(),
            },
            BUNDLE => {
                let request_id = r.u32()?;
                let username = read_username(&mut r)?;
                let count = read_count(&mut r, MAX_DEVICES_PER_BUNDLE)?;
                let mut devices = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    devices.push(read_device_bundle(&mut r)?);
                }
                Self::Bundle {
                    request_id,
                    username,
                    devices,
                }
            }
            TREE_HEAD => Self::TreeHead {
                request_id: r.u32()?,
                signed_head: r.bytes(MAX_TREE_HEAD_BYTES)?.to_vec(),
                consistency_proof: read_hashes(&mut r, MAX_CONSISTENCY_PROOF_HASHES)?,
            },
            INCLUSION => Self::Inclusion {
                request_id: r.u32()?,
                leaf: r.bytes(MAX_LEAF_BYTES)?.to_vec(),
                leaf_index: r.u64()?,
                tree_size: r.u64()?,
                proof: read_hashes(&mut r, MAX_INCLUSION_PROOF_HASHES)?,
            },
            LEAVES => {
                let request_id = r.u32()?;
                let start = r.u64()?;
                let count = read_count(&mut r, MAX_LEAVES_PER_FRAME)?;
                let mut leaves = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    leaves.push(r.bytes(MAX_LEAF_BYTES)?.to_vec());
                }
                Self::Leaves {
                    request_id,
                    start,
                    leaves,
                }
            }
            ERROR => {
                let scope = match r.u8()? {
                    0 => ErrorScope::Connection,
                    1 => ErrorScope::Request(r.u32()?),
                    2 => ErrorScope::Message(r.array()?),
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            what: "error scope",
                            tag,
                        });
                    }
                };
                let code =
                    ErrorCode::from_u16(r.u16()?).ok_or(DecodeError::Invalid("error code"))?;
                Self::Error {
                    scope,
                    code,
                    message: r.str(MAX_ERROR_MESSAGE_BYTES)?.to_owned(),
                }
            }
            PONG => Self::Pong { nonce: r.u64()? },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "server frame",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(frame)
    }
}

/// Checks the frame size and version byte and returns a reader positioned at the tag.
fn frame_reader(bytes: &[u8]) -> Result<Reader<'_>, DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLong {
            offset: 0,
            len: bytes.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    let mut r = Reader::new(bytes);
    let version = r.u8()?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "frame",
            version,
        });
    }
    Ok(r)
}

fn read_username(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    Ok(r.str(MAX_USERNAME_BYTES)?.to_owned())
}

fn write_opt_u32(w: &mut Writer, v: Option<u32>) {
    match v {
        Some(v) => w.u8(1).u32(v),
        None => w.u8(0),
    };
}

fn read_opt_u32(r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
    Ok(if r.bool()? { Some(r.u32()?) } else { None })
}

fn write_opt_u64(w: &mut Writer, v: Option<u64>) {
    match v {
        Some(v) => w.u8(1).u64(v),
        None => w.u8(0),
    };
}

fn read_opt_u64(r: &mut Reader<'_>) -> Result<Option<u64>, DecodeError> {
    Ok(if r.bool()? { Some(r.u64()?) } else { None })
}

/// List counts are u32, like byte-string lengths.
fn write_count(w: &mut Writer, count: usize) {
    w.u32(u32::try_from(count).unwrap_or(u32::MAX));
}

/// A list count of at most `limit` items; over the limit is [`DecodeError::TooLong`] (whose
/// `len` and `limit` then count items, not bytes).
fn read_count(r: &mut Reader<'_>, limit: usize) -> Result<u32, DecodeError> {
    let offset = r.offset();
    let count = r.u32()?;
    if count as usize > limit {
        return Err(DecodeError::TooLong {
            offset,
            len: count as usize,
            limit,
        });
    }
    Ok(count)
}

fn write_signed_prekey(w: &mut Writer, spk: &SignedPrekey) {
    w.u32(spk.id).fixed(&spk.public).fixed(&spk.signature);
}

fn read_signed_prekey(r: &mut Reader<'_>) -> Result<SignedPrekey, DecodeError> {
    Ok(SignedPrekey {
        id: r.u32()?,
        public: r.array()?,
        signature: r.array()?,
    })
}

fn write_one_time_prekeys(w: &mut Writer, prekeys: &[OneTimePrekey]) {
    write_count(w, prekeys.len());
    for prekey in prekeys {
        w.u32(prekey.id).fixed(&prekey.public);
    }
}

fn read_one_time_prekeys(r: &mut Reader<'_>) -> Result<Vec<OneTimePrekey>, DecodeError> {
    let count = read_count(r, MAX_ONE_TIME_PREKEYS_PER_FRAME)?;
    let mut prekeys = Vec::with_capacity(count as usize);
    for _ in 0..count {
        prekeys.push(OneTimePrekey {
            id: r.u32()?,
            public: r.array()?,
        });
    }
    Ok(prekeys)
}

/// The key fields [`DeviceBundle`] and [`DirectoryLeaf`] share, laid out alike in both:
/// `[device_id][ed25519][x25519][identity signature][spk id][spk public][spk signature]`.
struct DeviceKeyFields {
    device_id: u32,
    identity_ed25519: [u8; 32],
    identity_x25519: [u8; 32],
    identity_signature: [u8; 64],
    signed_prekey: SignedPrekey,
}

impl DeviceKeyFields {
    fn write(&self, w: &mut Writer) {
        w.u32(self.device_id)
            .fixed(&self.identity_ed25519)
            .fixed(&self.identity_x25519)
            .fixed(&self.identity_signature);
        write_signed_prekey(w, &self.signed_prekey);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            device_id: r.u32()?,
            identity_ed25519: r.array()?,
            identity_x25519: r.array()?,
            identity_signature: r.array()?,
            signed_prekey: read_signed_prekey(r)?,
        })
    }
}

fn write_device_bundle(w: &mut Writer, device: &DeviceBundle) {
    DeviceKeyFields {
        device_id: device.device_id,
        identity_ed25519: device.identity_ed25519,
        identity_x25519: device.identity_x25519,
        identity_signature: device.identity_signature,
        signed_prekey: device.signed_prekey.clone(),
    }
    .write(w);
    match &device.one_time_prekey {
        Some(otk) => w.u8(1).u32(otk.id).fixed(&otk.public),
        None => w.u8(0),
    };
    w.u64(device.leaf_index);
}

fn read_device_bundle(r: &mut Reader<'_>) -> Result<DeviceBundle, DecodeError> {
    let keys = DeviceKeyFields::read(r)?;
    Ok(DeviceBundle {
        device_id: keys.device_id,
        identity_ed25519: keys.identity_ed25519,
        identity_x25519: keys.identity_x25519,
        identity_signature: keys.identity_signature,
        signed_prekey: keys.signed_prekey,
        one_time_prekey: if r.bool()? {
            Some(OneTimePrekey {
                id: r.u32()?,
                public: r.array()?,
            })
        } else {
            None
        },
        leaf_index: r.u64()?,
    })
}

fn write_hashes(w: &mut Writer, hashes: &[NodeHash]) {
    write_count(w, hashes.len());
    for hash in hashes {
        w.fixed(hash);
    }
}

fn read_hashes(r: &mut Reader<'_>, limit: usize) -> Result<Vec<NodeHash>, DecodeError> {
    let count = read_count(r, limit)?;
    let mut hashes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        hashes.push(r.array()?);
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spk() -> SignedPrekey {
        SignedPrekey {
            id: 7,
            public: [2; 32],
            signature: [3; 64],
        }
    }

    fn otks(n: usize) -> Vec<OneTimePrekey> {
        (0..n)
            .map(|i| OneTimePrekey {
                id: i as u32,
                public: [i as u8; 32],
            })
            .collect()
    }

    fn device(one_time_prekey: Option<OneTimePrekey>) -> DeviceBundle {
        DeviceBundle {
            device_id: 1,
            identity_ed25519: [4; 32],
            identity_x25519: [5; 32],
            identity_signature: [6; 64],
            signed_prekey: spk(),
            one_time_prekey,
            leaf_index: 9,
        }
    }

    fn leaf() -> DirectoryLeaf {
        DirectoryLeaf {
            username: "alice".into(),
            device_id: 1,
            identity_ed25519: [1; 32],
            identity_x25519: [2; 32],
            identity_signature: [6; 64],
            signed_prekey_id: 3,
            signed_prekey_public: [4; 32],
            signed_prekey_signature: [5; 64],
            version: 1,
            timestamp: 1_700_000_000,
        }
    }

    fn client_frames() -> Vec<ClientFrame> {
        vec![
            ClientFrame::Hello {
                protocol_version: 1,
                client_name: "chatctl/0.1".into(),
            },
            ClientFrame::Register {
                username: "alice".into(),
                device_id: 1,
                identity_ed25519: [1; 32],
                identity_x25519: [2; 32],
                identity_signature: [3; 64],
                signed_prekey: spk(),
                one_time_prekeys: otks(3),
            },
            ClientFrame::Login {
                username: "alice".into(),
                device_id: 1,
            },
            ClientFrame::LoginProof { signature: [9; 64] },
            ClientFrame::UploadPrekeys {
                one_time_prekeys: otks(0),
            },
            ClientFrame::Send {
                message_id: [8; 16],
                to_user: "bob".into(),
                to_device: 2,
                envelope: vec![1, 2, 3],
            },
            ClientFrame::Ack { up_to_seq: 42 },
            ClientFrame::FetchBundle {
                request_id: 1,
                username: "bob".into(),
            },
            ClientFrame::GetTreeHead {
                request_id: 2,
                known_size: None,
            },
            ClientFrame::GetTreeHead {
                request_id: 3,
                known_size: Some(10),
            },
            ClientFrame::GetInclusion {
                request_id: 4,
                username: "bob".into(),
                device_id: 2,
            },
            ClientFrame::GetLeaves {
                request_id: 5,
                start: 100,
                count: 256,
            },
            ClientFrame::Ping { nonce: 77 },
        ]
    }

    fn server_frames() -> Vec<ServerFrame> {
        vec![
            ServerFrame::ServerHello {
                protocol_version: 1,
                server_name: "chat-server/0.1".into(),
                max_envelope_bytes: DEFAULT_MAX_ENVELOPE_BYTES,
            },
            ServerFrame::Registered {
                username: "alice".into(),
                device_id: 1,
                leaf_index: 0,
            },
            ServerFrame::Challenge { nonce: [6; 32] },
            ServerFrame::Welcome {
                username: "alice".into(),
                device_id: 1,
                mailbox_next_seq: 1,
            },
            ServerFrame::PrekeyStatus { available: 100 },
            ServerFrame::SendAck {
                message_id: [8; 16],
                duplicate: true,
            },
            ServerFrame::Deliver {
                seq: 5,
                message_id: [8; 16],
                from_user: "bob".into(),
                from_device: 2,
                server_time: 1_700_000_000,
                envelope: vec![0; 300],
            },
            ServerFrame::Bundle {
                request_id: 1,
                username: "bob".into(),
                devices: vec![
                    device(None),
                    device(Some(OneTimePrekey {
                        id: 3,
                        public: [7; 32],
                    })),
                ],
            },
            ServerFrame::TreeHead {
                request_id: 2,
                signed_head: vec![1; 120],
                consistency_proof: vec![[1; 32], [2; 32]],
            },
            ServerFrame::Inclusion {
                request_id: 4,
                leaf: leaf().encode(),
                leaf_index: 3,
                tree_size: 8,
                proof: vec![[3; 32]; 3],
            },
            ServerFrame::Leaves {
                request_id: 5,
                start: 100,
                leaves: vec![leaf().encode(), vec![]],
            },
            ServerFrame::Error {
                scope: ErrorScope::Connection,
                code: ErrorCode::UsernameInvalid,
                message: "username must start with a lowercase letter a-z".into(),
            },
            ServerFrame::Error {
                scope: ErrorScope::Request(9),
                code: ErrorCode::UnknownUser,
                message: String::new(),
            },
            ServerFrame::Error {
                scope: ErrorScope::Message([8; 16]),
                code: ErrorCode::EnvelopeTooLarge,
                message: "envelope of 70000 bytes exceeds 65536".into(),
            },
            ServerFrame::Pong { nonce: 77 },
        ]
    }

    fn envelopes() -> Vec<Envelope> {
        vec![
            Envelope::PreKeyMessage {
                sender_identity_ed25519: [1; 32],
                sender_identity_x25519: [2; 32],
                sender_identity_signature: [11; 64],
                ephemeral_x25519: [3; 32],
                signed_prekey_id: 4,
                one_time_prekey_id: Some(5),
                message: vec![6; 40],
            },
            Envelope::PreKeyMessage {
                sender_identity_ed25519: [1; 32],
                sender_identity_x25519: [2; 32],
                sender_identity_signature: [11; 64],
                ephemeral_x25519: [3; 32],
                signed_prekey_id: 4,
                one_time_prekey_id: None,
                message: vec![],
            },
            Envelope::RatchetMessage {
                message: vec![7; 64],
            },
            Envelope::GroupMessage {
                group_id: [8; 16],
                message: vec![9; 10],
            },
            Envelope::SenderKeyDistribution {
                group_id: [8; 16],
                message: vec![10; 10],
            },
        ]
    }

    /// A frame with one field changed: `bytes[at..at+4]` (a u32 length or count) set to `value`.
    fn with_u32_at(mut bytes: Vec<u8>, at: usize, value: u32) -> Vec<u8> {
        bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
        bytes
    }

    #[test]
    fn every_client_frame_round_trips() {
        let frames = client_frames();
        let mut names: Vec<_> = frames.iter().map(ClientFrame::name).collect();
        names.dedup();
        assert_eq!(names.len(), 12, "a sample of every client frame type");
        for frame in frames {
            let bytes = frame.encode();
            assert_eq!(bytes[..2], [PROTOCOL_VERSION, frame.tag()]);
            assert_eq!(ClientFrame::decode(&bytes), Ok(frame));
        }
    }

    #[test]
    fn every_server_frame_round_trips() {
        let frames = server_frames();
        let mut names: Vec<_> = frames.iter().map(ServerFrame::name).collect();
        names.dedup();
        assert_eq!(names.len(), 13, "a sample of every server frame type");
        for frame in frames {
            let bytes = frame.encode();
            assert_eq!(bytes[..2], [PROTOCOL_VERSION, frame.tag()]);
            assert_eq!(ServerFrame::decode(&bytes), Ok(frame));
        }
    }

    #[test]
    fn every_envelope_round_trips() {
        for envelope in envelopes() {
            assert_eq!(Envelope::decode(&envelope.encode()), Ok(envelope));
        }
    }

    #[test]
    fn directory_leaf_round_trips() {
        assert_eq!(DirectoryLeaf::decode(&leaf().encode()), Ok(leaf()));
    }

    #[test]
    fn client_and_server_tags_are_disjoint_and_unique() {
        let client: Vec<u8> = client_frames().iter().map(ClientFrame::tag).collect();
        let server: Vec<u8> = server_frames().iter().map(ServerFrame::tag).collect();
        assert!(client.iter().all(|t| t & 0x80 == 0));
        assert!(server.iter().all(|t| t & 0x80 != 0));
        for frame in server_frames() {
            assert!(matches!(
                ClientFrame::decode(&frame.encode()),
                Err(DecodeError::UnknownTag { .. })
            ));
        }
    }

    #[test]
    fn frames_match_the_test_vectors_in_protocol_md() {
        let hello = ClientFrame::Hello {
            protocol_version: 1,
            client_name: "cli".into(),
        };
        assert_eq!(
            hex::encode(hello.encode()),
            "0101010000000363 6c69".replace(' ', "")
        );
        let ack = ClientFrame::Ack { up_to_seq: 258 };
        assert_eq!(hex::encode(ack.encode()), "01110000000000000102");
        let error = ServerFrame::Error {
            scope: ErrorScope::Request(7),
            code: ErrorCode::UnknownUser,
            message: "no".into(),
        };
        assert_eq!(
            hex::encode(error.encode()),
            "01f0010000000701 2e000000026e6f".replace(' ', "")
        );
    }

    #[test]
    fn refuses_an_unsupported_frame_version() {
        let mut bytes = ClientFrame::Ping { nonce: 1 }.encode();
        bytes[0] = 2;
        assert_eq!(
            ClientFrame::decode(&bytes),
            Err(DecodeError::UnsupportedVersion {
                what: "frame",
                version: 2
            })
        );
        let err = DecodeError::UnsupportedVersion {
            what: "frame",
            version: 2,
        };
        assert_eq!(
            ErrorCode::for_decode_error(&err),
            ErrorCode::UnsupportedVersion
        );
    }

    #[test]
    fn refuses_unknown_tags() {
        assert_eq!(
            ClientFrame::decode(&[1, 0x7f]),
            Err(DecodeError::UnknownTag {
                what: "client frame",
                tag: 0x7f
            })
        );
        assert_eq!(
            ServerFrame::decode(&[1, 0x01]),
            Err(DecodeError::UnknownTag {
                what: "server frame",
                tag: 0x01
            })
        );
        assert!(matches!(
            Envelope::decode(&[1, 9]),
            Err(DecodeError::UnknownTag { tag: 9, .. })
        ));
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut bytes = ClientFrame::Ack { up_to_seq: 1 }.encode();
        bytes.push(0);
        assert_eq!(
            ClientFrame::decode(&bytes),
            Err(DecodeError::TrailingBytes(1))
        );
        let mut bytes = leaf().encode();
        bytes.push(0);
        assert_eq!(
            DirectoryLeaf::decode(&bytes),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn refuses_every_strict_prefix_of_a_frame() {
        for frame in client_frames() {
            let bytes = frame.encode();
            for len in 0..bytes.len() {
                assert!(ClientFrame::decode(&bytes[..len]).is_err());
            }
        }
        for frame in server_frames() {
            let bytes = frame.encode();
            for len in 0..bytes.len() {
                assert!(ServerFrame::decode(&bytes[..len]).is_err());
            }
        }
    }

    #[test]
    fn refuses_an_unknown_error_code_without_panicking() {
        let mut bytes =
            ServerFrame::error(ErrorScope::Connection, ErrorCode::Internal, "").encode();
        bytes[3..5].copy_from_slice(&999u16.to_be_bytes());
        assert_eq!(
            ServerFrame::decode(&bytes),
            Err(DecodeError::Invalid("error code"))
        );
    }

    #[test]
    fn refuses_an_unknown_error_scope() {
        let mut bytes =
            ServerFrame::error(ErrorScope::Connection, ErrorCode::Internal, "").encode();
        bytes[2] = 3;
        assert!(matches!(
            ServerFrame::decode(&bytes),
            Err(DecodeError::UnknownTag {
                what: "error scope",
                tag: 3
            })
        ));
    }

    fn assert_too_long<T: fmt::Debug>(result: Result<T, DecodeError>, expected_limit: usize) {
        match result {
            Err(DecodeError::TooLong { limit, .. }) => assert_eq!(limit, expected_limit),
            other => panic!("expected TooLong with limit {expected_limit}, got {other:?}"),
        }
    }

    #[test]
    fn refuses_a_frame_over_max_frame_bytes() {
        assert_too_long(
            ClientFrame::decode(&vec![1; MAX_FRAME_BYTES + 1]),
            MAX_FRAME_BYTES,
        );
        assert_too_long(
            ServerFrame::decode(&vec![1; MAX_FRAME_BYTES + 1]),
            MAX_FRAME_BYTES,
        );
    }

    #[test]
    fn refuses_a_username_over_its_wire_limit() {
        let frame = ClientFrame::Login {
            username: "a".repeat(MAX_USERNAME_BYTES + 1),
            device_id: 1,
        };
        assert_too_long(ClientFrame::decode(&frame.encode()), MAX_USERNAME_BYTES);
        let at_limit = ClientFrame::Login {
            username: "a".repeat(MAX_USERNAME_BYTES),
            device_id: 1,
        };
        assert_eq!(
            ClientFrame::decode(&at_limit.encode()),
            Ok(at_limit),
            "an over-long but wire-legal name reaches the server for username_invalid"
        );
    }

    #[test]
    fn refuses_a_client_name_over_its_limit() {
        let frame = ClientFrame::Hello {
            protocol_version: 1,
            client_name: "x".repeat(MAX_PEER_NAME_BYTES + 1),
        };
        assert_too_long(ClientFrame::decode(&frame.encode()), MAX_PEER_NAME_BYTES);
    }

    #[test]
    fn refuses_an_envelope_over_the_hard_limit() {
        let send = |len| ClientFrame::Send {
            message_id: [0; 16],
            to_user: "bob".into(),
            to_device: 1,
            envelope: vec![0; len],
        };
        assert!(ClientFrame::decode(&send(MAX_ENVELOPE_BYTES).encode()).is_ok());
        assert_too_long(
            ClientFrame::decode(&send(MAX_ENVELOPE_BYTES + 1).encode()),
            MAX_ENVELOPE_BYTES,
        );
        let deliver = ServerFrame::Deliver {
            seq: 1,
            message_id: [0; 16],
            from_user: "bob".into(),
            from_device: 1,
            server_time: 0,
            envelope: vec![0; MAX_ENVELOPE_BYTES + 1],
        };
        assert_too_long(ServerFrame::decode(&deliver.encode()), MAX_ENVELOPE_BYTES);
        assert_too_long(
            Envelope::decode(&vec![1; MAX_ENVELOPE_BYTES + 1]),
            MAX_ENVELOPE_BYTES,
        );
    }

    #[test]
    fn refuses_too_many_one_time_prekeys() {
        let upload = |n| ClientFrame::UploadPrekeys {
            one_time_prekeys: otks(n),
        };
        assert!(ClientFrame::decode(&upload(MAX_ONE_TIME_PREKEYS_PER_FRAME).encode()).is_ok());
        assert_too_long(
            ClientFrame::decode(&upload(MAX_ONE_TIME_PREKEYS_PER_FRAME + 1).encode()),
            MAX_ONE_TIME_PREKEYS_PER_FRAME,
        );
    }

    #[test]
    fn refuses_a_huge_declared_count_without_allocating_it() {
        let bytes = with_u32_at(
            ClientFrame::UploadPrekeys {
                one_time_prekeys: vec![],
            }
            .encode(),
            2,
            u32::MAX,
        );
        assert_too_long(ClientFrame::decode(&bytes), MAX_ONE_TIME_PREKEYS_PER_FRAME);
    }

    #[test]
    fn refuses_too_many_leaves_requested_or_returned() {
        let get = |count| ClientFrame::GetLeaves {
            request_id: 1,
            start: 0,
            count,
        };
        assert_too_long(
            ClientFrame::decode(&get(MAX_LEAVES_PER_FRAME as u32 + 1).encode()),
            MAX_LEAVES_PER_FRAME,
        );
        let leaves = ServerFrame::Leaves {
            request_id: 1,
            start: 0,
            leaves: vec![vec![]; MAX_LEAVES_PER_FRAME + 1],
        };
        assert_too_long(ServerFrame::decode(&leaves.encode()), MAX_LEAVES_PER_FRAME);
        let big_leaf = ServerFrame::Leaves {
            request_id: 1,
            start: 0,
            leaves: vec![vec![0; MAX_LEAF_BYTES + 1]],
        };
        assert_too_long(ServerFrame::decode(&big_leaf.encode()), MAX_LEAF_BYTES);
    }

    #[test]
    fn refuses_too_many_devices_in_a_bundle() {
        let bundle = ServerFrame::Bundle {
            request_id: 1,
            username: "bob".into(),
            devices: vec![device(None); MAX_DEVICES_PER_BUNDLE + 1],
        };
        assert_too_long(
            ServerFrame::decode(&bundle.encode()),
            MAX_DEVICES_PER_BUNDLE,
        );
    }

    #[test]
    fn refuses_oversized_tree_heads_leaves_and_proofs() {
        let head = ServerFrame::TreeHead {
            request_id: 1,
            signed_head: vec![0; MAX_TREE_HEAD_BYTES + 1],
            consistency_proof: vec![],
        };
        assert_too_long(ServerFrame::decode(&head.encode()), MAX_TREE_HEAD_BYTES);
        let consistency = ServerFrame::TreeHead {
            request_id: 1,
            signed_head: vec![],
            consistency_proof: vec![[0; 32]; MAX_CONSISTENCY_PROOF_HASHES + 1],
        };
        assert_too_long(
            ServerFrame::decode(&consistency.encode()),
            MAX_CONSISTENCY_PROOF_HASHES,
        );
        let inclusion = |leaf_len, hashes| ServerFrame::Inclusion {
            request_id: 1,
            leaf: vec![0; leaf_len],
            leaf_index: 0,
            tree_size: 1,
            proof: vec![[0; 32]; hashes],
        };
        assert_too_long(
            ServerFrame::decode(&inclusion(MAX_LEAF_BYTES + 1, 0).encode()),
            MAX_LEAF_BYTES,
        );
        assert_too_long(
            ServerFrame::decode(&inclusion(0, MAX_INCLUSION_PROOF_HASHES + 1).encode()),
            MAX_INCLUSION_PROOF_HASHES,
        );
        let mut big_leaf = leaf().encode();
        big_leaf.resize(MAX_LEAF_BYTES + 1, 0);
        assert_too_long(DirectoryLeaf::decode(&big_leaf), MAX_LEAF_BYTES);
    }

    #[test]
    fn refuses_an_error_message_over_its_limit_and_the_constructor_cuts_it() {
        let raw = ServerFrame::Error {
            scope: ErrorScope::Connection,
            code: ErrorCode::Internal,
            message: "x".repeat(MAX_ERROR_MESSAGE_BYTES + 1),
        };
        assert_too_long(ServerFrame::decode(&raw.encode()), MAX_ERROR_MESSAGE_BYTES);
        let cut = ServerFrame::error(
            ErrorScope::Connection,
            ErrorCode::Internal,
            "é".repeat(MAX_ERROR_MESSAGE_BYTES),
        );
        let ServerFrame::Error { message, .. } = &cut else {
            panic!("not an error frame");
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert_eq!(ServerFrame::decode(&cut.encode()), Ok(cut));
    }

    #[test]
    fn frames_at_every_limit_fit_in_max_frame_bytes() {
        let long_name = "a".repeat(MAX_USERNAME_BYTES);
        let biggest = [
            ClientFrame::Send {
                message_id: [0; 16],
                to_user: long_name.clone(),
                to_device: 0,
                envelope: vec![0; MAX_ENVELOPE_BYTES],
            }
            .encode(),
            ClientFrame::Register {
                username: long_name.clone(),
                device_id: 0,
                identity_ed25519: [0; 32],
                identity_x25519: [0; 32],
                identity_signature: [0; 64],
                signed_prekey: spk(),
                one_time_prekeys: otks(MAX_ONE_TIME_PREKEYS_PER_FRAME),
            }
            .encode(),
            ServerFrame::Deliver {
                seq: 0,
                message_id: [0; 16],
                from_user: long_name.clone(),
                from_device: 0,
                server_time: 0,
                envelope: vec![0; MAX_ENVELOPE_BYTES],
            }
            .encode(),
            ServerFrame::Leaves {
                request_id: 0,
                start: 0,
                leaves: vec![vec![0; MAX_LEAF_BYTES]; MAX_LEAVES_PER_FRAME],
            }
            .encode(),
            ServerFrame::Bundle {
                request_id: 0,
                username: long_name,
                devices: vec![device(Some(otks(1)[0].clone())); MAX_DEVICES_PER_BUNDLE],
            }
            .encode(),
            ServerFrame::TreeHead {
                request_id: 0,
                signed_head: vec![0; MAX_TREE_HEAD_BYTES],
                consistency_proof: vec![[0; 32]; MAX_CONSISTENCY_PROOF_HASHES],
            }
            .encode(),
        ];
        for bytes in biggest {
            assert!(bytes.len() <= MAX_FRAME_BYTES, "{} bytes", bytes.len());
        }
    }

    #[test]
    fn error_codes_keep_their_numbers_and_names() {
        let table: Vec<(u16, &str)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.as_u16(), c.as_str()))
            .collect();
        assert_eq!(
            table,
            [
                (100, "malformed_frame"),
                (101, "unsupported_version"),
                (102, "unexpected_frame"),
                (200, "not_authenticated"),
                (201, "bad_signature"),
                (202, "challenge_expired_or_replayed"),
                (300, "username_invalid"),
                (301, "username_taken"),
                (302, "unknown_user"),
                (303, "unknown_device"),
                (304, "no_prekeys"),
                (400, "out_of_range"),
                (500, "envelope_too_large"),
                (501, "mailbox_full"),
                (600, "rate_limited"),
                (900, "internal"),
                (901, "draining"),
            ]
        );
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(code));
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
    }

    #[test]
    fn close_codes_keep_their_numbers_and_only_transient_ones_reconnect() {
        let table: Vec<(u16, &str, bool)> = CloseCode::ALL
            .iter()
            .map(|c| (c.as_u16(), c.as_str(), c.should_reconnect()))
            .collect();
        assert_eq!(
            table,
            [
                (4000, "normal", false),
                (4001, "reconnect", true),
                (4002, "protocol_error", false),
                (4003, "auth_failed", false),
                (4004, "overloaded", true),
            ]
        );
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(CloseCode::from_u16(1000), None);
        assert_eq!(CloseCode::from_u16(4005), None);
    }

    #[test]
    fn login_challenge_message_is_domain_separated_and_binds_name_and_device() {
        let nonce = [0xab; 32];
        let msg = login_challenge_message(&nonce, "alice", 2);
        let mut expected = b"chatapp-login-v1".to_vec();
        expected.extend_from_slice(&nonce);
        expected.extend_from_slice(&[0, 0, 0, 5]);
        expected.extend_from_slice(b"alice");
        expected.extend_from_slice(&[0, 0, 0, 2]);
        assert_eq!(msg, expected);
        assert_ne!(msg, login_challenge_message(&nonce, "alice", 3));
        assert_ne!(msg, login_challenge_message(&nonce, "alicf", 2));
    }

    #[test]
    fn accepts_valid_usernames() {
        for name in ["abc", "alice", "bob.smith", "x_1-2.3", &"a".repeat(32)] {
            assert_eq!(validate_username(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_invalid_usernames_with_the_reason() {
        assert_eq!(
            validate_username("ab"),
            Err(UsernameError::TooShort { len: 2 })
        );
        assert_eq!(
            validate_username(&"a".repeat(33)),
            Err(UsernameError::TooLong { len: 33 })
        );
        assert_eq!(
            validate_username("1abc"),
            Err(UsernameError::MustStartWithLetter)
        );
        assert_eq!(
            validate_username("_abc"),
            Err(UsernameError::MustStartWithLetter)
        );
        assert_eq!(
            validate_username("Alice"),
            Err(UsernameError::InvalidCharacter { ch: 'A', index: 0 })
        );
        assert_eq!(
            validate_username("al ice"),
            Err(UsernameError::InvalidCharacter { ch: ' ', index: 2 })
        );
        assert_eq!(
            validate_username("alicé"),
            Err(UsernameError::InvalidCharacter { ch: 'é', index: 4 })
        );
    }

    #[test]
    fn directory_leaf_is_253_bytes_plus_the_username() {
        let mut shortest = leaf();
        shortest.username = "abc".into();
        assert_eq!(shortest.encode().len(), 256);
        let mut longest = leaf();
        longest.username = "a".repeat(USERNAME_MAX_LEN);
        assert_eq!(longest.encode().len(), 285);
    }

    /// The bytes of a directory leaf and of a device bundle, spelled out field by field (not
    /// through the codec): these layouts are signed into the key directory and must not move.
    #[test]
    fn directory_leaf_and_device_bundle_encode_to_fixed_bytes() {
        let leaf_bytes = [
            &[1u8][..],
            &5u32.to_be_bytes(),
            b"alice",
            &1u32.to_be_bytes(),
            &[1; 32],
            &[2; 32],
            &[6; 64],
            &3u32.to_be_bytes(),
            &[4; 32],
            &[5; 64],
            &1u64.to_be_bytes(),
            &1_700_000_000u64.to_be_bytes(),
        ]
        .concat();
        assert_eq!(leaf().encode(), leaf_bytes);
        assert_eq!(DirectoryLeaf::decode(&leaf_bytes), Ok(leaf()));

        let otk = OneTimePrekey {
            id: 8,
            public: [10; 32],
        };
        let otk_bytes = [&[1u8][..], &8u32.to_be_bytes(), &[10; 32]].concat();
        for (bundle, otk_bytes) in [(device(None), vec![0u8]), (device(Some(otk)), otk_bytes)] {
            let expected = [
                &1u32.to_be_bytes()[..],
                &[4; 32],
                &[5; 32],
                &[6; 64],
                &7u32.to_be_bytes(),
                &[2; 32],
                &[3; 64],
                &otk_bytes,
                &9u64.to_be_bytes(),
            ]
            .concat();
            let mut w = Writer::new();
            write_device_bundle(&mut w, &bundle);
            assert_eq!(w.into_bytes(), expected);
            let mut r = Reader::new(&expected);
            assert_eq!(read_device_bundle(&mut r), Ok(bundle));
            assert_eq!(r.finish(), Ok(()));
        }
    }

    /// The wire's identity fields are the parts of an `IdentityPublic` as identity.rs makes it.
    #[test]
    fn identity_fields_carry_an_identity_that_verifies() {
        use crate::identity::{IDENTITY_PUBLIC_VERSION, IdentityKeyPair, IdentityPublic, KeyError};

        let encoded = IdentityKeyPair::generate(&mut rand_core::OsRng)
            .public()
            .encode();
        assert_eq!(encoded.len(), IdentityPublic::ENCODED_LEN);
        assert_eq!(encoded.len(), 1 + 32 + 32 + 64);
        let mut bundle = device(None);
        bundle.identity_ed25519.copy_from_slice(&encoded[1..33]);
        bundle.identity_x25519.copy_from_slice(&encoded[33..65]);
        bundle.identity_signature.copy_from_slice(&encoded[65..]);
        let frame = ServerFrame::Bundle {
            request_id: 1,
            username: "bob".into(),
            devices: vec![bundle],
        };
        let Ok(ServerFrame::Bundle { devices, .. }) = ServerFrame::decode(&frame.encode()) else {
            panic!("bundle does not round-trip");
        };
        let d = &devices[0];
        let parts = |x25519: &[u8; 32]| {
            [
                &[IDENTITY_PUBLIC_VERSION][..],
                &d.identity_ed25519,
                x25519,
                &d.identity_signature,
            ]
            .concat()
        };
        assert_eq!(parts(&d.identity_x25519), encoded);
        assert!(IdentityPublic::decode(&parts(&d.identity_x25519)).is_ok());
        let mut other_x25519 = d.identity_x25519;
        other_x25519[0] ^= 1;
        assert_eq!(
            IdentityPublic::decode(&parts(&other_x25519)),
            Err(KeyError::BadIdentitySignature)
        );
    }

    #[test]
    fn directory_leaf_with_an_invalid_username_is_refused() {
        let mut bad = leaf();
        bad.username = "Mallory".into();
        assert_eq!(
            DirectoryLeaf::decode(&bad.encode()),
            Err(DecodeError::Invalid("username in directory leaf"))
        );
    }

    #[test]
    fn directory_leaf_with_another_version_is_refused() {
        let mut bytes = leaf().encode();
        bytes[0] = 2;
        assert!(matches!(
            DirectoryLeaf::decode(&bytes),
            Err(DecodeError::UnsupportedVersion { version: 2, .. })
        ));
    }

    #[test]
    fn refuses_a_non_canonical_boolean() {
        let mut bytes = ServerFrame::SendAck {
            message_id: [0; 16],
            duplicate: true,
        }
        .encode();
        bytes[18] = 2;
        assert_eq!(
            ServerFrame::decode(&bytes),
            Err(DecodeError::Invalid("boolean"))
        );
    }
}
