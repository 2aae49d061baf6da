//! `cargo xtask wasm --out DIR`: builds `chat-core-wasm` for the browser and writes
//! `chat_core.wasm` and its ES-module glue `chat_core.js` to DIR.
//!
//! Uses the workspace's `[profile.wasm]` (size-oriented, fat LTO, panic = abort, stripped);
//! runs `wasm-opt -Oz` when it is installed, and does without otherwise. Prints the size,
//! uncompressed and gzip -9.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, have, status, workspace_root};

pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// What `build` wrote.
#[derive(Debug)]
pub struct WasmBuild {
    pub wasm: PathBuf,
    pub size: u64,
    /// `None` when no `gzip` program is available.
    pub gzip_size: Option<u64>,
    pub wasm_opt: bool,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut out = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(it.next().context("--out DIR")?)),
            other => bail!("unknown argument {other}; usage: cargo xtask wasm --out DIR"),
        }
    }
    let out = out.context("usage: cargo xtask wasm --out DIR")?;
    let built = build(&out)?;
    println!(
        "{}: {} bytes ({:.1} KiB), gzip -9 {}{}",
        built.wasm.display(),
        built.size,
        built.size as f64 / 1024.0,
        built
            .gzip_size
            .map(|g| format!("{g} bytes ({:.1} KiB)", g as f64 / 1024.0))
            .unwrap_or_else(|| "unknown (no gzip)".into()),
        if built.wasm_opt {
            ", wasm-opt -Oz applied"
        } else {
            ", wasm-opt not installed (skipped)"
        },
    );
    Ok(())
}

/// Builds the wasm and copies it with its glue into `out`.
pub fn build(out: &Path) -> Result<WasmBuild> {
    status(cargo().args([
        "build",
        "--package",
        "chat-core-wasm",
        "--target",
        WASM_TARGET,
        "--profile",
        "wasm",
    ]))?;
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_relative() { root.join(p) } else { p })
        .unwrap_or_else(|| root.join("target"));
    let built = target.join(WASM_TARGET).join("wasm/chat_core_wasm.wasm");
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let wasm = out.join("chat_core.wasm");
    let wasm_opt = have("wasm-opt");
    if wasm_opt {
        status(
            Command::new("wasm-opt")
                .args(["-Oz", "--strip-debug", "--strip-producers"])
                .arg(&built)
                .arg("-o")
                .arg(&wasm),
        )?;
    } else {
        fs::copy(&built, &wasm)
            .with_context(|| format!("cannot copy {} to {}", built.display(), wasm.display()))?;
    }
    let glue = root.join("client-web/wasm/js/chat_core.js");
    fs::copy(&glue, out.join("chat_core.js"))
        .with_context(|| format!("cannot copy {}", glue.display()))?;
    let size = fs::metadata(&wasm)?.len();
    let gzip_size = if have("gzip") {
        let gz = Command::new("gzip")
            .args(["-9", "-c"])
            .arg(&wasm)
            .output()
            .context("cannot run gzip")?;
        gz.status.success().then_some(gz.stdout.len() as u64)
    } else {
        None
    };
    Ok(WasmBuild {
        wasm,
        size,
        gzip_size,
        wasm_opt,
    })
}
