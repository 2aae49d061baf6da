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
    // No size limit on what a peer sends: nats-server writes everything pending for a
    // subscriber in one frame, and a receiver that fell behind at 90% of NATS's maximum got
    // 32 MiB at once, over tungstenite's 16 MiB default, which ended the run.
    config.max_frame_size = None;
    config.max_message_size = None;
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
        .await
        .with_context(|| format!("WebSocket handshake with {url} failed"))?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    #[tokio::test]
    async fn a_peer_frame_larger_than_tungstenites_default_limit_is_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let big = 20 << 20; // over the 16 MiB default of max_frame_size
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp)
                .await
                .expect("handshake");
            ws.send(Message::Binary(vec![7u8; big].into()))
                .await
                .expect("send");
            // Keep the socket open until the client has read the frame.
            let _ = ws.next().await;
        });
        let mut ws = connect(&format!("ws://{addr}/"), None)
            .await
            .expect("connect");
        let got = ws.next().await.expect("a message").expect("no size error");
        assert_eq!(got.into_data().len(), big);
        drop(ws);
        server.await.expect("server");
    }
}
