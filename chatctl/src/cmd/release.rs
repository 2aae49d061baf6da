//! `chatctl sign` and `chatctl verify`: release manifests for a bundle directory.
//!
//! `sign` hashes every file, writes the canonical `manifest.json` and its minisign signature
//! (`manifest.json.minisig`, verifiable with `minisign -Vm`); `verify` checks both and every file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use chat_signing::manifest::{
    self, DirError, FileDigest, MANIFEST_FILE, Manifest, ReleaseError, SIGNATURE_FILE,
    VerifyPolicy, verify_manifest,
};
use chat_signing::release::{ReleasePublicKey, ReleaseSecretKey};
use clap::Args;
use semver::Version;
use sha2::{Digest, Sha256};

use crate::cmd::keys::{DEFAULT_DIR, RELEASE_KEY, RELEASE_PUB};
use crate::files::{Mode, read_text, write_atomic};
use crate::{passphrase, progress};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl sign --version 1.4.0 dist/\n  \
    CHATCTL_PASSPHRASE=… chatctl sign --key keys/release.key --version 1.4.1 --expires 30d dist/\n\n\
    The signature is a standard minisign signature: `minisign -Vm dist/manifest.json -p release.pub`\n\
    verifies it.")]
pub struct SignArgs {
    /// The minisign secret key (encrypted ones ask for the passphrase, or read CHATCTL_PASSPHRASE).
    #[arg(long, default_value_t = format!("{DEFAULT_DIR}/{RELEASE_KEY}"))]
    pub key: String,
    /// The release version (semver, e.g. 1.4.0). Clients refuse versions lower than one they saw.
    #[arg(long, value_parser = parse_version)]
    pub version: Version,
    /// How long the release stays valid (e.g. 90d, 12h); clients refuse it afterwards.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub expires: Duration,
    /// The release name recorded in the manifest.
    #[arg(long, default_value = "chatapp-web")]
    pub name: String,
    /// The bundle directory to sign; manifest files already in it are replaced.
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl verify dist/\n  \
    chatctl verify --pubkey release.pub --min-version 1.4.0 --at 2027-01-01T00:00:00Z dist/\n\n\
    Exit status: 0 verified; 1 refused (the message names the file and the reason); 2 usage error.")]
pub struct VerifyArgs {
    /// The minisign public key to trust.
    #[arg(long, default_value_t = format!("{DEFAULT_DIR}/{RELEASE_PUB}"))]
    pub pubkey: String,
    /// Refuse versions lower than this one (rollback protection).
    #[arg(long, value_parser = parse_version)]
    pub min_version: Option<Version>,
    /// Verify as of this time (RFC 3339) instead of now.
    #[arg(long)]
    pub at: Option<String>,
    /// The bundle directory holding manifest.json and manifest.json.minisig.
    pub dir: PathBuf,
}

fn parse_version(s: &str) -> Result<Version, String> {
    Version::parse(s).map_err(|e| format!("not a semantic version (like 1.4.0): {e}"))
}

fn now_unix() -> Result<i64> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    Ok(i64::try_from(secs)?)
}

/// What `sign` did.
#[derive(Debug)]
pub struct SignSummary {
    pub manifest_sha256: String,
    pub files: usize,
    pub total_size: u64,
    pub key_id: String,
    pub expires: String,
}

pub fn run_sign(args: SignArgs) -> Result<()> {
    let key_path = PathBuf::from(&args.key);
    let key_text = read_text(&key_path).map_err(|e| {
        e.context(format!(
            "no release key at {}: run `chatctl keys init` or pass --key",
            key_path.display()
        ))
    })?;
    let encrypted = ReleaseSecretKey::file_is_encrypted(&key_text)
        .with_context(|| key_path.display().to_string())?;
    let passphrase = if encrypted {
        Some(passphrase::existing_passphrase(&key_path)?)
    } else {
        None
    };
    let key =
        ReleaseSecretKey::from_file_string(&key_text, passphrase.as_deref().map(|s| s.as_str()))
            .with_context(|| key_path.display().to_string())?;
    let s = sign_dir(&key, &args.name, &args.version, args.expires, &args.dir)?;
    println!(
        "Signed {} {} with key {}: {} files, {} (expires {})\nmanifest.json sha256 {}",
        args.name,
        args.version,
        s.key_id,
        s.files,
        human_bytes(s.total_size),
        s.expires,
        s.manifest_sha256
    );
    // The browser loader is the one file verified by trust on first use: print its hash so it
    // can be pinned and published (`chatctl verify-site --loader-sha256`).
    for loader in ["loader.js", "index.html"] {
        if let Ok(bytes) = std::fs::read(args.dir.join(loader)) {
            println!("{loader} sha256 {}", hex::encode(Sha256::digest(&bytes)));
        }
    }
    Ok(())
}

/// Hashes `dir`, writes `manifest.json` and `manifest.json.minisig` into it.
pub fn sign_dir(
    key: &ReleaseSecretKey,
    name: &str,
    version: &Version,
    valid_for: Duration,
    dir: &Path,
) -> Result<SignSummary> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let files = hash_with_progress(dir, "Hashing")?;
    let created = now_unix()?;
    let expires = created
        .checked_add(i64::try_from(valid_for.as_secs())?)
        .ok_or_else(|| anyhow!("--expires is too far in the future"))?;
    let manifest =
        Manifest::new(name, version, created, expires, files).map_err(|e| anyhow!("{e}"))?;
    let bytes = manifest.to_canonical_json();
    let signature = key
        .sign(
            &bytes,
            &manifest.trusted_comment(),
            &manifest::untrusted_comment(key.public_key().key_id()),
        )
        .context("cannot sign the manifest")?;
    // Signature first, then the manifest: a crash in between leaves a release that fails to
    // verify rather than one that looks signed but is not.
    write_atomic(
        &dir.join(SIGNATURE_FILE),
        signature.as_bytes(),
        Mode::Public,
    )?;
    write_atomic(&dir.join(MANIFEST_FILE), &bytes, Mode::Public)?;
    Ok(SignSummary {
        manifest_sha256: hex::encode(Sha256::digest(&bytes)),
        files: manifest.files.len(),
        total_size: manifest.total_size(),
        key_id: key.public_key().key_id().to_string(),
        expires: manifest.expires,
    })
}

/// A refused release: exit status 1.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

pub fn run_verify(args: VerifyArgs) -> Result<()> {
    let pub_path = PathBuf::from(&args.pubkey);
    let key = ReleasePublicKey::from_file_string(&read_text(&pub_path)?)
        .with_context(|| pub_path.display().to_string())?;
    let now = match &args.at {
        Some(at) => manifest::parse_time(at).map_err(|_| {
            anyhow!("--at {at:?} is not an RFC 3339 time (like 2027-01-01T00:00:00Z)")
        })?,
        None => now_unix()?,
    };
    let policy = VerifyPolicy {
        now_unix: now,
        min_version: args.min_version,
    };
    let line = verify_dir(&key, &policy, &args.dir)?;
    println!("{line}");
    Ok(())
}

/// Verifies a signed directory; the error is a [`Refused`] naming the file and the reason.
pub fn verify_dir(key: &ReleasePublicKey, policy: &VerifyPolicy, dir: &Path) -> Result<String> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let sig_path = dir.join(SIGNATURE_FILE);
    let refuse =
        |path: &Path, e: ReleaseError| Refused(format!("{}: {} [{}]", path.display(), e, e.code()));
    let manifest_bytes = std::fs::read(&manifest_path).map_err(|e| {
        Refused(format!(
            "{}: cannot read: {e} [missing-file]",
            manifest_path.display()
        ))
    })?;
    let sig_text = std::fs::read(&sig_path).map_err(|e| {
        Refused(format!(
            "{}: cannot read: {e} [missing-file]",
            sig_path.display()
        ))
    })?;
    let sig_text = String::from_utf8(sig_text).map_err(|_| {
        Refused(format!(
            "{}: not UTF-8 text [malformed]",
            sig_path.display()
        ))
    })?;
    let verified = verify_manifest(key, &manifest_bytes, &sig_text, policy).map_err(|e| {
        let path = match e {
            ReleaseError::BadSignature(_) | ReleaseError::UnknownKey { .. } => &sig_path,
            _ => &manifest_path,
        };
        refuse(path, e)
    })?;
    let present = hash_with_progress(dir, "Verifying")?;
    verified.manifest.check_files(&present).map_err(|e| {
        let file = match &e {
            ReleaseError::FileMismatch { path }
            | ReleaseError::SizeMismatch { path, .. }
            | ReleaseError::MissingFile { path }
            | ReleaseError::UnlistedFile { path } => dir.join(path),
            _ => dir.to_owned(),
        };
        Refused(format!(
            "{}: {} [{}]",
            file.display(),
            short_reason(&e),
            e.code()
        ))
    })?;
    Ok(format!(
        "Verified {} {} signed by key {}: {} files, {}, expires {}",
        verified.manifest.name,
        verified.version,
        verified.key_id,
        verified.manifest.files.len(),
        human_bytes(verified.manifest.total_size()),
        verified.manifest.expires
    ))
}

fn short_reason(e: &ReleaseError) -> String {
    match e {
        ReleaseError::FileMismatch { .. } => "SHA-256 differs from the manifest".into(),
        ReleaseError::SizeMismatch {
            expected, actual, ..
        } => {
            format!("size {actual} differs from {expected} in the manifest")
        }
        ReleaseError::MissingFile { .. } => "listed in the manifest but missing".into(),
        ReleaseError::UnlistedFile { .. } => "present but not listed in the manifest".into(),
        other => other.to_string(),
    }
}

fn hash_with_progress(dir: &Path, verb: &str) -> Result<BTreeMap<String, FileDigest>> {
    let bar = progress::spinner(format!("{verb} {}", dir.display()));
    let mut bytes = 0u64;
    let mut count = 0usize;
    let result = manifest::digest_dir(dir, |_, size| {
        bytes += size;
        count += 1;
        bar.set_message(format!(
            "{verb} {}: {count} files, {}",
            dir.display(),
            human_bytes(bytes)
        ));
    });
    bar.finish_and_clear();
    result.map_err(|e: DirError| anyhow!("{e}"))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn policy() -> VerifyPolicy {
        VerifyPolicy {
            now_unix: now_unix().expect("clock"),
            min_version: None,
        }
    }

    /// Random trees: up to 6 files in up to two directory levels, up to 300 bytes each.
    fn tree() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
        let path =
            ("[a-c]{1,2}", proptest::option::of("[a-c]{1,2}")).prop_map(|(file, dir)| match dir {
                Some(dir) => format!("d{dir}/{file}.js"),
                None => format!("{file}.js"),
            });
        proptest::collection::btree_map(path, proptest::collection::vec(any::<u8>(), 0..300), 1..6)
    }

    fn write_tree(dir: &Path, tree: &BTreeMap<String, Vec<u8>>) {
        for (path, contents) in tree {
            let full = dir.join(path);
            std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            std::fs::write(full, contents).expect("write");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn round_trip_verifies_and_any_single_byte_change_is_refused(
            tree in tree(),
            pick in any::<prop::sample::Index>(),
            offset in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let key = ReleaseSecretKey::generate(None).expect("key");
            let dir = tempfile::tempdir().expect("tempdir");
            write_tree(dir.path(), &tree);
            sign_dir(&key.secret, "web", &Version::new(1, 0, 0), DAY, dir.path()).expect("sign");
            prop_assert!(verify_dir(&key.public, &policy(), dir.path()).is_ok());

            // Every byte of the release: the files, the manifest and the signature.
            let mut targets: Vec<String> = tree.keys().cloned().collect();
            targets.push(MANIFEST_FILE.into());
            targets.push(SIGNATURE_FILE.into());
            let target = dir.path().join(pick.get(&targets));
            let mut bytes = std::fs::read(&target).expect("read");
            prop_assume!(!bytes.is_empty());
            let at = offset.index(bytes.len());
            bytes[at] ^= flip;
            std::fs::write(&target, &bytes).expect("write");
            let result = verify_dir(&key.public, &policy(), dir.path());
            prop_assert!(result.is_err(), "a change at byte {} of {} was accepted", at, target.display());
        }
    }
}
