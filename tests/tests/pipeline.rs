//! A client that pipelines its sends (writes many `Send` frames without waiting for each
//! `SendAck`) against a real chat-server process: the server handles the frames that arrived
//! together as one batch (one durable group commit), yet every send is answered in order with
//! its own outcome, and the recipient gets the stored ones once each, in the order sent.

use std::time::Duration;

use chat_core::wire::{ClientFrame, Envelope, ErrorCode, ErrorScope, MessageId, ServerFrame};
use chat_tests::World;
use chatctl::client::DEVICE_ID;

const SENDS: usize = 200;
/// The send to a user that does not exist: refused alone, in its place.
const UNKNOWN: usize = 100;
/// The send that repeats the message id of send `REPEATED`: answered as a duplicate.
const REPEAT: usize = 150;
const REPEATED: usize = 10;

fn message_id(i: usize) -> MessageId {
    let i = if i == REPEAT { REPEATED } else { i };
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
    id[8] = 0xa5;
    id
}

/// Counters `names` from the server's `/metrics`, in order.
async fn counters<const N: usize>(world: &World, names: [&str; N]) -> [u64; N] {
    let tls = chatctl::supervisor::observe::tls_connector(&world.server.ca()).expect("tls");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], world.server.port));
    let text = chatctl::supervisor::observe::https_get(&tls, addr, "/metrics")
        .await
        .expect("GET /metrics");
    names.map(|name| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    })
}

/// `(frames in, batches)` from the server's `/metrics`.
async fn frame_counters(world: &World) -> (u64, u64) {
    let [frames, batches] = counters(
        world,
        ["chatapp_frames_in_total", "chatapp_frame_batches_total"],
    )
    .await;
    (frames, batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_are_batched_yet_answered_and_delivered_in_order_each_once() {
    let world = World::new().expect("server");
    let mut alice = world.register("alice").await.expect("alice");
    let mut bob = world.register("bob").await.expect("bob");
    let (frames_before, batches_before) = frame_counters(&world).await;

    for i in 0..SENDS {
        let to_user = if i == UNKNOWN { "nobody" } else { "bob" };
        let frame = ClientFrame::Send {
            message_id: message_id(i),
            to_user: to_user.into(),
            to_device: DEVICE_ID,
            envelope: Envelope::RatchetMessage {
                message: (i as u64).to_be_bytes().to_vec(),
            }
            .encode(),
        };
        alice.conn.send(&frame).await.expect("send");
    }

    // Every send is answered, in the order sent, with its own outcome.
    let mut answers = Vec::new();
    while answers.len() < SENDS {
        match alice.conn.next_frame(Duration::from_secs(10)).await {
            Ok(f @ (ServerFrame::SendAck { .. } | ServerFrame::Error { .. })) => answers.push(f),
            Ok(_) => {}
            Err(e) => panic!("after {} answers: {e:#}", answers.len()),
        }
    }
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            ServerFrame::Error { scope, code, .. } => {
                assert_eq!(i, UNKNOWN, "unexpected error for send {i}: {answer:?}");
                assert_eq!(*code, ErrorCode::UnknownUser);
                assert_eq!(*scope, ErrorScope::Message(message_id(i)));
            }
            ServerFrame::SendAck {
                message_id: id,
                duplicate,
            } => {
                assert_eq!(*id, message_id(i), "answer {i} out of order");
                assert_eq!(*duplicate, i == REPEAT, "send {i}: {answer:?}");
            }
            _ => unreachable!(),
        }
    }

    // Bob gets each stored send once, in the order sent.
    let expected: Vec<u64> = (0..SENDS)
        .filter(|&i| i != UNKNOWN && i != REPEAT)
        .map(|i| i as u64)
        .collect();
    let mut delivered = Vec::new();
    let mut last_seq = 0;
    while delivered.len() < expected.len() {
        match bob.conn.next_frame(Duration::from_secs(10)).await {
            Ok(ServerFrame::Deliver { seq, envelope, .. }) => {
                assert!(seq > last_seq, "seq {seq} after {last_seq}");
                last_seq = seq;
                let Ok(Envelope::RatchetMessage { message }) = Envelope::decode(&envelope) else {
                    panic!("not the envelope sent: {envelope:?}");
                };
                let n = u64::from_be_bytes(message.try_into().expect("8 bytes"));
                delivered.push(n);
                bob.conn
                    .send(&ClientFrame::Ack { up_to_seq: seq })
                    .await
                    .expect("ack");
            }
            Ok(_) => {}
            Err(e) => panic!("after {} deliveries: {e:#}", delivered.len()),
        }
    }
    assert_eq!(delivered, expected);

    // The frames were not handled one by one: some arrived together and shared a batch.
    let (frames_after, batches_after) = frame_counters(&world).await;
    let frames = frames_after - frames_before;
    let batches = batches_after - batches_before;
    eprintln!("{frames} frames in {batches} batches");
    assert!(frames >= SENDS as u64, "{frames} frames counted");
    assert!(
        batches < frames,
        "{frames} frames in {batches} batches: no batching"
    );
}

/// Sends one frame and waits for its answer (`SendAck` or `Error`).
async fn send_one(
    client: &mut chatctl::client::Client,
    i: usize,
    to_user: &str,
    to_device: u32,
) -> ServerFrame {
    let frame = ClientFrame::Send {
        message_id: message_id(i),
        to_user: to_user.into(),
        to_device,
        envelope: Envelope::RatchetMessage {
            message: vec![i as u8],
        }
        .encode(),
    };
    client.conn.send(&frame).await.expect("send");
    loop {
        match client.conn.next_frame(Duration::from_secs(10)).await {
            Ok(f @ (ServerFrame::SendAck { .. } | ServerFrame::Error { .. })) => return f,
            Ok(_) => {}
            Err(e) => panic!("no answer to send {i}: {e:#}"),
        }
    }
}

/// The server remembers the recipients a session found so that later sends skip the account
/// read; what it remembers is a user's device, and only one that exists: a user who registers
/// after a refused send is found at the next one, and another device of a known user is
/// still checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_remembers_only_recipients_that_exist_and_only_their_device() {
    let world = World::new().expect("server");
    let mut alice = world.register("alice").await.expect("alice");
    let bob = world.register("bob").await.expect("bob");
    drop(bob);

    let code = |f: &ServerFrame| match f {
        ServerFrame::Error { code, .. } => Some(*code),
        _ => None,
    };
    assert_eq!(
        code(&send_one(&mut alice, 1, "carol", DEVICE_ID).await),
        Some(ErrorCode::UnknownUser)
    );
    drop(world.register("carol").await.expect("carol"));
    assert_eq!(
        code(&send_one(&mut alice, 2, "carol", DEVICE_ID).await),
        None,
        "carol registered"
    );

    assert_eq!(code(&send_one(&mut alice, 3, "bob", DEVICE_ID).await), None);
    assert_eq!(
        code(&send_one(&mut alice, 4, "bob", DEVICE_ID + 1).await),
        Some(ErrorCode::UnknownDevice),
        "bob's other device does not exist"
    );
    assert_eq!(code(&send_one(&mut alice, 5, "bob", DEVICE_ID).await), None);
    assert_eq!(
        code(&send_one(&mut alice, 6, "carol", DEVICE_ID + 1).await),
        Some(ErrorCode::UnknownDevice)
    );

    // Sends to a remembered recipient are one store call each (the append), where reading
    // the account made two.
    let store_calls = || counters(&world, ["chatapp_store_latency_seconds_count"]);
    let [before] = store_calls().await;
    for i in 10..20 {
        assert_eq!(code(&send_one(&mut alice, i, "bob", DEVICE_ID).await), None);
    }
    let [after] = store_calls().await;
    assert_eq!(after - before, 10);
}
