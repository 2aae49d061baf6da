//! End to end with real `chat-server` processes and native clients: delivery, durability,
//! ordering, de-duplication, no plaintext at rest, directory checks, bad input, SIGTERM.

use std::time::Duration;

use chat_core::wire::{ClientFrame, CloseCode, ErrorCode, ServerFrame};
use chat_tests::{ServerProcess, World, dir_contains, error_code, register_frame};
use chatctl::client::conn::{Closed, Connection, ServerError};

const IDLE: Duration = Duration::from_millis(800);

fn server_error(e: &anyhow::Error) -> Option<ErrorCode> {
    e.chain()
        .find_map(|c| c.downcast_ref::<ServerError>())
        .map(|s| s.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_message_is_pushed_to_a_connected_recipient() {
    let world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    let mut bob = world.register("bob").await.expect("bob");
    alice
        .send_text("bob", "are you there?")
        .await
        .expect("send");
    let got = bob.receive(IDLE).await.expect("receive");
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].from.as_str(), got[0].text.as_str()),
        ("alice", "are you there?")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_receives_on_return_in_order() {
    let world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    world.register("bob").await.expect("bob").conn.close().await;
    // More than two of the server's delivery batches (64 envelopes each): the rest of the
    // mailbox is fetched after each full batch without waiting for a notification.
    for i in 0..150 {
        alice
            .send_text("bob", &format!("message {i}"))
            .await
            .expect("send");
    }
    let mut bob = world.open("bob").await.expect("bob again");
    let got: Vec<String> = bob
        .receive(IDLE)
        .await
        .expect("receive")
        .into_iter()
        .map(|m| m.text)
        .collect();
    let want: Vec<String> = (0..150).map(|i| format!("message {i}")).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_flow_both_ways() {
    let world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    let mut bob = world.register("bob").await.expect("bob");
    for round in 0..5 {
        alice
            .send_text("bob", &format!("ping {round}"))
            .await
            .expect("send");
        let got = bob.receive(IDLE).await.expect("bob receives");
        assert_eq!(
            got.iter().map(|m| m.text.clone()).collect::<Vec<_>>(),
            vec![format!("ping {round}")]
        );
        bob.send_text("alice", &format!("pong {round}"))
            .await
            .expect("reply");
        let got = alice.receive(IDLE).await.expect("alice receives");
        assert_eq!(
            got.iter().map(|m| m.text.clone()).collect::<Vec<_>>(),
            vec![format!("pong {round}")]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_between_send_and_receive_loses_nothing() {
    let mut world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    world.register("bob").await.expect("bob").conn.close().await;
    for i in 0..10 {
        alice
            .send_text("bob", &format!("before restart {i}"))
            .await
            .expect("send");
    }
    alice.conn.close().await;
    world.server.restart().expect("restart");
    let mut bob = world.open("bob").await.expect("bob after restart");
    let got = bob.receive(IDLE).await.expect("receive");
    assert_eq!(got.len(), 10, "{got:?}");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, m)| m.text == format!("before restart {i}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_keeps_every_acknowledged_message() {
    let mut world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    world.register("bob").await.expect("bob").conn.close().await;
    for i in 0..10 {
        alice
            .send_text("bob", &format!("acked {i}"))
            .await
            .expect("send");
    }
    world.server.kill9().expect("kill -9");
    world.server.restart().expect("restart");
    let mut bob = world.open("bob").await.expect("bob");
    assert_eq!(bob.receive(IDLE).await.expect("receive").len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_envelope_is_stored_and_delivered_once() {
    let world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    let mut bob = world.register("bob").await.expect("bob");
    // Establish the session, then resend one envelope with the same message id.
    alice.send_text("bob", "first").await.expect("send");
    assert_eq!(bob.receive(IDLE).await.expect("receive").len(), 1);
    let envelope = chat_core::wire::Envelope::RatchetMessage {
        message: vec![1, 2, 3],
    }
    .encode();
    let id = [7u8; 16];
    assert!(
        !alice
            .send_envelope(id, "bob", 1, envelope.clone())
            .await
            .expect("send once")
    );
    assert!(
        alice
            .send_envelope(id, "bob", 1, envelope)
            .await
            .expect("send twice"),
        "second send is a duplicate"
    );
    let deliveries = count_deliveries(&mut bob.conn).await;
    assert_eq!(deliveries, 1);
}

async fn count_deliveries(conn: &mut Connection) -> usize {
    let mut n = 0;
    while let Ok(frame) = conn.next_frame(IDLE).await {
        if let ServerFrame::Deliver { seq, .. } = frame {
            n += 1;
            conn.send(&ClientFrame::Ack { up_to_seq: seq })
                .await
                .expect("ack");
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_reaches_the_data_directory_or_the_logs() {
    let world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    let mut bob = world.register("bob").await.expect("bob");
    let marker = "MARKER-6f1d3c9e-plaintext-must-never-be-stored";
    alice.send_text("bob", marker).await.expect("send");
    // Stored and not yet delivered: the ciphertext is at rest now.
    let data = world.server.data.clone();
    assert_eq!(dir_contains(&data, marker.as_bytes()), None);
    assert!(!world.server.log_text().contains(marker));
    assert_eq!(bob.receive(IDLE).await.expect("receive")[0].text, marker);
    assert_eq!(dir_contains(&data, marker.as_bytes()), None);
    assert!(
        !world.server.log_text().contains(marker),
        "the debug log holds the plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_tree_heads_signed_by_another_key() {
    let world = World::new().expect("world");
    world
        .register("alice")
        .await
        .expect("alice")
        .conn
        .close()
        .await;
    let other = chat_tests::Keys::new().expect("other keys");
    let mut options = world.options();
    options.directory_key = other.path().join("directory.pub");
    let err = chatctl::client::Client::open(&options, "alice")
        .await
        .expect_err("must refuse");
    let text = format!("{err:#}");
    assert!(
        text.contains("another directory key") || text.contains("another key"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_head_signed_by_a_foreign_key() {
    let world = World::hostile("foreign-head").expect("hostile world");
    let err = world.register("alice").await.expect_err("must refuse");
    assert!(
        format!("{err:#}").contains("key directory check failed"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_keys_that_differ_from_the_directory() {
    let world = World::hostile("substitute-bundle").expect("hostile world");
    let mut alice = world.register("alice").await.expect("alice");
    world.register("bob").await.expect("bob").conn.close().await;
    let err = alice
        .send_text("bob", "secret")
        .await
        .expect_err("must refuse");
    assert!(
        format!("{err:#}").contains("differ from the key directory"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_key_without_a_valid_inclusion_proof() {
    let world = World::hostile("bad-inclusion").expect("hostile world");
    // Registering checks one's own entry, which the server now falsifies too.
    let err = world.register("alice").await.expect_err("must refuse");
    assert!(
        format!("{err:#}").contains("does not prove the keys"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_head_inconsistent_with_heads_it_saw() {
    let keys = chat_tests::Keys::new().expect("keys");
    let work = tempfile::tempdir().expect("tmp");
    let home = work.path().join("clients");
    {
        let honest = ServerProcess::start(keys.path(), work.path()).expect("honest server");
        let opts = honest.client_options(&home);
        chatctl::client::Client::register(&opts, "alice")
            .await
            .expect("alice");
        chatctl::client::Client::register(&opts, "bob")
            .await
            .expect("bob");
    }
    // Same data and keys, now forking the history it showed before.
    let forked =
        ServerProcess::start_hostile(keys.path(), work.path(), "fork").expect("forking server");
    let err = chatctl::client::Client::open(&forked.client_options(&home), "alice")
        .await
        .expect_err("must refuse");
    assert!(
        format!("{err:#}").contains("key directory check failed"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_own_error_and_the_server_keeps_serving() {
    let world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    world.register("bob").await.expect("bob").conn.close().await;
    let url = world.server.url();
    let ca = world.server.ca();

    // Malformed frame.
    let mut raw = Connection::connect(&url, &ca).await.expect("connect");
    raw.send_raw(vec![1, 0xEE, 0, 1]).await.expect("send");
    assert_eq!(error_code(&mut raw).await, Some(ErrorCode::MalformedFrame));
    // Unauthenticated send.
    raw.send(&ClientFrame::Send {
        message_id: [1; 16],
        to_user: "bob".into(),
        to_device: 1,
        envelope: vec![0; 10],
    })
    .await
    .expect("send");
    assert_eq!(
        error_code(&mut raw).await,
        Some(ErrorCode::NotAuthenticated)
    );
    // Invalid username.
    let mut keys = chat_core::identity::DeviceKeys::generate(&mut rand_core::OsRng);
    let _ = keys.generate_one_time_prekeys(1, &mut rand_core::OsRng);
    raw.send(&register_frame("Not A Name", &keys))
        .await
        .expect("send");
    assert_eq!(error_code(&mut raw).await, Some(ErrorCode::UsernameInvalid));
    // Replayed login challenge: a second proof for the same challenge.
    raw.send(&ClientFrame::Login {
        username: "bob".into(),
        device_id: 1,
    })
    .await
    .expect("login");
    assert!(matches!(
        raw.next_frame(IDLE).await,
        Ok(ServerFrame::Challenge { .. })
    ));
    raw.send(&ClientFrame::LoginProof { signature: [0; 64] })
        .await
        .expect("proof");
    assert_eq!(error_code(&mut raw).await, Some(ErrorCode::BadSignature));
    raw.send(&ClientFrame::LoginProof { signature: [0; 64] })
        .await
        .expect("replay");
    assert_eq!(
        error_code(&mut raw).await,
        Some(ErrorCode::ChallengeExpiredOrReplayed)
    );

    // Oversized envelope from a logged-in client.
    let big = vec![0u8; 64 * 1024 + 1];
    let err = alice
        .send_envelope([9; 16], "bob", 1, big)
        .await
        .expect_err("too large");
    assert_eq!(server_error(&err), Some(ErrorCode::EnvelopeTooLarge));
    // Unknown recipient.
    let err = alice
        .send_envelope([8; 16], "nobody", 1, vec![1])
        .await
        .expect_err("unknown");
    assert_eq!(server_error(&err), Some(ErrorCode::UnknownUser));

    // And the server still serves a well-behaved client.
    alice
        .send_text("bob", "still here")
        .await
        .expect("send after abuse");
    let mut bob = world.open("bob").await.expect("bob");
    assert_eq!(
        bob.receive(IDLE).await.expect("receive")[0].text,
        "still here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_with_reconnect_and_the_client_resumes_without_loss() {
    let mut world = World::new().expect("world");
    let mut alice = world.register("alice").await.expect("alice");
    let mut bob = world.register("bob").await.expect("bob");
    alice.send_text("bob", "one").await.expect("send");
    alice.send_text("bob", "two").await.expect("send");
    // Bob is connected and idle when the server is told to stop.
    let status = world.server.sigterm().expect("sigterm");
    assert!(status.success(), "graceful exit, got {status}");
    let closed = loop {
        match bob.conn.next_frame(Duration::from_secs(5)).await {
            Ok(_) => continue, // deliveries before the close
            Err(e) => break e,
        }
    };
    let closed = closed
        .downcast_ref::<Closed>()
        .cloned()
        .expect("a close frame");
    assert_eq!(closed.code, Some(CloseCode::Reconnect));
    world.server.restart().expect("restart");
    let mut bob = world.open("bob").await.expect("bob resumes");
    let texts: Vec<String> = bob
        .receive(IDLE)
        .await
        .expect("receive")
        .into_iter()
        .map(|m| m.text)
        .collect();
    // Nothing was acknowledged before the shutdown, so both arrive (exactly once each).
    assert_eq!(texts, vec!["one".to_owned(), "two".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_from_one_address_are_rate_limited() {
    let world = World::new().expect("world");
    let mut conn = Connection::connect(&world.server.url(), &world.server.ca())
        .await
        .expect("connect");
    let mut codes = Vec::new();
    for i in 0..11 {
        let keys = chat_core::identity::DeviceKeys::generate(&mut rand_core::OsRng);
        conn.send(&register_frame(&format!("flood{i}"), &keys))
            .await
            .expect("send");
        codes.push(
            match conn
                .next_frame(Duration::from_secs(5))
                .await
                .expect("answer")
            {
                ServerFrame::Registered { .. } => None,
                ServerFrame::Error { code, .. } => Some(code),
                other => panic!("unexpected {}", other.name()),
            },
        );
    }
    // The default limit is 10 per minute per address.
    assert!(codes[..10].iter().all(Option::is_none), "{codes:?}");
    assert_eq!(codes[10], Some(ErrorCode::RateLimited));
}
