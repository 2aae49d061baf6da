//! Connections to upstream chat-servers: TCP, then TLS verified against the project CA
//! (`tls/ca.pem` of the key directory) under one server name (default `localhost`, the name
//! every server certificate from `chatctl keys init` carries), whatever the upstream's address.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub const CA_FILE: &str = "tls/ca.pem";

/// Opens TLS connections to upstreams.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    name: ServerName<'static>,
    timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Trusts the CA of `keys_dir` and expects certificates for `server_name`.
    pub fn new(keys_dir: &Path, server_name: &str, timeout: Duration) -> Result<Self> {
        let ca = keys_dir.join(CA_FILE);
        let pem = std::fs::read(&ca).with_context(|| {
            format!(
                "cannot read {}: run `chatctl keys init --dir {}`",
                ca.display(),
                keys_dir.display()
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
        .with_safe_default_protocol_versions()
        .context("no usable TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("{server_name:?} is not a valid TLS server name"))?;
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            name,
            timeout,
        })
    }

    /// Connects and completes the TLS handshake within the timeout.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TlsStream<TcpStream>> {
        let work = async {
            let tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("cannot connect to upstream {addr}"))?;
            let _ = tcp.set_nodelay(true);
            self.tls
                .connect(self.name.clone(), tcp)
                .await
                .with_context(|| format!("TLS handshake with upstream {addr} failed"))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .with_context(|| format!("upstream {addr} did not answer within {:?}", self.timeout))?
    }
}
