//! Starting and stopping a server: open the keys and the store, bind, accept (TLS or loopback
//! plain HTTP), serve HTTP/1.1 and HTTP/2 through hyper, and shut down gracefully.
//!
//! Graceful shutdown: not ready (`/readyz` 503), stop accepting, every WebSocket closed with the
//! reconnect close code, in-flight HTTP finished, all within the configured deadline. Every
//! acknowledged envelope is already committed to the store, so nothing needs flushing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, Result};
use chat_signing::tree_head::DirectorySigningKey;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::backplane::Backplane;
use crate::config::{ServerConfig, StoreLocation};
use crate::directory::Directory;
use crate::node::Node;
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::nats::{NatsOptions, NatsStore};
use crate::store::seal::DataKeyRing;

pub const DIRECTORY_KEY_FILE: &str = "directory.key";
pub const DATA_KEY_FILE: &str = "data.key";

/// A server running in this process.
#[derive(Debug)]
pub struct RunningServer {
    pub local_addr: SocketAddr,
    pub node: Arc<Node>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// Shuts down gracefully and waits until done.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }

    /// Resolves when the server has stopped by itself (it does not, unless asked).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A handle that triggers a graceful shutdown from elsewhere (a signal handler).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Opens the store named by the config: the embedded one in `DATA_DIR` (`chat.redb` and
/// `mailboxes.log`), or the NATS
/// JetStream store at the configured URL.
pub async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>> {
    let keys_path = config.keys_dir.join(DATA_KEY_FILE);
    let text = std::fs::read_to_string(&keys_path).with_context(|| {
        format!(
            "cannot read {}: run `chatctl keys init --dir {}`",
            keys_path.display(),
            config.keys_dir.display()
        )
    })?;
    let keys =
        DataKeyRing::from_file_string(&text).with_context(|| keys_path.display().to_string())?;
    if let StoreLocation::Nats(url) = &config.store {
        let store = NatsStore::connect(url, keys, NatsOptions::default())
            .await
            .with_context(|| {
                format!("cannot open the NATS store at {url}: is nats-server -js running there?")
            })?;
        return Ok(Arc::new(store));
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let store = EmbeddedStore::open(&config.data_dir, keys)
        .await
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    Ok(Arc::new(store))
}

/// The backplane that goes with the store: in-process for the embedded store, NATS pub/sub for
/// the NATS store.
pub async fn open_backplane(config: &ServerConfig) -> Result<Backplane> {
    match &config.store {
        StoreLocation::Embedded => Ok(Backplane::in_process()),
        StoreLocation::Nats(url) => Backplane::nats(url)
            .await
            .with_context(|| format!("cannot connect the delivery backplane to {url}")),
    }
}

/// Starts a server; returns once it is listening.
pub async fn start(config: ServerConfig) -> Result<RunningServer> {
    config.validate()?;
    let key_path = config.keys_dir.join(DIRECTORY_KEY_FILE);
    let key_text = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "cannot read {}: run `chatctl keys init --dir {}`",
            key_path.display(),
            config.keys_dir.display()
        )
    })?;
    let key = DirectorySigningKey::from_file_string(&key_text)
        .with_context(|| key_path.display().to_string())?;
    let tls = if config.plain_http {
        None
    } else {
        Some(TlsAcceptor::from(crate::tls::server_config(
            &config.keys_dir,
        )?))
    };
    let store = open_store(&config).await?;
    let backplane = open_backplane(&config).await?;
    let directory = Directory::open(store.clone(), key)
        .await
        .context("cannot open the key directory")?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let node = Arc::new(Node::with_backplane(config, store, directory, backplane));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(node.clone(), listener, tls, stop_rx));
    let ticker = node.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(crate::directory::SIGNING_INTERVAL);
        loop {
            interval.tick().await;
            if let Err(e) = ticker.directory.tick().await {
                tracing::error!(error = %e, "cannot sign a tree head");
            }
            if ticker.is_draining() {
                break;
            }
        }
    });
    tracing::info!(
        addr = %local_addr,
        tls = tls_label(&node),
        store = %node.config.store,
        "chat-server listening"
    );
    Ok(RunningServer {
        local_addr,
        node,
        stop,
        task,
    })
}

fn tls_label(node: &Node) -> &'static str {
    if node.config.plain_http {
        "off (loopback only)"
    } else {
        "on"
    }
}

async fn accept_loop(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(node.config.limits.max_connections));
    loop {
        let (tcp, peer) = tokio::select! {
            () = crate::node::flipped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refusing");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let node = node.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(serve_connection(
            node,
            tcp,
            peer,
            tls,
            watcher,
            Arc::new(permit),
        ));
    }
    drop(listener);
    tracing::info!("shutting down: draining connections");
    node.start_draining();
    let deadline = node.config.limits.shutdown_deadline();
    let sockets_closed = async {
        while node.metrics.connections.load(Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let all = async {
        graceful.shutdown().await;
        sockets_closed.await;
    };
    if tokio::time::timeout(deadline, all).await.is_err() {
        tracing::warn!("shutdown deadline reached with connections still open");
    }
    tracing::info!("chat-server stopped");
}

async fn serve_connection(
    node: Arc<Node>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    watcher: hyper_util::server::graceful::Watcher,
    // The connection's place under `max_connections`. hyper's connection ends when it upgrades,
    // so a WebSocket takes a clone along and the place is free only once both are gone.
    slot: crate::http::Slot,
) {
    let timeout = node.config.limits.handshake_timeout();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout);
    builder.http2().timer(TokioTimer::new());
    let service = service_fn(move |req| {
        let node = node.clone();
        let slot = slot.clone();
        async move { Ok::<_, std::convert::Infallible>(crate::http::route(node, peer, slot, req).await) }
    });
    let result = match tls {
        Some(acceptor) => {
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            watcher.watch(conn.into_owned()).await
        }
        None => {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            watcher.watch(conn.into_owned()).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;
    use rand_core::OsRng;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn plain_server(dir: &std::path::Path, max_connections: usize) -> RunningServer {
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys).expect("mkdir");
        let directory_key = DirectorySigningKey::generate(&mut OsRng).to_file_string();
        std::fs::write(keys.join(DIRECTORY_KEY_FILE), directory_key).expect("write");
        let data_key = DataKeyRing::generate(&mut OsRng).to_file_string();
        std::fs::write(keys.join(DATA_KEY_FILE), data_key).expect("write");
        let mut config = ServerConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            dir.join("data"),
            keys,
        );
        config.plain_http = true;
        config.limits.max_connections = max_connections;
        start(config).await.expect("server starts")
    }

    /// Whether a plain GET /healthz on a new connection is answered.
    async fn answered(addr: SocketAddr) -> bool {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let request = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        if tcp.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        out.starts_with(b"HTTP/1.1 200")
    }

    #[tokio::test]
    async fn an_upgraded_websocket_keeps_its_place_under_the_connection_limit() {
        let dir = tempfile::tempdir().expect("tmp");
        let server = plain_server(dir.path(), 1).await;
        let addr = server.local_addr;
        assert!(answered(addr).await, "a free server answers");
        let mut ws = TcpStream::connect(addr).await.expect("connect");
        ws.write_all(
            b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("write");
        let mut head = vec![0u8; 12];
        ws.read_exact(&mut head).await.expect("read");
        assert_eq!(&head, b"HTTP/1.1 101");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !answered(addr).await,
            "the WebSocket holds the only place: a second connection is refused"
        );
        drop(ws);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !answered(addr).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the place is freed when the WebSocket closes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.shutdown().await;
    }
}
