//! Plain WebSocket connections for the peer drivers (NATS, ejabberd, the bare relay): loopback
//! `ws://` only, optional subprotocol, nothing else.

use anyhow::{Context, Result, bail};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// Connects to `ws://host:port/path`, asking for `protocol` if given.
pub async fn connect(url: &str, protocol: Option<&str>) -> Result<Ws> {
    let Some(rest) = url.strip_prefix("ws://") else {
        bail!(
            "peer URL {url:?} must start with ws:// (peers are measured on loopback, without TLS)"
        );
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let tcp = TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}: is the peer running?"))?;
    let _ = tcp.set_nodelay(true);
    let mut request = url.into_client_request()?;
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p)?);
    }
    // The same read buffer as the chat driver's sockets: the load generator costs the same
    // for every system.
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = chatctl::client::conn::READ_BUFFER;
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
        .await
        .with_context(|| format!("WebSocket handshake with {url} failed"))?;
    Ok(ws)
}
