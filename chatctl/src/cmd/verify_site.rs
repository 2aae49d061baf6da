//! `chatctl verify-site URL --pubkey FILE`: checks a deployed browser client from outside its
//! origin, the way the loader checks it inside the browser, so that the loader itself (trusted on
//! first use in a browser) can be checked out of band.
//!
//! It fetches the page, the manifest and its signature, every file the page references (and the
//! modules the loader script imports) and every listed file; it verifies the signature with the
//! given release key, expiry and `--min-version`, every file's size and SHA-256, that the page
//! references only listed files and that the loader's SHA-256 is the expected one. Exit status 1
//! names the URL and the reason (with the loader's code: `file-mismatch`, `unknown-key`, …).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chat_signing::manifest::{
    FileDigest, MANIFEST_FILE, ReleaseError, SIGNATURE_FILE, VerifyPolicy, verify_manifest,
};
use chat_signing::release::ReleasePublicKey;
use clap::Args;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use semver::Version;
use serde::Serialize;

use crate::cmd::keys::{DEFAULT_DIR, RELEASE_PUB};
use crate::cmd::release::{Refused, human_bytes};
use crate::files::read_text;
use crate::progress;

/// Longest a single request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest body accepted for one file (the manifest caps a release far below this).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// The page's entry inside the release.
const INDEX: &str = "index.html";

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl verify-site https://chat.example.org/ --pubkey release.pub\n  \
    chatctl verify-site https://localhost:8443/ --pubkey .chatctl/keys/release.pub \\\n      \
    --ca .chatctl/keys/tls/ca.pem --loader-sha256 3f1c… --min-version 1.4.0\n\n\
    --loader-sha256 is the `loader.js sha256` line printed by `chatctl bundle`; without it the\n\
    loader is checked against the signed manifest like every other file.\n\
    Exit status: 0 the site serves exactly the signed release; 1 refused (the message names the\n\
    URL and the reason); 2 usage error.")]
pub struct VerifySiteArgs {
    /// The page a browser opens (`https://host[:port]/[path/]`).
    pub url: String,
    /// The release public key the manifest must be signed with.
    #[arg(long, default_value_t = format!("{DEFAULT_DIR}/{RELEASE_PUB}"))]
    pub pubkey: String,
    /// The CA certificate that issued the server's certificate (https only).
    #[arg(long, default_value_t = format!("{DEFAULT_DIR}/tls/ca.pem"))]
    pub ca: String,
    /// The expected SHA-256 (hex) of the loader script the page runs.
    #[arg(long)]
    pub loader_sha256: Option<String>,
    /// Refuse releases older than this version (rollback protection).
    #[arg(long, value_parser = parse_version)]
    pub min_version: Option<Version>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_version(s: &str) -> Result<Version, String> {
    Version::parse(s).map_err(|e| format!("not a semantic version (like 1.4.0): {e}"))
}

/// What a clean check found.
#[derive(Debug, Clone, Serialize)]
pub struct SiteReport {
    pub url: String,
    pub name: String,
    pub version: String,
    pub key_id: String,
    pub expires: String,
    pub manifest_sha256: String,
    pub loader: String,
    pub loader_sha256: String,
    /// Whether the loader hash was compared with `--loader-sha256` (else with the manifest only).
    pub loader_pinned: bool,
    pub referenced: Vec<String>,
    pub files: usize,
    pub total_size: u64,
}

pub fn run(args: VerifySiteArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(verify_site(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "Verified {}: {} {} signed by key {}, expires {}\n  \
             page {INDEX} and {} referenced file(s) listed in the manifest: {}\n  \
             loader {} sha256 {} ({})\n  \
             {} files, {}: every size and SHA-256 as signed",
            report.url,
            report.name,
            report.version,
            report.key_id,
            report.expires,
            report.referenced.len(),
            report.referenced.join(", "),
            report.loader,
            report.loader_sha256,
            if report.loader_pinned {
                "matches --loader-sha256"
            } else {
                "as listed in the signed manifest"
            },
            report.files,
            human_bytes(report.total_size),
        );
    }
    Ok(())
}

/// Where the site is: scheme, authority and the directory of the page.
#[derive(Debug, Clone)]
struct Origin {
    tls: bool,
    host: String,
    port: u16,
    /// The page's directory, starting and ending with `/`.
    base: String,
    /// The page's own path (`base` itself for a directory URL).
    page: String,
}

impl Origin {
    fn parse(url: &str) -> Result<Self> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("{url:?} must start with https:// (or http:// for a loopback dev server)");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = path.split(['?', '#']).next().unwrap_or("/");
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6
                    .split_once(']')
                    .with_context(|| format!("unclosed [ in {url}"))?;
                (h, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(p) => p
                .parse()
                .with_context(|| format!("bad port {p:?} in {url}"))?,
            None => default_port,
        };
        let host = host.to_owned();
        if host.is_empty() {
            bail!("{url:?} has no host");
        }
        let base = match path.rfind('/') {
            Some(i) => path[..=i].to_owned(),
            None => "/".to_owned(),
        };
        Ok(Self {
            tls,
            host,
            port,
            base,
            page: path.to_owned(),
        })
    }

    fn display(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}{path}", self.host, self.port)
    }

    /// The URL path of a release file.
    fn path_of(&self, file: &str) -> String {
        format!("{}{file}", self.base)
    }

    /// The release path of a reference found in the page, or why it is outside the release.
    fn resolve(&self, reference: &str) -> Result<String, String> {
        let reference = reference.trim();
        let reference = reference.split(['?', '#']).next().unwrap_or_default();
        let absolute = if let Some(rest) = reference.strip_prefix("//") {
            return Err(format!("//{rest} (another origin)"));
        } else if reference.contains("://") || reference.starts_with("data:") {
            let scheme = if self.tls { "https" } else { "http" };
            let same = [self.display("/"), format!("{scheme}://{}/", self.host)];
            let default_port = self.port == if self.tls { 443 } else { 80 };
            match same
                .iter()
                .take(if default_port { 2 } else { 1 })
                .find(|p| reference.starts_with(p.as_str()))
            {
                Some(prefix) => format!("/{}", &reference[prefix.len()..]),
                None => return Err(format!("{reference} (another origin)")),
            }
        } else if reference.starts_with('/') {
            reference.to_owned()
        } else {
            format!("{}{reference}", self.base)
        };
        // Normalise `.` and `..` segments as a browser does.
        let mut parts: Vec<&str> = Vec::new();
        for seg in absolute.split('/').skip(1) {
            match seg {
                "." => {}
                ".." => {
                    parts.pop();
                }
                s => parts.push(s),
            }
        }
        let normal = format!("/{}", parts.join("/"));
        let Some(rel) = normal.strip_prefix(&self.base) else {
            return Err(format!("{normal} (outside {})", self.base));
        };
        Ok(if rel.is_empty() {
            INDEX.to_owned()
        } else {
            rel.to_owned()
        })
    }
}

/// An HTTP/1.1 client for one origin: a fresh connection per request, TLS with the given CA.
struct Fetcher {
    origin: Origin,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Fetcher {
    fn new(origin: Origin, ca: &str) -> Result<Self> {
        let tls = if origin.tls {
            let config: Arc<rustls::ClientConfig> =
                chatctl::client::conn::tls_config(std::path::Path::new(ca))?;
            Some(tokio_rustls::TlsConnector::from(config))
        } else {
            None
        };
        Ok(Self { origin, tls })
    }

    /// `GET path`: the body of a 200 answer; any other status, a redirect or an error is a
    /// [`Refused`] naming the URL (the loader refuses the same way).
    async fn get(&self, path: &str) -> Result<Vec<u8>> {
        let url = self.origin.display(path);
        match tokio::time::timeout(REQUEST_TIMEOUT, self.get_inner(path)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(Refused(format!("{url}: {e:#} [missing-file]")).into()),
            Err(_) => Err(Refused(format!(
                "{url}: no answer within {REQUEST_TIMEOUT:?} [missing-file]"
            ))
            .into()),
        }
    }

    async fn get_inner(&self, path: &str) -> Result<Vec<u8>> {
        let (host, port) = (&self.origin.host, self.origin.port);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        let authority = if port == 443 || port == 80 {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::USER_AGENT, "chatctl-verify-site")
            .body(Empty::<Bytes>::new())?;
        let response = match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())?;
                let stream = tls.connect(name, tcp).await.with_context(|| {
                    format!("TLS handshake with {host}:{port} failed (is --ca the server's CA?)")
                })?;
                send(TokioIo::new(stream), request).await?
            }
            None => send(TokioIo::new(tcp), request).await?,
        };
        let status = response.status();
        if status != hyper::StatusCode::OK {
            bail!("HTTP {status}");
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the body: {e}"))?;
        Ok(body.to_bytes().to_vec())
    }
}

async fn send<T>(
    io: TokioIo<T>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(request).await?)
}

/// A refusal naming `url` and the release error's code (the URL already names the file).
fn refused(url: &str, e: &ReleaseError) -> anyhow::Error {
    let text = e.to_string();
    let reason = match e {
        ReleaseError::FileMismatch { path }
        | ReleaseError::SizeMismatch { path, .. }
        | ReleaseError::MissingFile { path }
        | ReleaseError::UnlistedFile { path } => {
            text.strip_prefix(&format!("{path}: ")).unwrap_or(&text)
        }
        _ => &text,
    };
    Refused(format!("{url}: {reason} [{}]", e.code())).into()
}

/// Runs every check; the error is a [`Refused`] (exit 1) for anything the site got wrong.
pub async fn verify_site(args: &VerifySiteArgs) -> Result<SiteReport> {
    let origin = Origin::parse(&args.url)?;
    let pub_path = PathBuf::from(&args.pubkey);
    let key = ReleasePublicKey::from_file_string(&read_text(&pub_path).map_err(|e| {
        e.context("pass --pubkey with the release public key (release.pub of `chatctl keys init`)")
    })?)
    .with_context(|| pub_path.display().to_string())?;
    let expected_loader = args
        .loader_sha256
        .as_deref()
        .map(|h| {
            let h = h.trim().to_ascii_lowercase();
            if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(h)
            } else {
                Err(anyhow!("--loader-sha256 must be 64 hex digits, got {h:?}"))
            }
        })
        .transpose()?;
    let fetcher = Fetcher::new(origin.clone(), &args.ca)?;
    let bar = progress::spinner(format!("Fetching {}", args.url));

    // 1. The page, the manifest and its signature, as the browser and the loader fetch them.
    let page = fetcher.get(&origin.page).await?;
    let manifest_url = origin.display(&origin.path_of(MANIFEST_FILE));
    let signature_url = origin.display(&origin.path_of(SIGNATURE_FILE));
    let manifest_bytes = fetcher.get(&origin.path_of(MANIFEST_FILE)).await?;
    let signature = fetcher.get(&origin.path_of(SIGNATURE_FILE)).await?;
    let signature = String::from_utf8(signature)
        .map_err(|_| Refused(format!("{signature_url}: not UTF-8 text [malformed]")))?;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    )?;
    let policy = VerifyPolicy {
        now_unix: now,
        min_version: args.min_version.clone(),
    };
    let verified = verify_manifest(&key, &manifest_bytes, &signature, &policy).map_err(|e| {
        let url = match e {
            ReleaseError::BadSignature(_) | ReleaseError::UnknownKey { .. } => &signature_url,
            _ => &manifest_url,
        };
        refused(url, &e)
    })?;
    let manifest = &verified.manifest;

    // 2. The page is the release's index.html, and it references only listed files.
    let page_file = origin
        .resolve(&origin.page)
        .map_err(|e| anyhow!("the page {e}"))?;
    let page_url = origin.display(&origin.page);
    manifest
        .check_file(&page_file, &FileDigest::of_bytes(&page))
        .map_err(|e| refused(&page_url, &e))?;
    let html = String::from_utf8_lossy(&page);
    let references = page_references(&html);
    let mut referenced = BTreeSet::new();
    let mut scripts = Vec::new();
    for reference in &references {
        let path = origin.resolve(&reference.value).map_err(|where_| {
            Refused(format!(
                "{page_url}: the page references {where_}, outside the signed release [unlisted-file]"
            ))
        })?;
        if !manifest.files.contains_key(&path) {
            return Err(Refused(format!(
                "{page_url}: the page references {path}, which the signed manifest does not list [unlisted-file]"
            ))
            .into());
        }
        if reference.is_script {
            scripts.push(path.clone());
        }
        referenced.insert(path);
    }

    // 3. Every listed file: size and SHA-256.
    let mut bodies: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (i, path) in manifest.files.keys().enumerate() {
        bar.set_message(format!(
            "Checking {path} ({}/{})",
            i + 1,
            manifest.files.len()
        ));
        let bytes = fetcher.get(&origin.path_of(path)).await?;
        let url = origin.display(&origin.path_of(path));
        manifest
            .check_file(path, &FileDigest::of_bytes(&bytes))
            .map_err(|e| refused(&url, &e))?;
        bodies.insert(path.clone(), bytes);
    }
    bar.finish_and_clear();

    // 4. The loader: the one script the page runs, its imports listed, its hash the expected one.
    let [loader] = scripts.as_slice() else {
        return Err(Refused(format!(
            "{page_url}: the page runs {} scripts ({}), not one loader [malformed]",
            scripts.len(),
            scripts.join(", ")
        ))
        .into());
    };
    let loader_bytes = bodies
        .get(loader)
        .ok_or_else(|| anyhow!("{loader} was not fetched"))?;
    let loader_url = origin.display(&origin.path_of(loader));
    for import in module_imports(&String::from_utf8_lossy(loader_bytes)) {
        let path = origin
            .resolve(&format!("{}{import}", directory_of(loader)))
            .map_err(|where_| {
                Refused(format!(
                    "{loader_url}: imports {where_}, outside the signed release [unlisted-file]"
                ))
            })?;
        if !manifest.files.contains_key(&path) {
            return Err(Refused(format!(
                "{loader_url}: imports {path}, which the signed manifest does not list [unlisted-file]"
            ))
            .into());
        }
        referenced.insert(path);
    }
    let loader_sha256 = FileDigest::of_bytes(loader_bytes).sha256;
    if let Some(expected) = &expected_loader {
        if &loader_sha256 != expected {
            return Err(Refused(format!(
                "{loader_url}: SHA-256 {loader_sha256} is not the expected loader {expected} \
                 (--loader-sha256) [loader-mismatch]"
            ))
            .into());
        }
    }

    Ok(SiteReport {
        url: args.url.clone(),
        name: manifest.name.clone(),
        version: verified.version.to_string(),
        key_id: verified.key_id.to_string(),
        expires: manifest.expires.clone(),
        manifest_sha256: verified.manifest_sha256.clone(),
        loader: loader.clone(),
        loader_sha256,
        loader_pinned: expected_loader.is_some(),
        referenced: referenced.into_iter().collect(),
        files: manifest.files.len(),
        total_size: manifest.total_size(),
    })
}

/// `a/b/` for `a/b/c.js`, empty for a top-level file.
fn directory_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..=i])
}

/// One file a page refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    value: String,
    is_script: bool,
}

/// What the loader counts as the page's files: every `src` attribute, `link[href]` and
/// `object[data]` (`a[href]` is navigation, not part of the page). Comments are skipped.
fn page_references(html: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        rest = &rest[start + 1..];
        if let Some(after) = rest.strip_prefix("!--") {
            rest = after.find("-->").map_or("", |end| &after[end + 3..]);
            continue;
        }
        let end = tag_end(rest);
        let tag = &rest[..end];
        rest = &rest[end..];
        let name_len = tag
            .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
            .unwrap_or(tag.len());
        let name = tag[..name_len].to_ascii_lowercase();
        if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue;
        }
        for (attr, value) in attributes(&tag[name_len..]) {
            let counted = attr == "src"
                || (attr == "href" && name == "link")
                || (attr == "data" && name == "object");
            if counted {
                out.push(Reference {
                    value,
                    is_script: name == "script" && attr == "src",
                });
            }
        }
    }
    out
}

/// The index of the `>` closing a tag (outside quoted values), or the end of the text.
fn tag_end(tag: &str) -> usize {
    let mut quote = None;
    for (i, c) in tag.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return i,
            _ => {}
        }
    }
    tag.len()
}

/// `name=value` pairs of a tag's attribute text (names lower-cased, values unquoted).
fn attributes(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && (chars[i].is_ascii_whitespace() || chars[i] == '/') {
            i += 1;
        }
        let start = i;
        while i < chars.len() && !chars[i].is_ascii_whitespace() && !matches!(chars[i], '=' | '/') {
            i += 1;
        }
        let name: String = chars[start..i]
            .iter()
            .collect::<String>()
            .to_ascii_lowercase();
        while i < chars.len() && chars[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '=' {
            i += 1;
            while i < chars.len() && chars[i].is_ascii_whitespace() {
                i += 1;
            }
            let value: String = if i < chars.len() && matches!(chars[i], '"' | '\'') {
                let q = chars[i];
                i += 1;
                let s = i;
                while i < chars.len() && chars[i] != q {
                    i += 1;
                }
                let v = chars[s..i].iter().collect();
                i += 1;
                v
            } else {
                let s = i;
                while i < chars.len() && !chars[i].is_ascii_whitespace() {
                    i += 1;
                }
                chars[s..i].iter().collect()
            };
            if !name.is_empty() {
                out.push((name, value));
            }
        } else if start == i {
            i += 1;
        }
    }
    out
}

/// Relative module specifiers (`./x.js`, `../y.js`) that a script imports statically or
/// dynamically, in order of appearance.
fn module_imports(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["from", "import"] {
        let mut rest = source;
        while let Some(at) = rest.find(keyword) {
            let after = rest[at + keyword.len()..].trim_start();
            let after = after.strip_prefix('(').map_or(after, str::trim_start);
            if let Some(q) = after.chars().next().filter(|c| matches!(c, '"' | '\'')) {
                let body = &after[1..];
                if let Some(end) = body.find(q) {
                    let spec = &body[..end];
                    if (spec.starts_with("./") || spec.starts_with("../"))
                        && !out.iter().any(|s| s == spec)
                    {
                        out.push(spec.to_owned());
                    }
                }
            }
            rest = &rest[at + keyword.len()..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(url: &str) -> Origin {
        Origin::parse(url).expect("url")
    }

    #[test]
    fn finds_what_the_loader_counts_as_the_pages_files() {
        let html = "<!doctype html><html><head><link rel=\"stylesheet\" href=\"loader.css\">\
            <!-- <script src=\"commented.js\"></script> -->\
            <script type=module src='loader.js'></script><img src=logo.png alt=\"a > b\">\
            <a href=\"elsewhere.html\">x</a><object data=\"o.svg\"></object></head></html>";
        let refs = page_references(html);
        let values: Vec<&str> = refs.iter().map(|r| r.value.as_str()).collect();
        assert_eq!(values, ["loader.css", "loader.js", "logo.png", "o.svg"]);
        let scripts: Vec<&str> = refs
            .iter()
            .filter(|r| r.is_script)
            .map(|r| r.value.as_str())
            .collect();
        assert_eq!(scripts, ["loader.js"]);
    }

    #[test]
    fn resolves_references_inside_the_release_and_refuses_others() {
        let o = origin("https://chat.example.org:8443/web/");
        assert_eq!(o.resolve("loader.js"), Ok("loader.js".into()));
        assert_eq!(o.resolve("./app/main.js?v=2"), Ok("app/main.js".into()));
        assert_eq!(o.resolve("/web/x.css"), Ok("x.css".into()));
        assert_eq!(
            o.resolve("https://chat.example.org:8443/web/a.js"),
            Ok("a.js".into())
        );
        assert!(o.resolve("../other.js").is_err());
        assert!(o.resolve("https://cdn.example.com/x.js").is_err());
        assert!(o.resolve("//cdn.example.com/x.js").is_err());
        assert_eq!(origin("http://127.0.0.1:9/").resolve("/"), Ok(INDEX.into()));
    }

    #[test]
    fn parses_urls_with_and_without_a_port_or_path() {
        let o = origin("http://127.0.0.1:8080");
        assert_eq!((o.tls, o.port, o.base.as_str()), (false, 8080, "/"));
        let o = origin("https://chat.example.org/app/index.html");
        assert_eq!((o.tls, o.port, o.base.as_str()), (true, 443, "/app/"));
        assert_eq!(o.resolve(&o.page), Ok(INDEX.into()));
        assert!(Origin::parse("ftp://x/").is_err());
    }

    #[test]
    fn lists_the_relative_modules_a_script_imports() {
        let js = "import { instantiate } from './chat_verify.js';\n\
                  const m = await import(\"../x/y.js\");\nimport 'https://cdn/z.js';\n\
                  // from the manifest\n";
        assert_eq!(module_imports(js), ["./chat_verify.js", "../x/y.js"]);
    }
}
