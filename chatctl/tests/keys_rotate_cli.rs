//! `chatctl keys rotate data` as an operator runs it: a new key is appended to `data.key`, the
//! old ones stay, and what was sealed before is still readable by the server's key ring.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use chat_server::store::DataKeyRing;
use chat_server::store::seal::{Slot, Table};

fn chatctl(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatctl"))
        .current_dir(cwd)
        .args(args)
        .env_remove("CHATCTL_PASSPHRASE")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("spawn chatctl")
}

fn ok(cwd: &Path, args: &[&str]) -> String {
    let out = chatctl(cwd, args);
    assert!(
        out.status.success(),
        "chatctl {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rotate_data_appends_max_plus_one_and_old_records_stay_readable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    ok(
        tmp.path(),
        &["keys", "init", "--dir", "keys", "--unencrypted"],
    );
    let key_file = tmp.path().join("keys/data.key");
    let before = DataKeyRing::load(&key_file).expect("load");
    let slot = Slot::new().str("alice");
    let sealed = before
        .seal(Table::Accounts, &slot, b"old record")
        .expect("seal");

    let out = ok(tmp.path(), &["keys", "rotate", "data", "--dir", "keys"]);
    assert!(out.contains("new active key id 2"), "{out}");
    let out = ok(tmp.path(), &["keys", "rotate", "data", "--dir", "keys"]);
    assert!(out.contains("new active key id 3"), "{out}");

    let after = DataKeyRing::load(&key_file).expect("load");
    assert_eq!(after.ids(), vec![1, 2, 3]);
    assert_eq!(after.active_id(), 3);
    assert_eq!(
        after
            .open(Table::Accounts, &slot, &sealed)
            .expect("old record"),
        b"old record"
    );
    let show = ok(tmp.path(), &["keys", "show", "--dir", "keys"]);
    assert!(show.contains("ids 1, 2, 3"), "{show}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&key_file).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn rotate_data_without_keys_says_to_run_init_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = chatctl(tmp.path(), &["keys", "rotate", "data", "--dir", "keys"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chatctl keys init"), "{stderr}");
    assert!(!tmp.path().join("keys").exists());
}

#[test]
fn rotate_data_refuses_a_malformed_key_file_and_leaves_it_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    fs::create_dir_all(&keys).expect("mkdir");
    fs::write(keys.join("data.key"), "not a key file\n").expect("write");
    let out = chatctl(tmp.path(), &["keys", "rotate", "data", "--dir", "keys"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data.key"), "{stderr}");
    assert_eq!(
        fs::read_to_string(keys.join("data.key")).expect("read"),
        "not a key file\n"
    );
}
