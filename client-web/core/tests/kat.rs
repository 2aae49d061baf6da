//! Known-answer tests for the primitives chat-core builds on, run through the crates it uses:
//! X25519 (RFC 7748 §5.2 and §6.1), ChaCha20-Poly1305 (RFC 8439 §2.8.2), HKDF-SHA256 (RFC 5869
//! cases 1–3). The module tests of `ratchet` and `safety` run the same vectors (and Signal's
//! fingerprint vector) through chat-core's own wrappers.
#![allow(clippy::unwrap_used)]

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret, x25519};

fn h32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

#[test]
fn x25519_matches_rfc7748_section_5_2_first_vector() {
    let k = h32("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
    let u = h32("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
    assert_eq!(
        hex::encode(x25519(k, u)),
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    );
}

#[test]
fn x25519_matches_rfc7748_section_5_2_second_vector() {
    let k = h32("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d");
    let u = h32("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493");
    assert_eq!(
        hex::encode(x25519(k, u)),
        "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"
    );
}

#[test]
fn x25519_matches_rfc7748_section_5_2_iterated_1_and_1000_times() {
    let mut k = x25519_dalek::X25519_BASEPOINT_BYTES;
    let mut u = k;
    for i in 1..=1000 {
        let next = x25519(k, u);
        u = k;
        k = next;
        if i == 1 {
            assert_eq!(
                hex::encode(k),
                "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
            );
        }
    }
    assert_eq!(
        hex::encode(k),
        "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"
    );
}

#[test]
fn x25519_matches_rfc7748_section_6_1_alice_and_bob() {
    let alice = StaticSecret::from(h32(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let bob = StaticSecret::from(h32(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    let alice_pub = PublicKey::from(&alice);
    let bob_pub = PublicKey::from(&bob);
    assert_eq!(
        hex::encode(alice_pub.as_bytes()),
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    );
    assert_eq!(
        hex::encode(bob_pub.as_bytes()),
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    );
    let k = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742";
    let ab = alice.diffie_hellman(&bob_pub);
    let ba = bob.diffie_hellman(&alice_pub);
    assert!(ab.was_contributory());
    assert_eq!(hex::encode(ab.as_bytes()), k);
    assert_eq!(hex::encode(ba.as_bytes()), k);
}

#[test]
fn x25519_with_a_low_order_point_is_not_contributory() {
    let secret = StaticSecret::from([0x42; 32]);
    for point in [[0u8; 32], {
        let mut one = [0u8; 32];
        one[0] = 1;
        one
    }] {
        assert!(
            !secret
                .diffie_hellman(&PublicKey::from(point))
                .was_contributory()
        );
    }
}

#[test]
fn chacha20poly1305_matches_rfc8439_section_2_8_2() {
    let key = h32("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce = hex::decode("070000004041424344454647").unwrap();
    let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
    let plaintext: &[u8] = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let expected = "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
                    3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36\
                    92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc\
                    3ff4def08e4b7a9de576d26586cec64b6116\
                    1ae10b594f09e26a7e902ecbd0600691";
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(hex::encode(&sealed), expected);
    let opened = cipher
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &sealed,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(opened, plaintext);
}

fn hkdf_hex(salt: Option<&[u8]>, ikm: &[u8], info: &[u8], len: usize) -> (String, String) {
    let (prk, hk) = Hkdf::<Sha256>::extract(salt, ikm);
    let mut okm = vec![0u8; len];
    hk.expand(info, &mut okm).unwrap();
    (hex::encode(prk), hex::encode(okm))
}

#[test]
fn hkdf_sha256_matches_rfc5869_case_1() {
    let salt = hex::decode("000102030405060708090a0b0c").unwrap();
    let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
    let (prk, okm) = hkdf_hex(Some(&salt), &[0x0b; 22], &info, 42);
    assert_eq!(
        prk,
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    );
    assert_eq!(
        okm,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    );
}

#[test]
fn hkdf_sha256_matches_rfc5869_case_2() {
    let ikm: Vec<u8> = (0x00..=0x4f).collect();
    let salt: Vec<u8> = (0x60..=0xaf).collect();
    let info: Vec<u8> = (0xb0..=0xff).collect();
    let (prk, okm) = hkdf_hex(Some(&salt), &ikm, &info, 82);
    assert_eq!(
        prk,
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244"
    );
    assert_eq!(
        okm,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
         59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
         cc30c58179ec3e87c14c01d5c1f3434f1d87"
    );
}

#[test]
fn hkdf_sha256_matches_rfc5869_case_3_with_empty_salt_and_info() {
    let (prk, okm) = hkdf_hex(None, &[0x0b; 22], &[], 42);
    assert_eq!(
        prk,
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04"
    );
    assert_eq!(
        okm,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    );
}
