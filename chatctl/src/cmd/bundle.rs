//! `chatctl bundle`: assembles the browser client into a directory ready for `chatctl sign`.
//!
//! Builds the wasm files with `cargo xtask wasm` (chat_core for the app, chat_verify for the
//! loader), copies the loader (`client-web/loader`), the app (`client-web/app`) and the wasm
//! files with their JS glue into OUT,
//! and bakes the release public key and the directory public key into `loader.js`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use chat_signing::release::{ReleasePublicKey, ReleaseSecretKey};
use chat_signing::tree_head::DirectoryPublicKey;
use clap::Args;
use semver::Version;
use sha2::{Digest, Sha256};

use crate::cmd::keys::{DIRECTORY_PUB, RELEASE_KEY, RELEASE_PUB};
use crate::cmd::release::{human_bytes, sign_dir};
use crate::files::read_text;

/// Placeholders in `client-web/loader/loader.js` that `bundle` replaces (JSON strings).
const RELEASE_KEY_PLACEHOLDER: &str = "\"@RELEASE_PUBLIC_KEY@\"";
const DIRECTORY_KEY_PLACEHOLDER: &str = "\"@DIRECTORY_PUBLIC_KEY@\"";
/// What `cargo xtask wasm` must have written: the app's wasm and the loader's verifier.
const REQUIRED_WASM: [&str; 4] = [
    "chat_core.wasm",
    "chat_core.js",
    "chat_verify.wasm",
    "chat_verify.js",
];

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl bundle --keys .chatctl/keys --out dist/\n  \
    chatctl bundle --keys keys/ --wasm prebuilt/ --out dist/ && chatctl sign --version 1.4.0 dist/\n\n\
    Run inside the ChatApp source tree (or pass --source): the wasm is built by\n\
    `cargo xtask wasm` unless --wasm names a directory it wrote (chat_core.wasm/.js,\n\
    chat_verify.wasm/.js). Prints the SHA-256 of loader.js and index.html, the\n\
    files to pin and publish.")]
pub struct BundleArgs {
    /// Key directory holding release.pub and directory.pub (from `chatctl keys init`).
    #[arg(long)]
    pub keys: PathBuf,
    /// Output directory; it is emptied first.
    #[arg(long)]
    pub out: PathBuf,
    /// The ChatApp source tree (holding client-web/). Default: the tree chatctl was built from,
    /// else the current directory.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// A directory written by `cargo xtask wasm --out` (skips the build).
    #[arg(long)]
    pub wasm: Option<PathBuf>,
}

/// What `assemble` wrote.
#[derive(Debug)]
pub struct BundleSummary {
    pub files: usize,
    pub total_size: u64,
    pub loader_sha256: String,
    pub index_sha256: String,
}

pub fn run(args: BundleArgs) -> Result<()> {
    let source = match &args.source {
        Some(s) => s.clone(),
        None => default_source()?,
    };
    let s = assemble(&source, &args.keys, args.wasm.as_deref(), &args.out)?;
    println!(
        "Bundle in {}: {} files, {}\nloader.js sha256 {}\nindex.html sha256 {}\nNext: chatctl sign --version X.Y.Z {}",
        args.out.display(),
        s.files,
        human_bytes(s.total_size),
        s.loader_sha256,
        s.index_sha256,
        args.out.display()
    );
    Ok(())
}

/// The source tree: the one chatctl was compiled from when it is still there, else `.`.
pub fn default_source() -> Result<PathBuf> {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for candidate in [built_from, PathBuf::from(".")] {
        if candidate.join("client-web/loader/loader.js").is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find client-web/loader/loader.js: run inside the ChatApp source tree or pass --source"
    )
}

/// Builds the wasm (unless `wasm_dir` is given) and writes the bundle into `out`.
pub fn assemble(
    source: &Path,
    keys: &Path,
    wasm_dir: Option<&Path>,
    out: &Path,
) -> Result<BundleSummary> {
    let release_pub_path = keys.join(RELEASE_PUB);
    let release_pub = read_text(&release_pub_path)
        .map_err(|e| e.context("run `chatctl keys init` or pass --keys"))?;
    ReleasePublicKey::from_file_string(&release_pub)
        .with_context(|| release_pub_path.display().to_string())?;
    let directory_pub_path = keys.join(DIRECTORY_PUB);
    let directory_pub = read_text(&directory_pub_path)
        .map_err(|e| e.context("run `chatctl keys init` or pass --keys"))?;
    let directory_key = DirectoryPublicKey::from_file_string(&directory_pub)
        .with_context(|| directory_pub_path.display().to_string())?;
    let directory_b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(directory_key.to_bytes())
    };

    let built;
    let wasm_dir = match wasm_dir {
        Some(dir) => dir.to_owned(),
        None => {
            built = tempfile::tempdir()?;
            build_wasm(source, built.path())?;
            built.path().to_owned()
        }
    };
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("cannot empty {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("app"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let loader_dir = source.join("client-web/loader");
    copy_dir(&loader_dir, out)?;
    copy_dir(&source.join("client-web/app"), &out.join("app"))?;
    // The wasm files and their JS glue, as `cargo xtask wasm` wrote them.
    for name in REQUIRED_WASM {
        if !wasm_dir.join(name).is_file() {
            bail!("{} has no {name}", wasm_dir.display());
        }
    }
    for file in walk(&wasm_dir)? {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".wasm") || name.ends_with(".js") {
            std::fs::copy(&file, out.join(name))
                .with_context(|| format!("cannot copy {}", file.display()))?;
        }
    }

    // Bake the keys into the loader.
    let loader_path = out.join("loader.js");
    let loader = read_text(&loader_path)?;
    for placeholder in [RELEASE_KEY_PLACEHOLDER, DIRECTORY_KEY_PLACEHOLDER] {
        if loader.matches(placeholder).count() != 1 {
            bail!(
                "{} must hold {placeholder} exactly once",
                loader_dir.join("loader.js").display()
            );
        }
    }
    let loader = loader
        .replace(
            RELEASE_KEY_PLACEHOLDER,
            &serde_json::to_string(release_pub.trim_end())?,
        )
        .replace(
            DIRECTORY_KEY_PLACEHOLDER,
            &serde_json::to_string(&directory_b64)?,
        );
    std::fs::write(&loader_path, &loader)?;

    let index = std::fs::read(out.join("index.html"))
        .with_context(|| format!("{} has no index.html", loader_dir.display()))?;
    let (mut files, mut total_size) = (0usize, 0u64);
    for file in walk(out)? {
        files += 1;
        total_size += std::fs::metadata(&file)?.len();
    }
    Ok(BundleSummary {
        files,
        total_size,
        loader_sha256: hex::encode(Sha256::digest(loader.as_bytes())),
        index_sha256: hex::encode(Sha256::digest(&index)),
    })
}

/// `cargo xtask wasm --out DIR` in `source`: the one build of the browser's wasm files.
fn build_wasm(source: &Path, out: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(source)
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "wasm",
            "--out",
        ])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {cargo} to build the wasm"))?;
    if !status.success() {
        bail!(
            "`cargo xtask wasm` failed ({status}); `rustup target add wasm32-unknown-unknown` may be missing"
        );
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    for file in walk(from)? {
        let rel = file.strip_prefix(from)?;
        let dest = to.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&file, &dest)
            .with_context(|| format!("cannot copy {} to {}", file.display(), dest.display()))?;
    }
    Ok(())
}

/// Regular files under `dir`, skipping hidden ones, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?
        {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// For `chatctl up`: the bundle to serve. An explicit one is served as is; otherwise the client
/// is assembled into `KEYS/../bundle` and signed with the key directory's release key, when it
/// is unencrypted (dev keys). `None` (with a note) when that cannot be done here.
pub fn bundle_for_up(keys: &Path, explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return Some(dir.to_owned());
    }
    let attempt = || -> Result<PathBuf> {
        let key_path = keys.join(RELEASE_KEY);
        let key_text = read_text(&key_path)?;
        if ReleaseSecretKey::file_is_encrypted(&key_text)? {
            bail!(
                "{} is passphrase-protected: run `chatctl bundle` and `chatctl sign`, then `up --bundle`",
                key_path.display()
            );
        }
        let key = ReleaseSecretKey::from_file_string(&key_text, None)?;
        let out = keys.join("..").join("bundle");
        assemble(&default_source()?, keys, None, &out)?;
        let version = Version::parse(env!("CARGO_PKG_VERSION"))?;
        sign_dir(
            &key,
            "chatapp-web",
            &version,
            std::time::Duration::from_secs(90 * 86_400),
            &out,
        )?;
        eprintln!(
            "Built and signed the browser client {version} with the dev release key into {}",
            out.display()
        );
        Ok(out)
    };
    match attempt() {
        Ok(dir) => Some(dir),
        Err(e) => {
            eprintln!("Not serving the browser client: {e:#}");
            None
        }
    }
}
