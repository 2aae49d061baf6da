//! Health: every interval, resolve the upstream names (a Docker network alias resolves to every
//! server container, so scaling needs no reconfiguration), update the pool, and probe each
//! endpoint by scraping its `/metrics` over TLS: `chatapp_ready` says whether it takes new work
//! (0 while it drains), and its counters (connections, frames, envelopes) are kept for
//! `/gateway/metrics`. An answer that is not 200 makes it not ready; no answer within
//! [`PROBE_TIMEOUT`] is a failure for the circuit breaker. After a round with a failure the next
//! one comes sooner ([`FAILED_ROUND_INTERVAL`]), so a hung server is ejected within seconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::balance::{Outcome, Pool, ServerCounters};

/// How long a probe may take before it counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before the next round when a probe failed in this one.
pub const FAILED_ROUND_INTERVAL: Duration = Duration::from_millis(250);
/// Largest `/metrics` response read.
const MAX_METRICS_BYTES: usize = 64 * 1024;
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

/// Scrapes the upstream's `/metrics`: [`Outcome::Probed`] with its counters,
/// [`Outcome::ProbeRefused`] for another status (or a body that is not a chat-server's), or
/// [`Outcome::ProbeFailed`] when nothing answered within [`PROBE_TIMEOUT`].
pub async fn probe_metrics(connector: &Connector, addr: SocketAddr) -> Outcome {
    let work = async {
        let mut stream = connector.connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                // A server that closes without TLS close_notify still sent its answer.
                Err(_) if !buf.is_empty() => break,
                Err(_) => return None,
            }
            if buf.len() > MAX_METRICS_BYTES {
                break;
            }
        }
        Some(buf)
    };
    let Ok(Some(bytes)) = tokio::time::timeout(PROBE_TIMEOUT, work).await else {
        return Outcome::ProbeFailed;
    };
    if status_code(&bytes) != Some(200) {
        return if bytes.is_empty() {
            Outcome::ProbeFailed
        } else {
            Outcome::ProbeRefused
        };
    }
    let body = super::routing::head_end(&bytes)
        .and_then(|i| bytes.get(i..))
        .unwrap_or_default();
    match ServerCounters::parse(&String::from_utf8_lossy(body)) {
        Some(counters) => Outcome::Probed(counters),
        None => Outcome::ProbeRefused,
    }
}

/// One round: resolve, update the pool, probe everything concurrently and report each
/// outcome to the pool; returns whether any probe failed.
pub async fn check_once(pool: &Pool, connector: &Connector, names: &[String]) -> bool {
    let addrs = resolve(names).await;
    pool.set_addresses(&addrs);
    let probes = pool.snapshot().into_iter().map(|e| {
        let connector = connector.clone();
        async move {
            let outcome = probe_metrics(&connector, e.addr).await;
            let was = e.eligible();
            pool.report(&e, outcome);
            let now = e.eligible();
            if was != now {
                tracing::info!(upstream = %e.addr, eligible = now, ?outcome, "upstream eligibility changed");
            }
            outcome == Outcome::ProbeFailed
        }
    });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .any(|failed| failed)
}

/// Runs [`check_once`] every `interval` (sooner after a failed probe) until `stop` flips.
pub async fn run(
    pool: Arc<Pool>,
    connector: Connector,
    names: Vec<String>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let failed = check_once(&pool, &connector, &names).await;
        let pause = if failed {
            interval.min(FAILED_ROUND_INTERVAL)
        } else {
            interval
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
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
