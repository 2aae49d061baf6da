//! The per-message primitives of `chat-core`'s Double Ratchet and sender keys: KDF_CK
//! (HMAC-SHA256 with the constants 0x01 and 0x02), HKDF-SHA256, HKDF-Expand to one 32-byte key,
//! and ChaCha20-Poly1305 in place with a detached tag. Nothing here is a primitive of our own:
//! every function is a thin, non-generic call into the RustCrypto crates (`hmac`, `hkdf`,
//! `sha2`, `chacha20poly1305`).
//!
//! Why a crate of its own: those crates are generic, so their code is compiled into the crate
//! that calls them, at that crate's optimisation level. `cargo xtask wasm` builds the browser's
//! wasm for size (`opt-level = "s"`, root `Cargo.toml`, `[profile.wasm]`), which keeps the
//! ChaCha20 rounds, the Poly1305 blocks and the HMAC/SHA-256 glue rolled and costs the ratchet
//! about 2x in wasm; building all of `chat-core` for speed instead costs 50 KiB of wasm. Here the
//! hot code is monomorphised in this small crate, which `[profile.wasm.package.chat-core-prims]`
//! builds at opt-level 3, while the codecs, the directory verifier and the rest stay at "s".
//! The definitions (which constants, which info strings, which layout) belong to `chat-core`
//! and `docs/PROTOCOL.md`; this crate only runs them.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Length of a ChaCha20-Poly1305 tag.
pub const TAG_LEN: usize = 16;

/// HKDF-SHA256 (RFC 5869, extract then expand) into `out`.
///
/// # Panics
/// When `out` is longer than 255 × 32 bytes (HKDF's limit); callers use 32 to 64 bytes.
pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, out)
        .unwrap_or_else(|_| panic!("HKDF-SHA256 output of {} bytes is too long", out.len()));
}

/// HKDF-Expand(PRK = `prk`, `info`, 32 bytes) = HMAC-SHA256(prk, info || 0x01) (RFC 5869 §2.3).
pub fn hkdf_expand_32(prk: &[u8; 32], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::from_prk(prk)
        .unwrap_or_else(|_| unreachable!("a 32-byte PRK is the hash length"))
        .expand(info, key.as_mut())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    key
}

/// KDF_CK: (HMAC-SHA256(ck, 0x01), HMAC-SHA256(ck, 0x02)). The chain key is hashed into HMAC's
/// inner and outer states once and the keyed state cloned for both constants.
pub fn kdf_ck(chain_key: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let keyed = <Hmac<Sha256> as Mac>::new_from_slice(chain_key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    let mut first = keyed.clone();
    first.update(&[0x01]);
    let mut second = keyed;
    second.update(&[0x02]);
    (
        Zeroizing::new(first.finalize().into_bytes().into()),
        Zeroizing::new(second.finalize().into_bytes().into()),
    )
}

/// ChaCha20-Poly1305 (RFC 8439) encryption of `buffer` in place; returns the tag.
///
/// # Panics
/// Only beyond ChaCha20's 256 GiB per nonce.
pub fn seal_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    buffer: &mut [u8],
) -> [u8; TAG_LEN] {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buffer)
        .unwrap_or_else(|_| panic!("ChaCha20-Poly1305 encrypts at most 256 GiB"))
        .into()
}

/// ChaCha20-Poly1305 (RFC 8439) decryption of `buffer` in place. `None` when the tag does not
/// verify (then `buffer` is unchanged).
pub fn open_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    buffer: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Option<()> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buffer, Tag::from_slice(tag))
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc8439_section_2_8_2() {
        let key: [u8; 32] =
            hex::decode("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = hex::decode("070000004041424344454647")
            .unwrap()
            .try_into()
            .unwrap();
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut buffer = plaintext.to_vec();
        let tag = seal_in_place(&key, &nonce, &aad, &mut buffer);
        assert_eq!(hex::encode(tag), "1ae10b594f09e26a7e902ecbd0600691");
        assert_eq!(
            hex::encode(&buffer[..16]),
            "d31a8d34648e60db7b86afbc53ef7ec2"
        );
        let mut tampered = buffer.clone();
        tampered[0] ^= 1;
        assert!(open_in_place(&key, &nonce, &aad, &mut tampered, &tag).is_none());
        open_in_place(&key, &nonce, &aad, &mut buffer, &tag).unwrap();
        assert_eq!(buffer, plaintext);
    }

    #[test]
    fn rfc5869_test_case_1() {
        let ikm = [0x0b; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; 42];
        hkdf_sha256(&salt, &ikm, &info, &mut okm);
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
        // Test case 1's PRK, expanded to 32 bytes: the first 32 bytes of its OKM.
        let prk: [u8; 32] =
            hex::decode("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(*hkdf_expand_32(&prk, &info), okm[..32]);
    }

    #[test]
    fn kdf_ck_is_hmac_of_the_two_constants() {
        let ck = [7u8; 32];
        let hmac = |data: u8| -> [u8; 32] {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&ck).unwrap();
            mac.update(&[data]);
            mac.finalize().into_bytes().into()
        };
        let (mk, next) = kdf_ck(&ck);
        assert_eq!(*mk, hmac(1));
        assert_eq!(*next, hmac(2));
        assert_ne!(*mk, *next);
    }
}
