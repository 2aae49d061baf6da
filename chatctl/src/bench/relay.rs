//! The limit: a minimal WebSocket relay (`chatctl bench relay --listen ADDR`) and its driver.
//!
//! Protocol, all binary messages: a client's first message is its name, answered by an empty
//! message once routable; every later message is `[name length u8][name][payload]` and is
//! forwarded unchanged to the named client. No TLS, no storage, no encryption, no
//! acknowledgements: what a loopback WebSocket costs on this machine and nothing more. Like the
//! chat server, each socket has one writer task fed by a bounded channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::load::{Flow, Inbox, Outbox};
use super::ws::{self, Ws};

type Routes = Arc<Mutex<HashMap<Vec<u8>, mpsc::Sender<Message>>>>;

/// Serves until the process is stopped.
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "chatctl: bench relay listening on ws://{}",
        listener.local_addr()?
    );
    let routes: Routes = Arc::default();
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("chatctl: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let routes = routes.clone();
        tokio::spawn(async move {
            if let Ok(ws) =
                tokio_tungstenite::accept_async_with_config(tcp, Some(small_buffers())).await
            {
                connection(ws, routes).await;
            }
        });
    }
}

/// Buffers like the chat server's: small reads (idle sockets must stay cheap) and frames queued
/// together leaving in one write of up to 8 KiB. With a write buffer of 0, tungstenite writes
/// each frame as it is fed, and the writer task's single flush saved nothing.
fn small_buffers() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 8 * 1024;
    config
}

async fn connection(ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, routes: Routes) {
    let (mut sink, mut stream) = ws.split();
    let name = match stream.next().await {
        Some(Ok(Message::Binary(name))) => name.to_vec(),
        _ => return,
    };
    let (tx, mut rx) = mpsc::channel::<Message>(128);
    routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone(), tx.clone());
    let writer = tokio::spawn(async move {
        // Everything queued goes out with one flush.
        while let Some(m) = rx.recv().await {
            let mut result = sink.feed(m).await;
            while result.is_ok() {
                match rx.try_recv() {
                    Ok(m) => result = sink.feed(m).await,
                    Err(_) => break,
                }
            }
            if result.is_err() || sink.flush().await.is_err() {
                break;
            }
        }
    });
    let _ = tx.send(Message::Binary(Bytes::new())).await;
    while let Some(Ok(message)) = stream.next().await {
        let Message::Binary(frame) = message else {
            continue;
        };
        let Some(&len) = frame.first() else { continue };
        let Some(dest) = frame.get(1..1 + usize::from(len)) else {
            continue;
        };
        let route = routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(dest)
            .cloned();
        if let Some(route) = route {
            let _ = route.send(Message::Binary(frame)).await;
        }
    }
    routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    writer.abort();
}

/// A relay client: connected and routable under `name`.
pub struct RelayConn {
    ws: Ws,
    name: Vec<u8>,
}

impl RelayConn {
    pub async fn connect(url: &str, name: &str) -> Result<Self> {
        let mut ws = ws::connect(url, None).await?;
        ws.send(Message::Binary(name.as_bytes().to_vec().into()))
            .await?;
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.is_empty() => {}
            other => bail!("the relay did not accept {name}: {other:?}"),
        }
        Ok(Self {
            ws,
            name: name.as_bytes().to_vec(),
        })
    }

    /// Queues a frame for `dest` without writing it out (see [`RelayConn::flush`]).
    async fn queue_to(&mut self, dest: &[u8], payload: &[u8]) -> Result<()> {
        let len =
            u8::try_from(dest.len()).map_err(|_| anyhow!("relay names are at most 255 bytes"))?;
        let mut frame = Vec::with_capacity(1 + dest.len() + payload.len());
        frame.push(len);
        frame.extend_from_slice(dest);
        frame.extend_from_slice(payload);
        self.ws
            .feed(Message::Binary(frame.into()))
            .await
            .context("cannot send to the relay")
    }

    async fn flush(&mut self) -> Result<()> {
        self.ws.flush().await.context("cannot send to the relay")
    }

    async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        loop {
            let message = match tokio::time::timeout(timeout, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("the relay closed the connection"),
                Ok(Some(m)) => m.context("relay connection error")?,
            };
            if let Message::Binary(frame) = message {
                let skip = 1 + usize::from(frame.first().copied().unwrap_or_default());
                return Ok(Some(frame.get(skip..).unwrap_or_default().to_vec()));
            }
        }
    }
}

pub struct RelayOutbox {
    conn: RelayConn,
    to: Vec<Vec<u8>>,
    sent: u64,
}

pub struct RelayInbox(RelayConn);

impl Outbox for RelayOutbox {
    async fn send(&mut self, body: Vec<u8>) -> Result<()> {
        for dest in &self.to {
            self.conn.queue_to(dest, &body).await?;
            self.sent += 1;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.conn.flush().await
    }

    async fn finish(&mut self) -> Result<u64> {
        // A message to itself comes back after everything sent before it was forwarded.
        let me = self.conn.name.clone();
        self.conn.queue_to(&me, b"fin").await?;
        self.conn.flush().await?;
        self.conn
            .recv(Duration::from_secs(15))
            .await?
            .ok_or_else(|| anyhow!("the relay did not return the final message"))?;
        Ok(self.sent)
    }
}

impl Inbox for RelayInbox {
    async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.0.recv(timeout).await
    }
}

/// `senders` senders with `fanout` receivers each.
pub async fn flows(
    url: &str,
    senders: usize,
    fanout: usize,
) -> Result<Vec<Flow<RelayOutbox, RelayInbox>>> {
    let tag = super::load::run_tag();
    let mut out = Vec::new();
    for s in 0..senders {
        let mut to = Vec::new();
        let mut inboxes = Vec::new();
        for r in 0..fanout {
            let name = format!("{tag}s{s}r{r}");
            inboxes.push(RelayInbox(RelayConn::connect(url, &name).await?));
            to.push(name.into_bytes());
        }
        out.push(Flow {
            outbox: RelayOutbox {
                conn: RelayConn::connect(url, &format!("{tag}s{s}")).await?,
                to,
                sent: 0,
            },
            inboxes,
        });
    }
    Ok(out)
}
