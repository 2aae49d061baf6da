//! The browser-facing operations in safe Rust: bytes in, bytes out, objects behind handles.
//!
//! [`Api`] owns every live object (device keys, sessions, directory verifiers, groups, verified
//! release manifests) under a `u32` handle that is never reused. `abi` wraps each method in
//! an `extern "C"` export; this module knows nothing about pointers, so it is tested natively.
//! Byte layouts and error codes are specified in the crate's README.

use std::collections::BTreeMap;

#[cfg(feature = "app")]
use chat_core::codec::DecodeError;
#[cfg(feature = "app")]
use chat_core::directory::{DirectoryError, DirectoryVerifier};
#[cfg(feature = "app")]
use chat_core::group::{GroupError, GroupState, SenderKeyDistribution};
#[cfg(feature = "app")]
use chat_core::identity::{
    BUNDLE_VERSION, DeviceKeys, IDENTITY_PUBLIC_VERSION, IdentityPublic, KeyError, PreKeyBundle,
    SignedPreKey,
};
#[cfg(feature = "app")]
use chat_core::ratchet::{self, Session, SessionError};
#[cfg(feature = "app")]
use chat_core::safety::SafetyNumber;
#[cfg(feature = "app")]
use chat_core::x3dh::X3dhError;
#[cfg(feature = "verify")]
use chat_signing::manifest::{
    FileDigest, ReleaseError, VerifiedManifest, VerifyPolicy, verify_manifest,
};
#[cfg(feature = "verify")]
use chat_signing::release::ReleasePublicKey;
#[cfg(feature = "app")]
use chat_signing::tree_head::{DirectoryPublicKey, SignedTreeHead};
#[cfg(feature = "app")]
use rand_core::CryptoRngCore;

/// Raw identity: Ed25519 key (32) || X25519 key (32) || Ed25519 signature binding them (64).
pub const IDENTITY_LEN: usize = 128;
/// Raw signed prekey: id (u32 BE) || X25519 key (32) || signature (64).
pub const SIGNED_PREKEY_LEN: usize = 100;
/// Raw one-time prekey: id (u32 BE) || X25519 key (32).
pub const ONE_TIME_PREKEY_LEN: usize = 36;

/// A refusal as the JS side sees it: a stable kebab-case `code` and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn bad_argument(message: impl Into<String>) -> Self {
        Self::new("bad-argument", message)
    }
}

pub type ApiResult = Result<Vec<u8>, ApiError>;

#[cfg(feature = "app")]
impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        Self::new("malformed", e.to_string())
    }
}

#[cfg(feature = "app")]
impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        let code = match e {
            KeyError::Decode(_) => "malformed",
            _ => "bad-key",
        };
        Self::new(code, e.to_string())
    }
}

#[cfg(feature = "app")]
impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let code = match &e {
            SessionError::X3dh(X3dhError::Key(KeyError::Decode(_))) | SessionError::Decode(_) => {
                "malformed"
            }
            SessionError::X3dh(X3dhError::Key(_)) => "bad-key",
            SessionError::X3dh(X3dhError::NonContributory { .. })
            | SessionError::NonContributoryRatchetKey => "non-contributory",
            SessionError::X3dh(X3dhError::UnknownSignedPreKey(_))
            | SessionError::X3dh(X3dhError::UnknownOneTimePreKey(_)) => "unknown-prekey",
            SessionError::NotInitialMessage => "not-initial-message",
            SessionError::AuthenticationFailed | SessionError::Padding(_) => {
                "authentication-failed"
            }
            SessionError::Replay => "replay",
            SessionError::TooManySkipped { .. } => "too-many-skipped",
            SessionError::MessageTooLong(_) => "too-long",
            SessionError::NotReadyToSend => "not-ready",
            SessionError::ChainExhausted => "chain-exhausted",
        };
        Self::new(code, e.to_string())
    }
}

#[cfg(feature = "app")]
impl From<GroupError> for ApiError {
    fn from(e: GroupError) -> Self {
        let code = match &e {
            GroupError::Decode(_) | GroupError::IdTooLong(_) => "malformed",
            GroupError::WrongGroup => "wrong-group",
            GroupError::NotAMember(_) | GroupError::SenderMismatch { .. } => "not-a-member",
            GroupError::UnknownSender(_) | GroupError::UnknownSenderKey { .. } => "unknown-sender",
            GroupError::BadSignature
            | GroupError::AuthenticationFailed
            | GroupError::Padding(_) => "authentication-failed",
            GroupError::Replay => "replay",
            GroupError::TooManySkipped { .. } => "too-many-skipped",
            GroupError::MessageTooLong(_) => "too-long",
            GroupError::ChainExhausted => "chain-exhausted",
            GroupError::TooManyMembers => "too-many-members",
        };
        Self::new(code, e.to_string())
    }
}

#[cfg(feature = "app")]
impl From<DirectoryError> for ApiError {
    fn from(e: DirectoryError) -> Self {
        let code = match &e {
            DirectoryError::SignedByAnotherKey { .. } => "unknown-key",
            DirectoryError::BadSignature => "bad-signature",
            DirectoryError::Stale { .. } => "stale",
            DirectoryError::FromTheFuture { .. } => "from-the-future",
            DirectoryError::InvalidEmptyHead | DirectoryError::UnexpectedProof { .. } => {
                "malformed"
            }
            DirectoryError::Fork { .. } => "fork",
            DirectoryError::Inconsistent { .. } | DirectoryError::TimestampRegression { .. } => {
                "inconsistent"
            }
            DirectoryError::HeadNotAccepted { .. } => "head-not-accepted",
            DirectoryError::NotIncluded { .. } => "not-included",
        };
        Self::new(code, e.to_string())
    }
}

#[cfg(feature = "verify")]
impl From<ReleaseError> for ApiError {
    fn from(e: ReleaseError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// One live object.
enum Object {
    #[cfg(feature = "app")]
    Keys(Box<DeviceKeys>),
    #[cfg(feature = "app")]
    Session(Box<Session>),
    #[cfg(feature = "app")]
    Directory(Box<DirectoryVerifier>),
    #[cfg(feature = "app")]
    Group(Box<GroupState>),
    #[cfg(feature = "verify")]
    Release(Box<VerifiedManifest>),
}

/// Looks up the handle as one kind of object, or fails with `bad-handle`.
macro_rules! object {
    ($self:ident, $handle:expr, $variant:ident) => {
        match $self.objects.get_mut(&$handle) {
            Some(Object::$variant(o)) => o,
            _ => {
                return Err(ApiError::new(
                    "bad-handle",
                    format!(
                        "handle {} is not a live {} object",
                        $handle,
                        stringify!($variant)
                    ),
                ));
            }
        }
    };
}

/// Every live object of one wasm instance, by handle.
#[derive(Default)]
pub struct Api {
    objects: BTreeMap<u32, Object>,
    last_handle: u32,
}

impl Api {
    fn insert(&mut self, object: Object) -> Result<u32, ApiError> {
        let handle = self
            .last_handle
            .checked_add(1)
            .ok_or_else(|| ApiError::new("exhausted", "no handles left; reload the page"))?;
        self.last_handle = handle;
        self.objects.insert(handle, object);
        Ok(handle)
    }

    fn insert_handle(&mut self, object: Object) -> ApiResult {
        Ok(self.insert(object)?.to_be_bytes().to_vec())
    }

    /// Drops (and thereby zeroizes) an object; unknown handles are ignored.
    pub fn free(&mut self, handle: u32) {
        self.objects.remove(&handle);
    }

    /// How many objects are alive (for leak checks).
    pub fn live_objects(&self) -> usize {
        self.objects.len()
    }
}

#[cfg(feature = "app")]
impl Api {
    // ---- device keys -------------------------------------------------------------------

    pub fn keys_generate(&mut self, rng: &mut impl CryptoRngCore) -> ApiResult {
        self.insert_handle(Object::Keys(Box::new(DeviceKeys::generate(rng))))
    }

    pub fn keys_decode(&mut self, bytes: &[u8]) -> ApiResult {
        self.insert_handle(Object::Keys(Box::new(DeviceKeys::decode(bytes)?)))
    }

    pub fn keys_encode(&mut self, keys: u32) -> ApiResult {
        Ok(object!(self, keys, Keys).encode().to_vec())
    }

    /// The raw identity (128 bytes) for `Register` and directory comparisons.
    pub fn keys_identity(&mut self, keys: u32) -> ApiResult {
        Ok(raw_identity(object!(self, keys, Keys).identity().public()).to_vec())
    }

    /// The current signed prekey, raw (100 bytes).
    pub fn keys_signed_prekey(&mut self, keys: u32) -> ApiResult {
        Ok(raw_signed_prekey(object!(self, keys, Keys).signed_prekey()))
    }

    pub fn keys_rotate_signed_prekey(
        &mut self,
        keys: u32,
        rng: &mut impl CryptoRngCore,
    ) -> ApiResult {
        Ok(raw_signed_prekey(
            &object!(self, keys, Keys).rotate_signed_prekey(rng),
        ))
    }

    /// `count` new one-time prekeys, concatenated raw (36 bytes each).
    pub fn keys_generate_one_time_prekeys(
        &mut self,
        keys: u32,
        count: u32,
        rng: &mut impl CryptoRngCore,
    ) -> ApiResult {
        let keys = object!(self, keys, Keys);
        let mut out = Vec::new();
        for otk in keys.generate_one_time_prekeys(count as usize, rng) {
            out.extend_from_slice(&otk.id.to_be_bytes());
            out.extend_from_slice(otk.key.as_bytes());
        }
        Ok(out)
    }

    /// The 64-byte answer to a login challenge.
    pub fn keys_sign_login(
        &mut self,
        keys: u32,
        nonce: &[u8],
        username: &[u8],
        device_id: u32,
    ) -> ApiResult {
        let nonce: &[u8; 32] = nonce
            .try_into()
            .map_err(|_| ApiError::bad_argument("the login nonce must be 32 bytes"))?;
        let username = utf8(username, "username")?;
        let keys = object!(self, keys, Keys);
        Ok(keys
            .identity()
            .sign_login(nonce, username, device_id)
            .to_vec())
    }

    /// This device's bundle, raw (identity || signed prekey || optional one-time prekey), as
    /// the server would hand it out; `one_time_prekey_id` 0 means none.
    pub fn keys_bundle(&mut self, keys: u32, one_time_prekey_id: u32) -> ApiResult {
        let keys = object!(self, keys, Keys);
        let bundle = keys.bundle((one_time_prekey_id != 0).then_some(one_time_prekey_id));
        let mut out = raw_identity(&bundle.identity).to_vec();
        out.extend_from_slice(&raw_signed_prekey(&bundle.signed_prekey));
        if let Some(otk) = bundle.one_time_prekey {
            out.extend_from_slice(&otk.id.to_be_bytes());
            out.extend_from_slice(otk.key.as_bytes());
        }
        Ok(out)
    }

    // ---- pairwise sessions -------------------------------------------------------------

    /// Starts a session from a raw bundle (228 bytes, or 264 with a one-time prekey); verifies
    /// the identity binding and the signed prekey's signature.
    pub fn session_initiate(
        &mut self,
        keys: u32,
        raw_bundle: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> ApiResult {
        let bundle = bundle_from_raw(raw_bundle)?;
        let keys = object!(self, keys, Keys);
        let session = Session::initiate(keys.identity(), &bundle, rng)?;
        self.insert_handle(Object::Session(Box::new(session)))
    }

    /// Accepts an initial message: `handle (u32 BE) || plaintext`. Consumes the one-time
    /// prekey it used from `keys` (store the keys again afterwards).
    pub fn session_accept(&mut self, keys: u32, message: &[u8]) -> ApiResult {
        let keys = object!(self, keys, Keys);
        let (session, plaintext) = Session::accept(keys, message)?;
        let mut out = self.insert_handle(Object::Session(Box::new(session)))?;
        out.extend_from_slice(&plaintext);
        Ok(out)
    }

    pub fn session_encrypt(
        &mut self,
        session: u32,
        plaintext: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> ApiResult {
        Ok(object!(self, session, Session).encrypt(plaintext, rng)?)
    }

    pub fn session_decrypt(&mut self, session: u32, message: &[u8]) -> ApiResult {
        Ok(object!(self, session, Session).decrypt(message)?)
    }

    pub fn session_encode(&mut self, session: u32) -> ApiResult {
        Ok(object!(self, session, Session).encode().to_vec())
    }

    pub fn session_decode(&mut self, bytes: &[u8]) -> ApiResult {
        let session = Session::decode(bytes)?;
        self.insert_handle(Object::Session(Box::new(session)))
    }

    /// The peer's raw identity (128 bytes).
    pub fn session_remote_identity(&mut self, session: u32) -> ApiResult {
        Ok(raw_identity(object!(self, session, Session).remote_identity()).to_vec())
    }

    // ---- directory ---------------------------------------------------------------------

    pub fn directory_new(&mut self, public_key: &[u8]) -> ApiResult {
        let key: &[u8; 32] = public_key
            .try_into()
            .map_err(|_| ApiError::bad_argument("the directory public key must be 32 bytes"))?;
        let key = DirectoryPublicKey::from_bytes(key)
            .map_err(|e| ApiError::new("bad-key", e.to_string()))?;
        self.insert_handle(Object::Directory(Box::new(DirectoryVerifier::new(key))))
    }

    pub fn directory_from_bytes(&mut self, bytes: &[u8]) -> ApiResult {
        let verifier = DirectoryVerifier::from_bytes(bytes)?;
        self.insert_handle(Object::Directory(Box::new(verifier)))
    }

    pub fn directory_to_bytes(&mut self, directory: u32) -> ApiResult {
        Ok(object!(self, directory, Directory).to_bytes())
    }

    pub fn directory_accept_head(
        &mut self,
        directory: u32,
        head: &[u8],
        consistency_proof: &[u8],
        now_unix_secs: u64,
    ) -> ApiResult {
        let head = tree_head(head)?;
        let proof = hashes(consistency_proof)?;
        object!(self, directory, Directory).accept_head(&head, &proof, now_unix_secs)?;
        Ok(Vec::new())
    }

    pub fn directory_verify_key_entry(
        &mut self,
        directory: u32,
        entry_leaf: &[u8],
        index: u64,
        inclusion_proof: &[u8],
        head: &[u8],
        now_unix_secs: u64,
    ) -> ApiResult {
        let head = tree_head(head)?;
        let proof = hashes(inclusion_proof)?;
        object!(self, directory, Directory).verify_key_entry(
            entry_leaf,
            index,
            &proof,
            &head,
            now_unix_secs,
        )?;
        Ok(Vec::new())
    }

    // ---- groups ------------------------------------------------------------------------

    /// `members` is newline-separated.
    pub fn group_new(
        &mut self,
        group_id: &[u8],
        own_id: &[u8],
        members: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> ApiResult {
        let own_id = utf8(own_id, "own id")?;
        let members = utf8(members, "member list")?;
        let group = GroupState::new(
            group_id,
            own_id,
            members.split('\n').filter(|m| !m.is_empty()),
            rng,
        )?;
        self.insert_handle(Object::Group(Box::new(group)))
    }

    pub fn group_own_distribution(&mut self, group: u32) -> ApiResult {
        Ok(object!(self, group, Group)
            .own_distribution()
            .encode()
            .to_vec())
    }

    pub fn group_process_distribution(
        &mut self,
        group: u32,
        from: &[u8],
        distribution: &[u8],
    ) -> ApiResult {
        let from = utf8(from, "sender")?;
        let dist = SenderKeyDistribution::decode(distribution)?;
        object!(self, group, Group).process_distribution(from, &dist)?;
        Ok(Vec::new())
    }

    pub fn group_add_member(&mut self, group: u32, member: &[u8]) -> ApiResult {
        let member = utf8(member, "member")?;
        Ok(object!(self, group, Group)
            .add_member(member)?
            .encode()
            .to_vec())
    }

    /// The new distributions for the remaining members: `count (u32 BE)` then, per member,
    /// `name length (u16 BE) || name || distribution length (u32 BE) || distribution`.
    pub fn group_remove_member(
        &mut self,
        group: u32,
        member: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> ApiResult {
        let member = utf8(member, "member")?;
        let dists = object!(self, group, Group).remove_member(member, rng)?;
        let mut out = (dists.len() as u32).to_be_bytes().to_vec();
        for (name, dist) in dists {
            let dist = dist.encode();
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(dist.len() as u32).to_be_bytes());
            out.extend_from_slice(&dist);
        }
        Ok(out)
    }

    pub fn group_encrypt(&mut self, group: u32, plaintext: &[u8]) -> ApiResult {
        Ok(object!(self, group, Group).encrypt(plaintext)?)
    }

    /// `sender length (u16 BE) || sender || plaintext`.
    pub fn group_decrypt(&mut self, group: u32, message: &[u8]) -> ApiResult {
        let m = object!(self, group, Group).decrypt(message)?;
        let mut out = (m.sender.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(m.sender.as_bytes());
        out.extend_from_slice(&m.plaintext);
        Ok(out)
    }

    pub fn group_encode(&mut self, group: u32) -> ApiResult {
        Ok(object!(self, group, Group).encode().to_vec())
    }

    pub fn group_decode(&mut self, bytes: &[u8]) -> ApiResult {
        let group = GroupState::decode(bytes)?;
        self.insert_handle(Object::Group(Box::new(group)))
    }
}

#[cfg(feature = "verify")]
impl Api {
    // ---- release verification ------------------------------------------------------------

    /// Verifies `manifest.json` and its `.minisig` under the release public key (minisign file
    /// or base64 line), at `now_unix_secs`, refusing versions below `min_version` (empty: no
    /// floor). Returns `handle (u32 BE) || JSON` with name, version, created, expires, key_id,
    /// manifest_sha256 and the listed files' paths.
    pub fn release_verify(
        &mut self,
        public_key: &[u8],
        manifest: &[u8],
        signature: &[u8],
        now_unix_secs: i64,
        min_version: &[u8],
    ) -> ApiResult {
        let key = ReleasePublicKey::from_file_string(utf8(public_key, "release public key")?)
            .map_err(|e| ApiError::new("malformed", format!("release public key: {e}")))?;
        let signature =
            utf8(signature, "signature").map_err(|e| ApiError::new("malformed", e.message))?;
        let min_version =
            match utf8(min_version, "minimum version")? {
                "" => None,
                text => Some(semver::Version::parse(text).map_err(|e| {
                    ApiError::bad_argument(format!("minimum version {text:?}: {e}"))
                })?),
            };
        let policy = VerifyPolicy {
            now_unix: now_unix_secs,
            min_version,
        };
        let verified = verify_manifest(&key, manifest, signature, &policy)?;
        let summary = serde_json::json!({
            "name": verified.manifest.name,
            "version": verified.version.to_string(),
            "created": verified.manifest.created,
            "expires": verified.manifest.expires,
            "key_id": verified.key_id.to_string(),
            "manifest_sha256": verified.manifest_sha256,
            "files": verified.manifest.files.keys().collect::<Vec<_>>(),
        });
        let mut out = self.insert_handle(Object::Release(Box::new(verified)))?;
        out.extend_from_slice(summary.to_string().as_bytes());
        Ok(out)
    }

    /// Checks one fetched file's bytes (size and SHA-256) against the verified manifest.
    pub fn release_check_file(&mut self, release: u32, path: &[u8], contents: &[u8]) -> ApiResult {
        let path = utf8(path, "path")?;
        object!(self, release, Release)
            .manifest
            .check_file(path, &FileDigest::of_bytes(contents))?;
        Ok(Vec::new())
    }
}

// ---- stateless functions (app) -----------------------------------------------------------------

#[cfg(feature = "bench")]
/// Benchmark hook (`bench/bench.mjs`): runs `iterations` of operation `op` entirely inside
/// wasm, so the figure has no JS call overhead, matching `client-web/core/benches/crypto.rs`:
/// 0 = one X25519 agreement, 1 = X3DH initiator and responder (no one-time prekey), 2 = a
/// symmetric-ratchet encrypt + decrypt of 256 bytes, 3 = a sender-key group message of 256
/// bytes encrypted and decrypted (no JS calls in between).
pub fn bench(op: u32, iterations: u32, rng: &mut impl CryptoRngCore) -> ApiResult {
    match op {
        0 => {
            let a = x25519_dalek::StaticSecret::random_from_rng(&mut *rng);
            let mut b = x25519_dalek::PublicKey::from(
                &x25519_dalek::StaticSecret::random_from_rng(&mut *rng),
            );
            for _ in 0..iterations {
                b = x25519_dalek::PublicKey::from(a.diffie_hellman(&b).to_bytes());
            }
            Ok(b.as_bytes().to_vec())
        }
        1 => {
            let alice = chat_core::identity::IdentityKeyPair::generate(rng);
            let bob = DeviceKeys::generate(rng);
            let bundle = bob.bundle(None);
            for _ in 0..iterations {
                let a =
                    chat_core::x3dh::initiate(&alice, &bundle, rng).map_err(SessionError::from)?;
                let mut keys = bob.clone();
                let b =
                    chat_core::x3dh::respond(&mut keys, &a.header).map_err(SessionError::from)?;
                if *a.shared_secret != *b.shared_secret {
                    return Err(ApiError::new("internal", "X3DH sides disagree"));
                }
            }
            Ok(Vec::new())
        }
        2 => {
            let alice = chat_core::identity::IdentityKeyPair::generate(rng);
            let mut bob = DeviceKeys::generate(rng);
            let mut a = Session::initiate(&alice, &bob.bundle(None), rng)?;
            let (mut b, _) = Session::accept(&mut bob, &a.encrypt(b"hi", rng)?)?;
            a.decrypt(&b.encrypt(b"hello", rng)?)?;
            let plaintext = [0x5a_u8; 256];
            for _ in 0..iterations {
                let message = a.encrypt(&plaintext, rng)?;
                if b.decrypt(&message)? != plaintext {
                    return Err(ApiError::new("internal", "ratchet round trip differs"));
                }
            }
            Ok(Vec::new())
        }
        3 => {
            let mut a = GroupState::new(b"bench", "alice", ["bob"], rng)?;
            let mut b = GroupState::new(b"bench", "bob", ["alice"], rng)?;
            b.process_distribution("alice", &a.own_distribution())?;
            let plaintext = [0x5a_u8; 256];
            for _ in 0..iterations {
                let message = a.encrypt(&plaintext)?;
                if b.decrypt(&message)?.plaintext != plaintext {
                    return Err(ApiError::new("internal", "group round trip differs"));
                }
            }
            Ok(Vec::new())
        }
        _ => Err(ApiError::bad_argument(format!("unknown benchmark {op}"))),
    }
}

#[cfg(feature = "app")]
/// The X3DH header of a message, to choose between accept and decrypt: `[0]` for an ordinary
/// message, else `[1] || sender identity (128) || ephemeral key (32) || signed prekey id (u32)
/// || has one-time prekey (u8) || one-time prekey id (u32, 0 when absent)`. Not verified yet.
pub fn initial_header(message: &[u8]) -> ApiResult {
    Ok(match ratchet::initial_header(message)? {
        None => vec![0],
        Some(h) => {
            let mut out = vec![1];
            out.extend_from_slice(&raw_identity(&h.sender));
            out.extend_from_slice(h.ephemeral_key.as_bytes());
            out.extend_from_slice(&h.signed_prekey_id.to_be_bytes());
            out.push(u8::from(h.one_time_prekey_id.is_some()));
            out.extend_from_slice(&h.one_time_prekey_id.unwrap_or(0).to_be_bytes());
            out
        }
    })
}

#[cfg(feature = "app")]
/// `60 ASCII digits || QR payload` for two raw identities and their stable ids (user ids).
pub fn safety_number(local: &[u8], local_id: &[u8], remote: &[u8], remote_id: &[u8]) -> ApiResult {
    let local = identity_from_raw(local)?;
    let remote = identity_from_raw(remote)?;
    let number = SafetyNumber::compute(&local, local_id, &remote, remote_id);
    let mut out = number.digits().as_bytes().to_vec();
    out.extend_from_slice(number.qr_payload());
    Ok(out)
}

// ---- raw layouts ---------------------------------------------------------------------------

#[cfg(feature = "app")]
fn raw_identity(identity: &IdentityPublic) -> [u8; IDENTITY_LEN] {
    let encoded = identity.encode();
    let mut out = [0u8; IDENTITY_LEN];
    // `encode` is the version byte followed by exactly the raw layout.
    out.copy_from_slice(&encoded[1..]);
    out
}

#[cfg(feature = "app")]
fn raw_signed_prekey(spk: &SignedPreKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNED_PREKEY_LEN);
    out.extend_from_slice(&spk.id.to_be_bytes());
    out.extend_from_slice(spk.key.as_bytes());
    out.extend_from_slice(&spk.signature.to_bytes());
    out
}

#[cfg(feature = "app")]
fn identity_from_raw(raw: &[u8]) -> Result<IdentityPublic, ApiError> {
    if raw.len() != IDENTITY_LEN {
        return Err(ApiError::bad_argument(format!(
            "an identity is {IDENTITY_LEN} bytes, got {}",
            raw.len()
        )));
    }
    Ok(IdentityPublic::decode(
        &[&[IDENTITY_PUBLIC_VERSION], raw].concat(),
    )?)
}

#[cfg(feature = "app")]
fn bundle_from_raw(raw: &[u8]) -> Result<PreKeyBundle, ApiError> {
    let base = IDENTITY_LEN + SIGNED_PREKEY_LEN;
    let one_time = match raw.len() {
        n if n == base => &[0u8][..],
        n if n == base + ONE_TIME_PREKEY_LEN => &[1u8][..],
        n => {
            return Err(ApiError::bad_argument(format!(
                "a bundle is {base} or {} bytes, got {n}",
                base + ONE_TIME_PREKEY_LEN
            )));
        }
    };
    // The raw layout is PreKeyBundle's encoding without its version bytes and option flag.
    let encoded = [
        &[BUNDLE_VERSION, IDENTITY_PUBLIC_VERSION][..],
        &raw[..base],
        one_time,
        &raw[base..],
    ]
    .concat();
    Ok(PreKeyBundle::decode(&encoded)?)
}

#[cfg(feature = "app")]
fn tree_head(bytes: &[u8]) -> Result<SignedTreeHead, ApiError> {
    SignedTreeHead::from_bytes(bytes).map_err(|e| ApiError::new("malformed", e.to_string()))
}

#[cfg(feature = "app")]
fn hashes(bytes: &[u8]) -> Result<Vec<[u8; 32]>, ApiError> {
    let chunks = bytes.chunks_exact(32);
    if !chunks.remainder().is_empty() {
        return Err(ApiError::bad_argument(
            "a proof is a concatenation of 32-byte hashes",
        ));
    }
    Ok(chunks
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, ApiError> {
    std::str::from_utf8(bytes).map_err(|_| ApiError::bad_argument(format!("{what} is not UTF-8")))
}

#[cfg(all(test, feature = "app"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn handle(bytes: &[u8]) -> u32 {
        u32::from_be_bytes(bytes[..4].try_into().unwrap())
    }

    #[test]
    fn raw_bundle_round_trips_into_a_working_session() {
        let mut api = Api::default();
        let alice = handle(&api.keys_generate(&mut OsRng).unwrap());
        let bob = handle(&api.keys_generate(&mut OsRng).unwrap());
        let otks = api
            .keys_generate_one_time_prekeys(bob, 2, &mut OsRng)
            .unwrap();
        let otk_id = u32::from_be_bytes(otks[..4].try_into().unwrap());
        let bundle = api.keys_bundle(bob, otk_id).unwrap();
        assert_eq!(bundle.len(), 264);
        let a = handle(&api.session_initiate(alice, &bundle, &mut OsRng).unwrap());
        let m = api.session_encrypt(a, b"hello", &mut OsRng).unwrap();
        assert_eq!(initial_header(&m).unwrap()[0], 1);
        let accepted = api.session_accept(bob, &m).unwrap();
        assert_eq!(&accepted[4..], b"hello");
        assert_eq!(
            api.session_accept(bob, &m).unwrap_err().code,
            "unknown-prekey"
        );
    }

    #[test]
    fn a_freed_handle_is_refused_and_never_reused() {
        let mut api = Api::default();
        let h = handle(&api.keys_generate(&mut OsRng).unwrap());
        api.free(h);
        assert_eq!(api.keys_encode(h).unwrap_err().code, "bad-handle");
        assert_ne!(handle(&api.keys_generate(&mut OsRng).unwrap()), h);
        assert_eq!(api.live_objects(), 1);
    }

    #[test]
    fn a_tampered_bundle_is_refused_as_bad_key() {
        let mut api = Api::default();
        let alice = handle(&api.keys_generate(&mut OsRng).unwrap());
        let bob = handle(&api.keys_generate(&mut OsRng).unwrap());
        let mut bundle = api.keys_bundle(bob, 0).unwrap();
        bundle[IDENTITY_LEN + 10] ^= 1;
        let err = api
            .session_initiate(alice, &bundle, &mut OsRng)
            .unwrap_err();
        assert_eq!(err.code, "bad-key");
    }
}
