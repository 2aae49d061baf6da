//! Every attack of `docs/THREAT_MODEL.md` mounted by a real server against real clients, and
//! what the clients do about it: refuse, or report an alert and keep working. One test per
//! attack (each row of the threat model names its tests): the test-only `chat-server-hostile`
//! binary in the mode each test names against native clients, and an attacker-prepared bundle
//! directory served to headless Chromium (`chat_tests::browser`) and to `chatctl verify-site`.
//! A missing Chromium fails the browser tests; they never skip.

use std::path::Path;
use std::time::Duration;

use chat_core::identity::DeviceKeys;
use chat_core::ratchet::Session;
use chat_core::wire::{ClientFrame, Envelope, ErrorCode, ServerFrame};
use chat_tests::browser::{Browser, Site, append, sign, verdict_in_fresh_profile};
use chat_tests::{Keys, ServerProcess, World, dir_contains, error_code};
use chatctl::client::conn::Connection;
use chatctl::client::{AlertKind, Client, Received};

const IDLE: Duration = Duration::from_millis(800);
/// How long one answer from the server may take.
const WAIT: Duration = Duration::from_secs(5);

fn texts(got: &[Received]) -> Vec<&str> {
    got.iter().map(|m| m.text.as_str()).collect()
}

fn kinds(client: &Client) -> Vec<AlertKind> {
    client.alerts.iter().map(|a| a.kind).collect()
}

/// Alice (registered first) and Bob, both logged in.
async fn alice_and_bob(world: &World) -> (Client, Client) {
    let alice = world.register("alice").await.expect("alice registers");
    let bob = world.register("bob").await.expect("bob registers");
    (alice, bob)
}

/// Alice sends `one`, `two`, `three` to Bob; Bob receives everything.
async fn three_messages(world: &World) -> (Client, Vec<Received>) {
    let (mut alice, mut bob) = alice_and_bob(world).await;
    for text in ["one", "two", "three"] {
        alice.send_text("bob", text).await.expect("send");
    }
    let got = bob.receive(IDLE).await.expect("bob keeps receiving");
    (bob, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_server_raises_no_alert_in_either_direction() {
    let world = World::new().expect("world");
    let (mut alice, mut bob) = alice_and_bob(&world).await;
    for round in 0..3 {
        alice
            .send_text("bob", &format!("ping {round}"))
            .await
            .expect("send");
        bob.receive(IDLE).await.expect("receive");
        bob.send_text("alice", &format!("pong {round}"))
            .await
            .expect("reply");
        alice.receive(IDLE).await.expect("receive");
    }
    assert_eq!((kinds(&alice), kinds(&bob)), (vec![], vec![]));
}

// Row 1: key substitution in bundles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_bundle_keys_that_differ_from_the_directory() {
    let world = World::hostile("substitute-bundle").expect("hostile world");
    let (mut alice, _bob) = alice_and_bob(&world).await;
    let err = alice
        .send_text("bob", "secret")
        .await
        .expect_err("must refuse");
    assert!(
        format!("{err:#}").contains("differ from the key directory"),
        "{err:#}"
    );
}

// Row 2: a substituted leaf claimed to be in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_leaf_without_a_valid_inclusion_proof() {
    let world = World::hostile("bad-inclusion").expect("hostile world");
    let err = world.register("alice").await.expect_err("must refuse");
    assert!(
        format!("{err:#}").contains("does not prove the keys"),
        "{err:#}"
    );
}

// Row 3: heads signed by another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_tree_head_signed_by_a_foreign_key() {
    let world = World::hostile("foreign-head").expect("hostile world");
    let err = world.register("alice").await.expect_err("must refuse");
    let text = format!("{err:#}");
    assert!(
        text.contains("key directory check failed")
            && text.contains("not by the trusted directory key"),
        "{text}"
    );
}

// Row 4: history rewritten after the client saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_forked_history_after_seeing_the_real_one() {
    let keys = chat_tests::Keys::new().expect("keys");
    let work = tempfile::tempdir().expect("tmp");
    let home = work.path().join("clients");
    {
        let honest = ServerProcess::start(keys.path(), work.path()).expect("honest server");
        let opts = honest.client_options(&home);
        Client::register(&opts, "alice").await.expect("alice");
        Client::register(&opts, "bob").await.expect("bob");
    }
    let forked = ServerProcess::start_hostile(keys.path(), work.path(), "fork").expect("fork");
    let err = Client::open(&forked.client_options(&home), "alice")
        .await
        .expect_err("must refuse");
    let text = format!("{err:#}");
    assert!(
        text.contains("key directory check failed") && text.contains("not proven to be a prefix"),
        "{text}"
    );
}

// Row 5: a frozen directory (heads older than 24 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_tree_head_older_than_24_hours() {
    let world = World::hostile("stale-head").expect("hostile world");
    let err = world.register("alice").await.expect_err("must refuse");
    let text = format!("{err:#}");
    assert!(text.contains("more than 24 h old"), "{text}");
}

// Row 6: the server appends attacker keys for an existing device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_notices_its_keys_replaced_at_the_next_login() {
    let world = World::hostile("replace-keys").expect("hostile world");
    world
        .register("alice")
        .await
        .expect("first login is clean")
        .conn
        .close()
        .await;
    let err = world.open("alice").await.expect_err("must notice");
    assert!(
        format!("{err:#}").contains("someone replaced them"),
        "{err:#}"
    );
}

// Row 7: a curious server reads everything it relays and stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snooping_server_sees_no_plaintext_in_what_it_relays_stores_or_logs() {
    let world = World::hostile("snoop").expect("hostile world");
    let (mut alice, mut bob) = alice_and_bob(&world).await;
    let marker = "MARKER-5b2e-snooped-plaintext";
    alice.send_text("bob", marker).await.expect("send");
    assert_eq!(
        texts(&bob.receive(IDLE).await.expect("receive")),
        vec![marker]
    );
    let snooped = std::fs::read_to_string(world.server.data.join("snooped")).expect("snoop file");
    assert!(
        snooped.lines().count() >= 1,
        "the server recorded the envelope"
    );
    assert_eq!(dir_contains(&world.server.data, marker.as_bytes()), None);
    assert!(!world.server.log_text().contains(marker));
    assert!(!snooped.contains(&hex::encode(marker)));
}

// Row 8: tampered ciphertext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertext_is_dropped_with_a_warning_and_later_messages_arrive() {
    let world = World::hostile("tamper-ciphertext").expect("hostile world");
    let (bob, got) = three_messages(&world).await;
    assert_eq!(texts(&got), vec!["one", "three"]);
    assert_eq!(kinds(&bob), vec![AlertKind::Undecryptable, AlertKind::Gap]);
}

// Row 9: replayed envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_envelope_is_reported_and_shown_once() {
    let world = World::hostile("replay-envelope").expect("hostile world");
    let (bob, got) = three_messages(&world).await;
    assert_eq!(texts(&got), vec!["one", "two", "three"]);
    assert_eq!(kinds(&bob), vec![AlertKind::Replay]);
}

// Row 9: duplicated envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_envelope_is_reported_and_shown_once() {
    let world = World::hostile("duplicate-envelope").expect("hostile world");
    let (bob, got) = three_messages(&world).await;
    assert_eq!(texts(&got), vec!["one", "two", "three"]);
    assert_eq!(kinds(&bob), vec![AlertKind::Replay]);
}

// Row 14: dropped envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_envelope_is_reported_as_a_gap() {
    let world = World::hostile("drop-envelope").expect("hostile world");
    let (bob, got) = three_messages(&world).await;
    assert_eq!(texts(&got), vec!["one", "three"]);
    assert_eq!(kinds(&bob), vec![AlertKind::Gap]);
    assert!(bob.alerts[0].detail.contains("2..=2"), "{:?}", bob.alerts);
}

// Row 15: reordered envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_envelopes_are_reported_and_all_shown_with_their_counters() {
    let world = World::hostile("reorder-envelopes").expect("hostile world");
    let (bob, got) = three_messages(&world).await;
    assert_eq!(texts(&got), vec!["one", "three", "two"]);
    let counters: Vec<u64> = got.iter().map(|m| m.counter).collect();
    assert_eq!(counters, vec![1, 3, 2], "the sender's order is recoverable");
    assert_eq!(kinds(&bob), vec![AlertKind::Gap, AlertKind::Reordered]);
}

// Row 10: a stolen session state (post-compromise security), with the envelopes a snooping
// server recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_session_state_stops_decrypting_after_a_dh_round_trip() {
    let world = World::hostile("snoop").expect("hostile world");
    let (mut alice, mut bob) = alice_and_bob(&world).await;
    alice.send_text("bob", "before").await.expect("send");
    bob.receive(IDLE).await.expect("receive");
    bob.send_text("alice", "reply").await.expect("reply");
    alice.receive(IDLE).await.expect("receive");
    alice.send_text("bob", "in the chain").await.expect("send");
    bob.receive(IDLE).await.expect("receive");
    // The attacker copies Bob's state now.
    let stolen = bob
        .load_session("alice", 1)
        .expect("load")
        .expect("a session");
    alice
        .send_text("bob", "readable by the thief")
        .await
        .expect("send");
    bob.receive(IDLE).await.expect("receive");
    bob.send_text("alice", "heal").await.expect("reply");
    alice.receive(IDLE).await.expect("receive");
    alice.send_text("bob", "after").await.expect("send");
    assert_eq!(
        texts(&bob.receive(IDLE).await.expect("receive")),
        vec!["after"]
    );

    let snooped = std::fs::read_to_string(world.server.data.join("snooped")).expect("snoop file");
    let to_bob: Vec<Vec<u8>> = snooped
        .lines()
        .filter(|l| l.starts_with("bob "))
        .map(|l| hex::decode(l.rsplit(' ').next().expect("hex")).expect("hex"))
        .collect();
    assert_eq!(to_bob.len(), 4);
    let message = |envelope: &[u8]| match Envelope::decode(envelope).expect("envelope") {
        Envelope::RatchetMessage { message } => message,
        other => panic!("unexpected envelope {other:?}"),
    };
    let mut thief: Session = stolen;
    // The theft is real: the copy reads what is sent before Bob's next DH ratchet step ...
    assert!(thief.decrypt(&message(&to_bob[2])).is_ok());
    // ... and nothing after the round trip.
    assert!(
        thief.decrypt(&message(&to_bob[3])).is_err(),
        "the stolen state must not decrypt after healing"
    );
}

// Row 13: a low-order one-time prekey (unsigned, so the server can swap it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_low_order_one_time_prekey() {
    let world = World::hostile("low-order-prekey").expect("hostile world");
    let (mut alice, _bob) = alice_and_bob(&world).await;
    let err = alice.send_text("bob", "hi").await.expect_err("must refuse");
    assert!(format!("{err:#}").contains("not contributory"), "{err:#}");
}

// Row 16: split view, caught by the tree head inside an end-to-end encrypted message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_view_is_detected_by_the_tree_head_inside_a_message() {
    let world = World::hostile("split-view").expect("hostile world");
    let (mut alice, mut bob) = alice_and_bob(&world).await;
    alice
        .send_text("bob", "which log do you see?")
        .await
        .expect("send");
    let got = bob.receive(IDLE).await.expect("receive");
    assert_eq!(texts(&got), vec!["which log do you see?"]);
    assert_eq!(kinds(&bob), vec![AlertKind::SplitView], "{:?}", bob.alerts);
    assert!(bob.alerts[0].detail.contains("SPLIT VIEW"));
}

/// Runs `chatctl audit --json` against `server`, with its state under `state_dir`.
fn audit(
    server: &ServerProcess,
    state_dir: &std::path::Path,
    client_states: &[std::path::PathBuf],
) -> (bool, String) {
    let mut cmd = std::process::Command::new(&chat_tests::binaries().chatctl);
    cmd.arg("audit")
        .arg(server.url())
        .arg("--ca")
        .arg(server.ca())
        .arg("--directory-key")
        .arg(server.keys.join("directory.pub"))
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--json");
    for state in client_states {
        cmd.arg("--client-state").arg(state);
    }
    let out = cmd.output().expect("run chatctl audit");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn client_state(world: &World, name: &str) -> std::path::PathBuf {
    world
        .work
        .path()
        .join("clients")
        .join(name)
        .join("directory.state")
}

// Row 17 baseline: an honest log passes, with the clients' heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_of_an_honest_server_finds_no_problem() {
    let world = World::new().expect("world");
    let (mut alice, _bob) = alice_and_bob(&world).await;
    alice.send_text("bob", "hi").await.expect("send");
    let state = tempfile::tempdir().expect("tmp");
    let clients = [client_state(&world, "alice"), client_state(&world, "bob")];
    let (ok, out) = audit(&world.server, state.path(), &clients);
    assert!(ok, "{out}");
    assert!(
        out.contains("\"tree_size\":2") && out.contains("\"problems\":[]"),
        "{out}"
    );
    // A second audit checks consistency with the head the first one recorded.
    let (ok, out) = audit(&world.server, state.path(), &clients);
    assert!(ok, "{out}");
}

// Row 17: the log holds an entry that breaks the rules (bad signature, time running backwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_an_invalid_entry_naming_the_user_and_entry() {
    let world = World::hostile("invalid-leaf").expect("hostile world");
    let (alice, _bob) = alice_and_bob(&world).await;
    alice.conn.close().await;
    // Alice's second login makes the server append the invalid entry (index 2).
    let _ = world.open("alice").await;
    let state = tempfile::tempdir().expect("tmp");
    let (ok, out) = audit(&world.server, state.path(), &[]);
    assert!(!ok, "the audit must fail: {out}");
    assert!(
        out.contains("\"entry\":2")
            && out.contains("\"user\":\"alice\"")
            && out.contains("identity keys")
            && out.contains("time ran backwards"),
        "{out}"
    );
}

// Row 4: a fork after the auditor recorded a head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_a_fork_against_the_head_it_recorded() {
    let keys = chat_tests::Keys::new().expect("keys");
    let work = tempfile::tempdir().expect("tmp");
    let state = tempfile::tempdir().expect("tmp");
    {
        let honest = ServerProcess::start(keys.path(), work.path()).expect("honest server");
        let opts = honest.client_options(&work.path().join("clients"));
        Client::register(&opts, "alice").await.expect("alice");
        Client::register(&opts, "bob").await.expect("bob");
        let (ok, out) = audit(&honest, state.path(), &[]);
        assert!(ok, "{out}");
    }
    let forked = ServerProcess::start_hostile(keys.path(), work.path(), "fork").expect("fork");
    let (ok, out) = audit(&forked, state.path(), &[]);
    assert!(!ok, "the audit must fail: {out}");
    assert!(
        out.contains("fork") && out.contains("found 2 problem"),
        "{out}"
    );
}

// Row 16: a split view, caught by checking a client's heads against the full log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_a_split_view_from_a_clients_heads() {
    let world = World::hostile("split-view").expect("hostile world");
    let (_alice, _bob) = alice_and_bob(&world).await;
    let state = tempfile::tempdir().expect("tmp");
    let (ok, out) = audit(
        &world.server,
        state.path(),
        &[client_state(&world, "alice")],
    );
    assert!(ok, "alice sees the log the auditor sees: {out}");
    let (ok, out) = audit(&world.server, state.path(), &[client_state(&world, "bob")]);
    assert!(!ok, "the audit must fail: {out}");
    assert!(out.contains("split view") && out.contains("bob"), "{out}");
}

// Row 12: a login proof recorded on the wire (or by a server), replayed on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_login_proof_replayed_on_a_new_connection_is_refused() {
    let world = World::new().expect("world");
    world
        .register("alice")
        .await
        .expect("alice")
        .conn
        .close()
        .await;
    let keys = std::fs::read(world.work.path().join("clients/alice/device.key")).expect("keys");
    let keys = DeviceKeys::decode(&keys).expect("decode");
    let login = ClientFrame::Login {
        username: "alice".into(),
        device_id: 1,
    };
    let (url, ca) = (world.server.url(), world.server.ca());
    let connect = || Connection::connect(&url, &ca);
    // A genuine login, whose proof the attacker records.
    let mut genuine = connect().await.expect("connect");
    genuine.send(&login).await.expect("login");
    let ServerFrame::Challenge { nonce } = genuine.next_frame(WAIT).await.expect("challenge")
    else {
        panic!("expected a challenge");
    };
    let recorded = keys.identity().sign_login(&nonce, "alice", 1);
    genuine
        .send(&ClientFrame::LoginProof {
            signature: recorded,
        })
        .await
        .expect("proof");
    assert!(matches!(
        genuine.next_frame(WAIT).await,
        Ok(ServerFrame::Welcome { .. })
    ));
    // The replay gets a fresh challenge, which the recorded proof does not sign.
    let mut replay = connect().await.expect("connect");
    replay.send(&login).await.expect("login");
    assert!(matches!(
        replay.next_frame(WAIT).await,
        Ok(ServerFrame::Challenge { .. })
    ));
    replay
        .send(&ClientFrame::LoginProof {
            signature: recorded,
        })
        .await
        .expect("replayed proof");
    assert_eq!(
        error_code(&mut replay).await,
        Some(ErrorCode::BadSignature),
        "the replayed proof must be refused"
    );
}

// ---- row 11: the client code served to browsers ----
//
// The server is the attacker: it serves whatever bytes it likes, so these tests hand the real
// `chat-server` an attacker-prepared bundle directory (`--bundle`), changed between page loads.
// The loader in headless Chromium must refuse with the right `data-bundle-error` and run none of
// the app; `chatctl verify-site` must refuse the same deployment from outside the browser.

/// The loader's verdict on `site` in a fresh browser profile, asserting that no app code ran.
async fn refused_by_the_loader(site: &Site, profile: &str) -> String {
    let (verdict, started) = verdict_in_fresh_profile(site, profile)
        .await
        .expect("chromium loads the page");
    assert!(!started, "app code ran although the loader said {verdict}");
    verdict
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refuses_a_tampered_bundle_and_runs_no_app_code() {
    let site = Site::new(None).expect("site");
    append(
        &site.bundle().join("app/main.js"),
        b"\nfetch('/steal?' + document.cookie);\n",
    )
    .expect("tamper");
    assert_eq!(
        refused_by_the_loader(&site, "tampered").await,
        "rejected:file-mismatch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refuses_a_bundle_signed_by_a_foreign_key() {
    let site = Site::new(None).expect("site");
    let attacker = Keys::new().expect("attacker keys");
    sign(attacker.path(), &site.bundle(), "9.0.0", "30d").expect("sign");
    assert_eq!(
        refused_by_the_loader(&site, "foreign").await,
        "rejected:unknown-key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refuses_an_expired_bundle() {
    let site = Site::new(None).expect("site");
    sign(site.keys.path(), &site.bundle(), "1.0.0", "1s").expect("sign");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        refused_by_the_loader(&site, "expired").await,
        "rejected:expired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refuses_an_older_bundle_after_it_ran_a_newer_one() {
    let site = Site::new(None).expect("site");
    let old = site.work.path().join("old-release");
    copy_dir(&site.bundle(), &old);
    sign(site.keys.path(), &site.bundle(), "2.0.0", "30d").expect("sign 2.0.0");
    let browser = Browser::launch(&site.profile("rollback"))
        .await
        .expect("chromium");
    let page = browser.page().await.expect("page");
    page.goto(&site.server.url()).await.expect("goto");
    assert_eq!(page.verdict().await.expect("verdict"), "verified");
    // The server swaps in the old release (validly signed 1.0.0, not expired).
    std::fs::remove_dir_all(site.bundle()).expect("remove");
    std::fs::rename(&old, site.bundle()).expect("swap in the old release");
    page.goto("about:blank").await.expect("blank");
    page.goto(&site.server.url()).await.expect("goto again");
    assert_eq!(page.verdict().await.expect("verdict"), "rejected:rollback");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!page.app_started().await.expect("marker"), "app code ran");
}

// Row 1b: key substitution against the browser app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refuses_contact_keys_that_differ_from_the_directory() {
    let site = Site::new(Some("substitute-bundle")).expect("site");
    let bob_browser = Browser::launch(&site.profile("bob"))
        .await
        .expect("chromium");
    let bob = bob_browser.page().await.expect("page");
    bob.goto(&site.server.url()).await.expect("goto");
    bob.register("bob").await.expect("register bob");
    let alice_browser = Browser::launch(&site.profile("alice"))
        .await
        .expect("chromium");
    let alice = alice_browser.page().await.expect("page");
    alice.goto(&site.server.url()).await.expect("goto");
    alice.register("alice").await.expect("register alice");
    alice.open_conversation("bob").await.expect("open");
    alice.send("for bob only").await.expect("send");
    assert_eq!(
        alice
            .wait_state("for bob only", &["failed"])
            .await
            .expect("refused"),
        "failed"
    );
    let alert = alice
        .wait_for("document.querySelector('[data-alert=mismatch]')?.textContent")
        .await
        .expect("the UI shows the verification failure");
    assert!(
        alert
            .as_str()
            .unwrap_or_default()
            .contains("differ from the key directory"),
        "{alert}"
    );
}

// ---- row 11 from outside the browser: `chatctl verify-site` ----

fn copy_dir(from: &Path, to: &Path) {
    for file in chat_tests::files_under(from) {
        let dest = to.join(file.strip_prefix(from).expect("under"));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&file, &dest).expect("copy");
    }
}

/// `chatctl verify-site` against `site` with its release key; (exit 0, stdout + stderr).
fn verify_site(site: &Site, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(&chat_tests::binaries().chatctl)
        .arg("verify-site")
        .arg(site.server.url())
        .arg("--pubkey")
        .arg(site.keys.path().join("release.pub"))
        .args(extra)
        .output()
        .expect("run chatctl verify-site");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The `loader.js sha256` that `chatctl bundle` prints for the site's bundle.
fn loader_sha256(site: &Site) -> String {
    let bytes = std::fs::read(site.bundle().join("loader.js")).expect("loader.js");
    chat_signing::manifest::FileDigest::of_bytes(&bytes).sha256
}

/// Asserts a refusal with exit status 1 that names `what` and the reason `code`.
fn assert_refused(site: &Site, extra: &[&str], what: &str, code: &str) {
    let (ok, out) = verify_site(site, extra);
    eprintln!("verify-site {extra:?}: {out}");
    assert!(!ok, "verify-site must refuse: {out}");
    assert!(
        out.contains("refused") && out.contains(what) && out.contains(&format!("[{code}]")),
        "expected a refusal naming {what} [{code}]: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_site_accepts_an_honest_deployment_and_pins_the_loader() {
    let site = Site::new(None).expect("site");
    let loader = loader_sha256(&site);
    let (ok, out) = verify_site(
        &site,
        &["--loader-sha256", &loader, "--min-version", "1.0.0"],
    );
    eprintln!("{out}");
    assert!(ok, "{out}");
    assert!(
        out.contains("chatapp-web 1.0.0")
            && out.contains(&format!(
                "loader loader.js sha256 {loader} (matches --loader-sha256)"
            ))
            && out.contains("every size and SHA-256 as signed"),
        "{out}"
    );
    let (ok, out) = verify_site(&site, &["--json"]);
    assert!(ok && out.contains("\"loader_pinned\":false"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_site_refuses_every_tampered_deployment_naming_the_file_and_reason() {
    let site = Site::new(None).expect("site");
    let loader = loader_sha256(&site);
    let pristine = site.work.path().join("pristine");
    copy_dir(&site.bundle(), &pristine);
    let restore = || {
        std::fs::remove_dir_all(site.bundle()).expect("remove");
        copy_dir(&pristine, &site.bundle());
    };

    // A changed app file.
    append(&site.bundle().join("app/main.js"), b"\n/* owned */\n").expect("tamper");
    assert_refused(&site, &[], "app/main.js", "file-mismatch");
    restore();

    // A changed loader that the attacker also lists in a manifest signed by its own key.
    append(&site.bundle().join("loader.js"), b"\n/* owned */\n").expect("tamper");
    let attacker = Keys::new().expect("attacker keys");
    sign(attacker.path(), &site.bundle(), "1.0.0", "30d").expect("sign");
    assert_refused(&site, &[], "manifest.json.minisig", "unknown-key");
    restore();

    // A loader changed and validly signed (a compromised build): only the pin catches it.
    append(&site.bundle().join("loader.js"), b"\n/* rebuilt */\n").expect("tamper");
    sign(site.keys.path(), &site.bundle(), "1.0.1", "30d").expect("sign");
    assert_refused(
        &site,
        &["--loader-sha256", &loader],
        "loader.js",
        "loader-mismatch",
    );
    restore();

    // An expired release.
    sign(site.keys.path(), &site.bundle(), "1.0.0", "1s").expect("sign");
    std::thread::sleep(Duration::from_millis(2100));
    assert_refused(&site, &[], "manifest.json", "expired");
    restore();

    // An older release than the one the operator saw.
    assert_refused(
        &site,
        &["--min-version", "2.0.0"],
        "manifest.json",
        "rollback",
    );

    // The page references a file the manifest does not list.
    let index = site.bundle().join("index.html");
    let html = std::fs::read_to_string(&index).expect("read");
    std::fs::write(
        &index,
        html.replace("</head>", "<script src=\"extra.js\"></script>\n</head>"),
    )
    .expect("write");
    sign(site.keys.path(), &site.bundle(), "1.0.0", "30d").expect("sign");
    std::fs::write(site.bundle().join("extra.js"), "alert(1)").expect("extra");
    assert_refused(&site, &[], "extra.js", "unlisted-file");
    restore();

    // A listed file the server no longer serves.
    std::fs::remove_file(site.bundle().join("app/app.css")).expect("remove");
    assert_refused(&site, &[], "app/app.css", "missing-file");
    restore();

    let (ok, out) = verify_site(&site, &["--loader-sha256", &loader]);
    assert!(ok, "the restored deployment verifies again: {out}");
}
