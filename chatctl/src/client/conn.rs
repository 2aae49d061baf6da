//! One WebSocket connection to a chat-server: TLS (trusting the given CA) or loopback plain
//! HTTP, binary frames in and out, requests matched to answers, deliveries queued.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chat_core::identity::IdentityKeyPair;
use chat_core::wire::{
    ClientFrame, CloseCode, ErrorScope, MAX_FRAME_BYTES, PROTOCOL_VERSION, ServerFrame,
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How long to wait for the answer to one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Read buffer of a client socket. tungstenite zero-fills the free part of its read buffer
/// before every read, so its 128 KiB default cost a 128 KiB memset per read: 14% of a
/// `chatctl bench` load generator's CPU. 16 KiB still holds a few dozen deliveries per read,
/// and the buffer grows for a larger frame.
pub const READ_BUFFER: usize = 16 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The server closed the socket; `code` tells whether to reconnect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server closed the connection ({}: {reason})", code.map_or("no code".to_owned(), |c| c.to_string()))]
pub struct Closed {
    pub code: Option<CloseCode>,
    pub reason: String,
}

/// A server `Error` frame, as an error value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server error {code}: {message}")]
pub struct ServerError {
    pub code: chat_core::wire::ErrorCode,
    pub message: String,
}

/// A connected, greeted socket.
pub struct Connection {
    ws: WebSocketStream<Box<dyn IoBox>>,
    /// Frames that arrived while waiting for something else (deliveries, pushes).
    pub pending: VecDeque<ServerFrame>,
    next_request: u32,
    pub max_envelope_bytes: u32,
    /// The instance that greeted us (`ServerHello.server_name`: the server's hostname unless
    /// configured; in a `chatctl up` cluster the container name, `<project>-server-<i>`).
    pub server_name: String,
}

/// Object-safe alias for the boxed stream.
pub trait IoBox: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: Io> IoBox for T {}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

/// Parses `https://host:port` or `http://127.0.0.1:port` (plain only on loopback servers).
fn split_url(url: &str) -> Result<(bool, String, u16)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("server URL {url:?} must start with https:// (or http:// for a loopback dev server)");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(['[', ']']).to_owned(),
            p.parse().with_context(|| format!("bad port in {url}"))?,
        ),
        None => (authority.to_owned(), if tls { 443 } else { 80 }),
    };
    Ok((tls, host, port))
}

pub fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca).with_context(|| {
        format!(
            "cannot read the CA certificate {}: pass --ca or run `chatctl keys init`",
            ca.display()
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.with_context(|| format!("{} is not PEM", ca.display()))?)
            .with_context(|| format!("{} holds an unusable certificate", ca.display()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Connection {
    /// Connects to `url` (`https://host:port`), upgrades to WebSocket at `/v1/ws` and says Hello.
    pub async fn connect(url: &str, ca: &Path) -> Result<Self> {
        let (tls, host, port) = split_url(url)?;
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| {
                format!("cannot connect to {host}:{port}: is the server running? (`chatctl up`)")
            })?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn IoBox> = if tls {
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let tls = tokio_rustls::TlsConnector::from(tls_config(ca)?)
                .connect(name, tcp)
                .await
                .with_context(|| {
                    format!("TLS handshake with {host}:{port} failed (is --ca the server's CA?)")
                })?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let scheme = if tls { "wss" } else { "ws" };
        let request = format!("{scheme}://{host}:{port}/v1/ws").into_client_request()?;
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME_BYTES);
        config.max_frame_size = Some(MAX_FRAME_BYTES);
        config.read_buffer_size = READ_BUFFER;
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .with_context(|| format!("WebSocket handshake with {url} failed"))?;
        let mut conn = Self {
            ws,
            pending: VecDeque::new(),
            next_request: 1,
            max_envelope_bytes: chat_core::wire::DEFAULT_MAX_ENVELOPE_BYTES,
            server_name: String::new(),
        };
        conn.send(&ClientFrame::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: format!("chatctl/{}", env!("CARGO_PKG_VERSION")),
        })
        .await?;
        match conn.next_frame(REQUEST_TIMEOUT).await? {
            ServerFrame::ServerHello {
                max_envelope_bytes,
                server_name,
                ..
            } => {
                conn.max_envelope_bytes = max_envelope_bytes;
                conn.server_name = server_name;
            }
            other => bail!("expected ServerHello, got {}", other.name()),
        }
        Ok(conn)
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// Queues `frame` in the socket's write buffer without writing it out: frames fed one after
    /// another leave in one write at [`Connection::flush`] (or when the buffer fills).
    pub async fn feed(&mut self, frame: &ClientFrame) -> Result<()> {
        self.ws
            .feed(Message::Binary(frame.encode().into()))
            .await
            .context("cannot send to the server")
    }

    /// Writes out every frame queued by [`Connection::feed`].
    pub async fn flush(&mut self) -> Result<()> {
        self.ws.flush().await.context("cannot send to the server")
    }

    /// Sends raw bytes (tests of malformed frames).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .context("cannot send")
    }

    pub fn request_id(&mut self) -> u32 {
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        id
    }

    /// The next frame from the server (queued ones first); a close is an error of type [`Closed`].
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<ServerFrame> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        self.read_frame(timeout).await
    }

    /// The next frame if one has already arrived, without waiting (and without a timer: a
    /// zero timeout still yields to the timer driver, about a millisecond per call under load,
    /// which capped `chatctl bench` senders at ~700 messages/s each).
    pub fn try_next_frame(&mut self) -> Result<Option<ServerFrame>> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Some(frame));
        }
        while let Some(message) = self.ws.next().now_or_never() {
            if let Some(frame) = frame_of(message)? {
                return Ok(Some(frame));
            }
        }
        Ok(None)
    }

    async fn read_frame(&mut self, timeout: Duration) -> Result<ServerFrame> {
        loop {
            let message = tokio::time::timeout(timeout, self.ws.next())
                .await
                .map_err(|_| anyhow!("no answer from the server within {timeout:?}"))?;
            if let Some(frame) = frame_of(message)? {
                return Ok(frame);
            }
        }
    }

    /// Waits for the frame `matches` accepts, queueing everything else; an `Error` frame whose
    /// scope `is_mine` accepts is returned as a [`ServerError`].
    pub async fn wait_for(
        &mut self,
        matches: impl Fn(&ServerFrame) -> bool,
        is_mine: impl Fn(&ErrorScope) -> bool,
    ) -> Result<ServerFrame> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        // Look through what is already queued first.
        if let Some(pos) = self
            .pending
            .iter()
            .position(|f| matches(f) || error_for(f, &is_mine).is_some())
        {
            if let Some(frame) = self.pending.remove(pos) {
                return into_result(frame, &is_mine);
            }
        }
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.read_frame(left).await?;
            if matches(&frame) || error_for(&frame, &is_mine).is_some() {
                return into_result(frame, &is_mine);
            }
            self.pending.push_back(frame);
        }
    }

    /// Logs in as `username`'s device `device_id`: `Login`, then the challenge signed with the
    /// device's identity key, then `Welcome`.
    pub async fn login(
        &mut self,
        username: &str,
        device_id: u32,
        identity: &IdentityKeyPair,
    ) -> Result<()> {
        self.send(&ClientFrame::Login {
            username: username.to_owned(),
            device_id,
        })
        .await?;
        let nonce = match self
            .wait_for(
                |f| matches!(f, ServerFrame::Challenge { .. }),
                |s| *s == ErrorScope::Connection,
            )
            .await?
        {
            ServerFrame::Challenge { nonce } => nonce,
            _ => bail!("expected a login challenge"),
        };
        let signature = identity.sign_login(&nonce, username, device_id);
        self.send(&ClientFrame::LoginProof { signature }).await?;
        self.wait_for(
            |f| matches!(f, ServerFrame::Welcome { .. }),
            |s| *s == ErrorScope::Connection,
        )
        .await
        .with_context(|| format!("login as {username} failed"))?;
        Ok(())
    }

    /// Sends a request frame built with a fresh request id and waits for its answer.
    pub async fn request(&mut self, build: impl FnOnce(u32) -> ClientFrame) -> Result<ServerFrame> {
        let id = self.request_id();
        self.send(&build(id)).await?;
        self.wait_for(
            move |f| f.request_id() == Some(id) && !matches!(f, ServerFrame::Error { .. }),
            move |scope| *scope == ErrorScope::Request(id),
        )
        .await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The frame a WebSocket message carries; `None` for control messages (pings and pongs, which
/// tungstenite answers); an error when the connection closed or broke.
fn frame_of(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<ServerFrame>> {
    match message {
        Some(Ok(Message::Binary(bytes))) => ServerFrame::decode(&bytes)
            .map(Some)
            .map_err(|e| anyhow!("the server sent an undecodable frame: {e}")),
        Some(Ok(Message::Close(frame))) => {
            let (code, reason) = frame
                .map(|f| (CloseCode::from_u16(f.code.into()), f.reason.to_string()))
                .unwrap_or((None, String::new()));
            Err(Closed { code, reason }.into())
        }
        None => Err(Closed {
            code: None,
            reason: "connection lost".into(),
        }
        .into()),
        Some(Ok(_)) => Ok(None),
        Some(Err(e)) => Err(anyhow!("connection error: {e}")),
    }
}

fn error_for(frame: &ServerFrame, is_mine: &impl Fn(&ErrorScope) -> bool) -> Option<ServerError> {
    match frame {
        ServerFrame::Error {
            scope,
            code,
            message,
        } if is_mine(scope) => Some(ServerError {
            code: *code,
            message: message.clone(),
        }),
        _ => None,
    }
}

fn into_result(frame: ServerFrame, is_mine: &impl Fn(&ErrorScope) -> bool) -> Result<ServerFrame> {
    match error_for(&frame, is_mine) {
        Some(e) => Err(e.into()),
        None => Ok(frame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_server_urls() {
        assert_eq!(
            split_url("https://localhost:8443").ok(),
            Some((true, "localhost".into(), 8443))
        );
        assert_eq!(
            split_url("http://127.0.0.1:80/").ok(),
            Some((false, "127.0.0.1".into(), 80))
        );
        assert_eq!(
            split_url("https://[::1]:9").ok(),
            Some((true, "::1".into(), 9))
        );
        assert!(split_url("localhost:8443").is_err());
    }
}
