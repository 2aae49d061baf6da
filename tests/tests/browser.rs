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

// ---- message format version 2, alerts, safety numbers, key changes, reconnects, unlock,
// keyboard and phone width ----

use chat_tests::browser::Page;

/// Registers `name` in a new profile of `site` and returns the browser, its app closed.
async fn registered(site: &Site, name: &str) -> Browser {
    let browser = Browser::launch(&site.profile(name))
        .await
        .expect("chromium");
    let page = browser.page().await.expect("page");
    page.goto(&site.server.url()).await.expect("goto");
    assert_eq!(page.verdict().await.expect("verdict"), "verified");
    page.register(name).await.expect("register");
    // Leave the app, so that later tabs of this profile are the only ones running it.
    page.goto("about:blank").await.expect("leave");
    drop(page);
    browser
}

/// A new tab of `browser` on `site`'s app, logged in (the profile registered before).
async fn logged_in<'a>(browser: &'a Browser, site: &Site) -> Page<'a> {
    let page = browser.page().await.expect("page");
    page.goto(&site.server.url()).await.expect("goto");
    page.wait_logged_in().await.expect("login");
    page
}

/// [`logged_in`], with the conversation with `peer` open.
async fn chatting<'a>(browser: &'a Browser, site: &Site, peer: &str) -> Page<'a> {
    let page = logged_in(browser, site).await;
    page.open_conversation(peer).await.expect("open");
    page
}

/// The `data-alert` kinds of the alerts `page` shows above its conversation, oldest first.
async fn alert_kinds(page: &Page<'_>) -> Vec<String> {
    let v = page
        .eval("[...document.querySelectorAll('#alerts [data-alert]')].map(e => e.dataset.alert)")
        .await
        .expect("alerts");
    serde_json::from_value(v).expect("alert list")
}

/// The texts of the incoming messages `page` shows, in order.
async fn incoming_texts(page: &Page<'_>) -> Vec<String> {
    let v = page
        .eval("[...document.querySelectorAll('#messages li.in .text')].map(e => e.textContent)")
        .await
        .expect("texts");
    serde_json::from_value(v).expect("text list")
}

/// Bob, then Alice register; Alice sends "one", "two", "three" to Bob while his app is closed.
/// Returns both browsers.
async fn three_messages_through(site: &Site) -> (Browser, Browser) {
    let bob_browser = registered(site, "bob").await;
    let alice_browser = registered(site, "alice").await;
    {
        let alice = alice_browser.page().await.expect("page");
        alice.goto(&site.server.url()).await.expect("goto");
        alice.wait_logged_in().await.expect("login");
        alice.open_conversation("bob").await.expect("open");
        for text in ["one", "two", "three"] {
            alice.send(text).await.expect("send");
            alice
                .wait_state(text, &["sent", "delivered", "read"])
                .await
                .expect("sent");
        }
    }
    (alice_browser, bob_browser)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_server_dropped_shows_a_gap_alert_in_the_browser() {
    let site = Site::new(Some("drop-envelope")).expect("site");
    let (_alice, bob_browser) = three_messages_through(&site).await;
    let bob = chatting(&bob_browser, &site, "alice").await;
    bob.wait_incoming("three").await.expect("three arrives");
    bob.wait_for("document.querySelector('#alerts [data-alert=gap]')")
        .await
        .expect("gap alert");
    assert_eq!(incoming_texts(&bob).await, vec!["one", "three"]);
    assert_eq!(alert_kinds(&bob).await, vec!["gap"]);
    let text = bob
        .eval("document.querySelector('#alerts [data-alert=gap]').textContent")
        .await
        .expect("text");
    assert!(
        text.as_str().unwrap_or_default().contains("2..=2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_server_replayed_is_reported_and_shown_once() {
    let site = Site::new(Some("replay-envelope")).expect("site");
    let (_alice, bob_browser) = three_messages_through(&site).await;
    let bob = chatting(&bob_browser, &site, "alice").await;
    bob.wait_incoming("three").await.expect("three arrives");
    bob.wait_for("document.querySelector('#alerts [data-alert=replay]')")
        .await
        .expect("replay alert");
    assert_eq!(incoming_texts(&bob).await, vec!["one", "two", "three"]);
    assert_eq!(alert_kinds(&bob).await, vec!["replay"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_view_is_caught_by_the_tree_head_inside_a_message() {
    // The first registered user (alice) sees the honest log, bob one with a ghost leaf.
    let site = Site::new(Some("split-view")).expect("site");
    let alice_browser = registered(&site, "alice").await;
    let bob_browser = registered(&site, "bob").await;
    let alice = chatting(&alice_browser, &site, "bob").await;
    alice.send("which log do you see?").await.expect("send");
    alice
        .wait_state("which log do you see?", &["sent", "delivered", "read"])
        .await
        .expect("sent");
    let bob = chatting(&bob_browser, &site, "alice").await;
    bob.wait_incoming("which log do you see?")
        .await
        .expect("arrives");
    let alert = bob
        .wait_for("document.querySelector('#alerts [data-alert=split-view]')?.textContent")
        .await
        .expect("split-view alert");
    assert!(
        alert.as_str().unwrap_or_default().contains("SPLIT VIEW"),
        "{alert}"
    );
    bob.screenshot(&out_dir("browser-screenshots").join("split-view.png"))
        .await
        .expect("screenshot");
}

/// Runs `chatctl chat ARGS` against `site` with the native client's home in `home`.
fn native_chat(site: &Site, home: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let server = format!("http://127.0.0.1:{}", site.server.port);
    let dir_key = site.keys.path().join("directory.pub").display().to_string();
    let home = home.display().to_string();
    let mut all = vec![
        "chat",
        "--server",
        &server,
        "--directory-key",
        &dir_key,
        "--home",
        &home,
    ];
    all.extend(args);
    chatctl(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_and_native_client_exchange_version_2_messages_with_counters_and_no_alerts() {
    let site = Site::new(None).expect("site");
    let home = site.work.path().join("native");
    native_chat(&site, &home, &["register", "nate"]).expect("native register");
    let browser = registered(&site, "webby").await;
    let page = chatting(&browser, &site, "nate").await;
    for text in ["first from the browser", "second from the browser"] {
        page.send(text).await.expect("send");
        page.wait_state(text, &["sent"]).await.expect("sent");
    }
    let got = native_chat(&site, &home, &["recv", "--as", "nate", "--json"]).expect("recv");
    let counters: Vec<u64> = got
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .map(|m| m["counter"].as_u64().expect("counter"))
        .collect();
    assert_eq!(counters, vec![1, 2], "the browser writes counters: {got}");
    for text in ["one from the terminal", "two from the terminal"] {
        native_chat(&site, &home, &["send", "--as", "nate", "webby", text]).expect("send");
    }
    page.wait_incoming("two from the terminal")
        .await
        .expect("browser receives");
    // The native client's head (inside its messages) agrees with the browser's directory view.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alert_kinds(&page).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_profiles_show_the_same_sixty_digit_safety_number_and_a_qr_code() {
    let site = Site::new(None).expect("site");
    let alice_browser = registered(&site, "alice").await;
    let bob_browser = registered(&site, "bob").await;
    let mut numbers = Vec::new();
    for (browser, peer) in [(&alice_browser, "bob"), (&bob_browser, "alice")] {
        let page = browser.page().await.expect("page");
        page.goto(&site.server.url()).await.expect("goto");
        page.wait_logged_in().await.expect("login");
        page.open_conversation(peer).await.expect("open");
        page.eval("document.querySelector('#safety-button').click(); true")
            .await
            .expect("open safety number");
        let digits = page
            .wait_for("document.querySelector('#safety-digits')?.textContent")
            .await
            .expect("digits");
        let digits = digits.as_str().unwrap_or_default().replace(' ', "");
        assert_eq!(digits.len(), 60, "{digits}");
        assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{digits}");
        let qr = page
            .eval("document.querySelector('#safety svg.qr')?.getAttribute('aria-label')")
            .await
            .expect("qr");
        assert_eq!(qr, json!("QR code of the safety number"));
        if peer == "bob" {
            page.screenshot(&out_dir("browser-screenshots").join("safety-number.png"))
                .await
                .expect("screenshot");
        }
        numbers.push(digits);
    }
    assert_eq!(numbers[0], numbers[1], "both sides compute one number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_re_registering_with_new_keys_blocks_sending_until_the_new_key_is_accepted() {
    use chat_core::identity::DeviceKeys;
    use chat_core::wire::{ClientFrame, ErrorScope, ServerFrame, SignedPrekey};
    use chatctl::client::{Client, ClientOptions};

    let site = Site::new(None).expect("site");
    let home = site.work.path().join("native");
    native_chat(&site, &home, &["register", "bob"]).expect("native register");
    let browser = registered(&site, "alice").await;
    let page = chatting(&browser, &site, "bob").await;
    page.send("before the change").await.expect("send");
    page.wait_state("before the change", &["sent"])
        .await
        .expect("sent");

    // Bob's device registers new keys (a logged-in re-registration: a new directory leaf).
    let opts = ClientOptions {
        server: format!("http://127.0.0.1:{}", site.server.port),
        ca: site.keys.path().join("tls/ca.pem"),
        home: home.clone(),
        directory_key: site.keys.path().join("directory.pub"),
    };
    let mut bob = Client::open(&opts, "bob").await.expect("bob logs in");
    let keys = DeviceKeys::generate(&mut rand_core::OsRng);
    let identity = keys.identity().public().encode();
    let spk = keys.signed_prekey();
    bob.conn
        .send(&ClientFrame::Register {
            username: "bob".into(),
            device_id: chatctl::client::DEVICE_ID,
            identity_ed25519: identity[1..33].try_into().expect("ed25519"),
            identity_x25519: identity[33..65].try_into().expect("x25519"),
            identity_signature: identity[65..129].try_into().expect("signature"),
            signed_prekey: SignedPrekey {
                id: spk.id,
                public: *spk.key.as_bytes(),
                signature: spk.signature.to_bytes(),
            },
            one_time_prekeys: Vec::new(),
        })
        .await
        .expect("send register");
    bob.conn
        .wait_for(
            |f| matches!(f, ServerFrame::Registered { .. }),
            |s| *s == ErrorScope::Connection,
        )
        .await
        .expect("new keys registered");

    page.send("after the change").await.expect("send");
    assert_eq!(
        page.wait_state("after the change", &["failed", "sent"])
            .await
            .expect("state"),
        "failed",
        "a message went out under the changed key"
    );
    page.wait_for("document.querySelector('#key-warning [data-alert=changed]')")
        .await
        .expect("the prominent warning");
    assert_eq!(
        page.eval("document.querySelector('#send').disabled")
            .await
            .expect("send button"),
        json!(true),
        "sending stays blocked"
    );
    page.screenshot(&out_dir("browser-screenshots").join("key-change.png"))
        .await
        .expect("screenshot");
    page.send("still blocked").await.expect("send");
    assert_eq!(
        page.wait_state("still blocked", &["failed", "sent"])
            .await
            .expect("state"),
        "failed"
    );

    // Alice compares the safety number and accepts the new key: sending works again.
    page.eval("document.querySelector('#key-warning button').click(); true")
        .await
        .expect("compare");
    page.wait_for("document.querySelector('#accept-key')")
        .await
        .expect("accept button");
    page.eval("document.querySelector('#accept-key').click(); true")
        .await
        .expect("accept");
    page.wait_for("!document.querySelector('#key-warning [data-alert]') && !document.querySelector('#send').disabled")
        .await
        .expect("warning gone");
    page.send("after accepting").await.expect("send");
    assert_eq!(
        page.wait_state("after accepting", &["failed", "sent"])
            .await
            .expect("state"),
        "sent"
    );
}

/// A `chat-server` started by the test itself on a fixed port; killed on drop.
struct FixedPortServer(std::process::Child);

impl FixedPortServer {
    /// Serves `bundle` with the data in `data` on `127.0.0.1:port` (after a restart).
    fn start(
        keys: &std::path::Path,
        data: &std::path::Path,
        bundle: &std::path::Path,
        port: u16,
        log: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log)?;
        let mut child = std::process::Command::new(&chat_tests::binaries().chat_server)
            .args([
                "serve",
                "--plain-http",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data",
            ])
            .arg(data)
            .arg("--keys")
            .arg(keys)
            .arg("--bundle")
            .arg(bundle)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("chat-server listening") {
                return Ok(Self(child));
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("chat-server exited with {status}: {text}");
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("chat-server did not start: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FixedPortServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_written_while_the_server_is_down_arrive_after_the_app_reconnects() {
    let site = Site::new(None).expect("site");
    let alice_browser = registered(&site, "alice").await;
    let bob_browser = registered(&site, "bob").await;
    let alice = chatting(&alice_browser, &site, "bob").await;
    let bob = chatting(&bob_browser, &site, "alice").await;
    alice.send("before the restart").await.expect("send");
    bob.wait_incoming("before the restart")
        .await
        .expect("arrives");

    let (port, data, bundle, keys) = (
        site.server.port,
        site.server.data.clone(),
        site.bundle(),
        site.keys.path().to_owned(),
    );
    let log = site.work.path().join("server-restarted.log");
    drop(site.server);
    alice
        .wait_for("document.querySelector('#conn').textContent.includes('retry in')")
        .await
        .expect("alice shows the backoff");
    alice
        .send("written while the server was down")
        .await
        .expect("send");
    assert_eq!(
        alice
            .wait_state("written while the server was down", &["sending", "failed"])
            .await
            .expect("state"),
        "sending"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _server = FixedPortServer::start(&keys, &data, &bundle, port, &log).expect("restart");
    bob.wait_incoming("written while the server was down")
        .await
        .expect("arrives after the reconnect");
    alice
        .wait_state("written while the server was down", &["delivered", "read"])
        .await
        .expect("delivered");
    assert_eq!(alert_kinds(&bob).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_protected_profile_unlocks_only_with_its_passphrase() {
    let site = Site::new(None).expect("site");
    let _bob = registered(&site, "bob").await;
    let browser = Browser::launch(&site.profile("alice"))
        .await
        .expect("chromium");
    let page = browser.page().await.expect("page");
    page.goto(&site.server.url()).await.expect("goto");
    assert_eq!(page.verdict().await.expect("verdict"), "verified");
    page.wait_for("document.querySelector('#register')")
        .await
        .expect("form");
    page.eval(
        "document.querySelector('#username').value = 'alice'; \
         document.querySelector('#passphrase').value = 'correct horse battery'; \
         document.querySelector('#register').requestSubmit(); true",
    )
    .await
    .expect("register");
    page.wait_logged_in().await.expect("login");
    page.open_conversation("bob").await.expect("open");
    page.send("kept under the passphrase").await.expect("send");
    page.wait_state("kept under the passphrase", &["sent", "delivered", "read"])
        .await
        .expect("sent");
    // At rest: a salt and no key in IndexedDB, and the state is ciphertext.
    let at_rest = page
        .eval(
            "new Promise((ok, no) => { const r = indexedDB.open('chatapp-app'); r.onerror = no; \
             r.onsuccess = () => { const s = r.result.transaction('kv').objectStore('kv'); \
             const m = s.get('meta'), st = s.get('state'); st.onsuccess = () => ok({ \
             salt: !!m.result.salt, key: !!m.result.key, \
             plain: new TextDecoder().decode(st.result.sealed).includes('kept under') \
             || new TextDecoder().decode(st.result.sealed).includes('alice') }); }; })",
        )
        .await
        .expect("read IndexedDB");
    assert_eq!(
        at_rest,
        json!({ "salt": true, "key": false, "plain": false })
    );

    page.goto("about:blank").await.expect("blank");
    page.goto(&site.server.url()).await.expect("reload");
    page.wait_for("document.querySelector('#unlock')")
        .await
        .expect("the unlock form");
    assert_ne!(
        page.eval("document.documentElement.dataset.login ?? null")
            .await
            .expect("login"),
        json!("ok"),
        "logged in before the passphrase"
    );
    page.eval(
        "document.querySelector('#passphrase').value = 'wrong horse'; \
         document.querySelector('#unlock').requestSubmit(); true",
    )
    .await
    .expect("wrong passphrase");
    let refusal = page
        .wait_for("document.querySelector('#unlock [role=alert]')?.textContent")
        .await
        .expect("refused");
    assert!(
        refusal
            .as_str()
            .unwrap_or_default()
            .contains("wrong passphrase"),
        "{refusal}"
    );
    page.eval(
        "document.querySelector('#passphrase').value = 'correct horse battery'; \
         document.querySelector('#unlock').requestSubmit(); true",
    )
    .await
    .expect("passphrase");
    page.wait_logged_in().await.expect("unlocked and logged in");
    page.open_conversation("bob").await.expect("open");
    page.wait_state("kept under the passphrase", &["sent", "delivered", "read"])
        .await
        .expect("history decrypted");
}

/// Presses `key` (a DOM key name such as `Tab`, `Enter`, `Escape`) on `page`.
async fn press(page: &Page<'_>, key: &str) {
    let (code, text) = match key {
        "Tab" => (9, ""),
        "Enter" => (13, "\r"),
        "Escape" => (27, ""),
        other => panic!("no key code for {other}"),
    };
    let mut down =
        json!({ "type": "keyDown", "key": key, "code": key, "windowsVirtualKeyCode": code });
    if !text.is_empty() {
        down["text"] = json!(text);
    }
    page.cmd("Input.dispatchKeyEvent", down)
        .await
        .expect("key down");
    page.cmd(
        "Input.dispatchKeyEvent",
        json!({ "type": "keyUp", "key": key, "code": key, "windowsVirtualKeyCode": code }),
    )
    .await
    .expect("key up");
}

/// Types `text` into the focused element, as a keyboard (or an input method) would.
async fn type_text(page: &Page<'_>, text: &str) {
    page.cmd("Input.insertText", json!({ "text": text }))
        .await
        .expect("type");
}

/// Presses Tab until the focused element matches `selector` (at most 30 times).
async fn tab_to(page: &Page<'_>, selector: &str) {
    for _ in 0..30 {
        let here = page
            .eval(&format!(
                "document.activeElement?.matches({selector:?}) ?? false"
            ))
            .await
            .expect("focus");
        if here == json!(true) {
            return;
        }
        press(page, "Tab").await;
    }
    panic!("Tab never reached {selector}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_flow_works_with_the_keyboard_only_at_phone_width() {
    let site = Site::new(None).expect("site");
    let bob_browser = registered(&site, "bob").await;
    let browser = Browser::launch(&site.profile("alice"))
        .await
        .expect("chromium");
    let page = browser.page().await.expect("page");
    page.cmd(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": true }),
    )
    .await
    .expect("phone width");
    page.goto(&site.server.url()).await.expect("goto");
    assert_eq!(page.verdict().await.expect("verdict"), "verified");
    page.wait_for("document.activeElement?.id === 'username'")
        .await
        .expect("the username field has the focus");
    type_text(&page, "alice").await;
    press(&page, "Enter").await;
    page.wait_logged_in().await.expect("registered");
    tab_to(&page, "#contact").await;
    type_text(&page, "bob").await;
    press(&page, "Enter").await;
    page.wait_for("document.activeElement?.id === 'message-input'")
        .await
        .expect("the composer has the focus");
    type_text(&page, "typed, not clicked").await;
    press(&page, "Enter").await;
    page.wait_state("typed, not clicked", &["sent", "delivered", "read"])
        .await
        .expect("sent");
    // The safety number opens and closes from the keyboard.
    tab_to(&page, "#safety-button").await;
    press(&page, "Enter").await;
    page.wait_for(
        "document.querySelector('#safety').open && document.querySelector('#safety-digits')",
    )
    .await
    .expect("safety number");
    press(&page, "Escape").await;
    page.wait_for("!document.querySelector('#safety').open")
        .await
        .expect("dialog closed");
    let bob = chatting(&bob_browser, &site, "alice").await;
    bob.wait_incoming("typed, not clicked")
        .await
        .expect("arrives");
    let overflow = page
        .eval("document.documentElement.scrollWidth")
        .await
        .expect("width");
    assert!(
        overflow.as_u64().unwrap_or(u64::MAX) <= 375,
        "wider than the phone: {overflow}"
    );
    page.screenshot(&out_dir("browser-screenshots").join("keyboard-phone-375.png"))
        .await
        .expect("screenshot");
}

// ---- group conversations (sender keys over the pairwise sessions) ----

/// Creates the group `name` with `members` in `page`'s app and waits until it is open.
async fn create_group(page: &Page<'_>, name: &str, members: &str) {
    page.eval(&format!(
        "document.querySelector('#new-group-box').open = true; \
         document.querySelector('#group-name').value = {name:?}; \
         document.querySelector('#group-members').value = {members:?}; \
         document.querySelector('#new-group').requestSubmit(); true"
    ))
    .await
    .expect("create group");
    page.wait_for(&format!(
        "document.querySelector('#peer[data-group]')?.textContent === {name:?}"
    ))
    .await
    .expect("the group is open");
}

/// Waits until the group `name` is in `page`'s contact list, then opens it.
async fn open_group(page: &Page<'_>, name: &str) {
    page.wait_for(&format!(
        "(() => {{ const b = [...document.querySelectorAll('#contacts button[data-group]')]\
         .find(b => b.textContent.includes({name:?})); if (b) b.click(); return !!b; }})()"
    ))
    .await
    .expect("the group appears in the contact list");
    page.wait_for(&format!(
        "document.querySelector('#peer[data-group]')?.textContent === {name:?}"
    ))
    .await
    .expect("the group is open");
}

/// Waits for the incoming `text` in the open conversation and returns the sender it shows.
async fn incoming_from(page: &Page<'_>, text: &str) -> String {
    page.wait_incoming(text).await.expect("arrives");
    let from = page
        .eval(&format!(
            "[...document.querySelectorAll('#messages li.in')]\
             .find(l => l.querySelector('.text').textContent === {text:?})\
             ?.querySelector('.from')?.textContent ?? null"
        ))
        .await
        .expect("sender");
    from.as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_profiles_in_a_group_each_message_reaches_both_others() {
    let site = Site::new(None).expect("site");
    let browsers = [
        registered(&site, "alice").await,
        registered(&site, "bob").await,
        registered(&site, "carol").await,
    ];
    let alice = logged_in(&browsers[0], &site).await;
    let bob = logged_in(&browsers[1], &site).await;
    let carol = logged_in(&browsers[2], &site).await;
    create_group(&alice, "weekend", "bob, carol").await;
    open_group(&bob, "weekend").await;
    open_group(&carol, "weekend").await;
    let members = bob
        .eval("[...document.querySelectorAll('#group-members li')].map(l => l.dataset.member)")
        .await
        .expect("members");
    assert_eq!(members, json!(["alice", "bob", "carol"]));

    let pages = [("alice", &alice), ("bob", &bob), ("carol", &carol)];
    for (sender, page) in pages {
        let text = format!("{sender} to the group, marker 51c{}", sender.len());
        page.send(&text).await.expect("send");
        for (receiver, other) in pages {
            if receiver != sender {
                assert_eq!(
                    incoming_from(other, &text).await,
                    sender,
                    "{receiver} shows the sender"
                );
            }
        }
        assert_eq!(
            page.wait_state(&text, &["sent"]).await.expect("sent"),
            "sent",
            "every member device acknowledged"
        );
    }
    for (name, page) in pages {
        assert_eq!(
            incoming_texts(page).await.len(),
            2,
            "{name} shows exactly the two others"
        );
        assert_eq!(alert_kinds(page).await, Vec::<String>::new(), "{name}");
    }
    alice
        .screenshot(&out_dir("browser-screenshots").join("group.png"))
        .await
        .expect("screenshot");
    for secret in ["to the group, marker", "weekend"] {
        assert_eq!(
            dir_contains(&site.server.data, secret.as_bytes()),
            None,
            "plaintext {secret:?} reached the server's data directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_group_member_cannot_read_later_messages() {
    use chat_core::wire::ClientFrame;
    use chatctl::client::{Client, ClientOptions};

    // A curious server records every envelope: the one sent to a remaining member after the
    // removal is then handed to the removed member as well, and must not decrypt.
    let site = Site::new(Some("snoop")).expect("site");
    let browsers = [
        registered(&site, "alice").await,
        registered(&site, "bob").await,
        registered(&site, "carol").await,
    ];
    let alice = logged_in(&browsers[0], &site).await;
    let bob = logged_in(&browsers[1], &site).await;
    let carol = logged_in(&browsers[2], &site).await;
    create_group(&alice, "project", "bob carol").await;
    open_group(&bob, "project").await;
    open_group(&carol, "project").await;
    alice.send("before the removal").await.expect("send");
    bob.wait_incoming("before the removal").await.expect("bob");
    carol
        .wait_incoming("before the removal")
        .await
        .expect("carol");
    carol.send("carol was here").await.expect("send");
    alice.wait_incoming("carol was here").await.expect("alice");
    bob.wait_incoming("carol was here").await.expect("bob");

    alice
        .eval("document.querySelector('#group-members [data-remove=carol]').click(); true")
        .await
        .expect("remove carol");
    alice
        .wait_for(
            "[...document.querySelectorAll('#group-members li')].map(l => l.dataset.member).join() === 'alice,bob'",
        )
        .await
        .expect("carol is gone from alice's list");
    carol
        .wait_for(
            "[...document.querySelectorAll('#messages li.system')].some(l => l.textContent.includes('removed you'))",
        )
        .await
        .expect("carol learns she was removed");
    assert_eq!(
        carol
            .eval("document.querySelector('#send').disabled")
            .await
            .expect("send button"),
        json!(true)
    );
    bob.wait_for(
        "[...document.querySelectorAll('#messages li.system')].some(l => l.textContent.includes('alice removed carol'))",
    )
    .await
    .expect("bob learns carol was removed");

    alice
        .send("after the removal, secret 9c1d")
        .await
        .expect("send");
    assert_eq!(
        incoming_from(&bob, "after the removal, secret 9c1d").await,
        "alice"
    );
    bob.send("bob after the removal").await.expect("send");
    alice
        .wait_incoming("bob after the removal")
        .await
        .expect("alice");
    assert_eq!(
        alice
            .wait_state("after the removal, secret 9c1d", &["sent"])
            .await
            .expect("sent"),
        "sent"
    );

    // The server hands carol the group message it relayed to bob after the removal.
    let snooped = std::fs::read_to_string(site.server.data.join("snooped")).expect("snooped");
    let lines: Vec<(&str, u32, &str)> = snooped
        .lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            Some((it.next()?, it.next()?.parse().ok()?, it.next()?))
        })
        .collect();
    let to_bob = lines
        .iter()
        .rev()
        .find(|(to, _, env)| *to == "bob" && env.starts_with("0103"))
        .expect("a group message (envelope kind 3) relayed to bob")
        .2;
    let carol_device = lines
        .iter()
        .find(|(to, _, _)| *to == "carol")
        .expect("an envelope to carol")
        .1;
    // No group message went to carol after the removal: the last kind 3 to her is alice's first.
    let to_carol_kind3 = lines
        .iter()
        .filter(|(to, _, env)| *to == "carol" && env.starts_with("0103"))
        .count();
    assert_eq!(
        to_carol_kind3, 1,
        "carol was sent group messages after her removal"
    );
    let home = site.work.path().join("mallory");
    native_chat(&site, &home, &["register", "mallory"]).expect("native register");
    let opts = ClientOptions {
        server: format!("http://127.0.0.1:{}", site.server.port),
        ca: site.keys.path().join("tls/ca.pem"),
        home,
        directory_key: site.keys.path().join("directory.pub"),
    };
    let mut mallory = Client::open(&opts, "mallory")
        .await
        .expect("mallory logs in");
    let mut message_id = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut message_id);
    mallory
        .conn
        .send(&ClientFrame::Send {
            message_id,
            to_user: "carol".into(),
            to_device: carol_device,
            envelope: hex::decode(to_bob).expect("hex"),
        })
        .await
        .expect("relay to carol");
    let event = carol
        .wait_for("document.querySelector('#messages li[data-alert=undecryptable]')?.textContent")
        .await
        .expect("carol's app records an undecryptable group message");
    assert!(
        event
            .as_str()
            .unwrap_or_default()
            .contains("unknown-sender"),
        "{event}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shown = incoming_texts(&carol).await;
    assert_eq!(
        shown,
        vec!["before the removal"],
        "carol shows only what was sent before"
    );
}
