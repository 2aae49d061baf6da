//! The release manifest (`manifest.json`) of a client bundle, and everything that verifies one.
//!
//! The manifest is canonical JSON (sorted keys, no whitespace, no floats, `/`-separated UTF-8
//! paths) listing every file's SHA-256 and size. It is signed with minisign; the trusted comment
//! repeats `version` and `expires` so neither can be detached from the signature. Verification
//! takes the time from the caller and returns one typed [`ReleaseError`] per kind of refusal.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Component, Path};

use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::release::{KeyId, ReleasePublicKey, ReleaseSignature, SignatureError};

/// The value of the `format` field; a new layout gets a new string.
pub const MANIFEST_FORMAT: &str = "chatapp-release-manifest/1";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURE_FILE: &str = "manifest.json.minisig";
/// Largest manifest accepted (a bundle of ~20k files).
pub const MAX_MANIFEST_LEN: usize = 4 * 1024 * 1024;
const MAX_PATH_LEN: usize = 1024;

/// One listed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
    pub size: u64,
}

impl FileDigest {
    pub fn of_bytes(data: &[u8]) -> Self {
        Self {
            sha256: hex::encode(Sha256::digest(data)),
            size: data.len() as u64,
        }
    }

    /// Hashes a stream without holding it in memory.
    pub fn of_reader(mut reader: impl Read) -> io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(Self {
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    }
}

/// `manifest.json`. Fields are declared in sorted order so that serde writes sorted keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// RFC 3339, UTC, whole seconds.
    pub created: String,
    /// RFC 3339, UTC, whole seconds.
    pub expires: String,
    pub files: BTreeMap<String, FileDigest>,
    pub format: String,
    pub name: String,
    pub version: String,
}

/// Why a release was refused. [`ReleaseError::code`] gives a stable short name for scripts and
/// the browser loader.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReleaseError {
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("unknown key: signed by {found}, but the trusted release key is {expected}")]
    UnknownKey { expected: KeyId, found: KeyId },
    #[error("expired: the release expired at {expires} (now {now})")]
    Expired { expires: String, now: String },
    #[error("rollback: version {got} is lower than {seen}, already seen")]
    Rollback { seen: Version, got: Version },
    #[error("{path}: SHA-256 differs from the manifest")]
    FileMismatch { path: String },
    #[error("{path}: size {actual} differs from {expected} in the manifest")]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: listed in the manifest but missing")]
    MissingFile { path: String },
    #[error("{path}: present but not listed in the manifest")]
    UnlistedFile { path: String },
    #[error("malformed: {0}")]
    Malformed(String),
}

impl ReleaseError {
    /// Stable kebab-case name of the refusal (the loader's `data-bundle-error`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadSignature(_) => "bad-signature",
            Self::UnknownKey { .. } => "unknown-key",
            Self::Expired { .. } => "expired",
            Self::Rollback { .. } => "rollback",
            Self::FileMismatch { .. } | Self::SizeMismatch { .. } => "file-mismatch",
            Self::MissingFile { .. } => "missing-file",
            Self::UnlistedFile { .. } => "unlisted-file",
            Self::Malformed(_) => "malformed",
        }
    }
}

fn malformed(reason: impl fmt::Display) -> ReleaseError {
    ReleaseError::Malformed(reason.to_string())
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-26T07:45:00Z`).
pub fn format_time(unix_secs: i64) -> Result<String, ReleaseError> {
    OffsetDateTime::from_unix_timestamp(unix_secs)
        .map_err(malformed)?
        .format(&Rfc3339)
        .map_err(malformed)
}

/// Parses RFC 3339 into Unix seconds.
pub fn parse_time(text: &str) -> Result<i64, ReleaseError> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| malformed(format!("time {text:?}: {e}")))
}

/// Checks a manifest path: relative, `/`-separated, no `.`/`..`/empty segments, no backslash.
pub fn validate_path(path: &str) -> Result<(), ReleaseError> {
    let bad = path.is_empty()
        || path.len() > MAX_PATH_LEN
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        return Err(malformed(format!("invalid file path {path:?}")));
    }
    if path == MANIFEST_FILE || path == SIGNATURE_FILE {
        return Err(malformed(format!("{path} cannot list itself")));
    }
    Ok(())
}

impl Manifest {
    /// Builds a manifest; validates the version, the times and every path.
    pub fn new(
        name: &str,
        version: &Version,
        created_unix: i64,
        expires_unix: i64,
        files: BTreeMap<String, FileDigest>,
    ) -> Result<Self, ReleaseError> {
        let manifest = Self {
            created: format_time(created_unix)?,
            expires: format_time(expires_unix)?,
            files,
            format: MANIFEST_FORMAT.to_owned(),
            name: name.to_owned(),
            version: version.to_string(),
        };
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ReleaseError> {
        if self.format != MANIFEST_FORMAT {
            return Err(malformed(format!(
                "unknown manifest format {:?}",
                self.format
            )));
        }
        if self.name.is_empty() || self.name.len() > 128 || self.name.contains(char::is_whitespace)
        {
            return Err(malformed("name must be 1-128 characters without spaces"));
        }
        self.semver()?;
        let (created, expires) = (parse_time(&self.created)?, parse_time(&self.expires)?);
        if expires <= created {
            return Err(malformed("expires is not after created"));
        }
        for (path, digest) in &self.files {
            validate_path(path)?;
            let hex_ok = digest.sha256.len() == 64
                && digest
                    .sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !hex_ok {
                return Err(malformed(format!(
                    "{path}: sha256 is not 64 lower-case hex digits"
                )));
            }
        }
        Ok(())
    }

    pub fn semver(&self) -> Result<Version, ReleaseError> {
        Version::parse(&self.version)
            .map_err(|e| malformed(format!("version {:?}: {e}", self.version)))
    }

    pub fn expires_unix(&self) -> Result<i64, ReleaseError> {
        parse_time(&self.expires)
    }

    /// The canonical bytes: exactly what is signed and written to `manifest.json`.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Serialising string maps and strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses `manifest.json`, refusing anything that is not in canonical form.
    pub fn from_canonical_json(bytes: &[u8]) -> Result<Self, ReleaseError> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(malformed("manifest.json is too large"));
        }
        let manifest: Self = serde_json::from_slice(bytes).map_err(malformed)?;
        manifest.validate()?;
        if manifest.to_canonical_json() != bytes {
            return Err(malformed("manifest.json is not in canonical form"));
        }
        Ok(manifest)
    }

    /// The trusted comment signed with the manifest: it repeats name, version and expiry.
    pub fn trusted_comment(&self) -> String {
        format!(
            "chatapp-release name={} version={} expires={}",
            self.name, self.version, self.expires
        )
    }

    pub fn total_size(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    /// Compares the files actually present with the listed ones. Unlisted files are reported
    /// first (mix-and-match), then missing ones, then size and hash differences, each in path order.
    pub fn check_files(&self, present: &BTreeMap<String, FileDigest>) -> Result<(), ReleaseError> {
        if let Some(path) = present.keys().find(|p| !self.files.contains_key(*p)) {
            return Err(ReleaseError::UnlistedFile { path: path.clone() });
        }
        for path in self.files.keys() {
            let Some(actual) = present.get(path) else {
                return Err(ReleaseError::MissingFile { path: path.clone() });
            };
            self.check_file(path, actual)?;
        }
        Ok(())
    }

    /// Checks one file's digest against its entry.
    pub fn check_file(&self, path: &str, actual: &FileDigest) -> Result<(), ReleaseError> {
        let listed = self
            .files
            .get(path)
            .ok_or_else(|| ReleaseError::UnlistedFile {
                path: path.to_owned(),
            })?;
        if listed.size != actual.size {
            return Err(ReleaseError::SizeMismatch {
                path: path.to_owned(),
                expected: listed.size,
                actual: actual.size,
            });
        }
        if listed.sha256 != actual.sha256 {
            return Err(ReleaseError::FileMismatch {
                path: path.to_owned(),
            });
        }
        Ok(())
    }
}

/// The untrusted comment of a release signature. It is fixed, and the verifier insists on it and
/// on minisign's canonical layout, so that no byte of a release can change unnoticed.
pub fn untrusted_comment(key_id: KeyId) -> String {
    format!("chatapp release signature, key {key_id}")
}

/// What the verifier is told besides the bytes.
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    /// The current time, Unix seconds.
    pub now_unix: i64,
    /// The highest version this verifier has accepted before (rollback protection).
    pub min_version: Option<Version>,
}

/// A manifest whose signature, trusted comment, expiry and version passed.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    pub version: Version,
    pub key_id: KeyId,
    /// Lower-case hex SHA-256 of the `manifest.json` bytes.
    pub manifest_sha256: String,
}

/// Verifies `manifest.json` and its `.minisig` (not yet the files: see [`Manifest::check_files`]).
///
/// Order of checks: signature file syntax, key id, signature and trusted comment, manifest
/// syntax, trusted comment agreement, expiry, rollback.
pub fn verify_manifest(
    key: &ReleasePublicKey,
    manifest_bytes: &[u8],
    signature_text: &str,
    policy: &VerifyPolicy,
) -> Result<VerifiedManifest, ReleaseError> {
    let signature = ReleaseSignature::parse(signature_text).map_err(|e| match e {
        SignatureError::Malformed(m) => malformed(format!("{SIGNATURE_FILE}: {m}")),
        other => malformed(format!("{SIGNATURE_FILE}: {other}")),
    })?;
    signature.verify(key, manifest_bytes).map_err(|e| match e {
        SignatureError::UnknownKey { expected, found } => {
            ReleaseError::UnknownKey { expected, found }
        }
        other => ReleaseError::BadSignature(other.to_string()),
    })?;
    if signature.to_text() != signature_text
        || signature.untrusted_comment() != untrusted_comment(signature.key_id())
    {
        return Err(malformed(format!(
            "{SIGNATURE_FILE} is not in canonical form (layout or untrusted comment changed)"
        )));
    }
    let manifest = Manifest::from_canonical_json(manifest_bytes)?;
    if signature.trusted_comment() != manifest.trusted_comment() {
        return Err(malformed(format!(
            "the trusted comment {:?} does not match the manifest (expected {:?})",
            signature.trusted_comment(),
            manifest.trusted_comment()
        )));
    }
    let expires = manifest.expires_unix()?;
    if policy.now_unix >= expires {
        return Err(ReleaseError::Expired {
            expires: manifest.expires.clone(),
            now: format_time(policy.now_unix)?,
        });
    }
    let version = manifest.semver()?;
    if let Some(seen) = &policy.min_version {
        if &version < seen {
            return Err(ReleaseError::Rollback {
                seen: seen.clone(),
                got: version,
            });
        }
    }
    Ok(VerifiedManifest {
        version,
        key_id: signature.key_id(),
        manifest_sha256: hex::encode(Sha256::digest(manifest_bytes)),
        manifest,
    })
}

/// Lists and hashes every regular file under `dir` (recursively), skipping `manifest.json` and
/// its signature at the top. Paths are `/`-separated and must be UTF-8; symlinks are refused so
/// that what is signed is what is served.
pub fn digest_dir(
    dir: &Path,
    mut on_file: impl FnMut(&str, u64),
) -> Result<BTreeMap<String, FileDigest>, DirError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let entries = std::fs::read_dir(&current).map_err(|e| DirError::io(&current, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DirError::io(&current, e))?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|e| DirError::io(&path, e))?;
            let rel = relative_path(dir, &path)?;
            if file_type.is_symlink() {
                return Err(DirError::Unsupported {
                    path: rel,
                    reason: "symbolic links are not allowed in a release".into(),
                });
            } else if file_type.is_dir() {
                stack.push(path);
            } else if file_type.is_file() {
                if rel == MANIFEST_FILE || rel == SIGNATURE_FILE {
                    continue;
                }
                validate_path(&rel).map_err(|e| DirError::Unsupported {
                    path: rel.clone(),
                    reason: e.to_string(),
                })?;
                let file = std::fs::File::open(&path).map_err(|e| DirError::io(&path, e))?;
                let digest = FileDigest::of_reader(file).map_err(|e| DirError::io(&path, e))?;
                on_file(&rel, digest.size);
                out.insert(rel, digest);
            } else {
                return Err(DirError::Unsupported {
                    path: rel,
                    reason: "not a regular file or directory".into(),
                });
            }
        }
    }
    Ok(out)
}

fn relative_path(root: &Path, path: &Path) -> Result<String, DirError> {
    let rel = path.strip_prefix(root).map_err(|_| DirError::Unsupported {
        path: path.display().to_string(),
        reason: "outside the release directory".into(),
    })?;
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| DirError::Unsupported {
                    path: path.display().to_string(),
                    reason: "file names must be UTF-8".into(),
                })?)
            }
            _ => {
                return Err(DirError::Unsupported {
                    path: path.display().to_string(),
                    reason: "unexpected path component".into(),
                });
            }
        }
    }
    Ok(parts.join("/"))
}

/// Why a release directory could not be read.
#[derive(Debug, Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: {reason}")]
    Unsupported { path: String, reason: String },
}

impl DirError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

#[cfg(all(test, feature = "sign"))]
mod tests {
    use super::*;
    use crate::release::ReleaseSecretKey;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    fn files() -> BTreeMap<String, FileDigest> {
        BTreeMap::from([
            ("index.html".to_owned(), FileDigest::of_bytes(b"<html>")),
            ("app/main.js".to_owned(), FileDigest::of_bytes(b"main()")),
        ])
    }

    fn signed(version: &str) -> (ReleasePublicKey, Vec<u8>, String) {
        let key = ReleaseSecretKey::generate(None).expect("generate");
        let m = Manifest::new(
            "web",
            &Version::parse(version).expect("v"),
            NOW,
            NOW + 90 * DAY,
            files(),
        )
        .expect("manifest");
        let bytes = m.to_canonical_json();
        let sig = key
            .secret
            .sign(
                &bytes,
                &m.trusted_comment(),
                &untrusted_comment(key.public.key_id()),
            )
            .expect("sign");
        (key.public, bytes, sig)
    }

    fn policy() -> VerifyPolicy {
        VerifyPolicy {
            now_unix: NOW + DAY,
            min_version: None,
        }
    }

    #[test]
    fn canonical_json_has_sorted_keys_and_no_whitespace() {
        let m = Manifest::new("web", &Version::new(1, 4, 0), NOW, NOW + DAY, files()).expect("m");
        let text = String::from_utf8(m.to_canonical_json()).expect("utf8");
        assert!(
            text.starts_with(r#"{"created":"2027-01-15T08:00:00Z","expires":"#),
            "{text}"
        );
        assert!(text.contains(r#""files":{"app/main.js":{"sha256":"#));
        assert!(!text.contains(' '));
    }

    #[test]
    fn refuses_non_canonical_manifest() {
        let (_, bytes, _) = signed("1.0.0");
        let mut spaced = bytes.clone();
        spaced.insert(1, b' ');
        assert!(matches!(
            Manifest::from_canonical_json(&spaced),
            Err(ReleaseError::Malformed(_))
        ));
    }

    #[test]
    fn accepts_a_valid_release() {
        let (pk, bytes, sig) = signed("1.4.0");
        let v = verify_manifest(&pk, &bytes, &sig, &policy()).expect("verified");
        assert_eq!(v.version, Version::new(1, 4, 0));
        assert_eq!(v.manifest.check_files(&files()), Ok(()));
    }

    #[test]
    fn refuses_expired_release() {
        let (pk, bytes, sig) = signed("1.0.0");
        let late = VerifyPolicy {
            now_unix: NOW + 91 * DAY,
            min_version: None,
        };
        assert_eq!(
            verify_manifest(&pk, &bytes, &sig, &late)
                .map(|_| ())
                .map_err(|e| e.code()),
            Err("expired")
        );
    }

    #[test]
    fn refuses_rollback_below_highest_seen() {
        let (pk, bytes, sig) = signed("1.0.0");
        let p = VerifyPolicy {
            min_version: Some(Version::new(1, 1, 0)),
            ..policy()
        };
        assert!(matches!(
            verify_manifest(&pk, &bytes, &sig, &p),
            Err(ReleaseError::Rollback { .. })
        ));
    }

    #[test]
    fn refuses_unlisted_missing_and_changed_files() {
        let (pk, bytes, sig) = signed("1.0.0");
        let m = verify_manifest(&pk, &bytes, &sig, &policy())
            .expect("ok")
            .manifest;
        let mut extra = files();
        extra.insert("evil.js".into(), FileDigest::of_bytes(b"x"));
        assert_eq!(
            m.check_files(&extra).map_err(|e| e.code()),
            Err("unlisted-file")
        );
        let mut missing = files();
        missing.remove("index.html");
        assert_eq!(
            m.check_files(&missing).map_err(|e| e.code()),
            Err("missing-file")
        );
        let mut changed = files();
        changed.insert("index.html".into(), FileDigest::of_bytes(b"<htmL>"));
        assert!(matches!(
            m.check_files(&changed),
            Err(ReleaseError::FileMismatch { .. })
        ));
        let mut resized = files();
        resized.insert("index.html".into(), FileDigest::of_bytes(b"<html>!"));
        assert!(matches!(
            m.check_files(&resized),
            Err(ReleaseError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn refuses_paths_that_escape_or_are_not_canonical() {
        for bad in ["", "/abs", "a/../b", "./a", "a//b", "a\\b", MANIFEST_FILE] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(validate_path("app/ü.js"), Ok(()));
    }
}
