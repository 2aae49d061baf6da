//! Long-term device keys: an Ed25519 identity signing key, an X25519 identity key signed by it,
//! signed prekeys and batches of one-time prekeys, and the [`PreKeyBundle`] the server hands out.
//!
//! Two keys instead of XEdDSA: the Ed25519 key signs `"ChatApp_IdentityDH_v1" || x25519` and
//! `"ChatApp_SignedPreKey_v1" || id || x25519`. Secrets are zeroized on drop and never printed.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::codec::{DecodeError, Reader, Writer};

const IDENTITY_DH_CONTEXT: &[u8] = b"ChatApp_IdentityDH_v1";
const SIGNED_PREKEY_CONTEXT: &[u8] = b"ChatApp_SignedPreKey_v1";

/// Version byte of an encoded [`IdentityPublic`].
pub const IDENTITY_PUBLIC_VERSION: u8 = 1;
/// Version byte of an encoded [`PreKeyBundle`].
pub const BUNDLE_VERSION: u8 = 1;
/// Version byte of encoded [`DeviceKeys`].
pub const DEVICE_KEYS_VERSION: u8 = 1;
/// The most one-time prekeys a device keeps (and decodes).
pub const MAX_ONE_TIME_PREKEYS: usize = 10_000;
/// Signed prekeys kept after rotation, so that initial messages in flight still decrypt.
const SIGNED_PREKEYS_KEPT: usize = 2;

/// Why a key or bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("the Ed25519 identity key is not a valid, non-weak curve point")]
    InvalidSigningKey,
    #[error("the identity key's signature over its X25519 key does not verify")]
    BadIdentitySignature,
    #[error("the signed prekey {id}'s signature does not verify under the identity key")]
    BadSignedPreKeySignature { id: u32 },
    #[error("could not decode: {0}")]
    Decode(#[from] DecodeError),
}

/// The public half of a device identity: what peers pin, compare and put in the key directory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdentityPublic {
    signing_key: VerifyingKey,
    dh_key: PublicKey,
    dh_signature: Signature,
}

impl fmt::Debug for IdentityPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityPublic")
            .field("signing_key", &hex::encode(self.signing_key.as_bytes()))
            .field("dh_key", &hex::encode(self.dh_key.as_bytes()))
            .finish_non_exhaustive()
    }
}

impl IdentityPublic {
    /// Encoded length in bytes: version, Ed25519 key, X25519 key, signature.
    pub const ENCODED_LEN: usize = 1 + 32 + 32 + 64;

    pub fn signing_key(&self) -> &VerifyingKey {
        &self.signing_key
    }

    pub fn dh_key(&self) -> &PublicKey {
        &self.dh_key
    }

    /// The Ed25519 signature by [`signing_key`](Self::signing_key) that binds
    /// [`dh_key`](Self::dh_key) to it.
    pub fn dh_signature(&self) -> &Signature {
        &self.dh_signature
    }

    /// Rebuilds an identity from the three parts the wire and the key directory carry (Ed25519
    /// key, X25519 key, the signature binding them) and [`verify`](Self::verify)s it: the checks
    /// and errors of [`decode`](Self::decode) on `[IDENTITY_PUBLIC_VERSION] || parts`.
    pub fn from_parts(
        ed25519: &[u8; 32],
        x25519: &[u8; 32],
        signature: &[u8; 64],
    ) -> Result<Self, KeyError> {
        let id = Self {
            signing_key: signing_key_from_bytes(ed25519)?,
            dh_key: PublicKey::from(*x25519),
            dh_signature: Signature::from_bytes(signature),
        };
        id.verify()?;
        Ok(id)
    }

    /// `Ed25519 || X25519` (64 bytes): the identity as it enters X3DH's AD and safety numbers.
    pub fn key_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(self.signing_key.as_bytes());
        out[32..].copy_from_slice(self.dh_key.as_bytes());
        out
    }

    /// Checks that the Ed25519 key is not weak and signed the X25519 key.
    pub fn verify(&self) -> Result<(), KeyError> {
        if self.signing_key.is_weak() {
            return Err(KeyError::InvalidSigningKey);
        }
        self.signing_key
            .verify_strict(&identity_dh_message(&self.dh_key), &self.dh_signature)
            .map_err(|_| KeyError::BadIdentitySignature)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::ENCODED_LEN);
        self.write(&mut w);
        w.into_bytes()
    }

    /// Decodes and [`verify`](Self::verify)s.
    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes);
        let id = Self::read(&mut r)?;
        r.finish()?;
        id.verify()?;
        Ok(id)
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(IDENTITY_PUBLIC_VERSION)
            .fixed(self.signing_key.as_bytes())
            .fixed(self.dh_key.as_bytes())
            .fixed(&self.dh_signature.to_bytes());
    }

    /// Steps over an encoded identity key, checking its version and length but not its keys
    /// (see [`crate::x3dh::InitialHeader::skip`]).
    pub(crate) fn skip(r: &mut Reader<'_>) -> Result<(), DecodeError> {
        let version = r.u8()?;
        if version != IDENTITY_PUBLIC_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "identity key",
                version,
            });
        }
        r.skip(Self::ENCODED_LEN - 1)?;
        Ok(())
    }

    /// Reads without verifying the signature (callers verify).
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = r.u8()?;
        if version != IDENTITY_PUBLIC_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "identity key",
                version,
            });
        }
        let signing_key = signing_key_from_bytes(&r.array()?)?;
        let dh_key = PublicKey::from(r.array::<32>()?);
        let dh_signature = Signature::from_bytes(&r.array()?);
        Ok(Self {
            signing_key,
            dh_key,
            dh_signature,
        })
    }
}

fn signing_key_from_bytes(bytes: &[u8; 32]) -> Result<VerifyingKey, DecodeError> {
    VerifyingKey::from_bytes(bytes).map_err(|_| DecodeError::Invalid("Ed25519 identity key"))
}

fn identity_dh_message(dh_key: &PublicKey) -> Vec<u8> {
    [IDENTITY_DH_CONTEXT, dh_key.as_bytes()].concat()
}

fn signed_prekey_message(id: u32, key: &PublicKey) -> Vec<u8> {
    [SIGNED_PREKEY_CONTEXT, &id.to_be_bytes(), key.as_bytes()].concat()
}

/// A device's identity secrets: the Ed25519 signing key and the X25519 identity key.
#[derive(Clone)]
pub struct IdentityKeyPair {
    signing: SigningKey,
    dh: StaticSecret,
    public: IdentityPublic,
}

impl fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Both secrets (`SigningKey`, `StaticSecret`) wipe themselves on drop.
impl ZeroizeOnDrop for IdentityKeyPair {}

impl IdentityKeyPair {
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let signing = SigningKey::generate(rng);
        let dh = StaticSecret::random_from_rng(&mut *rng);
        Self::from_secrets(signing, dh)
    }

    fn from_secrets(signing: SigningKey, dh: StaticSecret) -> Self {
        let dh_key = PublicKey::from(&dh);
        let public = IdentityPublic {
            signing_key: signing.verifying_key(),
            dh_key,
            dh_signature: signing.sign(&identity_dh_message(&dh_key)),
        };
        Self {
            signing,
            dh,
            public,
        }
    }

    pub fn public(&self) -> &IdentityPublic {
        &self.public
    }

    /// Answers a server's login challenge: an Ed25519 signature over
    /// [`crate::wire::login_challenge_message`] (domain-separated, so it signs nothing else).
    pub fn sign_login(&self, nonce: &[u8; 32], username: &str, device_id: u32) -> [u8; 64] {
        let message = crate::wire::login_challenge_message(nonce, username, device_id);
        self.signing.sign(&message).to_bytes()
    }

    pub(crate) fn dh_secret(&self) -> &StaticSecret {
        &self.dh
    }

    /// Generates a signed prekey with the caller's `id`.
    pub fn generate_signed_prekey(
        &self,
        id: u32,
        rng: &mut impl CryptoRngCore,
    ) -> SignedPreKeySecret {
        let secret = StaticSecret::random_from_rng(&mut *rng);
        self.sign_prekey(id, secret)
    }

    fn sign_prekey(&self, id: u32, secret: StaticSecret) -> SignedPreKeySecret {
        let key = PublicKey::from(&secret);
        let signature = self.signing.sign(&signed_prekey_message(id, &key));
        SignedPreKeySecret {
            secret,
            public: SignedPreKey { id, key, signature },
        }
    }

    fn write_secret(&self, w: &mut Writer) {
        let signing = Zeroizing::new(self.signing.to_bytes());
        let dh = Zeroizing::new(self.dh.to_bytes());
        w.fixed(signing.as_ref()).fixed(dh.as_ref());
    }

    fn read_secret(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let signing = Zeroizing::new(r.array::<32>()?);
        let dh = Zeroizing::new(r.array::<32>()?);
        Ok(Self::from_secrets(
            SigningKey::from_bytes(&signing),
            StaticSecret::from(*dh),
        ))
    }
}

/// A signed prekey as published: id, X25519 public key, Ed25519 signature by the identity key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignedPreKey {
    pub id: u32,
    pub key: PublicKey,
    pub signature: Signature,
}

impl fmt::Debug for SignedPreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedPreKey")
            .field("id", &self.id)
            .field("key", &hex::encode(self.key.as_bytes()))
            .finish_non_exhaustive()
    }
}

impl SignedPreKey {
    /// Checks the signature under `identity`'s Ed25519 key.
    pub fn verify(&self, identity: &IdentityPublic) -> Result<(), KeyError> {
        identity
            .signing_key
            .verify_strict(&signed_prekey_message(self.id, &self.key), &self.signature)
            .map_err(|_| KeyError::BadSignedPreKeySignature { id: self.id })
    }

    fn write(&self, w: &mut Writer) {
        w.u32(self.id)
            .fixed(self.key.as_bytes())
            .fixed(&self.signature.to_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            id: r.u32()?,
            key: PublicKey::from(r.array::<32>()?),
            signature: Signature::from_bytes(&r.array()?),
        })
    }
}

/// The secret half of a signed prekey.
#[derive(Clone)]
pub struct SignedPreKeySecret {
    secret: StaticSecret,
    public: SignedPreKey,
}

impl fmt::Debug for SignedPreKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedPreKeySecret")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl ZeroizeOnDrop for SignedPreKeySecret {}

impl SignedPreKeySecret {
    pub fn public(&self) -> &SignedPreKey {
        &self.public
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }
}

/// A one-time prekey as published: id and X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OneTimePreKey {
    pub id: u32,
    pub key: PublicKey,
}

impl fmt::Debug for OneTimePreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneTimePreKey")
            .field("id", &self.id)
            .field("key", &hex::encode(self.key.as_bytes()))
            .finish()
    }
}

/// The secret half of a one-time prekey; used once, then dropped (and zeroized).
#[derive(Clone)]
pub struct OneTimePreKeySecret {
    id: u32,
    secret: StaticSecret,
}

impl fmt::Debug for OneTimePreKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneTimePreKeySecret")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ZeroizeOnDrop for OneTimePreKeySecret {}

impl OneTimePreKeySecret {
    pub fn public(&self) -> OneTimePreKey {
        OneTimePreKey {
            id: self.id,
            key: PublicKey::from(&self.secret),
        }
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }
}

/// What the server hands out to someone starting a session with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreKeyBundle {
    pub identity: IdentityPublic,
    pub signed_prekey: SignedPreKey,
    pub one_time_prekey: Option<OneTimePreKey>,
}

impl PreKeyBundle {
    /// Checks the identity's signature over its X25519 key and over the signed prekey.
    pub fn verify(&self) -> Result<(), KeyError> {
        self.identity.verify()?;
        self.signed_prekey.verify(&self.identity)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        w.u8(BUNDLE_VERSION);
        self.identity.write(&mut w);
        self.signed_prekey.write(&mut w);
        match &self.one_time_prekey {
            Some(otk) => w.u8(1).u32(otk.id).fixed(otk.key.as_bytes()),
            None => w.u8(0),
        };
        w.into_bytes()
    }

    /// Decodes and [`verify`](Self::verify)s.
    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != BUNDLE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "prekey bundle",
                version,
            }
            .into());
        }
        let identity = IdentityPublic::read(&mut r)?;
        let signed_prekey = SignedPreKey::read(&mut r)?;
        let one_time_prekey = if r.bool()? {
            Some(OneTimePreKey {
                id: r.u32()?,
                key: PublicKey::from(r.array::<32>()?),
            })
        } else {
            None
        };
        r.finish()?;
        let bundle = Self {
            identity,
            signed_prekey,
            one_time_prekey,
        };
        bundle.verify()?;
        Ok(bundle)
    }
}

/// Everything secret a device keeps: its identity, its current (and previous) signed prekey,
/// and its unused one-time prekeys.
#[derive(Clone)]
pub struct DeviceKeys {
    identity: IdentityKeyPair,
    /// Newest first; at most [`SIGNED_PREKEYS_KEPT`].
    signed_prekeys: Vec<SignedPreKeySecret>,
    one_time_prekeys: BTreeMap<u32, OneTimePreKeySecret>,
    next_signed_prekey_id: u32,
    next_one_time_prekey_id: u32,
}

impl fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("identity", self.identity.public())
            .field("signed_prekey", &self.signed_prekey().id)
            .field("one_time_prekeys", &self.one_time_prekeys.len())
            .finish_non_exhaustive()
    }
}

impl ZeroizeOnDrop for DeviceKeys {}

impl DeviceKeys {
    /// A new identity with one signed prekey (id 1) and no one-time prekeys.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let identity = IdentityKeyPair::generate(rng);
        let spk = identity.generate_signed_prekey(1, rng);
        Self {
            identity,
            signed_prekeys: vec![spk],
            one_time_prekeys: BTreeMap::new(),
            next_signed_prekey_id: 2,
            next_one_time_prekey_id: 1,
        }
    }

    pub fn identity(&self) -> &IdentityKeyPair {
        &self.identity
    }

    /// The current signed prekey (to publish).
    pub fn signed_prekey(&self) -> &SignedPreKey {
        // `signed_prekeys` is never empty: constructors and `decode` guarantee one.
        &self.signed_prekeys[0].public
    }

    /// Replaces the signed prekey; the previous one is kept for initial messages in flight.
    pub fn rotate_signed_prekey(&mut self, rng: &mut impl CryptoRngCore) -> SignedPreKey {
        let id = self.next_signed_prekey_id;
        self.next_signed_prekey_id = id.wrapping_add(1);
        let spk = self.identity.generate_signed_prekey(id, rng);
        let public = spk.public;
        self.signed_prekeys.insert(0, spk);
        self.signed_prekeys.truncate(SIGNED_PREKEYS_KEPT);
        public
    }

    /// Generates a batch of `count` one-time prekeys with fresh ids and returns their public
    /// halves to upload. Stops early at [`MAX_ONE_TIME_PREKEYS`] kept keys.
    pub fn generate_one_time_prekeys(
        &mut self,
        count: usize,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OneTimePreKey> {
        let room = MAX_ONE_TIME_PREKEYS.saturating_sub(self.one_time_prekeys.len());
        let mut out = Vec::with_capacity(count.min(room));
        for _ in 0..count.min(room) {
            let id = self.next_one_time_prekey_id;
            self.next_one_time_prekey_id = id.wrapping_add(1);
            let otk = OneTimePreKeySecret {
                id,
                secret: StaticSecret::random_from_rng(&mut *rng),
            };
            out.push(otk.public());
            self.one_time_prekeys.insert(id, otk);
        }
        out
    }

    /// The unused one-time prekeys (public halves).
    pub fn one_time_prekeys(&self) -> impl Iterator<Item = OneTimePreKey> + '_ {
        self.one_time_prekeys
            .values()
            .map(OneTimePreKeySecret::public)
    }

    /// A bundle for this device, as the server would build it from what was uploaded.
    pub fn bundle(&self, one_time_prekey_id: Option<u32>) -> PreKeyBundle {
        PreKeyBundle {
            identity: *self.identity.public(),
            signed_prekey: *self.signed_prekey(),
            one_time_prekey: one_time_prekey_id
                .and_then(|id| self.one_time_prekeys.get(&id))
                .map(OneTimePreKeySecret::public),
        }
    }

    pub(crate) fn signed_prekey_secret(&self, id: u32) -> Option<&SignedPreKeySecret> {
        self.signed_prekeys.iter().find(|spk| spk.public.id == id)
    }

    pub(crate) fn one_time_prekey_secret(&self, id: u32) -> Option<&OneTimePreKeySecret> {
        self.one_time_prekeys.get(&id)
    }

    /// Removes (and zeroizes) a one-time prekey; returns whether it existed.
    pub(crate) fn consume_one_time_prekey(&mut self, id: u32) -> bool {
        self.one_time_prekeys.remove(&id).is_some()
    }

    /// Serialises every secret (version byte first). Store it encrypted at rest.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(128 + 36 * self.one_time_prekeys.len());
        w.u8(DEVICE_KEYS_VERSION);
        self.identity.write_secret(&mut w);
        w.u32(self.next_signed_prekey_id)
            .u32(self.next_one_time_prekey_id);
        w.u8(self.signed_prekeys.len() as u8);
        for spk in &self.signed_prekeys {
            let secret = Zeroizing::new(spk.secret.to_bytes());
            w.u32(spk.public.id).fixed(secret.as_ref());
        }
        w.u32(self.one_time_prekeys.len() as u32);
        for otk in self.one_time_prekeys.values() {
            let secret = Zeroizing::new(otk.secret.to_bytes());
            w.u32(otk.id).fixed(secret.as_ref());
        }
        Zeroizing::new(w.into_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != DEVICE_KEYS_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "device keys",
                version,
            });
        }
        let identity = IdentityKeyPair::read_secret(&mut r)?;
        let next_signed_prekey_id = r.u32()?;
        let next_one_time_prekey_id = r.u32()?;
        let spk_count = usize::from(r.u8()?);
        if spk_count == 0 || spk_count > SIGNED_PREKEYS_KEPT {
            return Err(DecodeError::Invalid("signed prekey count"));
        }
        let mut signed_prekeys = Vec::with_capacity(spk_count);
        for _ in 0..spk_count {
            let id = r.u32()?;
            let secret = Zeroizing::new(r.array::<32>()?);
            signed_prekeys.push(identity.sign_prekey(id, StaticSecret::from(*secret)));
        }
        let otk_count = r.u32()? as usize;
        if otk_count > MAX_ONE_TIME_PREKEYS {
            return Err(DecodeError::Invalid("one-time prekey count"));
        }
        let mut one_time_prekeys = BTreeMap::new();
        for _ in 0..otk_count {
            let id = r.u32()?;
            let secret = Zeroizing::new(r.array::<32>()?);
            let otk = OneTimePreKeySecret {
                id,
                secret: StaticSecret::from(*secret),
            };
            if one_time_prekeys.insert(id, otk).is_some() {
                return Err(DecodeError::Invalid("duplicate one-time prekey id"));
            }
        }
        r.finish()?;
        Ok(Self {
            identity,
            signed_prekeys,
            one_time_prekeys,
            next_signed_prekey_id,
            next_one_time_prekey_id,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn bundle_from_fresh_device_verifies_and_round_trips() {
        let mut keys = DeviceKeys::generate(&mut OsRng);
        let otks = keys.generate_one_time_prekeys(3, &mut OsRng);
        let bundle = keys.bundle(Some(otks[1].id));
        assert_eq!(bundle.one_time_prekey, Some(otks[1]));
        assert_eq!(PreKeyBundle::decode(&bundle.encode()), Ok(bundle));
    }

    #[test]
    fn one_time_prekeys_get_distinct_increasing_ids() {
        let mut keys = DeviceKeys::generate(&mut OsRng);
        let a = keys.generate_one_time_prekeys(5, &mut OsRng);
        let b = keys.generate_one_time_prekeys(5, &mut OsRng);
        let ids: Vec<u32> = a.iter().chain(&b).map(|k| k.id).collect();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn refuses_bundle_whose_signed_prekey_was_swapped() {
        let keys = DeviceKeys::generate(&mut OsRng);
        let mut bundle = keys.bundle(None);
        bundle.signed_prekey.key = PublicKey::from(&StaticSecret::random_from_rng(OsRng));
        assert_eq!(
            bundle.verify(),
            Err(KeyError::BadSignedPreKeySignature { id: 1 })
        );
    }

    #[test]
    fn refuses_identity_whose_dh_key_was_swapped() {
        let keys = DeviceKeys::generate(&mut OsRng);
        let mut bundle = keys.bundle(None);
        bundle.identity.dh_key = PublicKey::from([9u8; 32]);
        assert_eq!(bundle.verify(), Err(KeyError::BadIdentitySignature));
    }

    #[test]
    fn identity_from_parts_round_trips_and_refuses_bad_parts_with_an_error() {
        let identity = *IdentityKeyPair::generate(&mut OsRng).public();
        let ed25519 = *identity.signing_key().as_bytes();
        let x25519 = *identity.dh_key().as_bytes();
        let signature = identity.dh_signature().to_bytes();
        let encoded = [
            &[IDENTITY_PUBLIC_VERSION][..],
            &ed25519,
            &x25519,
            &signature,
        ]
        .concat();
        assert_eq!(encoded, identity.encode());
        assert_eq!(
            IdentityPublic::from_parts(&ed25519, &x25519, &signature),
            Ok(identity)
        );

        // Not a curve point (y = 2), a small-order key, a signature over another X25519 key.
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        assert_eq!(
            IdentityPublic::from_parts(&not_a_point, &x25519, &signature),
            Err(KeyError::Decode(DecodeError::Invalid(
                "Ed25519 identity key"
            )))
        );
        let mut small_order = [0u8; 32];
        small_order[0] = 1;
        assert_eq!(
            IdentityPublic::from_parts(&small_order, &x25519, &signature),
            Err(KeyError::InvalidSigningKey)
        );
        assert_eq!(
            IdentityPublic::from_parts(&ed25519, &[9; 32], &signature),
            Err(KeyError::BadIdentitySignature)
        );

        // Every single bit flip is refused, with the verdict `decode` gives the same bytes.
        for bit in 0..(32 + 32 + 64) * 8 {
            let mut bad = encoded.clone();
            bad[1 + bit / 8] ^= 1 << (bit % 8);
            let parts = IdentityPublic::from_parts(
                bad[1..33].try_into().unwrap(),
                bad[33..65].try_into().unwrap(),
                bad[65..].try_into().unwrap(),
            );
            assert!(parts.is_err(), "bit {bit}");
            assert_eq!(parts, IdentityPublic::decode(&bad), "bit {bit}");
        }
    }

    #[test]
    fn refuses_every_single_bit_flip_in_an_encoded_bundle() {
        let keys = DeviceKeys::generate(&mut OsRng);
        let bytes = keys.bundle(None).encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(PreKeyBundle::decode(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn device_keys_round_trip_through_encoding() {
        let mut keys = DeviceKeys::generate(&mut OsRng);
        keys.generate_one_time_prekeys(4, &mut OsRng);
        keys.rotate_signed_prekey(&mut OsRng);
        let decoded = DeviceKeys::decode(&keys.encode()).unwrap();
        assert_eq!(decoded.bundle(Some(2)), keys.bundle(Some(2)));
        assert!(decoded.signed_prekey_secret(1).is_some());
        assert_eq!(decoded.encode(), keys.encode());
    }

    #[test]
    fn rotation_keeps_only_the_previous_signed_prekey() {
        let mut keys = DeviceKeys::generate(&mut OsRng);
        keys.rotate_signed_prekey(&mut OsRng);
        keys.rotate_signed_prekey(&mut OsRng);
        assert_eq!(keys.signed_prekey().id, 3);
        assert!(keys.signed_prekey_secret(2).is_some());
        assert!(keys.signed_prekey_secret(1).is_none());
    }

    #[test]
    fn secret_types_zeroize_on_drop() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<IdentityKeyPair>();
        wiped_on_drop::<SignedPreKeySecret>();
        wiped_on_drop::<OneTimePreKeySecret>();
        wiped_on_drop::<DeviceKeys>();
        wiped_on_drop::<crate::ratchet::Session>();
        wiped_on_drop::<crate::group::GroupState>();
        wiped_on_drop::<crate::group::SenderKeyDistribution>();
    }

    #[test]
    fn debug_output_contains_no_secret_bytes() {
        let keys = DeviceKeys::generate(&mut OsRng);
        let secret = hex::encode(keys.identity.signing.to_bytes());
        let dh = hex::encode(keys.identity.dh.to_bytes());
        let printed = format!("{keys:?} {:?} {:?}", keys.identity, keys.signed_prekeys[0]);
        assert!(!printed.contains(&secret) && !printed.contains(&dh));
    }

    #[test]
    fn decode_never_panics_on_truncated_device_keys() {
        let keys = DeviceKeys::generate(&mut OsRng);
        let bytes = keys.encode();
        for len in 0..bytes.len() {
            assert!(DeviceKeys::decode(&bytes[..len]).is_err());
        }
    }
}
