//! Routing: read the head of the first HTTP/1.1 request on a connection and decide who answers
//! it: the gateway itself (`/healthz`, `/readyz`, `/gateway/metrics`) or an upstream server
//! (everything else, WebSocket upgrades included). Pure parsing, no I/O beyond [`read_head`].

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// The request line of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    pub method: String,
    pub path: String,
}

/// Who answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Liveness of the gateway process.
    Healthz,
    /// 200 when at least one upstream is ready.
    Readyz,
    /// Per-upstream connections and state, Prometheus text.
    Metrics,
    /// Everything else goes to an upstream chat-server, bytes for bytes.
    Upstream,
}

/// Parses the request line (`GET /path HTTP/1.1`) at the start of `head`.
pub fn parse_request_line(head: &[u8]) -> Result<RequestLine> {
    let end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .context("no request line")?;
    let line = std::str::from_utf8(&head[..end]).context("request line is not UTF-8")?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("unsupported protocol {version:?} (the gateway speaks HTTP/1.1)");
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        bail!("bad method");
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    Ok(RequestLine {
        method: method.to_owned(),
        path,
    })
}

/// Decides who answers.
pub fn route(line: &RequestLine) -> Route {
    let read = line.method == "GET" || line.method == "HEAD";
    match line.path.as_str() {
        "/healthz" if read => Route::Healthz,
        "/readyz" if read => Route::Readyz,
        "/gateway/metrics" if read => Route::Metrics,
        _ => Route::Upstream,
    }
}

/// Index just past the `\r\n\r\n` that ends the head, if present.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Reads until the request head is complete; returns every byte read (the head and whatever
/// followed it), to be forwarded unchanged.
pub async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
    timeout: Duration,
) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed before a full request head");
            }
            buf.extend_from_slice(&chunk[..n]);
            if head_end(&buf).is_some() {
                return Ok(());
            }
            if buf.len() > MAX_HEAD {
                bail!("request head larger than {MAX_HEAD} bytes");
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .context("request head not received in time")??;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> RequestLine {
        parse_request_line(text.as_bytes()).expect("parses")
    }

    #[test]
    fn health_endpoints_are_answered_by_the_gateway() {
        assert_eq!(route(&line("GET /healthz HTTP/1.1\r\n")), Route::Healthz);
        assert_eq!(route(&line("GET /readyz?x=1 HTTP/1.1\r\n")), Route::Readyz);
        assert_eq!(
            route(&line("GET /gateway/metrics HTTP/1.1\r\n")),
            Route::Metrics
        );
    }

    #[test]
    fn websocket_and_everything_else_go_upstream() {
        assert_eq!(route(&line("GET /v1/ws HTTP/1.1\r\n")), Route::Upstream);
        assert_eq!(route(&line("GET /metrics HTTP/1.1\r\n")), Route::Upstream);
        assert_eq!(route(&line("GET / HTTP/1.1\r\n")), Route::Upstream);
        assert_eq!(route(&line("POST /healthz HTTP/1.1\r\n")), Route::Upstream);
    }

    #[test]
    fn malformed_request_lines_are_errors_not_panics() {
        for bad in [
            "",
            "GET\r\n",
            "GET / HTTP/2\r\n",
            "get / HTTP/1.1\r\n",
            "GET  / HTTP/1.1\r\n",
            "GET / HTTP/1.1",
        ] {
            assert!(parse_request_line(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn read_head_keeps_the_bytes_after_the_head() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = a
                .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\nEXTRA")
                .await;
        });
        let bytes = read_head(&mut b, Duration::from_secs(2))
            .await
            .expect("head");
        assert!(bytes.starts_with(b"GET /v1/ws"));
        assert_eq!(head_end(&bytes), Some(bytes.len() - 5));
    }
}
