//! Safety numbers: Signal's numeric fingerprint over both identities, for out-of-band checks.
//!
//! Per side: `h = 0x0000 || key || stable_id`, then 5200 times `h = SHA-512(h || key)`;
//! its first 30 bytes give 6 chunks of 5 bytes, each read big-endian mod 100000 as 5 digits.
//! Here `key` is `Ed25519 || X25519` of the identity. The two 30-digit halves are concatenated in
//! sorted order, so both sides see the same 60 digits (shown as 12 groups of 5). The QR payload is
//! `version (1) || first 32 bytes of each side's hash`, in the same sorted order.

use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use crate::identity::IdentityPublic;

/// Hash iterations per side (Signal's value: more than 112 bits of work to match a fingerprint).
pub const ITERATIONS: u32 = 5200;
/// Version byte leading the QR payload.
pub const QR_VERSION: u8 = 1;
/// Version prefix inside the hash (Signal's fingerprint version 0).
const HASH_VERSION: [u8; 2] = [0, 0];

/// A side's fingerprint: 30 digits and the hash they came from.
struct Half {
    digits: String,
    hash: [u8; 64],
}

fn half(key: &[u8], stable_id: &[u8]) -> Half {
    let mut hash: Vec<u8> = [&HASH_VERSION[..], key, stable_id].concat();
    for _ in 0..ITERATIONS {
        hash = Sha512::new()
            .chain_update(&hash)
            .chain_update(key)
            .finalize()
            .to_vec();
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(&hash);
    let mut digits = String::with_capacity(30);
    for chunk in hash[..30].chunks_exact(5) {
        let value = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        digits.push_str(&format!("{:05}", value % 100_000));
    }
    Half { digits, hash: out }
}

/// The safety number of a conversation between two identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    digits: String,
    qr_payload: Vec<u8>,
}

impl SafetyNumber {
    /// Computes the number both sides see. `*_stable_id` is the account's stable identifier
    /// (the user id), so that the same key under another name gives another number.
    pub fn compute(
        local: &IdentityPublic,
        local_stable_id: &[u8],
        remote: &IdentityPublic,
        remote_stable_id: &[u8],
    ) -> Self {
        Self::from_key_bytes(
            &local.key_bytes(),
            local_stable_id,
            &remote.key_bytes(),
            remote_stable_id,
        )
    }

    fn from_key_bytes(local: &[u8], local_id: &[u8], remote: &[u8], remote_id: &[u8]) -> Self {
        let mut halves = [half(local, local_id), half(remote, remote_id)];
        halves.sort_by(|a, b| a.digits.cmp(&b.digits));
        let mut qr_payload = Vec::with_capacity(65);
        qr_payload.push(QR_VERSION);
        let mut digits = String::with_capacity(60);
        for h in &halves {
            digits.push_str(&h.digits);
            qr_payload.extend_from_slice(&h.hash[..32]);
        }
        Self { digits, qr_payload }
    }

    /// The 60 digits without separators.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// 12 groups of 5 digits separated by spaces.
    pub fn display(&self) -> String {
        let groups: Vec<&str> = (0..12).map(|i| &self.digits[i * 5..i * 5 + 5]).collect();
        groups.join(" ")
    }

    /// The bytes to put in a QR code.
    pub fn qr_payload(&self) -> &[u8] {
        &self.qr_payload
    }

    /// Whether a scanned QR payload shows the same pair of identities (constant time).
    pub fn matches_qr(&self, scanned: &[u8]) -> bool {
        scanned.len() == self.qr_payload.len() && bool::from(scanned.ct_eq(&self.qr_payload))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::identity::IdentityKeyPair;
    use rand_core::OsRng;

    #[test]
    fn matches_signal_numeric_fingerprint_test_vector() {
        // libsignal's NumericFingerprintGenerator test (33-byte serialized identity keys).
        let alice =
            hex::decode("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
                .unwrap();
        let bob = hex::decode("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
            .unwrap();
        let n = SafetyNumber::from_key_bytes(&alice, b"+14152222222", &bob, b"+14153333333");
        assert_eq!(
            n.digits(),
            "300354477692869396892869876765458257569162576843440918079131"
        );
    }

    #[test]
    fn both_sides_compute_the_same_number_and_qr_payload() {
        let a = IdentityKeyPair::generate(&mut OsRng);
        let b = IdentityKeyPair::generate(&mut OsRng);
        let ab = SafetyNumber::compute(a.public(), b"alice", b.public(), b"bob");
        let ba = SafetyNumber::compute(b.public(), b"bob", a.public(), b"alice");
        assert_eq!(ab, ba);
        assert!(ab.matches_qr(ba.qr_payload()));
        assert_eq!(ab.qr_payload().len(), 65);
        assert_eq!(ab.qr_payload()[0], QR_VERSION);
    }

    #[test]
    fn a_changed_identity_key_changes_the_number() {
        let a = IdentityKeyPair::generate(&mut OsRng);
        let b = IdentityKeyPair::generate(&mut OsRng);
        let mallory = IdentityKeyPair::generate(&mut OsRng);
        let real = SafetyNumber::compute(a.public(), b"alice", b.public(), b"bob");
        let mitm = SafetyNumber::compute(a.public(), b"alice", mallory.public(), b"bob");
        assert_ne!(real.digits(), mitm.digits());
        assert!(!real.matches_qr(mitm.qr_payload()));
    }

    #[test]
    fn displays_twelve_groups_of_five_digits() {
        let a = IdentityKeyPair::generate(&mut OsRng);
        let shown = SafetyNumber::compute(a.public(), b"a", a.public(), b"b").display();
        let groups: Vec<&str> = shown.split(' ').collect();
        assert_eq!(groups.len(), 12);
        assert!(
            groups
                .iter()
                .all(|g| g.len() == 5 && g.bytes().all(|c| c.is_ascii_digit()))
        );
    }
}
