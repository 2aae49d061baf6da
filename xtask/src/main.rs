//! `cargo xtask`: ChatApp's build automation in plain Rust (no shell scripts to learn).
//!
//! - `deps`: install what the tests need (Debian packages, rustup targets), idempotently;
//! - `test`: the project's test command: deps, the workspace tests, the wasm32 builds;
//! - `bench-sign`: sign + verify of a 200 MB tree against the minisign CLI, same run;
//! - `wasm`: chat_core.wasm and its JS glue for the browser;
//! - `bench-wasm`: chat-core natively (criterion) against the same operations in wasm (Node.js);
//! - `bench-cluster`: `chatctl up` against Docker Compose, and cross-instance delivery latency;
//! - `bench-peers`: chat-server beside NATS, ejabberd and a bare relay, same load generator;
//! - `steadiness`: how steadily the machine's cores run (a shared host slows them in stretches).

mod bench_cluster;
mod bench_peers;
mod bench_sign;
mod bench_wasm;
mod steadiness;
mod wasm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages the test suites drive for real.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("minisign", "minisign"),
    ("wasm-opt", "binaryen"),
    ("openssl", "openssl"),
    ("nats-server", "nats-server"),
    ("chromium", "chromium"),
    ("testssl", "testssl.sh"),
    ("musl-gcc", "musl-tools"),
];
/// Rust targets the workspace builds for.
const RUST_TARGETS: &[&str] = &["wasm32-unknown-unknown", "x86_64-unknown-linux-musl"];
/// Crates that must build for the browser.
const WASM_CRATES: &[&str] = &["chat-signing", "chat-core"];

fn main() {
    if let Err(err) = run() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("deps") => deps(),
        Some("test") => test(&args[1..]),
        Some("bench-sign") => bench_sign::run(&args[1..]),
        Some("wasm") => wasm::run(&args[1..]),
        Some("bench-wasm") => bench_wasm::run(&args[1..]),
        Some("bench-peers") => bench_peers::run(&args[1..]),
        Some("bench-cluster") => bench_cluster::run(&args[1..]),
        Some("steadiness") => steadiness::run(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 deps         install Debian packages and rustup targets the tests need\n  \
                 test         deps, then every test of the workspace and the wasm32 builds\n  \
                 bench-sign   chatctl sign/verify of a 200 MB tree vs minisign -S/-V (--size-mb N)\n  \
                 wasm         build chat_core.wasm + chat_core.js into --out DIR\n  \
                 bench-wasm   chat-core natively vs in wasm under Node.js; writes docs/BENCHMARKS.md\n  \
                 bench-cluster  chatctl up vs docker compose, cross-instance latency (--runs N)\n  \
                 bench-peers  chat-server vs NATS, ejabberd, Synapse and a bare relay; writes docs/BENCHMARKS.md\n  \
                 steadiness   spin a thread per core, count slow 10 ms slices (--seconds N, --threads N)"
            );
            bail!("unknown or missing task");
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn status(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn deps() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(program, _)| !have(program))
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        let sudo = if is_root() { vec![] } else { vec!["sudo"] };
        let apt = |args: &[&str]| {
            let mut cmd = Command::new(sudo.first().copied().unwrap_or("apt-get"));
            if !sudo.is_empty() {
                cmd.arg("apt-get");
            }
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        status(&mut apt(&["update", "-qq"]))
            .context("apt-get update failed; install these packages by hand")?;
        let mut install = apt(&["install", "-y", "-qq"]);
        install.args(&missing);
        status(&mut install).with_context(|| format!("cannot install {}", missing.join(" ")))?;
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to add the wasm32 and musl targets")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    let wanted: Vec<&str> = RUST_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !wanted.is_empty() {
        status(Command::new("rustup").args(["target", "add"]).args(&wanted))?;
    }
    eprintln!("xtask: dependencies present");
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn test(extra: &[String]) -> Result<()> {
    deps()?;
    for krate in WASM_CRATES {
        status(cargo().args([
            "build",
            "--package",
            krate,
            "--target",
            "wasm32-unknown-unknown",
        ]))?;
    }
    status(
        cargo()
            .args(["test", "--workspace", "--locked"])
            .args(extra),
    )?;
    Ok(())
}
