//! The browser client in real headless Chromium (Debian `chromium`), driven from Rust over the
//! DevTools protocol: the loader's refusals, two browser profiles chatting, a browser and the
//! native `chatctl chat` client chatting, a key-substituting server, screenshots and the
//! navigation and ratchet benchmark. A missing Chromium fails these tests; they never skip.
//!
//! Screenshots go to `target/browser-screenshots/`; `CHATAPP_WRITE_BENCH=1` rewrites the browser
//! section of `docs/BENCHMARKS.md` with the figures of the benchmark test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use chat_tests::{Keys, binaries, dir_contains};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, oneshot};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn out_dir(name: &str) -> PathBuf {
    let dir = workspace_root().join("target").join(name);
    std::fs::create_dir_all(&dir).expect("create output dir");
    dir
}

// ---- a minimal DevTools protocol client ----

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One headless Chromium process with its own profile directory.
struct Browser {
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
    async fn launch(profile: &Path) -> Result<Self> {
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

    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
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
    async fn page(&self) -> Result<Page<'_>> {
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

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Page<'_> {
    async fn cmd(&self, method: &str, params: Value) -> Result<Value> {
        self.browser.call(Some(&self.session), method, params).await
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.cmd("Page.navigate", json!({ "url": url })).await?;
        Ok(())
    }

    /// Evaluates `js` (awaiting a promise) and returns its JSON value.
    async fn eval(&self, js: &str) -> Result<Value> {
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
    async fn wait_for(&self, js: &str) -> Result<Value> {
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

    async fn screenshot(&self, path: &Path) -> Result<()> {
        let shot = self
            .cmd("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("screenshot data")?)?;
        std::fs::write(path, png)?;
        Ok(())
    }

    async fn phone_width(&self) -> Result<()> {
        self.cmd(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 390, "height": 760, "deviceScaleFactor": 2, "mobile": true }),
        )
        .await?;
        Ok(())
    }

    /// The loader's verdict once it has one: `verified` or `rejected:CODE`.
    async fn verdict(&self) -> Result<String> {
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

    async fn app_started(&self) -> Result<bool> {
        Ok(self
            .eval("document.documentElement.dataset.app === 'running'")
            .await?
            == json!(true))
    }

    // ---- driving the app ----

    async fn register(&self, name: &str) -> Result<()> {
        self.wait_for("document.querySelector('#register')").await?;
        self.eval(&format!(
            "document.querySelector('#username').value = {name:?}; \
             document.querySelector('#register').requestSubmit(); true"
        ))
        .await?;
        self.wait_logged_in().await
    }

    async fn wait_logged_in(&self) -> Result<()> {
        self.wait_for("document.documentElement.dataset.login === 'ok'")
            .await?;
        Ok(())
    }

    async fn open_conversation(&self, peer: &str) -> Result<()> {
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

    async fn send(&self, text: &str) -> Result<()> {
        self.eval(&format!(
            "document.querySelector('#message-input').value = {text:?}; \
             document.querySelector('#composer').requestSubmit(); true"
        ))
        .await?;
        Ok(())
    }

    async fn wait_incoming(&self, text: &str) -> Result<()> {
        self.wait_for(&format!(
            "[...document.querySelectorAll('#messages li.in .text')].some(e => e.textContent === {text:?})"
        ))
        .await?;
        Ok(())
    }

    /// The state (sending, sent, delivered, read, failed) of the outgoing message `text`.
    async fn wait_state(&self, text: &str, states: &[&str]) -> Result<String> {
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
struct BundleServer {
    child: Child,
    port: u16,
    data: PathBuf,
}

impl BundleServer {
    fn start(keys: &Path, work: &Path, bundle: &Path, hostile: Option<&str>) -> Result<Self> {
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

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chatctl(args: &[&str]) -> Result<String> {
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
fn wasm_dir() -> &'static Path {
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
fn signed_bundle(keys: &Path, dir: &Path, version: &str, expires: &str) -> Result<()> {
    let (k, d) = (keys.display().to_string(), dir.display().to_string());
    let w = wasm_dir().display().to_string();
    chatctl(&["bundle", "--keys", &k, "--wasm", &w, "--out", &d])?;
    sign(keys, dir, version, expires)
}

fn sign(keys: &Path, dir: &Path, version: &str, expires: &str) -> Result<()> {
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
struct Site {
    keys: Keys,
    work: tempfile::TempDir,
    server: BundleServer,
}

impl Site {
    fn new(hostile: Option<&str>) -> Result<Self> {
        let keys = Keys::new()?;
        let work = tempfile::tempdir()?;
        let bundle = work.path().join("bundle");
        signed_bundle(keys.path(), &bundle, "1.0.0", "30d")?;
        let server = BundleServer::start(keys.path(), work.path(), &bundle, hostile)?;
        Ok(Self { keys, work, server })
    }

    fn bundle(&self) -> PathBuf {
        self.work.path().join("bundle")
    }

    fn profile(&self, name: &str) -> PathBuf {
        self.work.path().join("profiles").join(name)
    }
}

/// Loads the site in a fresh profile and returns the loader's verdict and whether the app ran.
async fn verdict_in_fresh_profile(site: &Site, name: &str) -> Result<(String, bool)> {
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

fn append(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut contents = std::fs::read(path)?;
    contents.extend_from_slice(bytes);
    std::fs::write(path, contents)?;
    Ok(())
}

// ---- the loader ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_bundle_verifies_and_the_app_starts() {
    let site = Site::new(None).expect("site");
    let (verdict, started) = verdict_in_fresh_profile(&site, "ok").await.expect("load");
    assert_eq!(verdict, "verified");
    assert!(started, "the app did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_js_file_is_refused_and_no_app_code_runs() {
    let site = Site::new(None).expect("site");
    append(
        &site.bundle().join("app/main.js"),
        b"\ndocument.title = 'owned';\n",
    )
    .expect("tamper");
    let (verdict, started) = verdict_in_fresh_profile(&site, "js").await.expect("load");
    assert_eq!(verdict, "rejected:file-mismatch");
    assert!(!started, "app code ran after a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_wasm_file_is_refused_and_no_app_code_runs() {
    let site = Site::new(None).expect("site");
    let wasm = site.bundle().join("chat_core.wasm");
    let mut bytes = std::fs::read(&wasm).expect("read");
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    std::fs::write(&wasm, bytes).expect("tamper");
    let (verdict, started) = verdict_in_fresh_profile(&site, "wasm").await.expect("load");
    assert_eq!(verdict, "rejected:file-mismatch");
    assert!(!started, "app code ran after a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_file_referenced_by_the_page_is_refused() {
    let site = Site::new(None).expect("site");
    let index = site.bundle().join("index.html");
    let html = std::fs::read_to_string(&index).expect("read");
    std::fs::write(
        &index,
        html.replace(
            "</head>",
            "<link rel=\"stylesheet\" href=\"extra.css\">\n</head>",
        ),
    )
    .expect("write");
    // Signed with the reference, then a file appears that the manifest does not list.
    sign(site.keys.path(), &site.bundle(), "1.0.1", "30d").expect("sign");
    std::fs::write(site.bundle().join("extra.css"), "body { display: none }").expect("extra");
    let (verdict, started) = verdict_in_fresh_profile(&site, "unlisted")
        .await
        .expect("load");
    assert_eq!(verdict, "rejected:missing-file");
    assert!(!started, "app code ran after a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_signed_by_another_key_is_refused() {
    let site = Site::new(None).expect("site");
    let other = Keys::new().expect("other keys");
    sign(other.path(), &site.bundle(), "1.0.0", "30d").expect("sign");
    let (verdict, started) = verdict_in_fresh_profile(&site, "foreign")
        .await
        .expect("load");
    assert_eq!(verdict, "rejected:unknown-key");
    assert!(!started, "app code ran after a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_manifest_is_refused() {
    let site = Site::new(None).expect("site");
    sign(site.keys.path(), &site.bundle(), "1.0.0", "1s").expect("sign");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (verdict, started) = verdict_in_fresh_profile(&site, "expired")
        .await
        .expect("load");
    assert_eq!(verdict, "rejected:expired");
    assert!(!started, "app code ran after a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_version_after_a_higher_one_was_seen_by_the_profile_is_refused() {
    let site = Site::new(None).expect("site");
    sign(site.keys.path(), &site.bundle(), "2.0.0", "30d").expect("sign 2.0.0");
    let browser = Browser::launch(&site.profile("rollback"))
        .await
        .expect("chromium");
    let page = browser.page().await.expect("page");
    page.goto(&site.server.url()).await.expect("goto");
    assert_eq!(page.verdict().await.expect("verdict"), "verified");
    // The server now serves an older, validly signed release to the same profile.
    sign(site.keys.path(), &site.bundle(), "1.0.0", "30d").expect("sign 1.0.0");
    page.goto("about:blank").await.expect("blank");
    page.goto(&site.server.url()).await.expect("goto again");
    assert_eq!(page.verdict().await.expect("verdict"), "rejected:rollback");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!page.app_started().await.expect("marker"));
    page.screenshot(&out_dir("browser-screenshots").join("refusal-rollback.png"))
        .await
        .expect("screenshot");
}

// ---- chatting ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_profiles_chat_both_ways_and_offline_messages_arrive_on_return() {
    let site = Site::new(None).expect("site");
    let alice_browser = Browser::launch(&site.profile("alice"))
        .await
        .expect("chromium");
    let alice = alice_browser.page().await.expect("page");
    alice.goto(&site.server.url()).await.expect("goto");
    assert_eq!(alice.verdict().await.expect("verdict"), "verified");
    alice.register("alice").await.expect("register alice");

    let bob_browser = Browser::launch(&site.profile("bob"))
        .await
        .expect("chromium");
    let bob = bob_browser.page().await.expect("page");
    bob.goto(&site.server.url()).await.expect("goto");
    assert_eq!(bob.verdict().await.expect("verdict"), "verified");
    bob.register("bob").await.expect("register bob");

    alice.open_conversation("bob").await.expect("open");
    alice
        .send("hello bob, secret marker 7f3a")
        .await
        .expect("send");
    bob.open_conversation("alice").await.expect("open");
    bob.wait_incoming("hello bob, secret marker 7f3a")
        .await
        .expect("bob receives");
    bob.send("hi alice!").await.expect("reply");
    alice
        .wait_incoming("hi alice!")
        .await
        .expect("alice receives");
    assert_eq!(
        alice
            .wait_state("hello bob, secret marker 7f3a", &["read"])
            .await
            .expect("read receipt"),
        "read"
    );
    alice
        .screenshot(&out_dir("browser-screenshots").join("conversation.png"))
        .await
        .expect("screenshot");
    alice.phone_width().await.expect("phone width");
    alice
        .screenshot(&out_dir("browser-screenshots").join("conversation-phone.png"))
        .await
        .expect("screenshot");

    // Bob closes his browser; alice writes; bob comes back with the same profile.
    drop(bob);
    drop(bob_browser);
    alice.send("while you were away").await.expect("send");
    assert_eq!(
        alice
            .wait_state("while you were away", &["sent"])
            .await
            .expect("stored by the server"),
        "sent"
    );
    let bob_browser = Browser::launch(&site.profile("bob"))
        .await
        .expect("chromium");
    let bob = bob_browser.page().await.expect("page");
    bob.goto(&site.server.url()).await.expect("goto");
    assert_eq!(bob.verdict().await.expect("verdict"), "verified");
    bob.wait_logged_in().await.expect("bob logs in again");
    bob.open_conversation("alice").await.expect("open");
    bob.wait_incoming("while you were away")
        .await
        .expect("offline message arrives");
    alice
        .wait_state("while you were away", &["delivered", "read"])
        .await
        .expect("delivered");

    for secret in ["secret marker 7f3a", "while you were away", "hi alice!"] {
        assert_eq!(
            dir_contains(&site.server.data, secret.as_bytes()),
            None,
            "plaintext {secret:?} reached the server's data directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_and_the_native_chatctl_client_chat_with_each_other() {
    let site = Site::new(None).expect("site");
    let browser = Browser::launch(&site.profile("web"))
        .await
        .expect("chromium");
    let page = browser.page().await.expect("page");
    page.goto(&site.server.url()).await.expect("goto");
    assert_eq!(page.verdict().await.expect("verdict"), "verified");
    page.register("webby").await.expect("register");

    let home = site.work.path().join("native");
    let server = format!("http://127.0.0.1:{}", site.server.port);
    let dir_key = site.keys.path().join("directory.pub");
    let native = |args: &[&str]| {
        let mut all = vec!["chat", "--server", &server];
        let dk = dir_key.display().to_string();
        let h = home.display().to_string();
        all.extend(["--directory-key", &dk, "--home", &h]);
        all.extend(args);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        chatctl(&refs)
    };
    native(&["register", "nate"]).expect("native register");
    native(&["send", "--as", "nate", "webby", "hello from the terminal"]).expect("native send");
    page.open_conversation("nate").await.expect("open");
    page.wait_incoming("hello from the terminal")
        .await
        .expect("browser receives from native");
    page.send("hello from the browser").await.expect("send");
    page.wait_state("hello from the browser", &["sent"])
        .await
        .expect("sent");
    let got = native(&["recv", "--as", "nate"]).expect("native recv");
    assert!(
        got.contains("hello from the browser"),
        "native client got: {got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_substituting_a_contacts_key_is_caught_and_nothing_is_encrypted_to_it() {
    let site = Site::new(Some("substitute-bundle")).expect("site");
    let bob_browser = Browser::launch(&site.profile("bob"))
        .await
        .expect("chromium");
    let bob = bob_browser.page().await.expect("page");
    bob.goto(&site.server.url()).await.expect("goto");
    bob.register("bob").await.expect("register bob");
    let alice_browser = Browser::launch(&site.profile("alice"))
        .await
        .expect("chromium");
    let alice = alice_browser.page().await.expect("page");
    alice.goto(&site.server.url()).await.expect("goto");
    alice.register("alice").await.expect("register alice");
    alice.open_conversation("bob").await.expect("open");
    alice.send("for bob only").await.expect("send");
    assert_eq!(
        alice
            .wait_state("for bob only", &["failed"])
            .await
            .expect("refused"),
        "failed"
    );
    let alert = alice
        .wait_for("document.querySelector('[data-alert=mismatch]')?.textContent")
        .await
        .expect("the UI shows the verification failure");
    assert!(
        alert
            .as_str()
            .unwrap_or_default()
            .contains("differ from the key directory"),
        "{alert}"
    );
    // Nothing was queued or sent for bob: the outbox is empty and bob receives nothing.
    bob.open_conversation("alice").await.expect("open");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let incoming = bob
        .eval("document.querySelectorAll('#messages li').length")
        .await
        .expect("count");
    assert_eq!(incoming, json!(0), "bob received something");
    alice
        .screenshot(&out_dir("browser-screenshots").join("key-substitution.png"))
        .await
        .expect("screenshot");
}

// ---- benchmark ----

/// Median of `samples` (milliseconds).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchmark_verified_navigation_against_unverified_and_ratchet_throughput() {
    let site = Site::new(None).expect("site");
    // The same bundle without the loader: a page that imports the app and the wasm directly.
    // Written next to the signed files only for this measurement; never shipped.
    let directory_b64 = std::fs::read_to_string(site.bundle().join("loader.js"))
        .expect("loader")
        .lines()
        .find_map(|l| {
            l.strip_prefix("const DIRECTORY_PUBLIC_KEY = ")
                .map(|v| v.trim_end_matches(';').to_owned())
        })
        .expect("baked directory key");
    std::fs::write(
        site.bundle().join("plain.html"),
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <link rel=\"stylesheet\" href=\"loader.css\"><link rel=\"stylesheet\" href=\"app/app.css\">\
         <script type=\"module\" src=\"plain.js\"></script></head>\
         <body><header id=\"release\"></header><main id=\"app\"></main></body></html>",
    )
    .expect("plain.html");
    std::fs::write(
        site.bundle().join("plain.js"),
        format!(
            "import {{ start }} from './app/main.js';\n\
             const key = Uint8Array.from(atob({directory_b64}), (c) => c.charCodeAt(0));\n\
             const wasm = await WebAssembly.compileStreaming(fetch('chat_core.wasm'));\n\
             await start({{ mount: document.getElementById('app'), wasm, release: {{}}, directoryKey: key }});\n"
        ),
    )
    .expect("plain.js");
    let browser = Browser::launch(&site.profile("bench"))
        .await
        .expect("chromium");
    let page = browser.page().await.expect("page");
    let base = site.server.url();
    let measure = |url: String| {
        let page = &page;
        async move {
            page.goto("about:blank").await?;
            page.goto(&url).await?;
            page.wait_for("window.chatappStartedAt")
                .await?
                .as_f64()
                .context("time")
        }
    };
    // Warm up both (compile caches, the service worker pin), then alternate.
    for _ in 0..2 {
        measure(base.clone()).await.expect("verified");
        measure(format!("{base}plain.html")).await.expect("plain");
    }
    let (mut verified, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        verified.push(measure(base.clone()).await.expect("verified"));
        plain.push(measure(format!("{base}plain.html")).await.expect("plain"));
    }
    let (v, p) = (median(verified), median(plain));
    let ratio = v / p;
    let throughput = page
        .eval("window.chatapp.bench(2000)")
        .await
        .expect("ratchet bench");
    let per_second = throughput["perSecond"].as_f64().unwrap_or_default();
    eprintln!(
        "verified {v:.1} ms, unverified {p:.1} ms, ratio {ratio:.2}; ratchet {per_second:.0} msg/s"
    );
    assert!(ratio.is_finite() && per_second > 0.0);
    if std::env::var_os("CHATAPP_WRITE_BENCH").is_some() {
        let version = Command::new("chromium")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let section = format!(
            "<!-- browser:begin -->\n## Browser client (headless Chromium)\n\n\
             `CHATAPP_WRITE_BENCH=1 cargo test -p chat-tests --test browser benchmark` on {version}, \
             2 shared cores, loopback, warm caches, median of 15 alternating navigations.\n\n\
             | measure | value |\n|---|---|\n\
             | navigation to a running app, verified by the loader | {v:.1} ms |\n\
             | the same bundle loaded without verification | {p:.1} ms |\n\
             | ratio (target at most 1.2x) | {ratio:.2}x |\n\
             | ratchet encrypt + decrypt of a 100-byte message in the page (wasm via the JS glue) | {per_second:.0} messages/s |\n\
             <!-- browser:end -->\n"
        );
        let path = workspace_root().join("docs/BENCHMARKS.md");
        let text = std::fs::read_to_string(&path).expect("BENCHMARKS.md");
        let text = match (
            text.find("<!-- browser:begin -->"),
            text.find("<!-- browser:end -->"),
        ) {
            (Some(a), Some(b)) => format!(
                "{}{section}{}",
                &text[..a],
                &text[b + "<!-- browser:end -->\n".len().min(text.len() - b)..]
            ),
            _ => format!("{}\n{section}", text.trim_end()),
        };
        std::fs::write(&path, text).expect("write BENCHMARKS.md");
    }
}
