//! Group messaging with Signal-style sender keys.
//!
//! Each member has its own sender key: a chain key (KDF_CK as in the pairwise ratchet) and an
//! Ed25519 signing key. It hands them out in a [`SenderKeyDistribution`], sent to every other
//! member over the pairwise [`Session`](crate::ratchet::Session)s. A group message is
//! `version || group id || sender || key id || iteration || ChaCha20-Poly1305 ciphertext ||
//! Ed25519 signature` (AEAD key from the message key by HKDF-Expand, info "ChatApp_SenderKey_v2",
//! zero nonce, as in the [pairwise ratchet](crate::ratchet)) (signature over `"ChatApp_GroupMessage_v1"` and every preceding byte; the
//! AEAD authenticates every byte before the ciphertext). Receivers follow each sender's chain and
//! keep skipped keys: at most [`MAX_GROUP_SKIP`] per message and [`MAX_SKIPPED_PER_SENDER`] per
//! sender, evicting the oldest first. A message decrypts at most once.
//!
//! Removing a member: every remaining member calls [`GroupState::remove_member`], which forgets
//! the removed member's key and replaces its own sender key; the new distributions go only to the
//! remaining members, so the removed member cannot decrypt anything sent afterwards. Only the
//! newest sender key of each member is kept: a message in flight under a sender's replaced key is
//! refused with [`GroupError::UnknownSenderKey`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::codec::{DecodeError, Reader, Writer};
use crate::padding::{self, PaddingError};
use crate::ratchet::{MAX_CIPHERTEXT_LEN, kdf_ck, open_padded, seal_padded_into};

/// Version byte of an encoded [`GroupState`].
pub const GROUP_STATE_VERSION: u8 = 1;
/// Version byte of an encoded [`SenderKeyDistribution`].
pub const DISTRIBUTION_VERSION: u8 = 1;
/// Version byte of every group message.
pub const GROUP_MESSAGE_VERSION: u8 = 2;
/// The most message keys one group message may skip.
pub const MAX_GROUP_SKIP: u32 = 1000;
/// The most skipped message keys kept per sender; the oldest are evicted first.
pub const MAX_SKIPPED_PER_SENDER: usize = 2000;
/// The longest group id and member id.
pub const MAX_ID_LEN: usize = 256;
/// The most members a group state holds.
pub const MAX_MEMBERS: usize = 4096;

const SENDER_KEY_INFO: &[u8] = b"ChatApp_SenderKey_v2";
const SIGNATURE_CONTEXT: &[u8] = b"ChatApp_GroupMessage_v1";

/// Why a group operation failed. A failed `decrypt` leaves the state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GroupError {
    #[error("malformed group message or state: {0}")]
    Decode(#[from] DecodeError),
    #[error("the message or distribution is for another group")]
    WrongGroup,
    #[error("{0:?} is not a member of this group")]
    NotAMember(String),
    #[error("distribution names sender {named:?} but arrived from {from:?}")]
    SenderMismatch { named: String, from: String },
    #[error("no sender key from {0:?} yet (its distribution message has not arrived)")]
    UnknownSender(String),
    #[error("sender key {key_id} of {sender:?} is not the current one")]
    UnknownSenderKey { sender: String, key_id: u32 },
    #[error("the sender's signature does not verify")]
    BadSignature,
    #[error("message authentication failed")]
    AuthenticationFailed,
    #[error("message already decrypted (replay), or its skipped key was evicted")]
    Replay,
    #[error("message would skip {requested} keys; the limit is {MAX_GROUP_SKIP}")]
    TooManySkipped { requested: u64 },
    #[error("decrypted plaintext has {0}")]
    Padding(#[from] PaddingError),
    #[error("plaintext of {0} bytes is too long to encrypt")]
    MessageTooLong(usize),
    #[error("the sender key's chain is exhausted; rotate it")]
    ChainExhausted,
    #[error("id of {0} bytes is longer than {MAX_ID_LEN}")]
    IdTooLong(usize),
    #[error("the group already has the maximum of {MAX_MEMBERS} members")]
    TooManyMembers,
}

/// A member's sender key as handed to the other members (contains the chain key: send it only
/// over a pairwise session).
#[derive(Clone, PartialEq, Eq)]
pub struct SenderKeyDistribution {
    pub group_id: Vec<u8>,
    pub sender: String,
    pub key_id: u32,
    pub iteration: u32,
    chain_key: Zeroizing<[u8; 32]>,
    pub signing_key: VerifyingKey,
}

impl fmt::Debug for SenderKeyDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKeyDistribution")
            .field("sender", &self.sender)
            .field("key_id", &self.key_id)
            .field("iteration", &self.iteration)
            .finish_non_exhaustive()
    }
}

/// The chain key is `Zeroizing`.
impl ZeroizeOnDrop for SenderKeyDistribution {}

impl SenderKeyDistribution {
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(128 + self.group_id.len() + self.sender.len());
        w.u8(DISTRIBUTION_VERSION)
            .bytes(&self.group_id)
            .str(&self.sender)
            .u32(self.key_id)
            .u32(self.iteration)
            .fixed(self.chain_key.as_ref())
            .fixed(self.signing_key.as_bytes());
        Zeroizing::new(w.into_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != DISTRIBUTION_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "sender key distribution",
                version,
            });
        }
        let group_id = r.bytes(MAX_ID_LEN)?.to_vec();
        let sender = r.str(MAX_ID_LEN)?.to_owned();
        let key_id = r.u32()?;
        let iteration = r.u32()?;
        let chain_key = Zeroizing::new(r.array::<32>()?);
        let signing_key = read_verifying_key(&mut r)?;
        r.finish()?;
        Ok(Self {
            group_id,
            sender,
            key_id,
            iteration,
            chain_key,
            signing_key,
        })
    }
}

fn read_verifying_key(r: &mut Reader<'_>) -> Result<VerifyingKey, DecodeError> {
    let key = VerifyingKey::from_bytes(&r.array()?)
        .map_err(|_| DecodeError::Invalid("Ed25519 sender signing key"))?;
    if key.is_weak() {
        return Err(DecodeError::Invalid("weak Ed25519 sender signing key"));
    }
    Ok(key)
}

/// Our own sender key.
#[derive(Clone)]
struct OwnSenderKey {
    key_id: u32,
    iteration: u32,
    chain_key: Zeroizing<[u8; 32]>,
    signing: SigningKey,
}

impl OwnSenderKey {
    fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut chain_key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(chain_key.as_mut());
        Self {
            key_id: rng.next_u32(),
            iteration: 0,
            chain_key,
            signing: SigningKey::generate(rng),
        }
    }
}

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct SkippedGroupKey {
    iteration: u32,
    message_key: [u8; 32],
}

/// Another member's sender key as we follow it.
#[derive(Clone)]
struct ReceivedSenderKey {
    key_id: u32,
    /// The next iteration expected.
    iteration: u32,
    chain_key: Zeroizing<[u8; 32]>,
    verifying: VerifyingKey,
    skipped: VecDeque<SkippedGroupKey>,
}

/// A decrypted group message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlaintext {
    pub sender: String,
    pub plaintext: Vec<u8>,
}

struct ParsedGroupMessage<'a> {
    group_id: &'a [u8],
    sender: &'a str,
    key_id: u32,
    iteration: u32,
    /// Bytes before the ciphertext: the AEAD's associated data.
    header_bytes: &'a [u8],
    ciphertext: &'a [u8],
    /// Bytes before the signature: what is signed (after the context string).
    signed_bytes: &'a [u8],
    signature: Signature,
}

impl<'a> ParsedGroupMessage<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != GROUP_MESSAGE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "group message",
                version,
            });
        }
        let group_id = r.bytes(MAX_ID_LEN)?;
        let sender = r.str(MAX_ID_LEN)?;
        let key_id = r.u32()?;
        let iteration = r.u32()?;
        let header_bytes = &bytes[..r.offset()];
        let ciphertext = r.bytes(MAX_CIPHERTEXT_LEN)?;
        let signed_bytes = &bytes[..r.offset()];
        let signature = Signature::from_bytes(&r.array()?);
        r.finish()?;
        Ok(Self {
            group_id,
            sender,
            key_id,
            iteration,
            header_bytes,
            ciphertext,
            signed_bytes,
            signature,
        })
    }
}

/// One device's view of a group: the members, its own sender key and everyone else's.
#[derive(Clone)]
pub struct GroupState {
    group_id: Vec<u8>,
    own_id: String,
    /// The other members (never `own_id`).
    members: BTreeSet<String>,
    own: OwnSenderKey,
    received: BTreeMap<String, ReceivedSenderKey>,
}

impl fmt::Debug for GroupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupState")
            .field("group_id", &hex::encode(&self.group_id))
            .field("own_id", &self.own_id)
            .field("members", &self.members)
            .field("own_key_id", &self.own.key_id)
            .finish_non_exhaustive()
    }
}

/// Chain keys are `Zeroizing`, signing keys and skipped keys wipe themselves on drop.
impl ZeroizeOnDrop for GroupState {}

fn check_id(id: &[u8]) -> Result<(), GroupError> {
    if id.len() > MAX_ID_LEN {
        return Err(GroupError::IdTooLong(id.len()));
    }
    Ok(())
}

impl GroupState {
    /// Joins (or creates) group `group_id` as `own_id` with the other `members`, generating our
    /// sender key. Send [`own_distribution`](Self::own_distribution) to each member.
    pub fn new<'m>(
        group_id: &[u8],
        own_id: &str,
        members: impl IntoIterator<Item = &'m str>,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, GroupError> {
        check_id(group_id)?;
        check_id(own_id.as_bytes())?;
        let mut state = Self {
            group_id: group_id.to_vec(),
            own_id: own_id.to_owned(),
            members: BTreeSet::new(),
            own: OwnSenderKey::generate(rng),
            received: BTreeMap::new(),
        };
        for m in members {
            state.add_member(m)?;
        }
        Ok(state)
    }

    /// The other members.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(String::as_str)
    }

    /// Our sender key at its current iteration, for the other members.
    pub fn own_distribution(&self) -> SenderKeyDistribution {
        SenderKeyDistribution {
            group_id: self.group_id.clone(),
            sender: self.own_id.clone(),
            key_id: self.own.key_id,
            iteration: self.own.iteration,
            chain_key: self.own.chain_key.clone(),
            signing_key: self.own.signing.verifying_key(),
        }
    }

    /// Adds a member and returns our distribution for it: it can read what we send from now on,
    /// not what we sent before.
    pub fn add_member(&mut self, member: &str) -> Result<SenderKeyDistribution, GroupError> {
        check_id(member.as_bytes())?;
        if member != self.own_id {
            if self.members.len() >= MAX_MEMBERS {
                return Err(GroupError::TooManyMembers);
            }
            self.members.insert(member.to_owned());
        }
        Ok(self.own_distribution())
    }

    /// Removes a member: forgets its sender key and replaces our own. Returns the new
    /// distribution addressed to each remaining member (send each over its pairwise session).
    pub fn remove_member(
        &mut self,
        member: &str,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<(String, SenderKeyDistribution)>, GroupError> {
        if !self.members.remove(member) {
            return Err(GroupError::NotAMember(member.to_owned()));
        }
        self.received.remove(member);
        self.own = OwnSenderKey::generate(rng);
        let dist = self.own_distribution();
        Ok(self
            .members
            .iter()
            .map(|m| (m.clone(), dist.clone()))
            .collect())
    }

    /// Installs a member's sender key. `from` is the member the pairwise session that delivered
    /// it belongs to. Receiving the same key again is a no-op (it cannot rewind the chain).
    pub fn process_distribution(
        &mut self,
        from: &str,
        dist: &SenderKeyDistribution,
    ) -> Result<(), GroupError> {
        if dist.group_id != self.group_id {
            return Err(GroupError::WrongGroup);
        }
        if dist.sender != from {
            return Err(GroupError::SenderMismatch {
                named: dist.sender.clone(),
                from: from.to_owned(),
            });
        }
        if !self.members.contains(from) {
            return Err(GroupError::NotAMember(from.to_owned()));
        }
        if let Some(existing) = self.received.get(from) {
            if existing.key_id == dist.key_id && existing.verifying == dist.signing_key {
                return Ok(());
            }
        }
        self.received.insert(
            from.to_owned(),
            ReceivedSenderKey {
                key_id: dist.key_id,
                iteration: dist.iteration,
                chain_key: dist.chain_key.clone(),
                verifying: dist.signing_key,
                skipped: VecDeque::new(),
            },
        );
        Ok(())
    }

    /// Pads, encrypts and signs a group message.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, GroupError> {
        if padding::padded_len(plaintext.len()) > MAX_CIPHERTEXT_LEN - 16 {
            return Err(GroupError::MessageTooLong(plaintext.len()));
        }
        let iteration = self.own.iteration;
        let next = iteration.checked_add(1).ok_or(GroupError::ChainExhausted)?;
        let (message_key, next_key) = kdf_ck(&self.own.chain_key);
        // Built behind the signature context, which is signed but not sent.
        let mut w = Writer::with_capacity(
            SIGNATURE_CONTEXT.len() + 32 + 2 * MAX_ID_LEN + padding::padded_len(plaintext.len()),
        );
        w.fixed(SIGNATURE_CONTEXT)
            .u8(GROUP_MESSAGE_VERSION)
            .bytes(&self.group_id)
            .str(&self.own_id)
            .u32(self.own.key_id)
            .u32(iteration);
        let mut buffer = w.into_bytes();
        let header = buffer[SIGNATURE_CONTEXT.len()..].to_vec();
        seal_padded_into(
            &message_key,
            SENDER_KEY_INFO,
            &header,
            plaintext,
            &mut buffer,
        );
        let signature = self.own.signing.sign(&buffer);
        buffer.drain(..SIGNATURE_CONTEXT.len());
        buffer.extend_from_slice(&signature.to_bytes());
        let signed = buffer;
        self.own.chain_key = next_key;
        self.own.iteration = next;
        Ok(signed)
    }

    /// Verifies and decrypts a group message from another member. On error nothing changes.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<GroupPlaintext, GroupError> {
        let m = ParsedGroupMessage::parse(message)?;
        if m.group_id != self.group_id.as_slice() {
            return Err(GroupError::WrongGroup);
        }
        let state = self
            .received
            .get_mut(m.sender)
            .ok_or_else(|| GroupError::UnknownSender(m.sender.to_owned()))?;
        if state.key_id != m.key_id {
            return Err(GroupError::UnknownSenderKey {
                sender: m.sender.to_owned(),
                key_id: m.key_id,
            });
        }
        state
            .verifying
            .verify_strict(&[SIGNATURE_CONTEXT, m.signed_bytes].concat(), &m.signature)
            .map_err(|_| GroupError::BadSignature)?;

        let plaintext = if m.iteration < state.iteration {
            let pos = state
                .skipped
                .iter()
                .position(|k| k.iteration == m.iteration)
                .ok_or(GroupError::Replay)?;
            let plaintext = open_padded(
                &state.skipped[pos].message_key,
                SENDER_KEY_INFO,
                m.header_bytes,
                m.ciphertext,
            )
            .ok_or(GroupError::AuthenticationFailed)??;
            state.skipped.remove(pos);
            plaintext
        } else {
            let requested = u64::from(m.iteration - state.iteration);
            if requested > u64::from(MAX_GROUP_SKIP) {
                return Err(GroupError::TooManySkipped { requested });
            }
            let mut chain_key = state.chain_key.clone();
            let mut new_skipped = Vec::new();
            for iteration in state.iteration..m.iteration {
                let (message_key, next_key) = kdf_ck(&chain_key);
                new_skipped.push(SkippedGroupKey {
                    iteration,
                    message_key: *message_key,
                });
                chain_key = next_key;
            }
            let (message_key, next_key) = kdf_ck(&chain_key);
            let plaintext =
                open_padded(&message_key, SENDER_KEY_INFO, m.header_bytes, m.ciphertext)
                    .ok_or(GroupError::AuthenticationFailed)??;
            state.chain_key = next_key;
            state.iteration = m.iteration.saturating_add(1);
            state.skipped.extend(new_skipped);
            while state.skipped.len() > MAX_SKIPPED_PER_SENDER {
                state.skipped.pop_front();
            }
            plaintext
        };
        Ok(GroupPlaintext {
            sender: m.sender.to_owned(),
            plaintext,
        })
    }

    /// Serialises the whole state (version byte first). Store it encrypted at rest.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(256);
        w.u8(GROUP_STATE_VERSION)
            .bytes(&self.group_id)
            .str(&self.own_id);
        w.u32(self.members.len() as u32);
        for m in &self.members {
            w.str(m);
        }
        let signing = Zeroizing::new(self.own.signing.to_bytes());
        w.u32(self.own.key_id)
            .u32(self.own.iteration)
            .fixed(self.own.chain_key.as_ref())
            .fixed(signing.as_ref());
        w.u32(self.received.len() as u32);
        for (sender, k) in &self.received {
            w.str(sender)
                .u32(k.key_id)
                .u32(k.iteration)
                .fixed(k.chain_key.as_ref())
                .fixed(k.verifying.as_bytes());
            w.u32(k.skipped.len() as u32);
            for s in &k.skipped {
                w.u32(s.iteration).fixed(&s.message_key);
            }
        }
        Zeroizing::new(w.into_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != GROUP_STATE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "group state",
                version,
            });
        }
        let group_id = r.bytes(MAX_ID_LEN)?.to_vec();
        let own_id = r.str(MAX_ID_LEN)?.to_owned();
        let member_count = r.u32()? as usize;
        if member_count > MAX_MEMBERS {
            return Err(DecodeError::Invalid("group member count"));
        }
        let mut members = BTreeSet::new();
        for _ in 0..member_count {
            members.insert(r.str(MAX_ID_LEN)?.to_owned());
        }
        let key_id = r.u32()?;
        let iteration = r.u32()?;
        let chain_key = Zeroizing::new(r.array::<32>()?);
        let signing = SigningKey::from_bytes(&Zeroizing::new(r.array::<32>()?));
        let own = OwnSenderKey {
            key_id,
            iteration,
            chain_key,
            signing,
        };
        let received_count = r.u32()? as usize;
        if received_count > member_count {
            return Err(DecodeError::Invalid("sender key count"));
        }
        let mut received = BTreeMap::new();
        for _ in 0..received_count {
            let sender = r.str(MAX_ID_LEN)?.to_owned();
            let key_id = r.u32()?;
            let iteration = r.u32()?;
            let chain_key = Zeroizing::new(r.array::<32>()?);
            let verifying = read_verifying_key(&mut r)?;
            let skipped_count = r.u32()? as usize;
            if skipped_count > MAX_SKIPPED_PER_SENDER {
                return Err(DecodeError::Invalid("skipped group key count"));
            }
            let mut skipped = VecDeque::with_capacity(skipped_count);
            for _ in 0..skipped_count {
                skipped.push_back(SkippedGroupKey {
                    iteration: r.u32()?,
                    message_key: r.array()?,
                });
            }
            received.insert(
                sender,
                ReceivedSenderKey {
                    key_id,
                    iteration,
                    chain_key,
                    verifying,
                    skipped,
                },
            );
        }
        r.finish()?;
        Ok(Self {
            group_id,
            own_id,
            members,
            own,
            received,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    const GROUP: &[u8] = b"group-1";

    /// Three members who have exchanged distributions.
    fn trio() -> [GroupState; 3] {
        let names = ["alice", "bob", "carol"];
        let mut states: Vec<GroupState> = names
            .iter()
            .map(|me| {
                let others = names.iter().copied().filter(|n| n != me);
                GroupState::new(GROUP, me, others, &mut OsRng).unwrap()
            })
            .collect();
        let dists: Vec<_> = states.iter().map(GroupState::own_distribution).collect();
        for s in &mut states {
            for d in &dists {
                if d.sender != s.own_id {
                    let wire = SenderKeyDistribution::decode(&d.encode()).unwrap();
                    s.process_distribution(&d.sender, &wire).unwrap();
                }
            }
        }
        states.try_into().ok().unwrap()
    }

    #[test]
    fn every_member_decrypts_a_group_message() {
        let [mut a, mut b, mut c] = trio();
        let m = a.encrypt(b"hi all").unwrap();
        assert_eq!(b.decrypt(&m).unwrap().plaintext, b"hi all");
        assert_eq!(c.decrypt(&m).unwrap().sender, "alice");
    }

    #[test]
    fn out_of_order_group_messages_decrypt_once_each() {
        let [mut a, mut b, _] = trio();
        let msgs: Vec<_> = (0..5).map(|i| a.encrypt(&[i]).unwrap()).collect();
        for i in [3usize, 0, 4, 1, 2] {
            assert_eq!(b.decrypt(&msgs[i]).unwrap().plaintext, vec![i as u8]);
        }
        for m in &msgs {
            assert_eq!(b.decrypt(m), Err(GroupError::Replay));
        }
    }

    #[test]
    fn removed_member_cannot_decrypt_after_removal() {
        let [mut a, mut b, mut c] = trio();
        let before = a.encrypt(b"before").unwrap();
        assert!(c.decrypt(&before).is_ok());

        let from_a = a.remove_member("carol", &mut OsRng).unwrap();
        let from_b = b.remove_member("carol", &mut OsRng).unwrap();
        assert_eq!(from_a.len(), 1);
        assert_eq!(from_a[0].0, "bob");
        b.process_distribution("alice", &from_a[0].1).unwrap();
        a.process_distribution("bob", &from_b[0].1).unwrap();

        let after_a = a.encrypt(b"after").unwrap();
        let after_b = b.encrypt(b"after").unwrap();
        assert_eq!(b.decrypt(&after_a).unwrap().plaintext, b"after");
        assert_eq!(a.decrypt(&after_b).unwrap().plaintext, b"after");
        assert!(matches!(
            c.decrypt(&after_a),
            Err(GroupError::UnknownSenderKey { .. })
        ));
        assert!(matches!(
            c.decrypt(&after_b),
            Err(GroupError::UnknownSenderKey { .. })
        ));
    }

    #[test]
    fn removed_members_old_chain_key_does_not_open_new_messages() {
        let [mut a, _, c] = trio();
        let old = c.received.get("alice").unwrap().clone();
        a.remove_member("carol", &mut OsRng).unwrap();
        let m = ParsedGroupMessage::parse(&a.encrypt(b"secret").unwrap())
            .map(|p| (p.header_bytes.to_vec(), p.ciphertext.to_vec()))
            .unwrap();
        let mut ck = old.chain_key.clone();
        for _ in 0..10 {
            let (mk, next) = kdf_ck(&ck);
            assert!(open_padded(&mk, SENDER_KEY_INFO, &m.0, &m.1).is_none());
            ck = next;
        }
    }

    #[test]
    fn refuses_a_forged_signature() {
        let [mut a, mut b, _] = trio();
        let mut m = a.encrypt(b"x").unwrap();
        let last = m.len() - 1;
        m[last] ^= 1;
        assert_eq!(b.decrypt(&m), Err(GroupError::BadSignature));
    }

    #[test]
    fn refuses_any_tampered_byte_and_keeps_state() {
        let [mut a, mut b, _] = trio();
        let m = a.encrypt(b"tamper me").unwrap();
        for i in 0..m.len() {
            let mut bad = m.clone();
            bad[i] ^= 0x01;
            assert!(b.decrypt(&bad).is_err(), "byte {i} accepted");
        }
        assert_eq!(b.decrypt(&m).unwrap().plaintext, b"tamper me");
    }

    #[test]
    fn refuses_a_distribution_relayed_under_another_name() {
        let [a, mut b, _] = trio();
        let dist = a.own_distribution();
        assert!(matches!(
            b.process_distribution("carol", &dist),
            Err(GroupError::SenderMismatch { .. })
        ));
    }

    #[test]
    fn a_repeated_distribution_does_not_rewind_the_chain() {
        let [mut a, mut b, _] = trio();
        let dist = a.own_distribution();
        let m = a.encrypt(b"once").unwrap();
        b.decrypt(&m).unwrap();
        b.process_distribution("alice", &dist).unwrap();
        assert_eq!(b.decrypt(&m), Err(GroupError::Replay));
    }

    #[test]
    fn refuses_a_skip_beyond_the_limit() {
        let [mut a, mut b, _] = trio();
        for _ in 0..=MAX_GROUP_SKIP {
            a.encrypt(b"s").unwrap();
        }
        let far = a.encrypt(b"far").unwrap();
        assert_eq!(
            b.decrypt(&far),
            Err(GroupError::TooManySkipped {
                requested: u64::from(MAX_GROUP_SKIP) + 1
            })
        );
    }

    #[test]
    fn group_state_round_trips_through_encoding() {
        let [mut a, b, _] = trio();
        let mut b = GroupState::decode(&b.encode()).unwrap();
        let mut a2 = GroupState::decode(&a.encode()).unwrap();
        assert_eq!(*a2.encode(), *a.encode());
        let m = a2.encrypt(b"restored").unwrap();
        assert_eq!(b.decrypt(&m).unwrap().plaintext, b"restored");
        let _ = a.encrypt(b"x").unwrap();
    }
}
