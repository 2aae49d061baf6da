//! The WebSocket transport of one client: reads frames, hands them to [`Node::handle`], writes the
//! answers, and pushes the device's mailbox once it has logged in.
//!
//! tokio-tungstenite over hyper's upgraded connection, no permessage-deflate, messages capped at
//! `MAX_FRAME_BYTES`, small read and write buffers (idle sockets must stay cheap: about 7 KiB
//! each, see issue #8 in `docs/BENCHMARKS.md`). Two tasks per socket: the reader handles frames
//! and queues the answers, shutdown and the start of delivery through a bounded channel to the
//! writer, which owns the sink and also pushes the mailbox once the device has logged in, so a
//! slow reader applies back-pressure instead of growing memory. A session closes with the
//! reconnect code when the server shuts down or when a gradual drain reaches it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chat_core::wire::{CloseCode, ErrorCode, ErrorScope, MAX_FRAME_BYTES, ServerFrame};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::sync::{Notify, futures::OwnedNotified};
use tokio::time::Sleep;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::node::{MailboxRecord, Node, Session, SessionState};
use crate::read_ahead::ReadAhead;
use crate::store::{MailboxId, StoreError, StoredMessage};

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

/// What the reader tells the writer task. Frames travel encoded. The channel allocates its
/// slots 32 at a time per socket (a tokio block, one per idle socket), so the item is kept at
/// 16 bytes: a 512-byte block instead of the 1 KiB of a `Vec` beside a `(CloseCode, &str)`.
enum Outgoing {
    Frame(Box<[u8]>),
    /// Rare: boxed to keep the item small.
    Control(Box<Control>),
}

/// What the reader rarely asks of the writer.
enum Control {
    /// Close the socket with this code and reason.
    Close(CloseCode, &'static str),
    /// The session has logged in: push this mailbox from now on, in place of any earlier one.
    Deliver(MailboxId),
}

const _: () = assert!(std::mem::size_of::<Outgoing>() <= 16);

impl Outgoing {
    fn frame(frame: &ServerFrame) -> Self {
        Outgoing::Frame(frame.encode().into_boxed_slice())
    }

    fn close(code: CloseCode, reason: &'static str) -> Self {
        Outgoing::Control(Box::new(Control::Close(code, reason)))
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
    sink: SplitSink<Socket, Message>,
    mut stream: SplitStream<Socket>,
    peer: SocketAddr,
) {
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(OUTBOX);
    let mut writer = tokio::spawn(write(node.clone(), sink, out_rx));

    let mut session = Session::new(peer.ip());
    let mut shutdown = node.shutdown.subscribe();
    let (session_id, mut drain) = node.session_started();
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
                    let _ = out_tx
                        .send(Outgoing::Control(Box::new(Control::Deliver(mailbox))))
                        .await;
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
    // The writer ends once it has written what was queued; one that cannot (a peer that reads
    // nothing) is stopped, with its delivery.
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// What the writer does next.
enum Step {
    /// What the reader queued; `None` once the reader has ended.
    Queued(Option<Outgoing>),
    /// The mailbox may hold envelopes not yet pushed.
    Mail,
    /// Nothing else is ready: write out what was fed.
    Flush,
}

/// The writer task: owns the sink, writes what the reader queues and, once the session has
/// logged in, pushes the device's mailbox. Delivery runs here rather than in a task of its own
/// so that an envelope goes from the store to the socket without a channel and another task's
/// wake-up in between, and a socket has two tasks, not three. What the reader queued comes
/// first; frames fed together go out with one flush, once nothing else is ready.
async fn write(
    node: Arc<Node>,
    mut sink: SplitSink<Socket, Message>,
    mut queued: mpsc::Receiver<Outgoing>,
) {
    let mut delivery: Option<Delivery> = None;
    let mut unflushed = false;
    loop {
        let step = tokio::select! {
            biased;
            out = queued.recv() => Step::Queued(out),
            () = Delivery::ready(&mut delivery) => Step::Mail,
            () = std::future::ready(()), if unflushed => Step::Flush,
        };
        match step {
            Step::Queued(None) => break,
            Step::Queued(Some(Outgoing::Frame(bytes))) => {
                node.metrics.frames_out.fetch_add(1, Relaxed);
                if sink.feed(Message::Binary(bytes.into())).await.is_err() {
                    break;
                }
                unflushed = true;
            }
            Step::Queued(Some(Outgoing::Control(control))) => match *control {
                Control::Close(code, reason) => {
                    let _ = sink.send(close_message(code, reason)).await;
                    break;
                }
                Control::Deliver(mailbox) => {
                    delivery = Some(Delivery::start(&node, mailbox).await);
                }
            },
            Step::Mail => {
                let Some(mail) = delivery.as_mut() else {
                    continue;
                };
                let batch = match mail.fetch(&node).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::error!(error = %e, "mailbox fetch failed");
                        let close = close_message(CloseCode::Overloaded, "mailbox unavailable");
                        let _ = sink.send(close).await;
                        break;
                    }
                };
                if !feed_envelopes(&node, &mut sink, batch).await {
                    break;
                }
                unflushed = true;
            }
            Step::Flush => {
                if sink.flush().await.is_err() {
                    break;
                }
                unflushed = false;
            }
        }
    }
    let _ = sink.close().await;
}

fn close_message(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.as_u16().into(),
        reason: reason.into(),
    }))
}

/// Feeds one fetched batch to the socket as `Deliver` frames; `false` if the socket failed.
async fn feed_envelopes(
    node: &Node,
    sink: &mut SplitSink<Socket, Message>,
    batch: Vec<StoredMessage>,
) -> bool {
    for item in batch {
        let Ok(record) = MailboxRecord::decode(&item.record) else {
            tracing::error!(seq = item.seq, "undecodable mailbox record skipped");
            continue;
        };
        let frame = ServerFrame::Deliver {
            seq: item.seq,
            message_id: item.message_id,
            from_user: record.from_user,
            from_device: record.from_device,
            server_time: record.server_time,
            envelope: record.envelope,
        };
        node.metrics.frames_out.fetch_add(1, Relaxed);
        if sink
            .feed(Message::Binary(frame.encode().into()))
            .await
            .is_err()
        {
            return false;
        }
        node.metrics.envelopes_delivered.fetch_add(1, Relaxed);
    }
    true
}

/// The push of one device's mailbox, in the writer task: every envelope in order, then a wait
/// for the backplane to say more has come (and, with NATS, a look every resync interval).
struct Delivery {
    mailbox: MailboxId,
    notify: Arc<Notify>,
    /// Registered before each fetch, so an append between the fetch and the wait is not missed.
    notified: Pin<Box<OwnedNotified>>,
    /// The last seq pushed.
    after: u64,
    /// The last fetch was a full batch: fetch again without waiting.
    more: bool,
    /// With NATS: the resync interval and the timer that runs it out.
    resync: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl Delivery {
    async fn start(node: &Node, mailbox: MailboxId) -> Self {
        // Boxed: once per session, and with NATS a large future the writer would otherwise carry.
        let notify = Box::pin(node.backplane.subscribe(&mailbox)).await;
        let resync = node
            .backplane
            .resync_interval()
            .map(|every| (every, Box::pin(tokio::time::sleep(every))));
        Self {
            mailbox,
            notified: Box::pin(notify.clone().notified_owned()),
            notify,
            after: 0,
            more: true,
            resync,
        }
    }

    /// Returns when the mailbox may hold envelopes not yet pushed; never without a delivery.
    async fn ready(delivery: &mut Option<Delivery>) {
        let Some(mail) = delivery else {
            return std::future::pending().await;
        };
        if mail.more {
            return;
        }
        match &mut mail.resync {
            None => mail.notified.as_mut().await,
            Some((_, timer)) => tokio::select! {
                () = mail.notified.as_mut() => {}
                () = timer.as_mut() => {}
            },
        }
    }

    /// The next envelopes after the last pushed, at most [`DELIVERY_BATCH`].
    async fn fetch(&mut self, node: &Node) -> Result<Vec<StoredMessage>, StoreError> {
        self.notified.set(self.notify.clone().notified_owned());
        self.notified.as_mut().enable();
        if let Some((every, timer)) = &mut self.resync {
            timer.as_mut().reset(tokio::time::Instant::now() + *every);
        }
        let batch = node
            .store
            .fetch(&self.mailbox, self.after, DELIVERY_BATCH)
            .await?;
        self.more = batch.len() == DELIVERY_BATCH;
        if let Some(last) = batch.last() {
            self.after = last.seq;
        }
        Ok(batch)
    }
}
