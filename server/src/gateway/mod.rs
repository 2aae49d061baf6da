//! The gateway role of `chat-server` (`chat-server gateway`): the one public entry of a
//! cluster. It terminates TLS with the key directory's certificate, answers its own `/healthz`,
//! `/readyz` and `/gateway/metrics`, and hands every other connection, WebSocket upgrades
//! included, to the upstream chat-server with the fewest connections, over TLS verified with the
//! project CA, then copies bytes both ways until either side closes.
//!
//! Layers, each in its module and tested alone: [`routing`] (who answers a request),
//! [`balance`] (the pool, least connections, the circuit breaker that ejects hung or failing
//! upstreams and cuts their connections), [`health`] (discovery by DNS, probes that scrape each
//! server's `/metrics`), [`upstream`] (TLS to the servers).
//!
//! Balancing is per connection: a client's HTTP/1.1 keep-alive connection or WebSocket stays on
//! the server it was given, which is what least-connections counts.

pub mod balance;
pub mod health;
pub mod routing;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncWriteExt, copy_bidirectional};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use balance::{Outcome, Pool};
use routing::Route;
use upstream::Connector;

/// How many upstreams a connection tries before the client gets 502.
const CONNECT_ATTEMPTS: usize = 3;

/// Everything the gateway needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Key directory: `tls/server.pem` and `.key` for clients, `tls/ca.pem` for upstreams.
    pub keys_dir: PathBuf,
    /// `host:port` names of the upstreams, resolved again every `probe_interval` (every address
    /// of a name is an upstream).
    pub upstreams: Vec<String>,
    /// The name upstream certificates must be valid for.
    pub upstream_name: String,
    pub probe_interval: Duration,
    /// Seconds for a client's TLS handshake and request head.
    pub handshake_timeout: Duration,
}

impl GatewayConfig {
    pub fn new(listen: SocketAddr, keys_dir: PathBuf, upstreams: Vec<String>) -> Self {
        Self {
            listen,
            keys_dir,
            upstreams,
            upstream_name: "localhost".into(),
            probe_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A gateway running in this process.
#[derive(Debug)]
pub struct RunningGateway {
    pub local_addr: SocketAddr,
    pub pool: Arc<Pool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningGateway {
    /// Stops accepting; open proxied connections end when their peers close them.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }

    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

struct Shared {
    pool: Arc<Pool>,
    connector: Connector,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    clients: AtomicUsize,
}

/// Starts the gateway; returns once it listens (upstreams become ready as probes pass).
pub async fn start(config: GatewayConfig) -> Result<RunningGateway> {
    let mut tls = (*crate::tls::server_config(&config.keys_dir)?).clone();
    // Bytes are relayed as they are: HTTP/1.1 only (WebSockets are HTTP/1.1 upgrades).
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let connector = Connector::new(
        &config.keys_dir,
        &config.upstream_name,
        Duration::from_secs(3),
    )?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let pool = Arc::new(Pool::default());
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(health::run(
        pool.clone(),
        connector.clone(),
        config.upstreams.clone(),
        config.probe_interval,
        stop_rx.clone(),
    ));
    let shared = Arc::new(Shared {
        pool: pool.clone(),
        connector,
        acceptor,
        handshake_timeout: config.handshake_timeout,
        clients: AtomicUsize::new(0),
    });
    let task = tokio::spawn(accept_loop(shared, listener, stop_rx));
    tracing::info!(addr = %local_addr, upstreams = ?config.upstreams, "chat-server gateway listening");
    Ok(RunningGateway {
        local_addr,
        pool,
        stop,
        task,
    })
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.clients.fetch_add(1, Relaxed);
            if let Err(e) = serve_client(&shared, tcp, peer).await {
                tracing::debug!(%peer, error = %format!("{e:#}"), "gateway connection ended");
            }
            shared.clients.fetch_sub(1, Relaxed);
        });
    }
    tracing::info!("gateway stopped accepting");
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn serve_client(shared: &Shared, tcp: TcpStream, peer: SocketAddr) -> Result<()> {
    let mut client = tokio::time::timeout(shared.handshake_timeout, shared.acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake failed")?;
    let head = routing::read_head(&mut client, shared.handshake_timeout).await?;
    let route = match routing::parse_request_line(&head) {
        Ok(line) => routing::route(&line),
        Err(e) => {
            let text = response("400 Bad Request", "text/plain", "bad request\n");
            client.write_all(text.as_bytes()).await?;
            client.shutdown().await?;
            return Err(e);
        }
    };
    let local = match route {
        Route::Healthz => Some(response("200 OK", "text/plain", "ok\n")),
        Route::Readyz if shared.pool.any_ready() => {
            Some(response("200 OK", "text/plain", "ready\n"))
        }
        Route::Readyz => Some(response(
            "503 Service Unavailable",
            "text/plain",
            "no ready upstream\n",
        )),
        Route::Metrics => {
            let mut body = shared.pool.render_metrics();
            body.push_str(&format!(
                "# TYPE chat_gateway_clients gauge\nchat_gateway_clients {}\n",
                shared.clients.load(Relaxed)
            ));
            Some(response("200 OK", "text/plain; version=0.0.4", &body))
        }
        Route::Upstream => None,
    };
    if let Some(text) = local {
        client.write_all(text.as_bytes()).await?;
        client.shutdown().await?;
        return Ok(());
    }
    let mut tried = Vec::new();
    let mut connected = None;
    while tried.len() < CONNECT_ATTEMPTS {
        let Some(lease) = shared.pool.pick(&tried) else {
            break;
        };
        tried.push(lease.endpoint.addr);
        match shared.connector.connect(lease.endpoint.addr).await {
            Ok(stream) => {
                shared.pool.report(&lease.endpoint, Outcome::Connected);
                connected = Some((lease, stream));
                break;
            }
            Err(e) => {
                tracing::warn!(upstream = %lease.endpoint.addr, error = %format!("{e:#}"), "upstream connect failed");
                shared.pool.report(&lease.endpoint, Outcome::ConnectFailed);
            }
        }
    }
    let Some((lease, mut upstream)) = connected else {
        let text = response(
            "502 Bad Gateway",
            "text/plain",
            "no upstream server is available\n",
        );
        client.write_all(text.as_bytes()).await?;
        client.shutdown().await?;
        anyhow::bail!("no upstream available for {peer}");
    };
    tracing::debug!(%peer, upstream = %lease.endpoint.addr, "proxying");
    upstream.write_all(&head).await?;
    // An ejected upstream (hung or failing) takes its connections down with it, so their
    // clients reconnect to a healthy server instead of waiting on a dead socket.
    let mut evicted = lease.endpoint.evictions();
    tokio::select! {
        _ = copy_bidirectional(&mut client, &mut upstream) => {}
        _ = evicted.changed() => {
            tracing::info!(%peer, upstream = %lease.endpoint.addr, "upstream ejected: closing the client connection");
        }
    }
    drop(lease);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_responses_are_complete_http_messages() {
        let text = response("200 OK", "text/plain", "ok\n");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 3\r\n"));
        assert!(text.ends_with("\r\n\r\nok\n"));
    }
}
