//! Release keys and signatures in minisign's formats, read and written the way minisign 0.11 does.
//!
//! Verification is self-contained: the `.pub` and `.minisig` formats are parsed here, the
//! prehash is BLAKE2b-512 (`blake2`) and the signatures Ed25519 (`ed25519-dalek`), so the
//! browser's verifier links no key-file or scrypt code. Key generation, secret keys
//! (`release.key`, scrypt-encrypted or unencrypted like `minisign -G -W`) and signing use the
//! `minisign` crate, behind the `sign` feature (on by default). Parsing never panics.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use blake2::{Blake2b512, Digest};
use ed25519_dalek::{Signature, VerifyingKey};
use thiserror::Error;
#[cfg(feature = "sign")]
use zeroize::Zeroizing;

/// Largest key or signature file we read; real ones are a few hundred bytes.
const MAX_BOX_LEN: usize = 64 * 1024;
/// Algorithm of keys and of legacy (not prehashed) signatures.
const SIG_ALG: &[u8; 2] = b"Ed";
/// Algorithm of prehashed signatures (BLAKE2b-512 of the data is signed).
const SIG_ALG_PREHASHED: &[u8; 2] = b"ED";
/// Decoded public key: algorithm (2) || key id (8) || Ed25519 key (32).
const PUBLIC_KEY_LEN: usize = 42;
/// Decoded signature line: algorithm (2) || key id (8) || Ed25519 signature (64).
const SIGNATURE_LEN: usize = 74;
const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";
/// Offset and value of the KDF algorithm in a decoded minisign secret key.
#[cfg(feature = "sign")]
const KDF_ALG_RANGE: std::ops::Range<usize> = 2..4;
#[cfg(feature = "sign")]
const KDF_NONE: [u8; 2] = [0, 0];
#[cfg(feature = "sign")]
const KDF_SCRYPT: &[u8; 2] = b"Sc";

/// The 8-byte key id minisign stores in keys and signatures; shown as 16 upper-case hex digits
/// of its little-endian value, exactly as `minisign` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Why a key or signature could not be used.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("not a minisign {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("the secret key is encrypted: a passphrase is needed")]
    PassphraseRequired,
    #[error("wrong passphrase for the secret key (or the key file is corrupt)")]
    WrongPassphrase,
    #[error("could not generate a key: {0}")]
    Generate(String),
    #[error("could not sign: {0}")]
    Sign(String),
}

fn malformed(what: &'static str, reason: impl fmt::Display) -> KeyError {
    KeyError::Malformed {
        what,
        reason: reason.to_string(),
    }
}

/// The base64 line of a minisign "box": line 1 is `untrusted comment: …`, line 2 the payload.
fn box_payload<'a>(text: &'a str, what: &'static str) -> Result<&'a str, KeyError> {
    if text.len() > MAX_BOX_LEN {
        return Err(malformed(what, "file too large"));
    }
    let mut lines = text.lines();
    let comment = lines.next().unwrap_or_default();
    if !comment.starts_with("untrusted comment: ") {
        return Err(malformed(
            what,
            "first line must start with 'untrusted comment: '",
        ));
    }
    lines
        .next()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .ok_or_else(|| malformed(what, "the base64 line is missing"))
}

/// minisign 0.11 writes unencrypted keys (`-G -W`) with an all-zero checksum, which the
/// `minisign` crate refuses as corrupt. Fill in the checksum (BLAKE2b-256 of algorithm, key id
/// and secret key, as for encrypted keys) so both kinds of unencrypted key open.
#[cfg(feature = "sign")]
fn with_unencrypted_checksum(text: &str) -> Result<Zeroizing<String>, KeyError> {
    use blake2::digest::consts::U32;
    use blake2::{Blake2b, Digest};
    const KEYNUM: std::ops::Range<usize> = 54..62;
    const SECRET: std::ops::Range<usize> = 62..126;
    const CHECKSUM: std::ops::Range<usize> = 126..158;
    let mut bytes = Zeroizing::new(
        BASE64
            .decode(box_payload(text, "secret key")?)
            .map_err(|e| malformed("secret key", e))?,
    );
    if bytes.len() != 158 || bytes[CHECKSUM].iter().any(|b| *b != 0) {
        return Ok(Zeroizing::new(text.to_owned()));
    }
    let mut hasher = Blake2b::<U32>::new();
    hasher.update(&bytes[..2]);
    hasher.update(&bytes[KEYNUM]);
    hasher.update(&bytes[SECRET]);
    bytes[CHECKSUM].copy_from_slice(&hasher.finalize());
    let comment = text
        .lines()
        .next()
        .unwrap_or("untrusted comment: minisign secret key");
    Ok(Zeroizing::new(format!(
        "{comment}\n{}\n",
        BASE64.encode(bytes.as_slice())
    )))
}

/// A minisign public key (`release.pub`): algorithm `Ed`, key id, Ed25519 key.
#[derive(Clone)]
pub struct ReleasePublicKey {
    key: VerifyingKey,
    key_id: KeyId,
}

impl fmt::Debug for ReleasePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleasePublicKey({})", self.key_id)
    }
}

impl ReleasePublicKey {
    /// Reads the two-line file minisign writes (`minisign -G`), or a bare base64 line
    /// (what `minisign -P` takes).
    pub fn from_file_string(text: &str) -> Result<Self, KeyError> {
        let line = if text.trim_start().starts_with("untrusted comment:") {
            box_payload(text.trim_start(), "public key")?
        } else {
            text.trim()
        };
        Self::from_base64(line)
    }

    /// Reads the base64 form (`RWQ…`, 56 characters).
    pub fn from_base64(line: &str) -> Result<Self, KeyError> {
        if line.len() > MAX_BOX_LEN {
            return Err(malformed("public key", "too long"));
        }
        let bytes = BASE64
            .decode(line.trim())
            .map_err(|e| malformed("public key", e))?;
        Self::from_bytes(&bytes)
    }

    /// Reads the decoded form: `Ed` (2) || key id (8) || Ed25519 public key (32).
    fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != PUBLIC_KEY_LEN || !bytes.starts_with(SIG_ALG) {
            return Err(malformed(
                "public key",
                "expected 42 bytes starting with the 'Ed' algorithm",
            ));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[2..10]);
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[10..]);
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| malformed("public key", "not a valid Ed25519 point"))?;
        Ok(Self {
            key,
            key_id: KeyId(key_id),
        })
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The base64 form, as `minisign -P` takes it.
    pub fn to_base64(&self) -> String {
        let mut bytes = Vec::with_capacity(PUBLIC_KEY_LEN);
        bytes.extend_from_slice(SIG_ALG);
        bytes.extend_from_slice(&self.key_id.0);
        bytes.extend_from_slice(self.key.as_bytes());
        BASE64.encode(bytes)
    }

    /// The two-line file, byte for byte what `minisign -G` writes.
    pub fn to_file_string(&self) -> String {
        format!(
            "untrusted comment: minisign public key {}\n{}\n",
            self.key_id,
            self.to_base64()
        )
    }

    /// minisign's Ed25519 check: strict verification (canonical `S`, no small-order `R` or
    /// key), which is what libsodium's `crypto_sign_verify_detached` accepts.
    fn verify_ed25519(&self, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        self.key
            .verify_strict(message, signature)
            .map_err(|_| SignatureError::BadSignature)
    }
}

/// A decrypted minisign secret key, ready to sign. Never printed.
#[cfg(feature = "sign")]
pub struct ReleaseSecretKey {
    inner: minisign::SecretKey,
    /// The same public key in the `minisign` crate's type, which `minisign::sign` checks
    /// each new signature with.
    inner_public: minisign::PublicKey,
    public: ReleasePublicKey,
}

#[cfg(feature = "sign")]
impl fmt::Debug for ReleaseSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseSecretKey({})", self.public.key_id)
    }
}

/// A freshly generated key pair and the secret key file to store (encrypted or not).
#[cfg(feature = "sign")]
pub struct GeneratedReleaseKey {
    pub secret: ReleaseSecretKey,
    pub public: ReleasePublicKey,
    /// The `release.key` text: write it with mode 0600.
    pub secret_file: Zeroizing<String>,
}

#[cfg(feature = "sign")]
impl fmt::Debug for GeneratedReleaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GeneratedReleaseKey({})", self.public.key_id)
    }
}

#[cfg(feature = "sign")]
impl ReleaseSecretKey {
    /// Makes a new key pair. With a passphrase, the secret key file is encrypted the way
    /// `minisign -G` does it (scrypt + XOR, BLAKE2b checksum); without, it is stored in the clear
    /// like `minisign -G -W`.
    pub fn generate(passphrase: Option<&str>) -> Result<GeneratedReleaseKey, KeyError> {
        let pair = match passphrase {
            Some(p) => minisign::KeyPair::generate_encrypted_keypair(Some(p.to_owned())),
            None => minisign::KeyPair::generate_unencrypted_keypair(),
        }
        .map_err(|e| KeyError::Generate(e.to_string()))?;
        let comment = match passphrase {
            Some(_) => "minisign encrypted secret key",
            None => "minisign secret key",
        };
        let secret_file = Zeroizing::new(
            pair.sk
                .to_box(Some(comment))
                .map_err(|e| KeyError::Generate(e.to_string()))?
                .into_string(),
        );
        // Reload from the file text: this proves the file we hand back opens with this passphrase.
        let secret = Self::from_file_string(&secret_file, passphrase)?;
        let public = secret.public.clone();
        Ok(GeneratedReleaseKey {
            secret,
            public,
            secret_file,
        })
    }

    /// Whether a secret key file needs a passphrase. Errors if it is not a minisign secret key.
    pub fn file_is_encrypted(text: &str) -> Result<bool, KeyError> {
        let bytes = Zeroizing::new(
            BASE64
                .decode(box_payload(text, "secret key")?)
                .map_err(|e| malformed("secret key", e))?,
        );
        if bytes.len() != 158 || &bytes[..2] != b"Ed" {
            return Err(malformed(
                "secret key",
                "expected 158 bytes starting with the 'Ed' algorithm",
            ));
        }
        match &bytes[KDF_ALG_RANGE] {
            kdf if kdf == KDF_NONE => Ok(false),
            kdf if kdf == KDF_SCRYPT => Ok(true),
            _ => Err(malformed("secret key", "unknown key derivation algorithm")),
        }
    }

    /// Opens a `release.key` file, decrypting it with `passphrase` when it is encrypted.
    pub fn from_file_string(text: &str, passphrase: Option<&str>) -> Result<Self, KeyError> {
        let encrypted = Self::file_is_encrypted(text)?;
        let text = if encrypted {
            Zeroizing::new(text.to_owned())
        } else {
            with_unencrypted_checksum(text)?
        };
        let sk_box =
            minisign::SecretKeyBox::from_string(&text).map_err(|e| malformed("secret key", e))?;
        let inner = if encrypted {
            let passphrase = passphrase.ok_or(KeyError::PassphraseRequired)?;
            // `from_box` with `Some` never prompts; a wrong passphrase fails the checksum.
            sk_box
                .into_secret_key(Some(passphrase.to_owned()))
                .map_err(|_| KeyError::WrongPassphrase)?
        } else {
            sk_box
                .into_unencrypted_secret_key()
                .map_err(|e| malformed("secret key", e))?
        };
        let pk =
            minisign::PublicKey::from_secret_key(&inner).map_err(|e| malformed("secret key", e))?;
        let public = ReleasePublicKey::from_bytes(&pk.to_bytes())?;
        Ok(Self {
            inner,
            inner_public: pk,
            public,
        })
    }

    pub fn public_key(&self) -> &ReleasePublicKey {
        &self.public
    }

    /// Signs `data` (prehashed with BLAKE2b-512, algorithm `ED`) and returns the `.minisig` text.
    /// The trusted comment is covered by the global signature.
    pub fn sign(
        &self,
        data: &[u8],
        trusted_comment: &str,
        untrusted_comment: &str,
    ) -> Result<String, KeyError> {
        if trusted_comment.contains(['\n', '\r']) || untrusted_comment.contains(['\n', '\r']) {
            return Err(KeyError::Sign("comments must be a single line".into()));
        }
        let sig = minisign::sign(
            Some(&self.inner_public),
            &self.inner,
            std::io::Cursor::new(data),
            Some(trusted_comment),
            Some(untrusted_comment),
        )
        .map_err(|e| KeyError::Sign(e.to_string()))?;
        Ok(sig.into_string())
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    #[error("the signature file is malformed: {0}")]
    Malformed(String),
    #[error("signed by key {found}, but the trusted key is {expected}")]
    UnknownKey { expected: KeyId, found: KeyId },
    #[error(
        "the signature does not match (the signed file or its trusted comment was changed, or the signature was forged)"
    )]
    BadSignature,
    #[error("legacy (non-prehashed) minisign signatures are not accepted")]
    Legacy,
}

/// A parsed `.minisig` file: an `ED` (BLAKE2b-512 prehashed) Ed25519 signature, the trusted
/// comment and the global signature over `signature || trusted comment`.
#[derive(Clone)]
pub struct ReleaseSignature {
    key_id: KeyId,
    signature: Signature,
    untrusted_comment: String,
    trusted_comment: String,
    global_signature: Signature,
}

impl fmt::Debug for ReleaseSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseSignature")
            .field("key_id", &self.key_id)
            .field("trusted_comment", &self.trusted_comment)
            .finish()
    }
}

fn sig_malformed(reason: &str) -> SignatureError {
    SignatureError::Malformed(reason.to_owned())
}

impl ReleaseSignature {
    /// Parses the four lines minisign writes: `untrusted comment: …`, base64 of `ED` || key id
    /// (8) || signature (64), `trusted comment: …`, base64 of the global signature (64).
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        if text.len() > MAX_BOX_LEN {
            return Err(sig_malformed("file too large"));
        }
        let mut lines = text.lines();
        let (Some(untrusted), Some(sig_line), Some(trusted), Some(global_line)) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(sig_malformed(
                "expected four lines: untrusted comment, signature, trusted comment, global signature",
            ));
        };
        let untrusted_comment = untrusted
            .strip_prefix(UNTRUSTED_PREFIX)
            .ok_or_else(|| sig_malformed("line 1 must start with 'untrusted comment: '"))?;
        let trusted_comment = trusted
            .strip_prefix(TRUSTED_PREFIX)
            .ok_or_else(|| sig_malformed("line 3 must start with 'trusted comment: '"))?
            .trim();
        let global = BASE64
            .decode(global_line.trim())
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or_else(|| {
                sig_malformed("the global signature (line 4) is not 64 bytes of base64")
            })?;
        let sig = BASE64
            .decode(sig_line.trim())
            .ok()
            .and_then(|b| <[u8; SIGNATURE_LEN]>::try_from(b).ok())
            .ok_or_else(|| sig_malformed("the signature (line 2) is not 74 bytes of base64"))?;
        let (alg, rest) = sig.split_at(2);
        if alg == SIG_ALG {
            return Err(SignatureError::Legacy);
        }
        if alg != SIG_ALG_PREHASHED {
            return Err(sig_malformed("unsupported signature algorithm"));
        }
        let (key_id, signature) = rest.split_at(8);
        let key_id = KeyId::from_slice(key_id).ok_or_else(|| sig_malformed("bad key id"))?;
        let signature =
            Signature::from_slice(signature).map_err(|_| sig_malformed("bad signature length"))?;
        Ok(Self {
            key_id,
            signature,
            untrusted_comment: untrusted_comment.to_owned(),
            trusted_comment: trusted_comment.to_owned(),
            global_signature: Signature::from_bytes(&global),
        })
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The untrusted comment (not covered by any signature).
    pub fn untrusted_comment(&self) -> String {
        self.untrusted_comment.clone()
    }

    /// The file text in minisign's canonical layout; equal to what was parsed when that was canonical.
    pub fn to_text(&self) -> String {
        let mut sig = Vec::with_capacity(SIGNATURE_LEN);
        sig.extend_from_slice(SIG_ALG_PREHASHED);
        sig.extend_from_slice(&self.key_id.0);
        sig.extend_from_slice(&self.signature.to_bytes());
        format!(
            "{UNTRUSTED_PREFIX}{}\n{}\n{TRUSTED_PREFIX}{}\n{}\n",
            self.untrusted_comment,
            BASE64.encode(sig),
            self.trusted_comment,
            BASE64.encode(self.global_signature.to_bytes()),
        )
    }

    /// The trusted comment. Only meaningful after [`ReleaseSignature::verify`] succeeded.
    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// Checks the key id, the signature over BLAKE2b-512 of `data` and the global signature
    /// over the signature and the trusted comment.
    pub fn verify(&self, key: &ReleasePublicKey, data: &[u8]) -> Result<(), SignatureError> {
        if self.key_id != key.key_id {
            return Err(SignatureError::UnknownKey {
                expected: key.key_id,
                found: self.key_id,
            });
        }
        let prehash = Blake2b512::digest(data);
        key.verify_ed25519(&prehash, &self.signature)?;
        let mut global = Vec::with_capacity(64 + self.trusted_comment.len());
        global.extend_from_slice(&self.signature.to_bytes());
        global.extend_from_slice(self.trusted_comment.as_bytes());
        key.verify_ed25519(&global, &self.global_signature)
    }
}

/// A key and signature made by the `minisign` 0.11 CLI (`minisign -G -W`, then
/// `minisign -S -t 'chatapp test vector' -c 'signed by the minisign CLI'` of [`CLI_DATA`]).
#[cfg(test)]
mod cli_vector {
    use super::*;

    const CLI_PUB: &str = "untrusted comment: minisign public key 874EA92DB2C801DD\n\
        RWTdAciyLalOh4JS+uRMcBvrrIJt3buq4ii+DrDSPnXbZv/Fd1uX+4rD\n";
    const CLI_SIG: &str = "untrusted comment: signed by the minisign CLI\n\
        RUTdAciyLalOh3OEb6TizF8LHDI81E+JSyB6FQgyYCP4TIoRc76ipi6P5ptBsxLVq/TcFgiCuhc1XZX9Tf26iRDfmx/YMFDHfQU=\n\
        trusted comment: chatapp test vector\n\
        8RtmG20K68t/vjg6Knz39fJGdQSQA8dwPgIRxNL3pGmbujxuAkzoICtiHkh+HIipbOcLtztOVg1iRrOw0Sf/AQ==\n";
    const CLI_DATA: &[u8] = b"chatapp minisign vector\n";

    fn parsed() -> (ReleasePublicKey, ReleaseSignature) {
        (
            ReleasePublicKey::from_file_string(CLI_PUB).expect("public key"),
            ReleaseSignature::parse(CLI_SIG).expect("signature"),
        )
    }

    #[test]
    fn verifies_a_signature_made_by_the_minisign_cli() {
        let (key, sig) = parsed();
        assert_eq!(key.key_id().to_string(), "874EA92DB2C801DD");
        assert_eq!(sig.verify(&key, CLI_DATA), Ok(()));
        assert_eq!(sig.trusted_comment(), "chatapp test vector");
        assert_eq!(sig.untrusted_comment(), "signed by the minisign CLI");
    }

    #[test]
    fn reproduces_the_cli_files_byte_for_byte() {
        let (key, sig) = parsed();
        assert_eq!(sig.to_text(), CLI_SIG);
        assert_eq!(key.to_file_string(), CLI_PUB);
    }

    #[test]
    fn refuses_the_cli_signature_over_other_data_or_comment() {
        let (key, sig) = parsed();
        assert_eq!(
            sig.verify(&key, b"chatapp minisign vector"),
            Err(SignatureError::BadSignature)
        );
        let edited = CLI_SIG.replace("test vector", "test vectoR");
        let sig = ReleaseSignature::parse(&edited).expect("parse");
        assert_eq!(
            sig.verify(&key, CLI_DATA),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn refuses_a_legacy_signature() {
        let legacy = CLI_SIG.replace("RUTd", "RWTd");
        assert_eq!(
            ReleaseSignature::parse(&legacy).err(),
            Some(SignatureError::Legacy)
        );
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_not_a_panic() {
        let (key, _) = parsed();
        for cut in 0..CLI_SIG.len() {
            if let Ok(sig) = ReleaseSignature::parse(&CLI_SIG[..cut]) {
                assert!(sig.verify(&key, CLI_DATA).is_err() || cut + 1 == CLI_SIG.len());
            }
        }
        let bytes = CLI_SIG.as_bytes();
        for i in 0..bytes.len() {
            let mut flipped = bytes.to_vec();
            flipped[i] ^= 0x01;
            let Ok(text) = std::str::from_utf8(&flipped) else {
                continue;
            };
            if let Ok(sig) = ReleaseSignature::parse(text) {
                // Flips inside the untrusted comment are not covered by a signature; anything
                // else must fail verification (or be refused by the canonical-layout check).
                if sig.verify(&key, CLI_DATA).is_ok() {
                    assert!(i < CLI_SIG.find('\n').unwrap_or(0) || sig.to_text() != text);
                }
            }
        }
        for cut in 0..CLI_PUB.len() {
            let _ = ReleasePublicKey::from_file_string(&CLI_PUB[..cut]);
        }
    }
}

#[cfg(all(test, feature = "sign"))]
mod tests {
    use super::*;

    fn unencrypted() -> GeneratedReleaseKey {
        ReleaseSecretKey::generate(None).expect("generate")
    }

    #[test]
    fn signature_made_by_a_key_verifies_with_its_public_key() {
        let key = unencrypted();
        let sig = key.secret.sign(b"hello", "version=1", "x").expect("sign");
        let sig = ReleaseSignature::parse(&sig).expect("parse");
        assert_eq!(sig.verify(&key.public, b"hello"), Ok(()));
        assert_eq!(sig.trusted_comment(), "version=1");
    }

    #[test]
    fn refuses_changed_data() {
        let key = unencrypted();
        let sig = ReleaseSignature::parse(&key.secret.sign(b"hello", "c", "x").expect("sign"))
            .expect("parse");
        assert_eq!(
            sig.verify(&key.public, b"hellO"),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn refuses_edited_trusted_comment() {
        let key = unencrypted();
        let text = key
            .secret
            .sign(b"hello", "version=1.0.0", "x")
            .expect("sign");
        let edited = text.replace("version=1.0.0", "version=9.0.0");
        let sig = ReleaseSignature::parse(&edited).expect("parse");
        assert_eq!(
            sig.verify(&key.public, b"hello"),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn refuses_signature_by_another_key_as_unknown_key() {
        let (a, b) = (unencrypted(), unencrypted());
        let sig =
            ReleaseSignature::parse(&a.secret.sign(b"m", "c", "x").expect("sign")).expect("parse");
        assert!(matches!(
            sig.verify(&b.public, b"m"),
            Err(SignatureError::UnknownKey { .. })
        ));
    }

    #[test]
    fn public_key_file_round_trips_and_names_the_key_id() {
        let key = unencrypted();
        let text = key.public.to_file_string();
        assert!(text.contains(&key.public.key_id().to_string()));
        let back = ReleasePublicKey::from_file_string(&text).expect("parse");
        assert_eq!(back.key_id(), key.public.key_id());
        assert_eq!(back.to_base64(), key.public.to_base64());
    }

    #[test]
    fn encrypted_secret_key_needs_the_right_passphrase() {
        let key = ReleaseSecretKey::generate(Some("correct horse")).expect("generate");
        assert_eq!(
            ReleaseSecretKey::file_is_encrypted(&key.secret_file).ok(),
            Some(true)
        );
        assert!(matches!(
            ReleaseSecretKey::from_file_string(&key.secret_file, None),
            Err(KeyError::PassphraseRequired)
        ));
        assert!(matches!(
            ReleaseSecretKey::from_file_string(&key.secret_file, Some("wrong")),
            Err(KeyError::WrongPassphrase)
        ));
        let opened = ReleaseSecretKey::from_file_string(&key.secret_file, Some("correct horse"))
            .expect("open");
        assert_eq!(opened.public_key().key_id(), key.public.key_id());
    }

    #[test]
    fn secret_key_debug_output_shows_only_the_key_id() {
        let key = unencrypted();
        assert_eq!(
            format!("{:?}", key.secret),
            format!("ReleaseSecretKey({})", key.public.key_id())
        );
    }

    #[test]
    fn refuses_garbage_and_truncated_inputs_without_panicking() {
        let key = unencrypted();
        let sig = key.secret.sign(b"m", "c", "x").expect("sign");
        for cut in 0..sig.len() {
            let _ = ReleaseSignature::parse(&sig[..cut]);
        }
        assert!(ReleaseSignature::parse("garbage").is_err());
        let mut lines: Vec<&str> = sig.lines().collect();
        lines[3] = "AAAA";
        assert!(matches!(
            ReleaseSignature::parse(&lines.join("\n")),
            Err(SignatureError::Malformed(_))
        ));
        assert!(ReleasePublicKey::from_file_string("untrusted comment: x\nRWQ\n").is_err());
        assert!(ReleaseSecretKey::from_file_string("untrusted comment: x\nAAAA\n", None).is_err());
    }
}
