//! Offline images: build contexts made in Rust (a deterministic tar with a Dockerfile), nothing
//! pulled. The chat-server image is `FROM scratch` plus the `chat-server` binary (a static musl
//! build; a dynamic binary gets the libraries `ldd` lists). The NATS image is `nats:<tag>` when
//! one is present locally, else `FROM scratch` plus the local `nats-server` and its libraries;
//! either way `/chat-server` rides along as its health-check probe. Tags are the SHA-256 of the
//! build context, so an unchanged binary is never rebuilt.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::ImageBuild;

/// Where the chat-server listens inside its container (TLS).
pub const SERVER_PORT: u16 = 8443;
/// NATS client and monitoring ports inside the NATS container.
pub const NATS_PORT: u16 = 4222;
pub const NATS_MONITOR_PORT: u16 = 8222;
/// Where the key directory is mounted in containers.
pub const KEYS_MOUNT: &str = "/keys";

/// The Rust target of the static server binary.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// A file to put in an image.
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// Absolute path inside the image.
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// Libraries an executable loads, from `ldd` output; empty for a static executable.
pub fn parse_ldd(output: &str) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs.sort();
    libs.dedup();
    libs
}

/// The shared libraries `binary` needs (none when static), by running `ldd`.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run `ldd` to list the libraries of a binary (install libc-bin)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {}", binary.display(), text.trim());
    }
    Ok(parse_ldd(&text))
}

/// A binary and its libraries as image files (`/NAME` and the libraries at their host paths).
pub fn binary_with_libraries(binary: &Path, name: &str) -> Result<Vec<ImageFile>> {
    let bytes =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let mut files = vec![ImageFile {
        path: format!("/{name}"),
        bytes,
        mode: 0o755,
    }];
    for lib in shared_libraries(binary)? {
        // Follow symlinks: the image gets the real bytes under the name the loader asks for.
        let bytes = std::fs::read(&lib).with_context(|| {
            format!(
                "cannot read {} (needed by {})",
                lib.display(),
                binary.display()
            )
        })?;
        files.push(ImageFile {
            path: lib.display().to_string(),
            bytes,
            mode: 0o755,
        });
    }
    Ok(files)
}

/// A deterministic tar (fixed owner, mode and time) of a Dockerfile and a `rootfs/` tree.
pub fn build_context(dockerfile: &str, files: &[ImageFile]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut append = |path: &str, bytes: &[u8], mode: u32| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, path, bytes)
            .with_context(|| format!("cannot add {path} to the build context"))
    };
    append("Dockerfile", dockerfile.as_bytes(), 0o644)?;
    let mut sorted: Vec<&ImageFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for f in sorted {
        append(
            &format!("rootfs/{}", f.path.trim_start_matches('/')),
            &f.bytes,
            f.mode,
        )?;
    }
    builder
        .into_inner()
        .context("cannot finish the build context")
}

/// `prefix` + the first 12 hex digits of the context's SHA-256.
pub fn content_tag(repository: &str, context: &[u8]) -> String {
    let digest = Sha256::digest(context);
    format!("{repository}:{}", &hex::encode(digest)[..12])
}

/// The Dockerfile of the chat-server image.
pub fn server_dockerfile() -> String {
    format!(
        "FROM scratch\n\
         COPY rootfs/ /\n\
         EXPOSE {SERVER_PORT}\n\
         ENTRYPOINT [\"/chat-server\"]\n\
         HEALTHCHECK --interval=1s --timeout=3s --start-period=30s --retries=3 \
         CMD [\"/chat-server\", \"healthcheck\", \"--url\", \"https://localhost:{SERVER_PORT}/healthz\", \"--ca\", \"{KEYS_MOUNT}/tls/ca.pem\"]\n\
         LABEL io.chatapp.image=chat-server\n"
    )
}

/// The Dockerfile of the NATS image, on `base` (`scratch` or a local `nats:<tag>`).
pub fn nats_dockerfile(base: &str) -> String {
    format!(
        "FROM {base}\n\
         COPY rootfs/ /\n\
         EXPOSE {NATS_PORT} {NATS_MONITOR_PORT}\n\
         ENTRYPOINT [\"/nats-server\"]\n\
         CMD [\"-js\", \"-sd\", \"/data\", \"-p\", \"{NATS_PORT}\", \"-m\", \"{NATS_MONITOR_PORT}\"]\n\
         HEALTHCHECK --interval=1s --timeout=3s --start-period=30s --retries=3 \
         CMD [\"/chat-server\", \"healthcheck\", \"--url\", \"http://localhost:{NATS_MONITOR_PORT}/healthz\"]\n\
         LABEL io.chatapp.image=nats\n"
    )
}

/// A file to copy from the host into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    /// Absolute path inside the image.
    pub image_path: String,
    /// Where it is on the host (read only when the image must be built or hashed).
    pub host: PathBuf,
    pub mode: u32,
}

/// An image described by the host files it is made of, before any of them is read: its tag can
/// come from the [`TagCache`] when none of them changed, so an `up` with cached images reads no
/// binary at all.
#[derive(Debug, Clone)]
pub struct ImageRecipe {
    /// `chatapp/chat-server`.
    pub repository: String,
    pub dockerfile: String,
    pub files: Vec<HostFile>,
}

/// What identifies a host file's contents without reading it: path, size, modification and
/// change times (ns), device and inode. Any write changes the change time.
fn file_stamp(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(format!(
            "{}\0{}\0{}.{}\0{}.{}\0{}\0{}",
            path.display(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.dev(),
            meta.ino()
        ))
    }
    #[cfg(not(unix))]
    {
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Ok(format!("{}\0{}\0{modified}", path.display(), meta.len()))
    }
}

/// SHA-256 (hex) of the stamps of `paths` and `extra`: equal only when no file changed.
pub fn fingerprint(paths: &[&Path], extra: &str) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(extra.as_bytes());
    for p in paths {
        hash.update(b"\0file\0");
        hash.update(file_stamp(p)?.as_bytes());
    }
    Ok(hex::encode(hash.finalize()))
}

impl ImageRecipe {
    /// Changes whenever the Dockerfile, a file's place or mode, or a file's contents (by its
    /// stamp) change.
    pub fn fingerprint(&self) -> Result<String> {
        let mut files: Vec<&HostFile> = self.files.iter().collect();
        files.sort_by(|a, b| a.image_path.cmp(&b.image_path));
        let mut extra = format!("{}\0{}", self.repository, self.dockerfile);
        for f in &files {
            extra.push_str(&format!("\0{}\0{:o}", f.image_path, f.mode));
        }
        let paths: Vec<&Path> = files.iter().map(|f| f.host.as_path()).collect();
        fingerprint(&paths, &extra)
    }

    /// Reads the files and makes the build context; its tag is the hash of the context.
    pub fn build(&self) -> Result<ImageBuild> {
        let mut files = Vec::with_capacity(self.files.len());
        for f in &self.files {
            // Follow symlinks: the image gets the real bytes under the name the loader asks for.
            let bytes = std::fs::read(&f.host)
                .with_context(|| format!("cannot read {}", f.host.display()))?;
            files.push(ImageFile {
                path: f.image_path.clone(),
                bytes,
                mode: f.mode,
            });
        }
        let context = build_context(&self.dockerfile, &files)?;
        Ok(ImageBuild {
            tag: content_tag(&self.repository, &context),
            context,
        })
    }

    /// The image's tag: from `cache` when no file changed since it was computed, else by
    /// making the context (returned too, so that a build does not read the files again).
    pub fn resolve(&self, cache: &mut TagCache) -> Result<(String, Option<ImageBuild>)> {
        let key = format!("image:{}", self.fingerprint()?);
        if let Some(tag) = cache.get(&key) {
            return Ok((tag.to_owned(), None));
        }
        let build = self.build()?;
        cache.put(key, build.tag.clone());
        Ok((build.tag.clone(), Some(build)))
    }
}

/// Facts computed from host files that `up` needs every time (image tags, the libraries `ldd`
/// lists, the flags a binary knows), keyed by the files' [`fingerprint`]: a JSON file in the
/// user's cache directory (`$XDG_CACHE_HOME/chatctl/facts.json`, else `~/.cache/...`). A
/// missing, unreadable or unwritable cache only costs the time to compute them again.
#[derive(Debug, Default)]
pub struct TagCache {
    path: Option<PathBuf>,
    entries: std::collections::BTreeMap<String, String>,
    dirty: bool,
}

/// Entries kept at most (the oldest binaries' entries are dropped first, by name order).
const CACHE_ENTRIES: usize = 256;

impl TagCache {
    /// The cache of this user (empty when there is no cache directory or file).
    pub fn load() -> Self {
        let dir = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        match dir {
            Some(dir) => Self::at(dir.join("chatctl").join("facts.json")),
            None => Self::default(),
        }
    }

    /// The cache in the file `path`.
    pub fn at(path: PathBuf) -> Self {
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            path: Some(path),
            entries,
            dirty: false,
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    pub fn put(&mut self, key: String, value: String) {
        if self.entries.get(&key) != Some(&value) {
            self.entries.insert(key, value);
            self.dirty = true;
        }
    }

    /// Writes the cache back if anything changed; failures are ignored (it is only a cache).
    pub fn save(&mut self) {
        let Some(path) = &self.path else { return };
        if !self.dirty {
            return;
        }
        while self.entries.len() > CACHE_ENTRIES {
            let Some(first) = self.entries.keys().next().cloned() else {
                break;
            };
            self.entries.remove(&first);
        }
        if let Ok(json) = serde_json::to_vec(&self.entries) {
            if crate::files::write_atomic(path, &json, crate::files::Mode::Public).is_ok() {
                self.dirty = false;
            }
        }
    }
}

/// [`shared_libraries`] through the cache (keyed by the binary's stamp).
pub fn shared_libraries_cached(binary: &Path, cache: &mut TagCache) -> Result<Vec<PathBuf>> {
    let key = format!("ldd:{}", fingerprint(&[binary], "")?);
    if let Some(list) = cache
        .get(&key)
        .and_then(|v| serde_json::from_str::<Vec<PathBuf>>(v).ok())
    {
        return Ok(list);
    }
    let libs = shared_libraries(binary)?;
    if let Ok(json) = serde_json::to_string(&libs) {
        cache.put(key, json);
    }
    Ok(libs)
}

/// A binary and its libraries as host files (`/NAME`, and the libraries at their host paths).
pub fn binary_with_libraries_cached(
    binary: &Path,
    name: &str,
    cache: &mut TagCache,
) -> Result<Vec<HostFile>> {
    let mut files = vec![HostFile {
        image_path: format!("/{name}"),
        host: binary.to_owned(),
        mode: 0o755,
    }];
    for lib in shared_libraries_cached(binary, cache)? {
        files.push(HostFile {
            image_path: lib.display().to_string(),
            host: lib,
            mode: 0o755,
        });
    }
    Ok(files)
}

/// The chat-server image of a binary.
pub fn server_recipe(binary: &Path, cache: &mut TagCache) -> Result<ImageRecipe> {
    Ok(ImageRecipe {
        repository: "chatapp/chat-server".to_owned(),
        dockerfile: server_dockerfile(),
        files: binary_with_libraries_cached(binary, "chat-server", cache)?,
    })
}

/// The NATS image: `base` is a local `nats:<tag>` image (its `/nats-server` is used) or `None`
/// to package `nats_binary`; `/chat-server` rides along as the health probe.
pub fn nats_recipe(
    base: Option<&str>,
    nats_binary: Option<&Path>,
    server_binary: &Path,
    cache: &mut TagCache,
) -> Result<ImageRecipe> {
    let mut files = binary_with_libraries_cached(server_binary, "chat-server", cache)?;
    let from = match (base, nats_binary) {
        (Some(base), _) => base.to_owned(),
        (None, Some(nats)) => {
            files.extend(binary_with_libraries_cached(nats, "nats-server", cache)?);
            "scratch".to_owned()
        }
        (None, None) => bail!(
            "no NATS image (`nats:<tag>`) is present and no nats-server binary was found: \
             install it (`apt-get install nats-server`) or load a `nats` image"
        ),
    };
    files.sort_by(|a, b| a.image_path.cmp(&b.image_path));
    files.dedup_by(|a, b| a.image_path == b.image_path);
    Ok(ImageRecipe {
        repository: "chatapp/nats".to_owned(),
        dockerfile: nats_dockerfile(&from),
        files,
    })
}

/// The chat-server image build for a binary (reads it; no cache).
pub fn server_image(binary: &Path) -> Result<ImageBuild> {
    server_recipe(binary, &mut TagCache::default())?.build()
}

/// The NATS image build (reads every file; no cache); see [`nats_recipe`].
pub fn nats_image(
    base: Option<&str>,
    nats_binary: Option<&Path>,
    server_binary: &Path,
) -> Result<ImageBuild> {
    nats_recipe(base, nats_binary, server_binary, &mut TagCache::default())?.build()
}

/// Finds the local `nats-server` binary: `$PATH`, then `/usr/sbin` and `/usr/bin`.
pub fn find_nats_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// Finds the chat-server binary for the image: `explicit`, else a static musl build under the
/// cargo target directory (next to this executable, or `./target`), else a `chat-server` next to
/// this executable. The second value says whether it is static.
pub fn find_server_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("the server binary {} does not exist", p.display());
    }
    let mut candidates = Vec::new();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    if let Some(dir) = &exe_dir {
        // target/{debug,release}/chatctl -> target/x86_64-unknown-linux-musl/release/chat-server
        if let Some(target) = dir.parent() {
            candidates.push(target.join(MUSL_TARGET).join("release/chat-server"));
        }
    }
    candidates.push(
        PathBuf::from("target")
            .join(MUSL_TARGET)
            .join("release/chat-server"),
    );
    if let Some(dir) = &exe_dir {
        candidates.push(dir.join("chat-server"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no chat-server binary for the image: build the static one with \
             `cargo build --release --target {MUSL_TARGET} -p chat-server` \
             (needs `apt-get install musl-tools`), or pass --server-binary PATH"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDD_NATS: &str = "\tlinux-vdso.so.1 (0x00007ffd)\n\
        \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f4c)\n\
        \t/lib64/ld-linux-x86-64.so.2 (0x00007f4c)\n";

    #[test]
    fn ldd_output_lists_libraries_and_the_loader_but_not_the_vdso() {
        assert_eq!(
            parse_ldd(LDD_NATS),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn a_static_binary_has_no_libraries() {
        assert!(parse_ldd("\tstatically linked\n").is_empty());
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn same_files_give_the_same_context_and_tag() {
        let files = vec![ImageFile {
            path: "/chat-server".into(),
            bytes: b"binary".to_vec(),
            mode: 0o755,
        }];
        let a = build_context(&server_dockerfile(), &files).expect("context");
        let b = build_context(&server_dockerfile(), &files).expect("context");
        assert_eq!(a, b);
        assert_eq!(content_tag("r", &a), content_tag("r", &b));
        let other = vec![ImageFile {
            bytes: b"binary2".to_vec(),
            ..files[0].clone()
        }];
        let c = build_context(&server_dockerfile(), &other).expect("context");
        assert_ne!(content_tag("r", &a), content_tag("r", &c));
    }

    #[test]
    fn the_cache_gives_the_tag_without_reading_and_notices_a_changed_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = dir.path().join("chat-server");
        std::fs::write(&binary, b"one").expect("write");
        let recipe = ImageRecipe {
            repository: "r".into(),
            dockerfile: server_dockerfile(),
            files: vec![HostFile {
                image_path: "/chat-server".into(),
                host: binary.clone(),
                mode: 0o755,
            }],
        };
        let mut cache = TagCache::at(dir.path().join("cache/facts.json"));
        let (tag, build) = recipe.resolve(&mut cache).expect("resolve");
        assert_eq!(build.expect("built the first time").tag, tag);
        cache.save();
        let mut cache = TagCache::at(dir.path().join("cache/facts.json"));
        let (again, build) = recipe.resolve(&mut cache).expect("resolve");
        assert_eq!((again.as_str(), build.is_none()), (tag.as_str(), true));
        std::fs::write(&binary, b"two").expect("rewrite");
        let (changed, build) = recipe.resolve(&mut cache).expect("resolve");
        assert!(build.is_some(), "a rewritten file must be read again");
        assert_ne!(changed, tag);
        assert_eq!(changed, recipe.build().expect("build").tag);
    }

    #[test]
    fn server_image_checks_health_over_tls_with_the_mounted_ca() {
        let text = server_dockerfile();
        assert!(text.starts_with("FROM scratch\n"));
        assert!(text.contains("\"--ca\", \"/keys/tls/ca.pem\""));
        assert!(text.contains("https://localhost:8443/healthz"));
    }
}
