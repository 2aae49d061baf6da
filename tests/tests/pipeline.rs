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

/// `(frames in, batches)` from the server's `/metrics`.
async fn frame_counters(world: &World) -> (u64, u64) {
    let tls = chatctl::supervisor::observe::tls_connector(&world.server.ca()).expect("tls");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], world.server.port));
    let text = chatctl::supervisor::observe::https_get(&tls, addr, "/metrics")
        .await
        .expect("GET /metrics");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    (
        value("chatapp_frames_in_total"),
        value("chatapp_frame_batches_total"),
    )
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
