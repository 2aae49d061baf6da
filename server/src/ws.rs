//! The WebSocket transport of one client: reads frames, hands them to [`Node::handle`], writes the
//! answers, and pushes the device's mailbox once it has logged in.
//!
//! tokio-tungstenite over hyper's upgraded connection, no permessage-deflate, messages capped at
//! `MAX_FRAME_BYTES`, small read and write buffers (idle sockets must stay cheap: about 7 KiB
//! each, see issue #8 in `docs/BENCHMARKS.md`). One writer task owns
//! the sink; the reader, the delivery loop and shutdown all send to it through a bounded channel,
//! so a slow reader applies back-pressure instead of growing memory. A session closes with the
//! reconnect code when the server shuts down or when a gradual drain reaches it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chat_core::wire::{CloseCode, ErrorCode, ErrorScope, MAX_FRAME_BYTES, ServerFrame};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::node::{MailboxRecord, Node, Session, SessionState};
use crate::read_ahead::ReadAhead;
use crate::store::MailboxId;

/// Envelopes fetched from the store per delivery round.
const DELIVERY_BATCH: usize = 64;
/// Frames queued for one socket before senders wait.
const OUTBOX: usize = 128;

/// First read buffer of a socket: login and ack frames fit; tungstenite grows it to the largest
/// frame the socket receives. Allocated and zero-filled at the upgrade, so every idle socket pays
/// for it (at 4 KiB it was a third of an idle socket's memory). tungstenite asks the socket for
/// one frame at a time; [`ReadAhead`] reads pipelined frames in one call.
const READ_BUFFER: usize = 1024;
/// See [`websocket_config`].
const WRITE_BUFFER: usize = 8 * 1024;

/// What the writer task sends. Frames travel encoded. The channel allocates its slots 32 at a
/// time per socket (a tokio block, one per idle socket), so the item is kept at 16 bytes: a
/// 512-byte block instead of the 1 KiB of a `Vec` beside a `(CloseCode, &str)`.
enum Outgoing {
    Frame(Box<[u8]>),
    /// Rare: boxed to keep the item small.
    Close(Box<(CloseCode, &'static str)>),
}

const _: () = assert!(std::mem::size_of::<Outgoing>() <= 16);

impl Outgoing {
    fn frame(frame: &ServerFrame) -> Self {
        Outgoing::Frame(frame.encode().into_boxed_slice())
    }

    fn close(code: CloseCode, reason: &'static str) -> Self {
        Outgoing::Close(Box::new((code, reason)))
    }
}

pub fn websocket_config() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_FRAME_BYTES);
    config.max_frame_size = Some(MAX_FRAME_BYTES);
    // Frames queued together (a delivery batch, the answers to pipelined sends) go out in one
    // write of up to this size, flushed by the writer task when its queue is empty; 0 would
    // make a write system call per frame (14% of a loaded server's CPU). The buffer grows only
    // while frames are queued, so an idle socket holds none of it.
    config.write_buffer_size = WRITE_BUFFER;
    config.max_write_buffer_size = MAX_FRAME_BYTES * 4;
    config.read_buffer_size = READ_BUFFER;
    config
}

/// Runs one client connection to its end.
pub async fn serve(node: Arc<Node>, upgraded: Upgraded, peer: SocketAddr) {
    let ws = WebSocketStream::from_raw_socket(
        ReadAhead::new(TokioIo::new(upgraded)),
        Role::Server,
        Some(websocket_config()),
    )
    .await;
    node.metrics.connections.fetch_add(1, Relaxed);
    node.metrics.connections_total.fetch_add(1, Relaxed);
    // Split here: an async fn keeps its arguments for its whole life, and the stream itself is
    // some 300 bytes that `run` would carry beside the halves.
    let (sink, stream) = ws.split();
    run(node.clone(), sink, stream, peer).await;
    node.metrics.connections.fetch_sub(1, Relaxed);
}

type Socket = WebSocketStream<ReadAhead<TokioIo<Upgraded>>>;

async fn run(
    node: Arc<Node>,
    mut sink: SplitSink<Socket, Message>,
    mut stream: SplitStream<Socket>,
    peer: SocketAddr,
) {
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(OUTBOX);
    let writer_node = node.clone();
    let writer = tokio::spawn(async move {
        // Frames queued together go out with one flush.
        let mut next = out_rx.recv().await;
        while let Some(out) = next.take() {
            match out {
                Outgoing::Frame(bytes) => {
                    writer_node.metrics.frames_out.fetch_add(1, Relaxed);
                    if sink.feed(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                    next = match out_rx.try_recv() {
                        Ok(out) => Some(out),
                        Err(_) => {
                            if sink.flush().await.is_err() {
                                break;
                            }
                            out_rx.recv().await
                        }
                    };
                }
                Outgoing::Close(close) => {
                    let (code, reason) = *close;
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: code.as_u16().into(),
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
            }
        }
        let _ = sink.close().await;
    });

    let mut session = Session::new(peer.ip());
    let mut shutdown = node.shutdown.subscribe();
    let (session_id, mut drain) = node.session_started();
    let mut delivery: Option<tokio::task::JoinHandle<()>> = None;
    let idle = Duration::from_secs(node.config.limits.unauthenticated_idle_secs);
    let pipelined = node.config.limits.pipelined_frames.max(1);
    // A message read while gathering a batch that is not part of it, handled next.
    let mut held = None;
    let close = loop {
        let authenticated = session.authenticated().is_some();
        let timeout = async {
            if authenticated {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(idle).await;
        };
        let message = match held.take() {
            Some(message) => message,
            None => tokio::select! {
                () = crate::node::flipped(&mut shutdown) => break Some((CloseCode::Reconnect, "server draining: reconnect")),
                Ok(()) = &mut drain => break Some((CloseCode::Reconnect, "server draining: reconnect")),
                () = timeout => break Some((CloseCode::AuthFailed, "no login in time")),
                message = stream.next() => message,
            },
        };
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                // Frames that arrived together are handled together: a client that
                // pipelines its sends gets them into one durable commit.
                let mut batch = vec![bytes];
                while batch.len() < pipelined {
                    match stream.next().now_or_never() {
                        Some(Some(Ok(Message::Binary(more)))) => batch.push(more),
                        Some(other) => {
                            held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                node.metrics
                    .frames_in
                    .fetch_add(batch.len() as u64, Relaxed);
                node.metrics.frame_batches.fetch_add(1, Relaxed);
                // Boxed: handling frames is a large future (store and directory calls), and
                // inline it would size this task, which lives as long as the socket.
                let frames = Box::pin(node.handle_encoded(&mut session, &batch)).await;
                for frame in frames {
                    if out_tx.send(Outgoing::frame(&frame)).await.is_err() {
                        break;
                    }
                }
                if let Some(mailbox) = session.start_delivery.take() {
                    if let Some(old) = delivery.take() {
                        old.abort();
                    }
                    delivery = Some(tokio::spawn(deliver(node.clone(), mailbox, out_tx.clone())));
                }
            }
            Some(Ok(Message::Text(_))) => {
                let frame = ServerFrame::error(
                    ErrorScope::Connection,
                    ErrorCode::MalformedFrame,
                    "frames are binary WebSocket messages",
                );
                let _ = out_tx.send(Outgoing::frame(&frame)).await;
            }
            Some(Ok(Message::Close(_))) | None => break None,
            Some(Ok(_)) => {} // ping/pong are answered by tungstenite
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "websocket read error");
                break Some((CloseCode::ProtocolError, "websocket protocol error"));
            }
        }
    };
    node.session_ended(session_id);
    if let Some(task) = delivery.take() {
        task.abort();
    }
    if let SessionState::Authenticated {
        username,
        device_id,
    } = &session.state
    {
        node.backplane
            .release(&MailboxId::new(username, *device_id));
    }
    if let Some((code, reason)) = close {
        let _ = out_tx.send(Outgoing::close(code, reason)).await;
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// Pushes every envelope of the mailbox in order, then waits for more.
async fn deliver(node: Arc<Node>, mailbox: MailboxId, out: mpsc::Sender<Outgoing>) {
    // Boxed: once per session, and with NATS a large future this task would otherwise carry.
    let notify = Box::pin(node.backplane.subscribe(&mailbox)).await;
    let resync = node.backplane.resync_interval();
    let mut after = 0u64;
    loop {
        // Register interest before reading, so an append between the read and the wait is not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let batch = match node.store.fetch(&mailbox, after, DELIVERY_BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "mailbox fetch failed");
                let _ = out
                    .send(Outgoing::close(
                        CloseCode::Overloaded,
                        "mailbox unavailable",
                    ))
                    .await;
                return;
            }
        };
        let full = batch.len() == DELIVERY_BATCH;
        for item in batch {
            after = item.seq;
            let Ok(record) = MailboxRecord::decode(&item.record) else {
                tracing::error!(seq = item.seq, "undecodable mailbox record skipped");
                continue;
            };
            // Encoded before the await, so the frame is not part of this task's state.
            let frame = Outgoing::frame(&ServerFrame::Deliver {
                seq: item.seq,
                message_id: item.message_id,
                from_user: record.from_user,
                from_device: record.from_device,
                server_time: record.server_time,
                envelope: record.envelope,
            });
            if out.send(frame).await.is_err() {
                return;
            }
            node.metrics.envelopes_delivered.fetch_add(1, Relaxed);
        }
        if !full {
            match resync {
                Some(every) => {
                    let _ = tokio::time::timeout(every, notified).await;
                }
                None => notified.await,
            }
        }
    }
}
