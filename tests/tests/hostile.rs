//! Every attack of `docs/THREAT_MODEL.md` mounted by the real test-only `chat-server-hostile`
//! binary against real native clients, and what the clients do about it: refuse, or report an
//! alert and keep working. One test per attack; each names the mode it starts the server in.

use std::time::Duration;

use chat_core::ratchet::Session;
use chat_core::wire::Envelope;
use chat_tests::{ServerProcess, World, dir_contains};
use chatctl::client::{AlertKind, Client, Received};

const IDLE: Duration = Duration::from_millis(800);

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
