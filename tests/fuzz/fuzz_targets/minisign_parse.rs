//! minisign key and signature parsing (chat_signing::release): public keys (file and base64
//! forms), unencrypted secret key files, and `.minisig` files. Never panics.
#![no_main]

use chat_signing::release::{ReleasePublicKey, ReleaseSecretKey, ReleaseSignature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ReleasePublicKey::from_file_string(text);
    let _ = ReleasePublicKey::from_base64(text);
    if let Ok(sig) = ReleaseSignature::parse(text) {
        let _ = sig.to_text();
    }
    // Only the unencrypted form: an encrypted key would spend the fuzzer's time in scrypt.
    if !text.contains("Sc") {
        let _ = ReleaseSecretKey::from_file_string(text, None);
    }
});
