//! What the Docker suites (`cluster`, `supervisor`) share: the static server that goes into the
//! image, a check that an engine answers, and a free port to publish the gateway on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{target_dir, workspace_root};

pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds (once per run) the static chat-server that goes into the image;
/// `CHATAPP_MUSL_SERVER` names a prebuilt one instead (to iterate without rebuilding it).
pub fn musl_server() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("CHATAPP_MUSL_SERVER") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(&cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "--target",
                MUSL_TARGET,
                "-p",
                "chat-server",
            ])
            .status()
            .expect("cannot run cargo");
        assert!(
            status.success(),
            "cargo build --release --target {MUSL_TARGET} -p chat-server failed \
             (needs `rustup target add {MUSL_TARGET}` and `apt-get install musl-tools`)"
        );
        target_dir().join(MUSL_TARGET).join("release/chat-server")
    })
}

/// Fails the test with a clear message when no Docker engine answers; `suite` names the tests.
pub fn require_docker(suite: &str) {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the {suite} tests need a running Docker engine; `docker info` failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("the {suite} tests need Docker; cannot run `docker info`: {e}"),
    }
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
