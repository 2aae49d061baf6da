//! The browser client in real headless Chromium (Debian `chromium`), driven from Rust over the
//! DevTools protocol: the loader's refusals, two browser profiles chatting, a browser and the
//! native `chatctl chat` client chatting, a key-substituting server, screenshots and the
//! navigation and ratchet benchmark. A missing Chromium fails these tests; they never skip.
//!
//! Screenshots go to `target/browser-screenshots/`; `CHATAPP_WRITE_BENCH=1` rewrites the browser
//! section of `docs/BENCHMARKS.md` with the figures of the benchmark test.

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use chat_tests::browser::{
    Browser, Site, append, chatctl, out_dir, sign, verdict_in_fresh_profile,
};
use chat_tests::{Keys, dir_contains, workspace_root};
use serde_json::json;

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
