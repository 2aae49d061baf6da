//! Signal's Double Ratchet (<https://signal.org/docs/specifications/doubleratchet/>) seeded by
//! X3DH: a [`Session`] is created from a prekey bundle or an initial message, encrypts bytes to
//! bytes, decrypts bytes to bytes, and serialises to bytes.
//!
//! KDF_RK = HKDF-SHA256(salt = rk, ikm = DH output, info "ChatApp_Ratchet_v1") -> rk || ck;
//! KDF_CK: message key = HMAC-SHA256(ck, 0x01), next chain key = HMAC-SHA256(ck, 0x02); a message
//! key becomes a one-use ChaCha20-Poly1305 key through HKDF-Expand (PRK = message key, info
//! "ChatApp_MessageKey_v2"), used with the zero nonce. Plaintexts are [padded](crate::padding)
//! first and encrypted in place. The AEAD's associated
//! data is the X3DH AD followed by every message byte before the ciphertext (version, kind, the
//! X3DH header of an initial message, and the ratchet header: ratchet public key, PN, N).
//!
//! The sending half of a DH ratchet step is taken lazily, on the next [`Session::encrypt`]: so
//! decryption needs no randomness, and the result is the same protocol as the specification.
//!
//! Out-of-order messages: the keys of skipped messages are kept. One message may skip at most
//! [`MAX_SKIP`] keys per chain (the rest of the previous receiving chain, then the new one);
//! more is refused with [`SessionError::TooManySkipped`]. At most [`MAX_SKIPPED_KEYS`] are kept in
//! all; when more arrive the oldest stored keys are evicted first (those messages then fail with
//! [`SessionError::Replay`]). A key is deleted when its message decrypts, so every message
//! decrypts at most once; a second copy gets [`SessionError::Replay`].
//!
//! Decryption is transactional: all new state is computed aside and committed only after the
//! AEAD tag and the padding check pass, so a failed decryption changes nothing.

use std::collections::VecDeque;
use std::fmt;

#[cfg(test)]
use hmac::{Hmac, Mac};
use rand_core::CryptoRngCore;
#[cfg(test)]
use sha2::Sha256;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{DeviceKeys, IdentityKeyPair, IdentityPublic, PreKeyBundle};
use crate::padding::{self, PaddingError};
use crate::x3dh::{self, InitialHeader, X3dhError, contributory_dh};

/// Version byte of an encoded [`Session`].
pub const SESSION_VERSION: u8 = 1;
/// Version byte of every pairwise message on the wire.
pub const MESSAGE_VERSION: u8 = 2;
/// The most message keys one message may skip in one chain.
pub const MAX_SKIP: u32 = 1000;
/// The most skipped message keys a session keeps; the oldest are evicted first.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// The largest ciphertext accepted (16 MiB).
pub const MAX_CIPHERTEXT_LEN: usize = 1 << 24;
/// Past remote ratchet keys remembered, so that a late copy of an old message is reported as
/// a [`SessionError::Replay`] rather than as an authentication failure.
const MAX_PAST_REMOTE_RATCHETS: usize = 64;

const RATCHET_INFO: &[u8] = b"ChatApp_Ratchet_v1";
const MESSAGE_KEYS_INFO: &[u8] = b"ChatApp_MessageKey_v2";
const KIND_MESSAGE: u8 = 0;
const KIND_INITIAL: u8 = 1;
const AEAD_TAG_LEN: usize = chat_core_prims::TAG_LEN;

/// Why a session operation failed. A failed `decrypt` leaves the session unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("X3DH failed: {0}")]
    X3dh(#[from] X3dhError),
    #[error("malformed message or state: {0}")]
    Decode(#[from] DecodeError),
    #[error("expected an initial (prekey) message to start a session")]
    NotInitialMessage,
    #[error("message authentication failed (tampered, or not for this session)")]
    AuthenticationFailed,
    #[error("message already decrypted (replay), or its skipped key was evicted")]
    Replay,
    #[error("message would skip {requested} keys in one chain; the limit is {MAX_SKIP}")]
    TooManySkipped { requested: u64 },
    #[error("the peer's ratchet key is low-order (non-contributory X25519 output)")]
    NonContributoryRatchetKey,
    #[error("decrypted plaintext has {0}")]
    Padding(#[from] PaddingError),
    #[error("plaintext of {0} bytes is too long to encrypt")]
    MessageTooLong(usize),
    #[error("the session has no peer ratchet key yet, so it cannot send")]
    NotReadyToSend,
    #[error("the sending chain is exhausted; start a new session")]
    ChainExhausted,
}

// ---------------------------------------------------------------------------------------------
// Primitives shared with the group (sender key) protocol.

// The primitives themselves live in `chat-core-prims`, a crate of their own so that the wasm
// build can optimise them for speed and the rest of chat-core for size (see its docs).

/// HKDF-SHA256 into `out`, which must be at most 255 × 32 bytes (all callers use 32–64).
pub(crate) fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    chat_core_prims::hkdf_sha256(salt, ikm, info, out);
}

#[cfg(test)]
fn hmac_sha256(key: &[u8; 32], data: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(data);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// KDF_CK: (message key, next chain key) = (HMAC(ck, 0x01), HMAC(ck, 0x02)). The key is
/// hashed into HMAC's inner and outer states once and the keyed state cloned for both.
pub(crate) fn kdf_ck(chain_key: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    chat_core_prims::kdf_ck(chain_key)
}

/// KDF_RK: (root key, chain key).
fn kdf_rk(root_key: &[u8; 32], dh_out: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut okm = Zeroizing::new([0u8; 64]);
    hkdf_sha256(root_key, dh_out, RATCHET_INFO, okm.as_mut());
    let mut rk = Zeroizing::new([0u8; 32]);
    let mut ck = Zeroizing::new([0u8; 32]);
    rk.copy_from_slice(&okm[..32]);
    ck.copy_from_slice(&okm[32..]);
    (rk, ck)
}

/// The one-use AEAD key of a message key: HKDF-Expand(PRK = message key, `info`, 32 bytes),
/// i.e. HMAC(message key, info || 0x01). The message key is already uniformly random, so the
/// HKDF extract step is skipped (RFC 5869 §3.3).
fn aead_key(message_key: &[u8; 32], info: &[u8]) -> Zeroizing<[u8; 32]> {
    chat_core_prims::hkdf_expand_32(message_key, info)
}

/// Every AEAD key encrypts exactly one message, so the nonce is the constant zero: a nonce
/// derived from the same secret would add nothing.
const AEAD_NONCE: [u8; 12] = [0; 12];

fn aead_seal_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    buffer: &mut [u8],
) -> [u8; AEAD_TAG_LEN] {
    chat_core_prims::seal_in_place(key, nonce, aad, buffer)
}

fn aead_open_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    buffer: &mut [u8],
    tag: &[u8],
) -> Option<()> {
    let tag: &[u8; AEAD_TAG_LEN] = tag.try_into().ok()?;
    chat_core_prims::open_in_place(key, nonce, aad, buffer, tag)
}

/// Pads `plaintext` into `out` as a length-prefixed ciphertext (`u32 length || ciphertext ||
/// tag`), encrypted in place under a one-use message key (AEAD key derived with `info`).
pub(crate) fn seal_padded_into(
    message_key: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) {
    let padded_len = padding::padded_len(plaintext.len());
    let sealed_len = u32::try_from(padded_len + AEAD_TAG_LEN).unwrap_or(u32::MAX);
    out.reserve(4 + padded_len + AEAD_TAG_LEN);
    out.extend_from_slice(&sealed_len.to_be_bytes());
    let start = out.len();
    padding::pad_into(plaintext, out);
    let tag = aead_seal_in_place(
        &aead_key(message_key, info),
        &AEAD_NONCE,
        aad,
        &mut out[start..],
    );
    out.extend_from_slice(&tag);
}

/// Decrypts `ciphertext || tag` under a one-use message key and removes the padding. `None` when
/// the tag does not verify; a padding error after a valid tag is reported as such.
pub(crate) fn open_padded(
    message_key: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Result<Vec<u8>, PaddingError>> {
    let split = sealed.len().checked_sub(AEAD_TAG_LEN)?;
    let (ciphertext, tag) = sealed.split_at(split);
    let mut buffer = ciphertext.to_vec();
    aead_open_in_place(
        &aead_key(message_key, info),
        &AEAD_NONCE,
        aad,
        &mut buffer,
        tag,
    )?;
    Some(match padding::unpad(&buffer) {
        Ok(plaintext) => {
            let len = plaintext.len();
            buffer.truncate(len);
            Ok(buffer)
        }
        Err(e) => {
            buffer.zeroize();
            Err(e)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Wire format.

/// The ratchet header of a message: sender's current ratchet public key, PN, N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RatchetHeader {
    ratchet_key: [u8; 32],
    previous_chain_len: u32,
    n: u32,
}

/// A parsed message borrowing its bytes.
struct ParsedMessage<'a> {
    /// The X3DH header's bytes, not decoded: only [`Session::accept`] needs it
    /// ([`InitialHeader::decode`]).
    initial: Option<&'a [u8]>,
    header: RatchetHeader,
    /// Every byte before the ciphertext: authenticated as associated data.
    header_bytes: &'a [u8],
    ciphertext: &'a [u8],
}

impl<'a> ParsedMessage<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != MESSAGE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "message",
                version,
            });
        }
        let initial = match r.u8()? {
            KIND_MESSAGE => None,
            KIND_INITIAL => Some(InitialHeader::skip(&mut r)?),
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "message kind",
                    tag,
                });
            }
        };
        let header = RatchetHeader {
            ratchet_key: r.array()?,
            previous_chain_len: r.u32()?,
            n: r.u32()?,
        };
        let header_bytes = &bytes[..r.offset()];
        let ciphertext = r.bytes(MAX_CIPHERTEXT_LEN)?;
        r.finish()?;
        Ok(Self {
            initial,
            header,
            header_bytes,
            ciphertext,
        })
    }
}

/// The X3DH header of an initial message, or `None` for an ordinary message. Lets a client
/// decide between [`Session::accept`] (no session with this sender yet, or a new one) and
/// [`Session::decrypt`]. Nothing in it is verified yet: `accept` does that.
pub fn initial_header(message: &[u8]) -> Result<Option<InitialHeader>, SessionError> {
    Ok(ParsedMessage::parse(message)?
        .initial
        .map(InitialHeader::decode)
        .transpose()?)
}

// ---------------------------------------------------------------------------------------------
// Session state.

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct Chain {
    key: [u8; 32],
    n: u32,
}

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct SkippedKey {
    ratchet_key: [u8; 32],
    n: u32,
    message_key: [u8; 32],
}

/// The X3DH associated data (public: both identity keys), followed by the header of the message
/// at hand, so that the AEAD's associated data (AD || header) is built in one reused buffer
/// rather than allocated for every message.
#[derive(Clone)]
struct AssociatedData {
    buf: Vec<u8>,
    ad_len: usize,
}

impl AssociatedData {
    fn new(associated_data: Vec<u8>) -> Self {
        let ad_len = associated_data.len();
        let mut buf = associated_data;
        // Room for an ordinary message header (initial messages grow it once).
        buf.reserve(64);
        Self { buf, ad_len }
    }

    /// The X3DH associated data alone.
    fn x3dh(&self) -> &[u8] {
        &self.buf[..self.ad_len]
    }

    /// Makes the buffer `AD || header`.
    fn set_header(&mut self, header: &[u8]) {
        self.buf.truncate(self.ad_len);
        self.buf.extend_from_slice(header);
    }

    /// `AD || header`, after [`set_header`](Self::set_header).
    fn with_header(&self) -> &[u8] {
        &self.buf
    }
}

/// A pairwise Double Ratchet session with one remote device.
#[derive(Clone)]
pub struct Session {
    associated_data: AssociatedData,
    remote_identity: IdentityPublic,
    root_key: Zeroizing<[u8; 32]>,
    self_ratchet: StaticSecret,
    /// Cached public half of `self_ratchet` (not serialised; derived on decode).
    self_ratchet_public: PublicKey,
    remote_ratchet: Option<PublicKey>,
    send_chain: Option<Chain>,
    recv_chain: Option<Chain>,
    previous_send_count: u32,
    skipped: VecDeque<SkippedKey>,
    past_remote_ratchets: VecDeque<PublicKey>,
    /// Sent with every message until the peer's first reply arrives (initiator only).
    pending_initial: Option<InitialHeader>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("remote_identity", &self.remote_identity)
            .field("sent_in_chain", &self.send_chain.as_ref().map(|c| c.n))
            .field("received_in_chain", &self.recv_chain.as_ref().map(|c| c.n))
            .field("skipped_keys", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

/// Every secret field (root key, ratchet secret, chains, skipped keys) is wiped on drop.
impl ZeroizeOnDrop for Session {}

/// What a successful decryption will change, computed before anything is committed.
struct Staged {
    ratchet: Option<(Zeroizing<[u8; 32]>, PublicKey)>,
    recv_chain: Chain,
    new_skipped: Vec<SkippedKey>,
}

impl Session {
    /// Starts a session with the owner of `bundle` (verified first). The first messages carry
    /// the X3DH header until the peer replies.
    pub fn initiate(
        identity: &IdentityKeyPair,
        bundle: &PreKeyBundle,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, SessionError> {
        let agreement = x3dh::initiate(identity, bundle, rng)?;
        let self_ratchet = StaticSecret::random_from_rng(&mut *rng);
        let remote = bundle.signed_prekey.key;
        let dh_out = contributory_dh(&self_ratchet, &remote)
            .ok_or(SessionError::NonContributoryRatchetKey)?;
        let (root_key, chain_key) = kdf_rk(&agreement.shared_secret, &dh_out);
        Ok(Self {
            associated_data: AssociatedData::new(agreement.associated_data),
            remote_identity: bundle.identity,
            root_key,
            self_ratchet_public: PublicKey::from(&self_ratchet),
            self_ratchet,
            remote_ratchet: Some(remote),
            send_chain: Some(Chain {
                key: *chain_key,
                n: 0,
            }),
            recv_chain: None,
            previous_send_count: 0,
            skipped: VecDeque::new(),
            past_remote_ratchets: VecDeque::new(),
            pending_initial: Some(agreement.header),
        })
    }

    /// Accepts an initial message: runs X3DH as responder, decrypts the message, and only
    /// then consumes the one-time prekey it used. Returns the session and the plaintext.
    pub fn accept(keys: &mut DeviceKeys, message: &[u8]) -> Result<(Self, Vec<u8>), SessionError> {
        let parsed = ParsedMessage::parse(message)?;
        let header = InitialHeader::decode(parsed.initial.ok_or(SessionError::NotInitialMessage)?)?;
        let agreement = x3dh::respond_without_consuming(keys, &header)?;
        let self_ratchet = keys
            .signed_prekey_secret(header.signed_prekey_id)
            .ok_or(X3dhError::UnknownSignedPreKey(header.signed_prekey_id))?
            .secret()
            .clone();
        let mut session = Self {
            associated_data: AssociatedData::new(agreement.associated_data),
            remote_identity: header.sender,
            root_key: agreement.shared_secret,
            self_ratchet_public: PublicKey::from(&self_ratchet),
            self_ratchet,
            remote_ratchet: None,
            send_chain: None,
            recv_chain: None,
            previous_send_count: 0,
            skipped: VecDeque::new(),
            past_remote_ratchets: VecDeque::new(),
            pending_initial: None,
        };
        let plaintext = session.decrypt(message)?;
        if let Some(id) = header.one_time_prekey_id {
            keys.consume_one_time_prekey(id);
        }
        Ok((session, plaintext))
    }

    /// The peer's identity (compare it with the key directory; show safety numbers from it).
    pub fn remote_identity(&self) -> &IdentityPublic {
        &self.remote_identity
    }

    /// Pads and encrypts `plaintext` into a message. Needs randomness only when it starts a new
    /// sending chain (the first message after receiving a new ratchet key).
    pub fn encrypt(
        &mut self,
        plaintext: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, SessionError> {
        if padding::padded_len(plaintext.len()) > MAX_CIPHERTEXT_LEN - AEAD_TAG_LEN {
            return Err(SessionError::MessageTooLong(plaintext.len()));
        }
        if self.send_chain.is_none() {
            self.start_sending_chain(rng)?;
        }
        let Some(chain) = self.send_chain.as_ref() else {
            return Err(SessionError::NotReadyToSend);
        };
        let n = chain.n;
        let next_n = n.checked_add(1).ok_or(SessionError::ChainExhausted)?;
        let (message_key, next_key) = kdf_ck(&chain.key);

        let mut w =
            Writer::with_capacity(4 + 256 + padding::padded_len(plaintext.len()) + AEAD_TAG_LEN);
        w.u8(MESSAGE_VERSION);
        match &self.pending_initial {
            Some(initial) => {
                w.u8(KIND_INITIAL);
                initial.write(&mut w);
            }
            None => {
                w.u8(KIND_MESSAGE);
            }
        }
        w.fixed(self.self_ratchet_public.as_bytes())
            .u32(self.previous_send_count)
            .u32(n);
        let mut message = w.into_bytes();
        self.associated_data.set_header(&message);
        seal_padded_into(
            &message_key,
            MESSAGE_KEYS_INFO,
            self.associated_data.with_header(),
            plaintext,
            &mut message,
        );

        self.send_chain = Some(Chain {
            key: *next_key,
            n: next_n,
        });
        Ok(message)
    }

    /// The sending half of a DH ratchet step: a fresh ratchet key pair and a new sending chain.
    fn start_sending_chain(&mut self, rng: &mut impl CryptoRngCore) -> Result<(), SessionError> {
        let remote = self.remote_ratchet.ok_or(SessionError::NotReadyToSend)?;
        let self_ratchet = StaticSecret::random_from_rng(&mut *rng);
        let dh_out = contributory_dh(&self_ratchet, &remote)
            .ok_or(SessionError::NonContributoryRatchetKey)?;
        let (root_key, chain_key) = kdf_rk(&self.root_key, &dh_out);
        self.self_ratchet_public = PublicKey::from(&self_ratchet);
        self.self_ratchet = self_ratchet;
        self.root_key = root_key;
        self.send_chain = Some(Chain {
            key: *chain_key,
            n: 0,
        });
        Ok(())
    }

    /// Decrypts and unpads a message. Refuses replays, tampering and excessive skips; on any
    /// error the session is unchanged.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<Vec<u8>, SessionError> {
        let parsed = ParsedMessage::parse(message)?;
        let header = parsed.header;
        self.associated_data.set_header(parsed.header_bytes);
        let aad = self.associated_data.with_header();

        if let Some(pos) = self
            .skipped
            .iter()
            .position(|k| k.ratchet_key == header.ratchet_key && k.n == header.n)
        {
            let plaintext = open_padded(
                &self.skipped[pos].message_key,
                MESSAGE_KEYS_INFO,
                aad,
                parsed.ciphertext,
            )
            .ok_or(SessionError::AuthenticationFailed)??;
            self.skipped.remove(pos);
            self.pending_initial = None;
            return Ok(plaintext);
        }

        let staged = self.stage(&header)?;
        let (message_key, next_key) = kdf_ck(&staged.recv_chain.key);
        let plaintext = open_padded(&message_key, MESSAGE_KEYS_INFO, aad, parsed.ciphertext)
            .ok_or(SessionError::AuthenticationFailed)??;
        let next_n = staged.recv_chain.n.saturating_add(1);
        self.commit(
            staged,
            Chain {
                key: *next_key,
                n: next_n,
            },
        );
        Ok(plaintext)
    }

    /// Computes the receiving chain positioned at `header.n` (and a DH ratchet step when the
    /// header carries a new ratchet key) without touching `self`.
    fn stage(&self, header: &RatchetHeader) -> Result<Staged, SessionError> {
        // Ratchet keys are compared as bytes, like the skipped-key lookup (and the specification's
        // header.dh != state.DHr), not as field elements mod p.
        let remote = PublicKey::from(header.ratchet_key);
        let mut new_skipped = Vec::new();
        let current = self
            .remote_ratchet
            .is_some_and(|k| *k.as_bytes() == header.ratchet_key);
        let (ratchet, mut chain) = if current {
            match &self.recv_chain {
                Some(chain) if header.n >= chain.n => (None, chain.clone()),
                // Our own sending chain's peer key with no receiving chain: nothing to accept.
                Some(_) => return Err(SessionError::Replay),
                None => return Err(SessionError::AuthenticationFailed),
            }
        } else {
            if self
                .past_remote_ratchets
                .iter()
                .any(|k| *k.as_bytes() == header.ratchet_key)
            {
                return Err(SessionError::Replay);
            }
            if let (Some(current), Some(chain)) = (&self.remote_ratchet, &self.recv_chain) {
                let mut chain = chain.clone();
                skip(
                    &mut chain,
                    current,
                    header.previous_chain_len,
                    &mut new_skipped,
                )?;
            }
            let dh_out = contributory_dh(&self.self_ratchet, &remote)
                .ok_or(SessionError::NonContributoryRatchetKey)?;
            let (root_key, chain_key) = kdf_rk(&self.root_key, &dh_out);
            let chain = Chain {
                key: *chain_key,
                n: 0,
            };
            (Some((root_key, remote)), chain)
        };
        skip(&mut chain, &remote, header.n, &mut new_skipped)?;
        Ok(Staged {
            ratchet,
            recv_chain: chain,
            new_skipped,
        })
    }

    fn commit(&mut self, staged: Staged, recv_chain: Chain) {
        if let Some((root_key, remote)) = staged.ratchet {
            if let Some(old) = self.remote_ratchet.replace(remote) {
                self.past_remote_ratchets.push_back(old);
                if self.past_remote_ratchets.len() > MAX_PAST_REMOTE_RATCHETS {
                    self.past_remote_ratchets.pop_front();
                }
            }
            if let Some(send) = self.send_chain.take() {
                self.previous_send_count = send.n;
            }
            self.root_key = root_key;
        }
        self.recv_chain = Some(recv_chain);
        for key in staged.new_skipped {
            self.skipped.push_back(key);
        }
        while self.skipped.len() > MAX_SKIPPED_KEYS {
            self.skipped.pop_front();
        }
        self.pending_initial = None;
    }

    /// Serialises the whole state (version byte first). Store it encrypted at rest.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(512 + self.skipped.len() * 68);
        w.u8(SESSION_VERSION).bytes(self.associated_data.x3dh());
        self.remote_identity.write(&mut w);
        let self_ratchet = Zeroizing::new(self.self_ratchet.to_bytes());
        w.fixed(self.root_key.as_ref()).fixed(self_ratchet.as_ref());
        w.opt_fixed(
            self.remote_ratchet
                .as_ref()
                .map(|k| k.as_bytes().as_slice()),
        );
        for chain in [&self.send_chain, &self.recv_chain] {
            match chain {
                Some(c) => w.u8(1).fixed(&c.key).u32(c.n),
                None => w.u8(0),
            };
        }
        w.u32(self.previous_send_count);
        w.u32(self.skipped.len() as u32);
        for k in &self.skipped {
            w.fixed(&k.ratchet_key).u32(k.n).fixed(&k.message_key);
        }
        w.u32(self.past_remote_ratchets.len() as u32);
        for k in &self.past_remote_ratchets {
            w.fixed(k.as_bytes());
        }
        match &self.pending_initial {
            Some(h) => {
                w.u8(1);
                h.write(&mut w);
            }
            None => {
                w.u8(0);
            }
        }
        Zeroizing::new(w.into_bytes())
    }

    /// Restores a state written by [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != SESSION_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "session",
                version,
            });
        }
        let associated_data = r.bytes(256)?.to_vec();
        let remote_identity = IdentityPublic::read(&mut r)?;
        let root_key = Zeroizing::new(r.array::<32>()?);
        let self_ratchet = StaticSecret::from(*Zeroizing::new(r.array::<32>()?));
        let remote_ratchet = r.opt_array::<32>()?.map(PublicKey::from);
        let read_chain = |r: &mut Reader<'_>| -> Result<Option<Chain>, DecodeError> {
            Ok(if r.bool()? {
                Some(Chain {
                    key: r.array()?,
                    n: r.u32()?,
                })
            } else {
                None
            })
        };
        let send_chain = read_chain(&mut r)?;
        let recv_chain = read_chain(&mut r)?;
        let previous_send_count = r.u32()?;
        let skipped_len = r.u32()? as usize;
        if skipped_len > MAX_SKIPPED_KEYS {
            return Err(DecodeError::Invalid("skipped key count"));
        }
        let mut skipped = VecDeque::with_capacity(skipped_len);
        for _ in 0..skipped_len {
            skipped.push_back(SkippedKey {
                ratchet_key: r.array()?,
                n: r.u32()?,
                message_key: r.array()?,
            });
        }
        let past_len = r.u32()? as usize;
        if past_len > MAX_PAST_REMOTE_RATCHETS {
            return Err(DecodeError::Invalid("past ratchet key count"));
        }
        let mut past_remote_ratchets = VecDeque::with_capacity(past_len);
        for _ in 0..past_len {
            past_remote_ratchets.push_back(PublicKey::from(r.array::<32>()?));
        }
        let pending_initial = if r.bool()? {
            Some(InitialHeader::read(&mut r)?)
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            associated_data: AssociatedData::new(associated_data),
            remote_identity,
            root_key,
            self_ratchet_public: PublicKey::from(&self_ratchet),
            self_ratchet,
            remote_ratchet,
            send_chain,
            recv_chain,
            previous_send_count,
            skipped,
            past_remote_ratchets,
            pending_initial,
        })
    }
}

/// Advances `chain` to position `until`, collecting the keys it passes.
fn skip(
    chain: &mut Chain,
    ratchet_key: &PublicKey,
    until: u32,
    out: &mut Vec<SkippedKey>,
) -> Result<(), SessionError> {
    if until <= chain.n {
        return Ok(());
    }
    let requested = u64::from(until - chain.n);
    if requested > u64::from(MAX_SKIP) {
        return Err(SessionError::TooManySkipped { requested });
    }
    while chain.n < until {
        let (message_key, next_key) = kdf_ck(&chain.key);
        out.push(SkippedKey {
            ratchet_key: *ratchet_key.as_bytes(),
            n: chain.n,
            message_key: *message_key,
        });
        chain.key = *next_key;
        chain.n += 1;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn pair() -> (Session, Session) {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob_keys = DeviceKeys::generate(&mut OsRng);
        let otk = bob_keys.generate_one_time_prekeys(1, &mut OsRng)[0];
        let mut a = Session::initiate(&alice, &bob_keys.bundle(Some(otk.id)), &mut OsRng).unwrap();
        let first = a.encrypt(b"hello", &mut OsRng).unwrap();
        let (b, pt) = Session::accept(&mut bob_keys, &first).unwrap();
        assert_eq!(pt, b"hello");
        (a, b)
    }

    #[test]
    fn accept_consumes_the_one_time_prekey_only_on_success() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob_keys = DeviceKeys::generate(&mut OsRng);
        let otk = bob_keys.generate_one_time_prekeys(1, &mut OsRng)[0];
        let mut a = Session::initiate(&alice, &bob_keys.bundle(Some(otk.id)), &mut OsRng).unwrap();
        let mut first = a.encrypt(b"hello", &mut OsRng).unwrap();
        let last = first.len() - 1;
        first[last] ^= 1;
        assert_eq!(
            Session::accept(&mut bob_keys, &first).err(),
            Some(SessionError::AuthenticationFailed)
        );
        assert_eq!(bob_keys.one_time_prekeys().count(), 1);
        first[last] ^= 1;
        Session::accept(&mut bob_keys, &first).unwrap();
        assert_eq!(bob_keys.one_time_prekeys().count(), 0);
    }

    #[test]
    fn replayed_initial_message_cannot_start_a_second_session() {
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut bob_keys = DeviceKeys::generate(&mut OsRng);
        let otk = bob_keys.generate_one_time_prekeys(1, &mut OsRng)[0];
        let mut a = Session::initiate(&alice, &bob_keys.bundle(Some(otk.id)), &mut OsRng).unwrap();
        let first = a.encrypt(b"hello", &mut OsRng).unwrap();
        Session::accept(&mut bob_keys, &first).unwrap();
        assert_eq!(
            Session::accept(&mut bob_keys, &first).err(),
            Some(SessionError::X3dh(X3dhError::UnknownOneTimePreKey(otk.id)))
        );
    }

    #[test]
    fn initiator_stops_sending_the_x3dh_header_after_the_first_reply() {
        let (mut a, mut b) = pair();
        assert!(
            initial_header(&a.encrypt(b"x", &mut OsRng).unwrap())
                .unwrap()
                .is_some()
        );
        let reply = b.encrypt(b"y", &mut OsRng).unwrap();
        a.decrypt(&reply).unwrap();
        assert!(
            initial_header(&a.encrypt(b"z", &mut OsRng).unwrap())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn refuses_a_ratchet_message_where_an_initial_message_is_needed() {
        let (_, mut b) = pair();
        let mut bob_keys = DeviceKeys::generate(&mut OsRng);
        let msg = b.encrypt(b"y", &mut OsRng).unwrap();
        assert_eq!(
            Session::accept(&mut bob_keys, &msg).err(),
            Some(SessionError::NotInitialMessage)
        );
    }

    #[test]
    fn refuses_more_than_max_skip_in_one_chain() {
        let (mut a, mut b) = pair();
        for _ in 0..=MAX_SKIP {
            a.encrypt(b"skipped", &mut OsRng).unwrap();
        }
        let far = a.encrypt(b"far", &mut OsRng).unwrap();
        assert_eq!(
            b.decrypt(&far),
            Err(SessionError::TooManySkipped {
                requested: u64::from(MAX_SKIP) + 1
            })
        );
    }

    #[test]
    fn evicted_skipped_key_reports_replay() {
        let (mut a, mut b) = pair();
        let mut skipped_msgs = Vec::new();
        for _ in 0..3 {
            for _ in 0..MAX_SKIP {
                skipped_msgs.push(a.encrypt(b"s", &mut OsRng).unwrap());
            }
            let last = a.encrypt(b"last", &mut OsRng).unwrap();
            b.decrypt(&last).unwrap();
            let reply = b.encrypt(b"r", &mut OsRng).unwrap();
            a.decrypt(&reply).unwrap();
        }
        assert_eq!(b.skipped.len(), MAX_SKIPPED_KEYS);
        assert_eq!(b.decrypt(&skipped_msgs[0]), Err(SessionError::Replay));
        assert_eq!(b.decrypt(skipped_msgs.last().unwrap()).unwrap(), b"s");
    }

    #[test]
    fn failed_decryption_leaves_the_state_unchanged() {
        let (mut a, mut b) = pair();
        let m = a.encrypt(b"after", &mut OsRng).unwrap();
        let before = b.encode();
        let mut bad = m.clone();
        bad[10] ^= 0x40;
        assert!(b.decrypt(&bad).is_err());
        assert_eq!(*b.encode(), *before);
    }

    #[test]
    fn session_round_trips_through_encoding_and_keeps_working() {
        let (mut a, b) = pair();
        let mut b = Session::decode(&b.encode()).unwrap();
        let m = a.encrypt(b"after restore", &mut OsRng).unwrap();
        assert_eq!(b.decrypt(&m).unwrap(), b"after restore");
        let mut a = Session::decode(&a.encode()).unwrap();
        let r = b.encrypt(b"reply", &mut OsRng).unwrap();
        assert_eq!(a.decrypt(&r).unwrap(), b"reply");
    }

    #[test]
    fn refuses_a_session_state_with_an_unknown_version() {
        let (a, _) = pair();
        let mut bytes = a.encode().to_vec();
        bytes[0] = 2;
        assert!(matches!(
            Session::decode(&bytes),
            Err(DecodeError::UnsupportedVersion { version: 2, .. })
        ));
    }

    #[test]
    fn refuses_a_low_order_ratchet_key() {
        let (_, mut b) = pair();
        let mut w = Writer::new();
        w.u8(MESSAGE_VERSION)
            .u8(KIND_MESSAGE)
            .fixed(&[0; 32])
            .u32(0)
            .u32(0)
            .bytes(&[0; 80]);
        assert_eq!(
            b.decrypt(&w.into_bytes()),
            Err(SessionError::NonContributoryRatchetKey)
        );
    }

    #[test]
    fn hkdf_wrapper_matches_rfc5869_case_1() {
        let ikm = [0x0b; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; 42];
        hkdf_sha256(&salt, &ikm, &info, &mut okm);
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn hkdf_wrapper_matches_rfc5869_case_2() {
        let ikm: Vec<u8> = (0x00..=0x4f).collect();
        let salt: Vec<u8> = (0x60..=0xaf).collect();
        let info: Vec<u8> = (0xb0..=0xff).collect();
        let mut okm = [0u8; 82];
        hkdf_sha256(&salt, &ikm, &info, &mut okm);
        assert_eq!(
            hex::encode(okm),
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
             59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
             cc30c58179ec3e87c14c01d5c1f3434f1d87"
        );
    }

    #[test]
    fn hkdf_wrapper_matches_rfc5869_case_3_with_empty_salt_and_info() {
        let ikm = [0x0b; 22];
        let mut okm = [0u8; 42];
        hkdf_sha256(&[], &ikm, &[], &mut okm);
        assert_eq!(
            hex::encode(okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
        );
    }

    #[test]
    fn aead_wrapper_matches_rfc8439_section_2_8_2() {
        let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        let key: [u8; 32] =
            hex::decode("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = hex::decode("070000004041424344454647")
            .unwrap()
            .try_into()
            .unwrap();
        let expected = "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
                        3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36\
                        92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc\
                        3ff4def08e4b7a9de576d26586cec64b6116\
                        1ae10b594f09e26a7e902ecbd0600691";
        let mut buffer = plaintext.to_vec();
        let tag = aead_seal_in_place(&key, &nonce, &aad, &mut buffer);
        assert_eq!(
            hex::encode([buffer.as_slice(), tag.as_slice()].concat()),
            expected
        );
        aead_open_in_place(&key, &nonce, &aad, &mut buffer, &tag).unwrap();
        assert_eq!(buffer, plaintext);
    }

    #[test]
    fn message_aead_key_is_hkdf_expand_of_the_message_key() {
        // RFC 5869 test case 1's PRK and info, first 32 bytes of its OKM: the same function.
        let prk: [u8; 32] =
            hex::decode("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
                .unwrap()
                .try_into()
                .unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        assert_eq!(
            hex::encode(*aead_key(&prk, &info)),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
        assert_eq!(
            *aead_key(&prk, &info),
            *hmac_sha256(&prk, &[&info[..], &[1]].concat())
        );
    }

    #[test]
    fn a_sealed_message_has_the_padded_length_plus_prefix_and_tag() {
        let mut out = vec![0xAA];
        seal_padded_into(&[3; 32], b"info", b"aad", b"hello", &mut out);
        assert_eq!(out.len(), 1 + 4 + 64 + AEAD_TAG_LEN);
        assert_eq!(out[1..5], (64u32 + 16).to_be_bytes());
        let opened = open_padded(&[3; 32], b"info", b"aad", &out[5..])
            .unwrap()
            .unwrap();
        assert_eq!(opened, b"hello");
        assert!(open_padded(&[3; 32], b"info", b"aaD", &out[5..]).is_none());
        assert!(open_padded(&[3; 32], b"info", b"aad", &out[5..20]).is_none());
        assert!(open_padded(&[3; 32], b"info", b"aad", &[]).is_none());
    }

    #[test]
    fn chain_kdf_is_hmac_with_constants_one_and_two() {
        let ck = [7u8; 32];
        let (mk, next) = kdf_ck(&ck);
        assert_ne!(*mk, *next);
        assert_eq!(*mk, *hmac_sha256(&ck, &[1]));
        assert_eq!(*next, *hmac_sha256(&ck, &[2]));
    }
}
