//! Headless Chromium (Debian `chromium`) driven over the DevTools protocol, and the browser
//! client's bundle served by a real `chat-server`: the shared harness of the `browser` suite and
//! of the bundle attacks in the `hostile` suite. A missing Chromium is an error, never a skip.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::{Keys, binaries, workspace_root};

/// How long any single wait on the browser or a server may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// `target/NAME`, created.
pub fn out_dir(name: &str) -> PathBuf {
    let dir = workspace_root().join("target").join(name);
    std::fs::create_dir_all(&dir).expect("create output dir");
    dir
}

// ---- a minimal DevTools protocol client ----

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One headless Chromium process with its own profile directory.
pub struct Browser {
    child: Child,
    sink: Arc<
        Mutex<
            futures_util::stream::SplitSink<
                tokio_tungstenite::WebSocketStream<
                    tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
                >,
                Message,
            >,
        >,
    >,
    pending: Pending,
    next_id: AtomicU64,
}

impl Browser {
    /// Starts Chromium on `profile` (kept across launches: the same "browser profile").
    pub async fn launch(profile: &Path) -> Result<Self> {
        Self::launch_with(profile, &[]).await
    }

    /// Starts Chromium on `profile` trusting the TLS certificate `cert_pem` (a PEM file) for
    /// HTTPS sites: the certificate's public key is pinned with
    /// `--ignore-certificate-errors-spki-list`, so only a server holding that key is accepted
    /// (every other certificate error still stops the page) and the origin is a secure context
    /// (service workers included).
    pub async fn launch_trusting(profile: &Path, cert_pem: &Path) -> Result<Self> {
        let pin = spki_sha256(cert_pem)?;
        Self::launch_with(
            profile,
            &[format!("--ignore-certificate-errors-spki-list={pin}")],
        )
        .await
    }

    /// Starts Chromium on `profile` with `extra` command-line flags.
    pub async fn launch_with(profile: &Path, extra: &[String]) -> Result<Self> {
        std::fs::create_dir_all(profile)?;
        let _ = std::fs::remove_file(profile.join("DevToolsActivePort"));
        let log = std::fs::File::create(profile.with_extension("log"))?;
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                "--window-size=1100,800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context(
                "cannot run `chromium`: the browser tests need Debian's headless Chromium; \
                 install it with `apt-get install chromium` (or `cargo xtask deps`)",
            )?;
        let port_file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + WAIT;
        let ws_url = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            if Instant::now() > deadline {
                bail!("chromium did not open its DevTools port within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(&ws_url)
            .await
            .with_context(|| format!("cannot connect to {ws_url}"))?;
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let reader = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(id) = value.get("id").and_then(Value::as_u64) {
                    if let Some(tx) = reader.lock().await.remove(&id) {
                        let _ = tx.send(value);
                    }
                }
            }
        });
        Ok(Self {
            child,
            sink: Arc::new(Mutex::new(sink)),
            pending,
            next_id: AtomicU64::new(1),
        })
    }

    /// One DevTools command (`session` for a tab's, `None` for the browser's).
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().await.insert(id, tx);
        self.sink
            .lock()
            .await
            .send(Message::text(msg.to_string()))
            .await?;
        let answer = tokio::time::timeout(WAIT, rx)
            .await
            .map_err(|_| anyhow!("{method}: no answer from chromium"))??;
        if let Some(err) = answer.get("error") {
            bail!("{method}: {err}");
        }
        Ok(answer.get("result").cloned().unwrap_or(Value::Null))
    }

    /// A new tab.
    pub async fn page(&self) -> Result<Page<'_>> {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        let page = Page {
            browser: self,
            session,
        };
        page.cmd("Page.enable", json!({})).await?;
        page.cmd("Runtime.enable", json!({})).await?;
        Ok(page)
    }
}

/// The base64 SHA-256 of the SubjectPublicKeyInfo of the first certificate in `cert_pem`, as
/// Chromium's `--ignore-certificate-errors-spki-list` takes it (computed with the `openssl` CLI).
pub fn spki_sha256(cert_pem: &Path) -> Result<String> {
    let pubkey = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(cert_pem)
        .output()
        .context("cannot run `openssl` (apt-get install openssl)")?;
    if !pubkey.status.success() {
        bail!(
            "openssl x509 -pubkey {}: {}",
            cert_pem.display(),
            String::from_utf8_lossy(&pubkey.stderr)
        );
    }
    let der = pipe(
        &["pkey", "-pubin", "-outform", "der"],
        &pubkey.stdout,
        "openssl pkey",
    )?;
    let digest = pipe(&["dgst", "-sha256", "-binary"], &der, "openssl dgst")?;
    if digest.len() != 32 {
        bail!("openssl dgst -sha256 gave {} bytes", digest.len());
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(digest))
}

/// Runs `openssl ARGS` with `input` on stdin; its stdout.
fn pipe(args: &[&str], input: &[u8], what: &str) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input)
        .with_context(|| format!("cannot write to {what}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab, attached over a flattened DevTools session.
pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Page<'_> {
    /// One DevTools command in this tab's session.
    pub async fn cmd(&self, method: &str, params: Value) -> Result<Value> {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Navigates (without waiting for the load).
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.cmd("Page.navigate", json!({ "url": url })).await?;
        Ok(())
    }

    /// Evaluates `js` (awaiting a promise) and returns its JSON value.
    pub async fn eval(&self, js: &str) -> Result<Value> {
        let r = self
            .cmd(
                "Runtime.evaluate",
                json!({ "expression": js, "awaitPromise": true, "returnByValue": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{js}: {e}");
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Polls `js` until it returns something truthy other than `false`/`null`/`""`.
    pub async fn wait_for(&self, js: &str) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(v) = self.eval(js).await {
                let truthy = match &v {
                    Value::Null | Value::Bool(false) => false,
                    Value::String(s) => !s.is_empty(),
                    _ => true,
                };
                if truthy {
                    return Ok(v);
                }
            }
            if Instant::now() > deadline {
                let dom = self
                    .eval("document.documentElement.outerHTML.slice(0, 3000)")
                    .await
                    .unwrap_or_default();
                bail!("timed out waiting for `{js}`; page:\n{dom}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport into `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let shot = self
            .cmd("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("screenshot data")?)?;
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Emulates a 390 px wide phone.
    pub async fn phone_width(&self) -> Result<()> {
        self.cmd(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 390, "height": 760, "deviceScaleFactor": 2, "mobile": true }),
        )
        .await?;
        Ok(())
    }

    /// The loader's verdict once it has one: `verified` or `rejected:CODE`.
    pub async fn verdict(&self) -> Result<String> {
        let v = self
            .wait_for(
                "(() => { const d = document.documentElement.dataset; \
                 return d.bundle === 'pending' || !d.bundle ? null \
                 : d.bundle === 'rejected' ? 'rejected:' + d.bundleError : d.bundle; })()",
            )
            .await?;
        let verdict = v.as_str().unwrap_or_default().to_owned();
        if verdict.starts_with("rejected") {
            let text = self.eval("document.body.innerText").await?;
            eprintln!("loader: {verdict}: {}", text.as_str().unwrap_or_default());
        }
        Ok(verdict)
    }

    /// Whether the app marked itself running (`<html data-app="running">`).
    pub async fn app_started(&self) -> Result<bool> {
        Ok(self
            .eval("document.documentElement.dataset.app === 'running'")
            .await?
            == json!(true))
    }

    // ---- driving the app ----

    /// Registers `name` in the app's form and waits for the login.
    pub async fn register(&self, name: &str) -> Result<()> {
        self.wait_for("document.querySelector('#register')").await?;
        self.eval(&format!(
            "document.querySelector('#username').value = {name:?}; \
             document.querySelector('#register').requestSubmit(); true"
        ))
        .await?;
        self.wait_logged_in().await
    }

    pub async fn wait_logged_in(&self) -> Result<()> {
        self.wait_for("document.documentElement.dataset.login === 'ok'")
            .await?;
        Ok(())
    }

    /// Adds `peer` as a contact and opens the conversation.
    pub async fn open_conversation(&self, peer: &str) -> Result<()> {
        self.eval(&format!(
            "document.querySelector('#contact').value = {peer:?}; \
             document.querySelector('#add-contact').requestSubmit(); true"
        ))
        .await?;
        self.wait_for(&format!(
            "document.querySelector('#peer')?.textContent === {peer:?}"
        ))
        .await?;
        Ok(())
    }

    /// Sends `text` in the open conversation.
    pub async fn send(&self, text: &str) -> Result<()> {
        self.eval(&format!(
            "document.querySelector('#message-input').value = {text:?}; \
             document.querySelector('#composer').requestSubmit(); true"
        ))
        .await?;
        Ok(())
    }

    /// Waits until `text` is shown as an incoming message.
    pub async fn wait_incoming(&self, text: &str) -> Result<()> {
        self.wait_for(&format!(
            "[...document.querySelectorAll('#messages li.in .text')].some(e => e.textContent === {text:?})"
        ))
        .await?;
        Ok(())
    }

    /// The state (sending, sent, delivered, read, failed) of the outgoing message `text`.
    pub async fn wait_state(&self, text: &str, states: &[&str]) -> Result<String> {
        let list = serde_json::to_string(states)?;
        let v = self
            .wait_for(&format!(
                "(() => {{ const li = [...document.querySelectorAll('#messages li.out')]\
                 .find(l => l.querySelector('.text').textContent === {text:?}); \
                 return li && {list}.includes(li.dataset.state) ? li.dataset.state : null; }})()"
            ))
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }
}

// ---- the server and the bundle ----

/// A chat-server (plain HTTP on loopback: a secure context for service workers) serving a
/// bundle directory that the test may change between page loads.
pub struct BundleServer {
    child: Child,
    pub port: u16,
    pub data: PathBuf,
}

impl BundleServer {
    /// Starts `chat-server` (or `chat-server-hostile --hostile MODE`) serving `bundle`, with
    /// its data and log under `work`.
    pub fn start(keys: &Path, work: &Path, bundle: &Path, hostile: Option<&str>) -> Result<Self> {
        let data = work.join("data");
        let log_path = work.join("server.log");
        let log = std::fs::File::create(&log_path)?;
        let bins = binaries();
        let binary = if hostile.is_some() {
            &bins.chat_server_hostile
        } else {
            &bins.chat_server
        };
        let mut cmd = Command::new(binary);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--plain-http", "--data"])
            .arg(&data)
            .arg("--keys")
            .arg(keys)
            .arg("--bundle")
            .arg(bundle)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        if let Some(mode) = hostile {
            cmd.args(["--hostile", mode]);
        }
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("chat-server listening")) {
                let port = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| anyhow!("no port in {line:?}"))?;
                return Ok(Self { child, port, data });
            }
            if let Some(status) = child.try_wait()? {
                bail!("chat-server exited with {status}: {text}");
            }
            if Instant::now() > deadline {
                bail!("chat-server did not start: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `chatctl` under test in the workspace root; its stdout, or an error with both streams.
pub fn chatctl(args: &[&str]) -> Result<String> {
    let out = Command::new(&binaries().chatctl)
        .args(args)
        .current_dir(workspace_root())
        .output()?;
    if !out.status.success() {
        bail!(
            "chatctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo xtask wasm`, once per test run (every bundle of the run shares its output).
pub fn wasm_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = out_dir("browser-wasm");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["run", "--quiet", "-p", "xtask", "--", "wasm", "--out"])
            .arg(&dir)
            .status()
            .expect("cannot run cargo xtask wasm");
        assert!(status.success(), "cargo xtask wasm failed");
        dir
    })
}

/// `chatctl bundle` + `chatctl sign` into `dir`.
pub fn signed_bundle(keys: &Path, dir: &Path, version: &str, expires: &str) -> Result<()> {
    let (k, d) = (keys.display().to_string(), dir.display().to_string());
    let w = wasm_dir().display().to_string();
    chatctl(&["bundle", "--keys", &k, "--wasm", &w, "--out", &d])?;
    sign(keys, dir, version, expires)
}

/// `chatctl sign` of `dir` with the release key in `keys`.
pub fn sign(keys: &Path, dir: &Path, version: &str, expires: &str) -> Result<()> {
    let key = keys.join("release.key").display().to_string();
    chatctl(&[
        "sign",
        "--key",
        &key,
        "--version",
        version,
        "--expires",
        expires,
        &dir.display().to_string(),
    ])?;
    Ok(())
}

/// One key directory, one signed bundle, one server.
pub struct Site {
    pub keys: Keys,
    pub work: tempfile::TempDir,
    pub server: BundleServer,
}

impl Site {
    /// A bundle signed as 1.0.0 (valid 30 days), served by `chat-server` (`hostile`: by
    /// `chat-server-hostile --hostile MODE`).
    pub fn new(hostile: Option<&str>) -> Result<Self> {
        let keys = Keys::new()?;
        let work = tempfile::tempdir()?;
        let bundle = work.path().join("bundle");
        signed_bundle(keys.path(), &bundle, "1.0.0", "30d")?;
        let server = BundleServer::start(keys.path(), work.path(), &bundle, hostile)?;
        Ok(Self { keys, work, server })
    }

    /// The directory the server serves: a test may change it between page loads.
    pub fn bundle(&self) -> PathBuf {
        self.work.path().join("bundle")
    }

    /// A browser profile directory by name (kept across launches).
    pub fn profile(&self, name: &str) -> PathBuf {
        self.work.path().join("profiles").join(name)
    }
}

/// Loads the site in a fresh profile and returns the loader's verdict and whether the app ran.
pub async fn verdict_in_fresh_profile(site: &Site, name: &str) -> Result<(String, bool)> {
    let browser = Browser::launch(&site.profile(name)).await?;
    let page = browser.page().await?;
    page.goto(&site.server.url()).await?;
    let verdict = page.verdict().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = page.app_started().await?;
    if verdict.starts_with("rejected") {
        page.screenshot(&out_dir("browser-screenshots").join(format!("refusal-{name}.png")))
            .await?;
    }
    Ok((verdict, started))
}

/// Appends `bytes` to the file at `path`.
pub fn append(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut contents = std::fs::read(path)?;
    contents.extend_from_slice(bytes);
    std::fs::write(path, contents)?;
    Ok(())
}
