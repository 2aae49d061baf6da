//! TLS for the server: the certificate and key written by `chatctl keys init` (`tls/server.pem`,
//! `tls/server.key`), rustls with the ring provider, TLS 1.3 and 1.2 with AEAD suites only,
//! ALPN `h2` and `http/1.1`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const CERT_FILE: &str = "tls/server.pem";
pub const KEY_FILE: &str = "tls/server.key";

/// Builds the rustls server configuration from a key directory.
pub fn server_config(keys_dir: &Path) -> Result<Arc<ServerConfig>> {
    let cert_path = keys_dir.join(CERT_FILE);
    let key_path = keys_dir.join(KEY_FILE);
    let certs: Vec<CertificateDer<'static>> = {
        let pem = std::fs::read(&cert_path).with_context(|| {
            format!(
                "cannot read {}: run `chatctl keys init --dir {}`",
                cert_path.display(),
                keys_dir.display()
            )
        })?;
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{} is not a PEM certificate chain", cert_path.display()))?
    };
    if certs.is_empty() {
        bail!("{} holds no certificate", cert_path.display());
    }
    let key: PrivateKeyDer<'static> = {
        let pem = std::fs::read(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        rustls_pemfile::private_key(&mut pem.as_slice())
            .with_context(|| format!("{} is not a PEM private key", key_path.display()))?
            .with_context(|| format!("{} holds no private key", key_path.display()))?
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("no usable TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "{} does not match {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
