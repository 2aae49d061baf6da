//! `chatctl keys`, `sign` and `verify` as a user runs them, checked against the real `minisign`
//! CLI (Debian package `minisign`, installed by `.ci/run`). A missing `minisign` fails the tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

fn chatctl(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatctl"));
    cmd.current_dir(cwd)
        .env_remove("CHATCTL_PASSPHRASE")
        .env("NO_COLOR", "1");
    cmd
}

fn minisign() -> Command {
    let found = Command::new("minisign")
        .arg("-v")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "the minisign CLI is required (apt-get install minisign, or run .ci/run)"
    );
    Command::new("minisign")
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "command failed: {cmd:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr.
fn refused(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 from {cmd:?}, stdout {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Release {
    tmp: TempDir,
}

impl Release {
    /// Unencrypted keys in `keys/`, a small bundle in `dist/`, signed as 1.4.0.
    fn signed() -> Self {
        let r = Self::unsigned();
        ok(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted"]));
        ok(chatctl(r.root()).args([
            "sign",
            "--key",
            "keys/release.key",
            "--version",
            "1.4.0",
            "dist",
        ]));
        r
    }

    fn unsigned() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dist = tmp.path().join("dist");
        fs::create_dir_all(dist.join("app")).expect("mkdir");
        fs::write(
            dist.join("index.html"),
            "<!doctype html><script src=loader.js></script>",
        )
        .expect("write");
        fs::write(dist.join("loader.js"), "verify();").expect("write");
        fs::write(dist.join("app/main.js"), "export function main() {}").expect("write");
        fs::write(dist.join("app/core.wasm"), [0u8, 97, 115, 109, 1, 0, 0, 0]).expect("write");
        Self { tmp }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn dist(&self) -> PathBuf {
        self.root().join("dist")
    }

    fn verify(&self) -> Command {
        let mut cmd = chatctl(self.root());
        cmd.args(["verify", "--pubkey", "keys/release.pub", "dist"]);
        cmd
    }
}

#[test]
fn minisign_cli_verifies_what_chatctl_signs() {
    let r = Release::signed();
    let out = run(minisign().current_dir(r.root()).args([
        "-Vm",
        "dist/manifest.json",
        "-p",
        "keys/release.pub",
    ]));
    assert!(
        out.status.success(),
        "minisign -V: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("version=1.4.0"),
        "trusted comment shown by minisign: {stdout}"
    );
    let line = ok(&mut r.verify());
    assert!(
        line.starts_with("Verified chatapp-web 1.4.0 signed by key "),
        "{line}"
    );
}

#[test]
fn passphrase_encrypted_key_signs_and_minisign_verifies() {
    let r = Release::unsigned();
    ok(chatctl(r.root())
        .env("CHATCTL_PASSPHRASE", "correct horse")
        .args(["keys", "init", "--dir", "keys"]));
    let no_pass = refused(chatctl(r.root()).args([
        "sign",
        "--key",
        "keys/release.key",
        "--version",
        "1.0.0",
        "dist",
    ]));
    assert!(no_pass.contains("CHATCTL_PASSPHRASE"), "{no_pass}");
    let wrong = refused(chatctl(r.root()).env("CHATCTL_PASSPHRASE", "wrong").args([
        "sign",
        "--key",
        "keys/release.key",
        "--version",
        "1.0.0",
        "dist",
    ]));
    assert!(wrong.contains("wrong passphrase"), "{wrong}");
    ok(chatctl(r.root())
        .env("CHATCTL_PASSPHRASE", "correct horse")
        .args([
            "sign",
            "--key",
            "keys/release.key",
            "--version",
            "1.0.0",
            "dist",
        ]));
    ok(minisign().current_dir(r.root()).args([
        "-Vm",
        "dist/manifest.json",
        "-p",
        "keys/release.pub",
    ]));
}

#[test]
fn key_made_by_minisign_signs_through_chatctl_and_both_verify() {
    let r = Release::unsigned();
    ok(minisign()
        .current_dir(r.root())
        .args(["-G", "-W", "-p", "mini.pub", "-s", "mini.key"]));
    ok(chatctl(r.root()).args(["sign", "--key", "mini.key", "--version", "2.0.0", "dist"]));
    ok(minisign()
        .current_dir(r.root())
        .args(["-Vm", "dist/manifest.json", "-p", "mini.pub"]));
    ok(chatctl(r.root()).args(["verify", "--pubkey", "mini.pub", "dist"]));
}

#[test]
fn passphrase_protected_key_made_by_minisign_opens_in_chatctl() {
    let r = Release::unsigned();
    let mut keygen = minisign();
    keygen
        .current_dir(r.root())
        .args(["-G", "-p", "mini.pub", "-s", "mini.key"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = keygen.spawn().expect("spawn minisign");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"pass phrase\npass phrase\n")
            .expect("write");
    }
    assert!(
        child.wait().expect("wait").success(),
        "minisign -G with a passphrase"
    );
    ok(chatctl(r.root())
        .env("CHATCTL_PASSPHRASE", "pass phrase")
        .args(["sign", "--key", "mini.key", "--version", "1.0.0", "dist"]));
    ok(minisign()
        .current_dir(r.root())
        .args(["-Vm", "dist/manifest.json", "-p", "mini.pub"]));
}

#[test]
fn refuses_changed_file() {
    let r = Release::signed();
    fs::write(
        r.dist().join("app/main.js"),
        "export function main() { evil() }",
    )
    .expect("write");
    let err = refused(&mut r.verify());
    assert!(
        err.contains("app/main.js") && err.contains("[file-mismatch]"),
        "{err}"
    );
}

#[test]
fn refuses_same_size_change() {
    let r = Release::signed();
    fs::write(r.dist().join("loader.js"), "verifX();").expect("write");
    let err = refused(&mut r.verify());
    assert!(
        err.contains("loader.js: SHA-256 differs") && err.contains("[file-mismatch]"),
        "{err}"
    );
}

#[test]
fn refuses_unlisted_file() {
    let r = Release::signed();
    fs::write(r.dist().join("app/extra.js"), "steal()").expect("write");
    let err = refused(&mut r.verify());
    assert!(
        err.contains("app/extra.js") && err.contains("[unlisted-file]"),
        "{err}"
    );
}

#[test]
fn refuses_missing_file() {
    let r = Release::signed();
    fs::remove_file(r.dist().join("app/core.wasm")).expect("rm");
    let err = refused(&mut r.verify());
    assert!(
        err.contains("app/core.wasm") && err.contains("[missing-file]"),
        "{err}"
    );
}

#[test]
fn refuses_edited_trusted_comment() {
    let r = Release::signed();
    let sig_path = r.dist().join("manifest.json.minisig");
    let sig = fs::read_to_string(&sig_path).expect("read");
    fs::write(&sig_path, sig.replace("version=1.4.0", "version=9.4.0")).expect("write");
    let err = refused(&mut r.verify());
    assert!(
        err.contains("manifest.json.minisig") && err.contains("[bad-signature]"),
        "{err}"
    );
    // The minisign CLI agrees.
    let out = run(minisign().current_dir(r.root()).args([
        "-Vm",
        "dist/manifest.json",
        "-p",
        "keys/release.pub",
    ]));
    assert!(!out.status.success());
}

#[test]
fn refuses_another_public_key() {
    let r = Release::signed();
    ok(chatctl(r.root()).args(["keys", "init", "--dir", "other", "--unencrypted"]));
    let err = refused(chatctl(r.root()).args(["verify", "--pubkey", "other/release.pub", "dist"]));
    assert!(err.contains("[unknown-key]"), "{err}");
}

#[test]
fn refuses_min_version_above_signed_version() {
    let r = Release::signed();
    let err = refused(r.verify().args(["--min-version", "1.5.0"]));
    assert!(
        err.contains("rollback") && err.contains("[rollback]"),
        "{err}"
    );
    ok(r.verify().args(["--min-version", "1.4.0"]));
}

#[test]
fn refuses_time_past_expiry() {
    let r = Release::unsigned();
    ok(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted"]));
    ok(chatctl(r.root()).args([
        "sign",
        "--key",
        "keys/release.key",
        "--version",
        "1.0.0",
        "--expires",
        "2d",
        "dist",
    ]));
    ok(r.verify().args(["--at", &rfc3339_in_days(1)]));
    let err = refused(r.verify().args(["--at", &rfc3339_in_days(3)]));
    assert!(err.contains("[expired]"), "{err}");
}

fn rfc3339_in_days(days: u64) -> String {
    let t = std::time::SystemTime::now() + std::time::Duration::from_secs(days * 86_400);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[test]
fn refuses_truncated_or_garbage_signature() {
    let r = Release::signed();
    let sig_path = r.dist().join("manifest.json.minisig");
    let sig = fs::read_to_string(&sig_path).expect("read");
    for (name, bad) in [
        ("truncated", sig[..sig.len() / 2].to_owned()),
        ("garbage", "this is not a signature\n".to_owned()),
        ("empty", String::new()),
    ] {
        fs::write(&sig_path, &bad).expect("write");
        let err = refused(&mut r.verify());
        assert!(
            err.contains("manifest.json.minisig") && err.contains("[malformed]"),
            "{name}: {err}"
        );
    }
}

#[test]
fn keys_init_refuses_to_overwrite_without_force_and_writes_secrets_0600() {
    let r = Release::unsigned();
    ok(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted"]));
    let before = fs::read(r.root().join("keys/release.key")).expect("read");
    let err = refused(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted"]));
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        fs::read(r.root().join("keys/release.key")).expect("read"),
        before
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for secret in [
            "release.key",
            "directory.key",
            "data.key",
            "tls/server.key",
            "tls/ca.key",
        ] {
            let mode = fs::metadata(r.root().join("keys").join(secret))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
    }
    ok(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted", "--force"]));
    assert_ne!(
        fs::read(r.root().join("keys/release.key")).expect("read"),
        before
    );
}

#[test]
fn keys_show_prints_public_parts_and_no_secrets() {
    let r = Release::unsigned();
    ok(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted"]));
    let shown = ok(chatctl(r.root()).args(["keys", "show", "--dir", "keys"]));
    let public = fs::read_to_string(r.root().join("keys/release.pub")).expect("read");
    assert!(
        shown.contains(public.lines().nth(1).expect("base64 line")),
        "{shown}"
    );
    let secret = fs::read_to_string(r.root().join("keys/release.key")).expect("read");
    assert!(!shown.contains(secret.lines().nth(1).expect("base64 line")));
}

#[test]
fn server_certificate_chains_to_the_ca_for_localhost() {
    let r = Release::unsigned();
    ok(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted"]));
    let out = run(Command::new("openssl").current_dir(r.root()).args([
        "verify",
        "-CAfile",
        "keys/tls/ca.pem",
        "-verify_hostname",
        "localhost",
        "keys/tls/server.pem",
    ]));
    assert!(
        out.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(Command::new("openssl").current_dir(r.root()).args([
        "verify",
        "-CAfile",
        "keys/tls/ca.pem",
        "-verify_ip",
        "127.0.0.1",
        "keys/tls/server.pem",
    ]));
    assert!(
        out.status.success(),
        "openssl verify ip: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn verify_without_keys_tells_what_to_run() {
    let r = Release::unsigned();
    let out = run(chatctl(r.root()).args(["sign", "--version", "1.0.0", "dist"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chatctl keys init"));
}

#[test]
fn sign_prints_the_loader_hash_to_pin() {
    let r = Release::unsigned();
    ok(chatctl(r.root()).args(["keys", "init", "--dir", "keys", "--unencrypted"]));
    let out = ok(chatctl(r.root()).args([
        "sign",
        "--key",
        "keys/release.key",
        "--version",
        "1.0.0",
        "dist",
    ]));
    let loader = fs::read(r.dist().join("loader.js")).expect("read");
    let want = format!("loader.js sha256 {}", sha256_hex(&loader));
    assert!(out.contains(&want), "{out}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
