//! `cargo xtask wasm --out DIR`: builds `chat-core-wasm` twice for the browser and writes to DIR
//! - `chat_core.wasm` + `chat_core.js`: the app (feature `app`: keys, sessions, groups,
//!   directory, safety numbers);
//! - `chat_verify.wasm` + `chat_verify.js`: the loader's release verifier (feature `verify`).
//!
//! Both use the workspace's `[profile.wasm]` (fat LTO, panic = abort, stripped; size-oriented,
//! with the hot crypto crates at opt-level 3). `wasm-opt -Oz` (Debian `binaryen`) runs when it
//! is installed (without it the files are copied as built). Prints each size, uncompressed and
//! gzip -9.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, have, status, workspace_root};

pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The features rustc's wasm32 target enables by default, and SIMD, which `.cargo/config.toml`
/// enables; wasm-opt must be told, since the stripped module carries no `target_features` section.
const WASM_FEATURES: &[&str] = &[
    "--enable-simd",
    "--enable-bulk-memory",
    "--enable-sign-ext",
    "--enable-mutable-globals",
    "--enable-nontrapping-float-to-int",
    "--enable-multivalue",
    "--enable-reference-types",
];

/// One wasm file the browser loads.
#[derive(Debug, Clone, Copy)]
pub struct Artifact {
    /// File stem in the output directory (`.wasm` and `.js`).
    pub name: &'static str,
    /// Cargo features of chat-core-wasm.
    features: &'static str,
    /// wasm-opt optimisation flag.
    wasm_opt_level: &'static str,
}

pub const APP: Artifact = Artifact {
    name: "chat_core",
    features: "app",
    wasm_opt_level: "-Oz",
};
/// The app with the in-wasm benchmark hook (`bench`), for `cargo xtask bench-wasm` only.
pub const APP_WITH_BENCH_HOOK: Artifact = Artifact {
    name: "chat_core",
    features: "app,bench",
    wasm_opt_level: "-Oz",
};
pub const VERIFIER: Artifact = Artifact {
    name: "chat_verify",
    features: "verify",
    wasm_opt_level: "-Oz",
};

/// What `build` wrote for one artifact.
#[derive(Debug)]
pub struct WasmFile {
    pub artifact: Artifact,
    pub wasm: PathBuf,
    pub size: u64,
    /// `None` when no `gzip` program is available.
    pub gzip_size: Option<u64>,
    /// Whether wasm-opt ran (it is optional).
    pub wasm_opt: bool,
}

impl WasmFile {
    /// `123.4 KiB (gzip -9 45.6 KiB)`.
    pub fn describe(&self) -> String {
        format!(
            "{:.1} KiB ({} bytes), gzip -9 {}",
            self.size as f64 / 1024.0,
            self.size,
            self.gzip_size
                .map(|g| format!("{:.1} KiB", g as f64 / 1024.0))
                .unwrap_or_else(|| "unknown (no gzip)".into()),
        )
    }

    pub fn wasm_opt_note(&self) -> String {
        if self.wasm_opt {
            format!("wasm-opt {}", self.artifact.wasm_opt_level)
        } else {
            "wasm-opt not installed".into()
        }
    }
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
    for file in build(&out)? {
        println!(
            "{}: {}, {}",
            file.wasm.display(),
            file.describe(),
            file.wasm_opt_note()
        );
    }
    Ok(())
}

/// Builds both wasm files and copies them with their glue into `out`: app first, then verifier.
pub fn build(out: &Path) -> Result<Vec<WasmFile>> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    [APP, VERIFIER]
        .into_iter()
        .map(|artifact| build_artifact(artifact, out))
        .collect()
}

/// Builds one wasm file and copies it with its glue into `out` (which must exist).
pub fn build_artifact(artifact: Artifact, out: &Path) -> Result<WasmFile> {
    status(cargo().args([
        "build",
        "--package",
        "chat-core-wasm",
        "--target",
        WASM_TARGET,
        "--profile",
        "wasm",
        "--no-default-features",
        "--features",
        artifact.features,
    ]))?;
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_relative() { root.join(p) } else { p })
        .unwrap_or_else(|| root.join("target"));
    // Both builds write this one path; it is copied out before the next build.
    let built = target.join(WASM_TARGET).join("wasm/chat_core_wasm.wasm");
    let wasm = out.join(format!("{}.wasm", artifact.name));
    let wasm_opt = have("wasm-opt");
    if wasm_opt {
        status(
            Command::new("wasm-opt")
                .arg(artifact.wasm_opt_level)
                .args(WASM_FEATURES)
                .args(["--strip-debug", "--strip-producers"])
                .arg(&built)
                .arg("-o")
                .arg(&wasm),
        )?;
    } else {
        fs::copy(&built, &wasm)
            .with_context(|| format!("cannot copy {} to {}", built.display(), wasm.display()))?;
    }
    let glue = root
        .join("client-web/wasm/js")
        .join(format!("{}.js", artifact.name));
    fs::copy(&glue, out.join(format!("{}.js", artifact.name)))
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
    Ok(WasmFile {
        artifact,
        wasm,
        size,
        gzip_size,
        wasm_opt,
    })
}
