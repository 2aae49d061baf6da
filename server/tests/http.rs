//! The HTTP surface of a server started in-process on loopback: health, readiness while
//! draining, Prometheus metrics, and the static bundle's security headers.

use std::net::SocketAddr;
use std::path::Path;

use chat_server::config::ServerConfig;
use chat_server::server::{RunningServer, start};
use chat_server::store::seal::DataKeyRing;
use chat_signing::tree_head::DirectorySigningKey;
use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn server(dir: &Path, bundle: Option<&Path>) -> RunningServer {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    std::fs::write(
        keys.join("directory.key"),
        DirectorySigningKey::generate(&mut OsRng)
            .to_file_string()
            .as_bytes(),
    )
    .expect("write directory key");
    std::fs::write(
        keys.join("data.key"),
        DataKeyRing::generate(&mut OsRng)
            .to_file_string()
            .as_bytes(),
    )
    .expect("write data key");
    let mut config = ServerConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        dir.join("data"),
        keys,
    );
    config.plain_http = true;
    config.bundle_dir = bundle.map(Path::to_path_buf);
    start(config).await.expect("server starts")
}

/// A minimal HTTP/1.1 GET; returns the status line + headers (lower-cased) and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_lowercase(), body.to_owned())
}

#[tokio::test]
async fn health_and_readiness_answer_and_readiness_drops_while_draining() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = server(dir.path(), None).await;
    let addr = server.local_addr;
    assert!(get(addr, "/healthz").await.0.starts_with("http/1.1 200"));
    assert!(get(addr, "/readyz").await.0.starts_with("http/1.1 200"));
    server.node.start_draining();
    assert!(get(addr, "/readyz").await.0.starts_with("http/1.1 503"));
    assert!(
        get(addr, "/healthz").await.0.starts_with("http/1.1 200"),
        "alive while draining"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_prefixed_chatapp() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = server(dir.path(), None).await;
    let (head, body) = get(server.local_addr, "/metrics").await;
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for name in [
        "chatapp_connections ",
        "chatapp_frames_in_total ",
        "chatapp_frames_out_total ",
        "chatapp_envelopes_stored_total ",
        "chatapp_envelopes_delivered_total ",
        "chatapp_store_latency_seconds_bucket",
        "chatapp_mailbox_depth ",
    ] {
        assert!(body.contains(name), "missing {name} in\n{body}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn bundle_is_served_with_strict_headers_and_an_uncached_manifest() {
    let dir = tempfile::tempdir().expect("tmp");
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("app")).expect("mkdir");
    std::fs::write(bundle.join("index.html"), "<!doctype html>").expect("write");
    std::fs::write(bundle.join("app/main.js"), "export {}").expect("write");
    std::fs::write(bundle.join("manifest.json"), "{}").expect("write");
    std::fs::write(dir.path().join("secret.txt"), "outside").expect("write");
    let server = server(dir.path(), Some(&bundle)).await;
    let addr = server.local_addr;

    let (head, body) = get(addr, "/").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "<!doctype html>");
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .expect("a CSP header");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("'unsafe-eval'"),
        "{csp}"
    );
    assert!(csp.contains("'wasm-unsafe-eval'"), "{csp}");
    assert!(head.contains("x-content-type-options: nosniff"));
    assert!(head.contains("referrer-policy: no-referrer"));
    assert!(head.contains("cross-origin-opener-policy: same-origin"));

    let (head, _) = get(addr, "/app/main.js").await;
    assert!(head.contains("content-type: text/javascript"), "{head}");
    let (head, _) = get(addr, "/manifest.json").await;
    assert!(head.contains("cache-control: no-store"), "{head}");
    for escape in [
        "/../secret.txt",
        "/app/../../secret.txt",
        "/%2e%2e/secret.txt",
    ] {
        assert!(
            get(addr, escape).await.0.starts_with("http/1.1 404"),
            "{escape}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn plain_http_is_refused_off_loopback() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = ServerConfig::new(
        SocketAddr::from(([0, 0, 0, 0], 0)),
        dir.path().join("d"),
        dir.path().join("k"),
    );
    config.plain_http = true;
    let err = start(config).await.expect_err("refused");
    assert!(format!("{err:#}").contains("loopback"), "{err:#}");
}
