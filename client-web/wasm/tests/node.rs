//! chat_core.wasm and chat_verify.wasm in a real engine: builds them with `cargo xtask wasm` (own target directory, so
//! it never waits on the outer cargo's lock) and runs the `tests/*.mjs` scripts under Node.js.
//! Native vectors come from chat-core and chat-signing in this process. `node` is required:
//! these tests fail, never skip, without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use chat_core::identity::{DeviceKeys, IdentityKeyPair, IdentityPublic};
use chat_core::ratchet::Session;
use chat_core::safety::SafetyNumber;
use chat_signing::manifest::{self, FileDigest, Manifest};
use chat_signing::release::ReleaseSecretKey;
use rand_core::OsRng;
use serde_json::{Value, json};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The package directory (`chat_core.*` and `chat_verify.*`), built once per test binary.
fn package() -> &'static Path {
    static PACKAGE: OnceLock<PathBuf> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let node = Command::new("node").arg("--version").output();
        assert!(
            node.as_ref().is_ok_and(|o| o.status.success()),
            "these tests run chat_core.wasm under Node.js, and `node` cannot be run ({node:?}); \
             install Node.js 18 or later (Debian: apt-get install nodejs)"
        );
        let root = workspace_root();
        let target = root.join("target/wasm-test");
        let out = target.join("pkg");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .args([
                "run",
                "--quiet",
                "--package",
                "xtask",
                "--",
                "wasm",
                "--out",
            ])
            .arg(&out)
            .status()
            .expect("cannot run cargo");
        assert!(status.success(), "cargo xtask wasm failed: {status}");
        out
    })
}

/// Runs `node tests/<script> <package> <args…>` and returns its stdout; fails on a non-zero exit.
fn node(script: &str, args: &[&Path]) -> String {
    let pkg = package();
    let output = Command::new("node")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(script),
        )
        .arg(pkg)
        .args(args)
        .output()
        .expect("cannot run node");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "node {script} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn node_json(script: &str, args: &[&Path]) -> Value {
    let out = node(script, args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{script} printed {out:?}: {e}"))
}

fn raw_identity(identity: &IdentityPublic) -> Vec<u8> {
    identity.encode()[1..].to_vec()
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

#[test]
fn the_verifier_imports_nothing_and_the_app_only_host_randomness() {
    let modules = node_json("modules.mjs", &[]);
    assert_eq!(
        strings(&modules["chat_verify"]["imports"]),
        Vec::<String>::new()
    );
    assert_eq!(
        strings(&modules["chat_core"]["imports"]),
        vec!["env.random_fill".to_owned()]
    );
    let verifier_exports = strings(&modules["chat_verify"]["exports"]);
    for name in [
        "release_verify",
        "release_check_file",
        "alloc",
        "dealloc",
        "free_handle",
    ] {
        assert!(verifier_exports.iter().any(|e| e == name), "{name} missing");
    }
    assert!(
        !verifier_exports.iter().any(|e| e.starts_with("session_")),
        "the verifier must not carry the app"
    );
    let app_exports = strings(&modules["chat_core"]["exports"]);
    assert!(app_exports.iter().any(|e| e == "session_encrypt"));
    assert!(!app_exports.iter().any(|e| e.starts_with("release_")));
}

#[test]
fn two_wasm_instances_agree_with_x3dh_and_exchange_100_messages_each_way() {
    // 1 initial message + 100 in each direction.
    assert_eq!(node("two_instances.mjs", &[]).trim(), "ok 201");
}

#[test]
fn wasm_and_native_sessions_interoperate_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    // Native Alice -> wasm Bob, whose keys are made natively and handed over encoded.
    let alice = IdentityKeyPair::generate(&mut OsRng);
    let mut bob = DeviceKeys::generate(&mut OsRng);
    let otk = bob.generate_one_time_prekeys(1, &mut OsRng)[0];
    let mut to_bob = Session::initiate(&alice, &bob.bundle(Some(otk.id)), &mut OsRng).unwrap();
    let sent: Vec<String> = (0..5).map(|i| format!("native Alice says {i}")).collect();
    let messages: Vec<String> = sent
        .iter()
        .map(|m| hex::encode(to_bob.encrypt(m.as_bytes(), &mut OsRng).unwrap()))
        .collect();
    let input = json!({ "bob_keys": hex::encode(bob.encode().as_slice()), "messages": messages });
    std::fs::write(dir.path().join("native_to_wasm.json"), input.to_string()).unwrap();

    // Wasm Dave -> native Carol, from Carol's raw bundle (identity || signed prekey || one-time).
    let mut carol = DeviceKeys::generate(&mut OsRng);
    let carol_otk = carol.generate_one_time_prekeys(1, &mut OsRng)[0];
    let mut bundle = raw_identity(carol.identity().public());
    let spk = carol.signed_prekey();
    bundle.extend_from_slice(&spk.id.to_be_bytes());
    bundle.extend_from_slice(spk.key.as_bytes());
    bundle.extend_from_slice(&spk.signature.to_bytes());
    bundle.extend_from_slice(&carol_otk.id.to_be_bytes());
    bundle.extend_from_slice(carol_otk.key.as_bytes());
    let carol_json = json!({ "bundle": hex::encode(&bundle) });
    std::fs::write(dir.path().join("carol.json"), carol_json.to_string()).unwrap();

    let phase1 = node_json("interop.mjs", &[dir.path(), Path::new("1")]);
    assert_eq!(
        strings(&phase1["received"]),
        sent,
        "wasm Bob read native Alice"
    );
    let replies: Vec<String> = strings(&phase1["replies"])
        .iter()
        .map(|m| String::from_utf8(to_bob.decrypt(&hex::decode(m).unwrap()).unwrap()).unwrap())
        .collect();
    let expected: Vec<String> = (0..5).map(|i| format!("wasm Bob reply {i}")).collect();
    assert_eq!(replies, expected, "native Alice read wasm Bob");

    let dave_messages = strings(&phase1["messages"]);
    let first = hex::decode(&dave_messages[0]).unwrap();
    let (mut from_dave, plaintext) = Session::accept(&mut carol, &first).unwrap();
    let mut read = vec![String::from_utf8(plaintext).unwrap()];
    for m in &dave_messages[1..] {
        let p = from_dave.decrypt(&hex::decode(m).unwrap()).unwrap();
        read.push(String::from_utf8(p).unwrap());
    }
    let expected: Vec<String> = (0..4).map(|i| format!("wasm Dave says {i}")).collect();
    assert_eq!(read, expected, "native Carol read wasm Dave");
    let dave = IdentityPublic::decode(&[&[1u8][..], &unhex(&phase1["dave_identity"])].concat())
        .expect("wasm identity decodes natively");
    assert_eq!(from_dave.remote_identity(), &dave);
    let safety = SafetyNumber::compute(carol.identity().public(), b"carol", &dave, b"dave");
    assert_eq!(phase1["safety"].as_str(), Some(safety.digits()));
    let login = unhex(&phase1["login"]);
    let message = chat_core::wire::login_challenge_message(&[7; 32], "dave", 3);
    let signature = ed25519_dalek::Signature::from_slice(&login).expect("64 bytes");
    dave.signing_key()
        .verify_strict(&message, &signature)
        .expect("the wasm login signature verifies natively");

    let carol_replies: Vec<String> = (0..3)
        .map(|i| {
            let m = from_dave
                .encrypt(format!("native Carol reply {i}").as_bytes(), &mut OsRng)
                .unwrap();
            hex::encode(m)
        })
        .collect();
    std::fs::write(
        dir.path().join("carol_replies.json"),
        json!(carol_replies).to_string(),
    )
    .unwrap();
    let phase2 = node_json("interop.mjs", &[dir.path(), Path::new("2")]);
    let expected: Vec<String> = (0..3).map(|i| format!("native Carol reply {i}")).collect();
    assert_eq!(
        strings(&phase2["replies"]),
        expected,
        "restored wasm session read native Carol"
    );
}

#[test]
fn natively_signed_release_verifies_in_wasm_and_each_tampering_gets_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
    let key = ReleaseSecretKey::generate(None).unwrap();
    let other = ReleaseSecretKey::generate(None).unwrap();
    let app = b"console.log('verified app');".to_vec();
    let files = BTreeMap::from([
        ("app.js".to_owned(), FileDigest::of_bytes(&app)),
        (
            "index.html".to_owned(),
            FileDigest::of_bytes(b"<!doctype html>"),
        ),
    ]);
    let now = 1_790_000_000i64;
    let expires = now + 30 * 86_400;
    let version = semver::Version::new(1, 4, 0);
    let manifest = Manifest::new("chatapp", &version, now - 60, expires, files).unwrap();
    let bytes = manifest.to_canonical_json();
    let signature = key
        .secret
        .sign(
            &bytes,
            &manifest.trusted_comment(),
            &manifest::untrusted_comment(key.public.key_id()),
        )
        .unwrap();
    write("release.pub", key.public.to_file_string().as_bytes());
    write("other.pub", other.public.to_file_string().as_bytes());
    write("manifest.json", &bytes);
    write("manifest.json.minisig", signature.as_bytes());
    let tampered = String::from_utf8(bytes.clone())
        .unwrap()
        .replace("\"size\":15", "\"size\":16");
    assert_ne!(tampered.as_bytes(), bytes.as_slice());
    write("manifest.json.tampered", tampered.as_bytes());
    write("app.js", &app);
    write("app.js.changed", b"console.log('evil app!!');  ");
    let times = json!({ "now": now, "expires_unix": expires });
    write("times.json", times.to_string().as_bytes());

    let out = node_json("release.mjs", &[dir.path()]);
    let verified = &out["verified"];
    assert_eq!(verified["version"], "1.4.0");
    assert_eq!(verified["name"], "chatapp");
    assert_eq!(verified["key_id"], key.public.key_id().to_string());
    assert_eq!(verified["expires"], manifest.expires.as_str());
    let checks = &out["checks"];
    let expected = json!({
        "good_file": "no-error",
        "changed_file": "file-mismatch",
        "unlisted_file": "unlisted-file",
        "tampered_manifest": "bad-signature",
        "other_key": "unknown-key",
        "expired": "expired",
        "rollback": "rollback",
        "garbage_signature": "malformed",
    });
    assert_eq!(checks, &expected);
}
