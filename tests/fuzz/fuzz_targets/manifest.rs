//! Release manifest parsing and verification (chat_signing::manifest): `from_canonical_json` of
//! arbitrary bytes, and `verify_manifest` with a fuzzed manifest under a real signature, or a
//! fuzzed signature file over a real manifest. Never panics; nothing fuzzed verifies unless it
//! is byte-for-byte the signed original.
#![no_main]

use std::sync::OnceLock;

use chat_signing::manifest::{Manifest, VerifyPolicy, verify_manifest};
use chat_signing::release::{ReleasePublicKey, ReleaseSecretKey};
use libfuzzer_sys::fuzz_target;

const MANIFEST: &str = r#"{"created":"2025-01-01T00:00:00Z","expires":"2099-01-01T00:00:00Z","files":{"app.js":{"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}},"format":"chatapp-release-manifest/1","name":"chatapp","version":"1.0.0"}"#;

fn fixture() -> &'static (ReleasePublicKey, Vec<u8>, String) {
    static FIXTURE: OnceLock<(ReleasePublicKey, Vec<u8>, String)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let generated = ReleaseSecretKey::generate(None).expect("key");
        let secret = generated.secret;
        let bytes = match Manifest::from_canonical_json(MANIFEST.as_bytes()) {
            Ok(m) => m.to_canonical_json(),
            Err(_) => MANIFEST.as_bytes().to_vec(),
        };
        let trusted = Manifest::from_canonical_json(&bytes)
            .map(|m| m.trusted_comment())
            .unwrap_or_default();
        let untrusted = chat_signing::manifest::untrusted_comment(secret.public_key().key_id());
        let sig = secret.sign(&bytes, &trusted, &untrusted).expect("sign");
        let policy = VerifyPolicy {
            now_unix: 1_800_000_000,
            min_version: None,
        };
        verify_manifest(secret.public_key(), &bytes, &sig, &policy)
            .expect("the fixture must verify, or the target tests nothing");
        (secret.public_key().clone(), bytes, sig)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::from_canonical_json(data);
    let (key, manifest, sig) = fixture();
    let policy = VerifyPolicy {
        now_unix: 1_800_000_000,
        min_version: None,
    };
    if data != manifest.as_slice() {
        assert!(
            verify_manifest(key, data, sig, &policy).is_err(),
            "a changed manifest verified"
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if text != sig {
            assert!(
                verify_manifest(key, manifest, text, &policy).is_err(),
                "a changed signature verified"
            );
        }
    }
});
