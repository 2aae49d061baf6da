//! `chat-server healthcheck`: a minimal HTTP(S) GET that exits 0 on status 200, so container
//! images need no shell or curl.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `url` and succeeds when the status is 200.
pub async fn probe(url: &str, ca: Option<&Path>, timeout: Duration) -> Result<()> {
    tokio::time::timeout(timeout, probe_inner(url, ca))
        .await
        .with_context(|| format!("{url}: no answer within {timeout:?}"))?
}

async fn probe_inner(url: &str, ca: Option<&Path>) -> Result<()> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        bail!("{url}: the URL must start with http:// or https://");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h.trim_matches(['[', ']']),
            p.parse().with_context(|| format!("bad port in {url}"))?,
        ),
        _ => (authority, default_port),
    };
    let tcp = TcpStream::connect((host, port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    let status = if tls {
        let ca =
            ca.context("an https URL needs --ca FILE (the CA that issued the server certificate)")?;
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {host}:{port} failed"))?;
        exchange(stream, &request).await?
    } else {
        exchange(tcp, &request).await?
    };
    if status != 200 {
        bail!("{url} answered {status}");
    }
    Ok(())
}

async fn exchange(mut stream: impl AsyncRead + AsyncWrite + Unpin, request: &str) -> Result<u16> {
    stream.write_all(request.as_bytes()).await?;
    let mut head = vec![0u8; 512];
    let mut len = 0;
    while len < 12 {
        let n = stream.read(&mut head[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&head[..len]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or_default()
            )
        })
}
