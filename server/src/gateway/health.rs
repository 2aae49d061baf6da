//! Health: every interval, resolve the upstream names (a Docker network alias resolves to every
//! server container, so scaling needs no reconfiguration), update the pool, and probe each
//! endpoint's `/readyz` over TLS. A draining server answers 503 there and gets no new
//! connections; one that does not answer is not ready until it does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::balance::Pool;
use super::upstream::Connector;

/// The status code of an HTTP/1.x response head (`HTTP/1.1 200 OK`).
pub fn status_code(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..head.len().min(64))?).ok()?;
    let mut parts = text.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.trim().parse().ok()
}

/// Resolves every `host:port` (all addresses of each); names that do not resolve add nothing.
pub async fn resolve(names: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for name in names {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(addrs) => out.extend(addrs.filter(SocketAddr::is_ipv4)),
            Err(e) => tracing::debug!(upstream = %name, error = %e, "cannot resolve"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Whether the upstream answers `GET /readyz` with 200.
pub async fn probe(connector: &Connector, addr: SocketAddr) -> bool {
    let work = async {
        let mut stream = connector.connect(addr).await.ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 64];
        let mut len = 0;
        while len < 12 {
            let n = stream.read(&mut head[len..]).await.ok()?;
            if n == 0 {
                break;
            }
            len += n;
        }
        status_code(&head[..len])
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), work).await,
        Ok(Some(200))
    )
}

/// One round: resolve, update the pool, probe everything concurrently.
pub async fn check_once(pool: &Pool, connector: &Connector, names: &[String]) {
    let addrs = resolve(names).await;
    pool.set_addresses(&addrs);
    let probes = pool.snapshot().into_iter().map(|e| {
        let connector = connector.clone();
        async move {
            let ok = probe(&connector, e.addr).await;
            let was = e.ready.swap(ok, Relaxed);
            if was != ok {
                tracing::info!(upstream = %e.addr, ready = ok, "upstream readiness changed");
            }
        }
    });
    futures_util::future::join_all(probes).await;
}

/// Runs [`check_once`] every `interval` until `stop` flips.
pub async fn run(
    pool: Arc<Pool>,
    connector: Connector,
    names: Vec<String>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        check_once(&pool, &connector, &names).await;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_read_from_response_heads() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.1 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/1.0 404 x"), Some(404));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(b""), None);
        assert_eq!(status_code(&[0xff, 0xfe, 0x20]), None);
    }

    #[tokio::test]
    async fn names_resolve_to_all_their_addresses() {
        let addrs = resolve(&["127.0.0.1:8443".into(), "nonexistent.invalid:1".into()]).await;
        assert_eq!(addrs, vec![SocketAddr::from(([127, 0, 0, 1], 8443))]);
    }
}
