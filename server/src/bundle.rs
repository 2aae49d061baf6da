//! Serving the signed client bundle (`--bundle DIR`) with strict security headers.
//!
//! Only regular files under the bundle directory are served; paths are checked segment by
//! segment. The manifest and its signature are never cached, so a new release is seen at once;
//! the loader verifies everything else itself, so caching the rest is safe.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

/// The Content-Security-Policy of every bundle response: no inline script, no eval; wasm
/// compilation and blob-URL modules (the verified app) are allowed.
pub const CSP: &str = "default-src 'none'; script-src 'self' blob: 'wasm-unsafe-eval'; \
style-src 'self' blob:; img-src 'self' data: blob:; connect-src 'self'; worker-src 'self'; \
manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A directory of static files.
#[derive(Debug, Clone)]
pub struct Bundle {
    root: PathBuf,
}

impl Bundle {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Resolves a request path to a file under the root, or `None`.
    fn resolve(&self, path: &str) -> Option<PathBuf> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "index.html" } else { rel };
        let mut out = self.root.clone();
        for seg in rel.split('/') {
            let ok = !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !seg.starts_with('.')
                && !seg.contains(['\\', '\0', '%']);
            if !ok {
                return None;
            }
            out.push(seg);
        }
        Some(out)
    }

    /// The response for `GET path`.
    pub async fn serve(&self, path: &str) -> Response<Full<Bytes>> {
        let Some(file) = self.resolve(path) else {
            return not_found();
        };
        match tokio::fs::symlink_metadata(&file).await {
            Ok(meta) if meta.is_file() => {}
            _ => return not_found(),
        }
        match tokio::fs::read(&file).await {
            Ok(bytes) => with_headers(Response::builder(), &file)
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, content_type(&file))
                .body(Full::new(Bytes::from(bytes)))
                .unwrap_or_else(|_| not_found()),
            Err(_) => not_found(),
        }
    }
}

fn with_headers(
    builder: hyper::http::response::Builder,
    file: &Path,
) -> hyper::http::response::Builder {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let cache = if name.starts_with("manifest.json") || name == "index.html" || name == "sw.js" {
        "no-store"
    } else {
        "no-cache"
    };
    security_headers(builder).header(header::CACHE_CONTROL, cache)
}

/// The headers every bundle response carries.
pub fn security_headers(builder: hyper::http::response::Builder) -> hyper::http::response::Builder {
    builder
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header("Cross-Origin-Opener-Policy", "same-origin")
        .header("Cross-Origin-Resource-Policy", "same-origin")
        .header(header::X_FRAME_OPTIONS, "DENY")
}

fn not_found() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

fn content_type(file: &Path) -> &'static str {
    match file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
    {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "minisig" | "txt" | "pub" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_that_leave_the_bundle() {
        let b = Bundle::new(PathBuf::from("/srv/bundle"));
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/.git/config",
            "/a//b",
            "/%2e%2e/x",
            "/a\\b",
        ] {
            assert_eq!(b.resolve(bad), None, "{bad}");
        }
        assert_eq!(
            b.resolve("/"),
            Some(PathBuf::from("/srv/bundle/index.html"))
        );
        assert_eq!(
            b.resolve("/app/main.js?v=1"),
            Some(PathBuf::from("/srv/bundle/app/main.js"))
        );
    }

    #[test]
    fn csp_forbids_inline_script_and_eval_but_allows_wasm() {
        assert!(!CSP.contains("unsafe-inline"));
        assert!(!CSP.contains("'unsafe-eval'"));
        assert!(CSP.contains("'wasm-unsafe-eval'"));
    }
}
