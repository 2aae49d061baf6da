//! The key directory's Ed25519 signing key, its text key files, and the signed tree heads (STH)
//! the directory issues over its Merkle log: a fixed 121-byte binary form, signed over a
//! domain-separated encoding of (size, timestamp, root).
//!
//! Key files are two lines a human can recognise:
//!
//! ```text
//! chatapp directory secret key v1        chatapp directory public key v1
//! <base64 of the 32-byte Ed25519 seed>   <base64 of the 32-byte public key>
//! ```
//!
//! The key id is the first 8 bytes of SHA-256(public key), shown as 16 hex characters.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::merkle::Hash;

/// First line of `directory.key`.
pub const SECRET_KEY_HEADER: &str = "chatapp directory secret key v1";
/// First line of `directory.pub`.
pub const PUBLIC_KEY_HEADER: &str = "chatapp directory public key v1";
/// Prefix of every tree-head signing input, so the signature means nothing in any other context.
pub const TREE_HEAD_DOMAIN: &[u8; 15] = b"chatapp-sth-v1\0";
/// Format version byte leading [`SignedTreeHead::to_bytes`].
pub const TREE_HEAD_VERSION: u8 = 1;
/// Length of [`SignedTreeHead::to_bytes`]: version, size, timestamp, root, key id, signature.
pub const TREE_HEAD_LEN: usize = 1 + 8 + 8 + 32 + 8 + 64;

const SIGNING_INPUT_LEN: usize = TREE_HEAD_DOMAIN.len() + 8 + 8 + 32;
const SECRET_KIND: &str = "directory secret key";
const PUBLIC_KIND: &str = "directory public key";

/// First 8 bytes of SHA-256 of a directory public key.
pub type KeyId = [u8; 8];

/// Why a directory key or key file was refused. Never contains secret material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirectoryKeyError {
    #[error("this is a {found} file, but a {expected} file was expected")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
    #[error("not a {kind} file: its first line must be `{header}`")]
    WrongHeader {
        kind: &'static str,
        header: &'static str,
    },
    #[error("{kind} file ends after its header: the base64 key line is missing")]
    MissingKeyLine { kind: &'static str },
    #[error("{kind} file has unexpected content after the key line")]
    TrailingContent { kind: &'static str },
    #[error("{kind} file: the key line is not valid base64")]
    InvalidBase64 { kind: &'static str },
    #[error("{kind} file: the key is {actual} bytes long, expected 32")]
    WrongKeyLength { kind: &'static str, actual: usize },
    #[error("directory public key is not a valid Ed25519 point")]
    InvalidPublicKey,
    #[error("directory public key is a weak (small-order) Ed25519 point")]
    WeakPublicKey,
}

/// Why a signed tree head was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TreeHeadError {
    #[error(
        "tree head is signed by directory key {}, not by the trusted key {}",
        hex::encode(.head_key_id),
        hex::encode(.trusted_key_id)
    )]
    WrongKey {
        trusted_key_id: KeyId,
        head_key_id: KeyId,
    },
    #[error("tree head signature does not verify under directory key {}", hex::encode(.key_id))]
    BadSignature { key_id: KeyId },
    #[error("signed tree head is {actual} bytes long, expected {expected}")]
    WrongLength { expected: usize, actual: usize },
    #[error("unsupported signed tree head version {0}")]
    UnsupportedVersion(u8),
}

/// Hex form of a key id, as shown to operators.
pub fn key_id_hex(key_id: &KeyId) -> String {
    hex::encode(key_id)
}

/// The directory's public key: what every client holds to check tree heads.
#[derive(Clone, PartialEq, Eq)]
pub struct DirectoryPublicKey {
    key: VerifyingKey,
}

impl std::fmt::Debug for DirectoryPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirectoryPublicKey({})", self.key_id_hex())
    }
}

impl DirectoryPublicKey {
    /// Refuses bytes that are not a point, and small-order points (which verify forged signatures).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, DirectoryKeyError> {
        let key =
            VerifyingKey::from_bytes(bytes).map_err(|_| DirectoryKeyError::InvalidPublicKey)?;
        if key.is_weak() {
            return Err(DirectoryKeyError::WeakPublicKey);
        }
        Ok(Self { key })
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn key_id(&self) -> KeyId {
        let digest = Sha256::digest(self.key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        id
    }

    pub fn key_id_hex(&self) -> String {
        key_id_hex(&self.key_id())
    }

    /// The text of `directory.pub`.
    pub fn to_file_string(&self) -> String {
        format!(
            "{PUBLIC_KEY_HEADER}\n{}\n",
            BASE64.encode(self.key.as_bytes())
        )
    }

    /// Parses the text of `directory.pub`.
    pub fn from_file_string(text: &str) -> Result<Self, DirectoryKeyError> {
        let mut bytes = [0u8; 32];
        decode_key_file(text, PUBLIC_KEY_HEADER, PUBLIC_KIND, &mut bytes)?;
        Self::from_bytes(&bytes)
    }
}

/// The directory's Ed25519 signing key. The seed is zeroized when the key is dropped
/// (`ed25519_dalek::SigningKey` is `ZeroizeOnDrop`) and is never printed.
pub struct DirectorySigningKey {
    key: SigningKey,
}

impl std::fmt::Debug for DirectorySigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DirectorySigningKey({}, secret redacted)",
            self.public_key().key_id_hex()
        )
    }
}

impl DirectorySigningKey {
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self {
            key: SigningKey::generate(rng),
        }
    }

    /// The key whose 32-byte Ed25519 seed (RFC 8032 secret key) is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(seed),
        }
    }

    pub fn public_key(&self) -> DirectoryPublicKey {
        DirectoryPublicKey {
            key: self.key.verifying_key(),
        }
    }

    /// The text of `directory.key`; zeroized when dropped.
    pub fn to_file_string(&self) -> Zeroizing<String> {
        let seed = Zeroizing::new(self.key.to_bytes());
        let mut encoded = Zeroizing::new([0u8; 44]);
        let mut text = Zeroizing::new(String::with_capacity(SECRET_KEY_HEADER.len() + 46));
        text.push_str(SECRET_KEY_HEADER);
        text.push('\n');
        // 32 bytes always encode to exactly 44 base64 characters.
        if let Ok(len) = BASE64.encode_slice(seed.as_slice(), encoded.as_mut_slice()) {
            for &c in &encoded[..len] {
                text.push(char::from(c));
            }
        }
        text.push('\n');
        text
    }

    /// Parses the text of `directory.key`. The decoded seed is zeroized after use; the caller
    /// owns (and should zeroize) `text`.
    pub fn from_file_string(text: &str) -> Result<Self, DirectoryKeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        decode_key_file(text, SECRET_KEY_HEADER, SECRET_KIND, &mut seed)?;
        Ok(Self::from_seed(&seed))
    }

    /// Signs the head of the tree of `tree_size` leaves with root `root` at `timestamp`
    /// (Unix seconds).
    pub fn sign_tree_head(&self, tree_size: u64, root: &Hash, timestamp: u64) -> SignedTreeHead {
        let signature = self
            .key
            .sign(&signing_input(tree_size, timestamp, root))
            .to_bytes();
        SignedTreeHead {
            tree_size,
            root: *root,
            timestamp,
            key_id: self.public_key().key_id(),
            signature,
        }
    }
}

/// A directory's signed statement that its log had `tree_size` leaves with root `root` at
/// `timestamp` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTreeHead {
    pub tree_size: u64,
    pub root: Hash,
    pub timestamp: u64,
    pub key_id: KeyId,
    pub signature: [u8; 64],
}

impl SignedTreeHead {
    /// Checks the signature under `key`. A head naming another key id is [`TreeHeadError::WrongKey`]
    /// (the client trusts a different directory); a bad signature is [`TreeHeadError::BadSignature`].
    pub fn verify(&self, key: &DirectoryPublicKey) -> Result<(), TreeHeadError> {
        let trusted_key_id = key.key_id();
        if self.key_id != trusted_key_id {
            return Err(TreeHeadError::WrongKey {
                trusted_key_id,
                head_key_id: self.key_id,
            });
        }
        let signature = Signature::from_bytes(&self.signature);
        key.key
            .verify_strict(
                &signing_input(self.tree_size, self.timestamp, &self.root),
                &signature,
            )
            .map_err(|_| TreeHeadError::BadSignature {
                key_id: trusted_key_id,
            })
    }

    /// `version (1) || tree_size (u64 BE) || timestamp (u64 BE) || root (32) || key_id (8) ||
    /// signature (64)`.
    pub fn to_bytes(&self) -> [u8; TREE_HEAD_LEN] {
        let mut out = [0u8; TREE_HEAD_LEN];
        out[0] = TREE_HEAD_VERSION;
        out[1..9].copy_from_slice(&self.tree_size.to_be_bytes());
        out[9..17].copy_from_slice(&self.timestamp.to_be_bytes());
        out[17..49].copy_from_slice(&self.root);
        out[49..57].copy_from_slice(&self.key_id);
        out[57..].copy_from_slice(&self.signature);
        out
    }

    /// Decodes [`Self::to_bytes`]; does not check the signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TreeHeadError> {
        let bytes: &[u8; TREE_HEAD_LEN] =
            bytes.try_into().map_err(|_| TreeHeadError::WrongLength {
                expected: TREE_HEAD_LEN,
                actual: bytes.len(),
            })?;
        if bytes[0] != TREE_HEAD_VERSION {
            return Err(TreeHeadError::UnsupportedVersion(bytes[0]));
        }
        let (size, rest) = split::<8>(&bytes[1..]);
        let (timestamp, rest) = split::<8>(rest);
        let (root, rest) = split::<32>(rest);
        let (key_id, rest) = split::<8>(rest);
        let (signature, _) = split::<64>(rest);
        Ok(Self {
            tree_size: u64::from_be_bytes(size),
            root,
            timestamp: u64::from_be_bytes(timestamp),
            key_id,
            signature,
        })
    }
}

/// The first `N` bytes of `bytes` (zero-padded if short, which the fixed layout rules out) and
/// the rest.
fn split<const N: usize>(bytes: &[u8]) -> ([u8; N], &[u8]) {
    let mut out = [0u8; N];
    let n = N.min(bytes.len());
    out[..n].copy_from_slice(&bytes[..n]);
    (out, &bytes[n..])
}

/// `"chatapp-sth-v1\0" || tree_size (u64 BE) || timestamp (u64 BE) || root`.
fn signing_input(tree_size: u64, timestamp: u64, root: &Hash) -> [u8; SIGNING_INPUT_LEN] {
    let mut out = [0u8; SIGNING_INPUT_LEN];
    let d = TREE_HEAD_DOMAIN.len();
    out[..d].copy_from_slice(TREE_HEAD_DOMAIN);
    out[d..d + 8].copy_from_slice(&tree_size.to_be_bytes());
    out[d + 8..d + 16].copy_from_slice(&timestamp.to_be_bytes());
    out[d + 16..].copy_from_slice(root);
    out
}

/// Parses `header \n base64(32 bytes) \n` into `out`, tolerating `\r\n` and trailing blank lines.
fn decode_key_file(
    text: &str,
    header: &'static str,
    kind: &'static str,
    out: &mut [u8; 32],
) -> Result<(), DirectoryKeyError> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default().trim();
    if first != header {
        let other = match kind {
            SECRET_KIND => (PUBLIC_KEY_HEADER, PUBLIC_KIND),
            _ => (SECRET_KEY_HEADER, SECRET_KIND),
        };
        return Err(if first == other.0 {
            DirectoryKeyError::WrongKind {
                expected: kind,
                found: other.1,
            }
        } else {
            DirectoryKeyError::WrongHeader { kind, header }
        });
    }
    let key_line = match lines.next().map(str::trim) {
        Some(line) if !line.is_empty() => line,
        _ => return Err(DirectoryKeyError::MissingKeyLine { kind }),
    };
    if lines.any(|line| !line.trim().is_empty()) {
        return Err(DirectoryKeyError::TrailingContent { kind });
    }
    // Decode into a zeroized scratch buffer with room for any line up to 64 characters.
    let mut scratch = Zeroizing::new([0u8; 48]);
    if key_line.len() > 64 {
        return Err(DirectoryKeyError::WrongKeyLength {
            kind,
            actual: key_line.len() / 4 * 3,
        });
    }
    let len = BASE64
        .decode_slice(key_line, scratch.as_mut_slice())
        .map_err(|_| DirectoryKeyError::InvalidBase64 { kind })?;
    if len != 32 {
        return Err(DirectoryKeyError::WrongKeyLength { kind, actual: len });
    }
    out.copy_from_slice(&scratch[..32]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    // Known-answer vector computed independently with Python `cryptography` 48 (Ed25519 over the
    // documented signing input), key = RFC 8032 §7.1 TEST 1, root = transparency-dev/merkle's
    // 8-leaf reference tree.
    const SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const KEY_ID: &str = "21fe31dfa154a261";
    const ROOT8: &str = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328";
    const SIGNATURE: &str = "264768f0c3e0d80a2a421693b2a03893d90f35c675263dee95ed7e747046903d\
                             9b25cc30036df2e1f70c2c30ce690724e2e910f5e83441817317d7ecbed01806";

    fn arr<const N: usize>(hex_str: &str) -> [u8; N] {
        hex::decode(hex_str)
            .expect("hex")
            .try_into()
            .expect("length")
    }

    fn test_key() -> DirectorySigningKey {
        DirectorySigningKey::from_seed(&arr(SEED))
    }

    fn test_head() -> SignedTreeHead {
        test_key().sign_tree_head(8, &arr(ROOT8), 1_700_000_000)
    }

    #[test]
    fn signs_tree_heads_like_an_independent_ed25519_implementation() {
        let key = test_key();
        assert_eq!(key.public_key().to_bytes(), arr::<32>(PUBLIC));
        assert_eq!(key.public_key().key_id_hex(), KEY_ID);
        let head = test_head();
        assert_eq!(head.signature, arr::<64>(SIGNATURE));
        assert_eq!(head.key_id, arr::<8>(KEY_ID));
        assert_eq!(head.verify(&key.public_key()), Ok(()));
    }

    #[test]
    fn key_files_match_the_documented_format() {
        let key = test_key();
        assert_eq!(
            key.to_file_string().as_str(),
            "chatapp directory secret key v1\nnWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=\n"
        );
        assert_eq!(
            key.public_key().to_file_string(),
            "chatapp directory public key v1\n11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n"
        );
    }

    #[test]
    fn key_files_round_trip() {
        let key = DirectorySigningKey::generate(&mut OsRng);
        let secret = key.to_file_string();
        let again = DirectorySigningKey::from_file_string(&secret).expect("parses");
        assert_eq!(again.public_key(), key.public_key());
        let public = key.public_key().to_file_string();
        assert_eq!(
            DirectoryPublicKey::from_file_string(&public),
            Ok(key.public_key())
        );
        let crlf = public.replace('\n', "\r\n");
        assert_eq!(
            DirectoryPublicKey::from_file_string(&crlf),
            Ok(key.public_key())
        );
    }

    #[test]
    fn refuses_a_public_key_file_where_a_secret_key_is_expected() {
        let public = test_key().public_key().to_file_string();
        assert_eq!(
            DirectorySigningKey::from_file_string(&public).map(|k| k.public_key()),
            Err(DirectoryKeyError::WrongKind {
                expected: SECRET_KIND,
                found: PUBLIC_KIND
            })
        );
        let secret = test_key().to_file_string();
        assert_eq!(
            DirectoryPublicKey::from_file_string(&secret),
            Err(DirectoryKeyError::WrongKind {
                expected: PUBLIC_KIND,
                found: SECRET_KIND
            })
        );
    }

    #[test]
    fn refuses_malformed_key_files() {
        let b64 = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let cases: [(String, DirectoryKeyError); 6] = [
            (
                format!("minisign public key\n{b64}\n"),
                DirectoryKeyError::WrongHeader {
                    kind: PUBLIC_KIND,
                    header: PUBLIC_KEY_HEADER,
                },
            ),
            (
                String::new(),
                DirectoryKeyError::WrongHeader {
                    kind: PUBLIC_KIND,
                    header: PUBLIC_KEY_HEADER,
                },
            ),
            (
                format!("{PUBLIC_KEY_HEADER}\n"),
                DirectoryKeyError::MissingKeyLine { kind: PUBLIC_KIND },
            ),
            (
                format!("{PUBLIC_KEY_HEADER}\n{b64}\nmore\n"),
                DirectoryKeyError::TrailingContent { kind: PUBLIC_KIND },
            ),
            (
                format!("{PUBLIC_KEY_HEADER}\n{}!\n", &b64[..43]),
                DirectoryKeyError::InvalidBase64 { kind: PUBLIC_KIND },
            ),
            (
                format!("{PUBLIC_KEY_HEADER}\nAAAA\n"),
                DirectoryKeyError::WrongKeyLength {
                    kind: PUBLIC_KIND,
                    actual: 3,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                DirectoryPublicKey::from_file_string(&text),
                Err(want),
                "{text:?}"
            );
        }
        let long = format!("{PUBLIC_KEY_HEADER}\n{}\n", "A".repeat(200));
        assert!(matches!(
            DirectoryPublicKey::from_file_string(&long),
            Err(DirectoryKeyError::WrongKeyLength { .. })
        ));
    }

    #[test]
    fn refuses_a_weak_public_key() {
        // The identity point (y = 1) has small order: it would verify forged signatures.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            DirectoryPublicKey::from_bytes(&identity),
            Err(DirectoryKeyError::WeakPublicKey)
        );
    }

    #[test]
    fn refuses_head_signed_by_another_key() {
        let other = DirectorySigningKey::generate(&mut OsRng);
        let head = other.sign_tree_head(8, &arr(ROOT8), 1_700_000_000);
        assert_eq!(
            head.verify(&test_key().public_key()),
            Err(TreeHeadError::WrongKey {
                trusted_key_id: arr(KEY_ID),
                head_key_id: other.public_key().key_id(),
            })
        );
    }

    #[test]
    fn refuses_head_whose_signature_does_not_match_its_fields() {
        let key = test_key().public_key();
        let bad = Err(TreeHeadError::BadSignature {
            key_id: arr(KEY_ID),
        });
        let mut head = test_head();
        head.tree_size += 1;
        assert_eq!(head.verify(&key), bad);
        let mut head = test_head();
        head.timestamp += 1;
        assert_eq!(head.verify(&key), bad);
        let mut head = test_head();
        head.root[31] ^= 1;
        assert_eq!(head.verify(&key), bad);
        let mut head = test_head();
        head.signature[0] ^= 1;
        assert_eq!(head.verify(&key), bad);
    }

    #[test]
    fn tree_heads_round_trip_through_bytes() {
        let head = test_head();
        let bytes = head.to_bytes();
        assert_eq!(bytes.len(), TREE_HEAD_LEN);
        assert_eq!(SignedTreeHead::from_bytes(&bytes), Ok(head));
    }

    #[test]
    fn refuses_tree_head_bytes_of_wrong_length_or_version() {
        let bytes = test_head().to_bytes();
        assert_eq!(
            SignedTreeHead::from_bytes(&bytes[..120]),
            Err(TreeHeadError::WrongLength {
                expected: 121,
                actual: 120
            })
        );
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(
            SignedTreeHead::from_bytes(&longer),
            Err(TreeHeadError::WrongLength {
                expected: 121,
                actual: 122
            })
        );
        let mut v2 = bytes;
        v2[0] = 2;
        assert_eq!(
            SignedTreeHead::from_bytes(&v2),
            Err(TreeHeadError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn debug_output_never_shows_the_secret_seed() {
        let shown = format!("{:?}", test_key());
        assert!(shown.contains(KEY_ID));
        assert!(!shown.to_lowercase().contains(&SEED[..16]));
        assert!(!shown.contains("nWGxne"));
    }

    proptest! {
        #[test]
        fn decoding_never_panics_on_arbitrary_input(
            bytes in proptest::collection::vec(any::<u8>(), 0..160),
            text in ".{0,120}",
        ) {
            let _ = SignedTreeHead::from_bytes(&bytes);
            let _ = DirectoryPublicKey::from_file_string(&text);
            let _ = DirectorySigningKey::from_file_string(&text);
            let _ = DirectoryPublicKey::from_file_string(&format!("{PUBLIC_KEY_HEADER}\n{text}"));
        }
    }
}
