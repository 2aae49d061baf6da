//! `chatctl bench` against real systems: chat-server (end-to-end encrypted and `--raw`), NATS
//! core over nats-server's WebSocket listener (Debian `nats-server`) and the bare relay of
//! `chatctl bench relay`. Every driver runs with pipelined senders (the default, up to 16
//! messages a write) and with each message written alone (`--batch 1`), and at a fixed rate
//! where several messages fall due at each timer tick; every run must deliver exactly what it
//! sent. ejabberd and Synapse are driven by `cargo xtask bench-peers` only: they take minutes to
//! install and start.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chat_tests::docker::free_port;
use chat_tests::{Keys, ServerProcess, binaries};

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `port` accepts connections, failing early if `child` exits.
fn wait_for_port(port: u16, child: &mut Killed, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = || std::fs::read_to_string(log).unwrap_or_default();
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{what} exited with {status}:\n{}", log());
        }
        assert!(
            Instant::now() < deadline,
            "{what} not listening within 20 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> Killed {
    let file = std::fs::File::create(log).expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {what}: {e} (`cargo xtask deps` installs nats-server)")
        });
    Killed(child)
}

/// Runs `chatctl bench SYSTEM --duration 1s --json SCENARIO` and returns (sent, delivered) and
/// the whole report.
fn bench(system: &[String], scenario: &[&str]) -> (u64, u64, serde_json::Value) {
    let out = Command::new(&binaries().chatctl)
        .env("NO_COLOR", "1")
        .arg("bench")
        .args(system)
        .args(["--duration", "1s", "--json"])
        .args(scenario)
        .stdin(Stdio::null())
        .output()
        .expect("chatctl bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let what = format!("chatctl bench {} {}", system.join(" "), scenario.join(" "));
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{what} printed no JSON:\n{stdout}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("bench JSON");
    let count = |key: &str| {
        json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no {key} in {json}"))
    };
    let (sent, delivered) = (count("sent"), count("delivered"));
    eprintln!("{what}: sent {sent}, delivered {delivered}");
    (sent, delivered, json)
}

#[test]
fn every_driver_delivers_what_it_sent_pipelined_and_one_write_at_a_time() {
    let work = tempfile::tempdir().expect("tempdir");

    let (nats_port, nats_ws) = (free_port(), free_port());
    let conf = work.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "host: 127.0.0.1\nport: {nats_port}\nwebsocket {{\n  host: 127.0.0.1\n  port: {nats_ws}\n  no_tls: true\n}}\n"
        ),
    )
    .expect("nats.conf");
    let log = work.path().join("nats.log");
    let mut nats = spawn_logged(
        Command::new("nats-server").arg("-c").arg(&conf),
        &log,
        "nats-server",
    );
    wait_for_port(nats_ws, &mut nats, "nats-server", &log);

    let relay_port = free_port();
    let log = work.path().join("relay.log");
    let mut relay = spawn_logged(
        Command::new(&binaries().chatctl).args([
            "bench",
            "relay",
            "--listen",
            &format!("127.0.0.1:{relay_port}"),
        ]),
        &log,
        "chatctl bench relay",
    );
    wait_for_port(relay_port, &mut relay, "chatctl bench relay", &log);

    let keys = Keys::new().expect("keys");
    // Each chat run registers four users from one address.
    let config = work.path().join("server.toml");
    std::fs::write(&config, "[limits]\nregistrations_per_minute = 1000\n").expect("server.toml");
    let server = ServerProcess::start_with_args(
        keys.path(),
        work.path(),
        &["--config", &config.display().to_string()],
    )
    .expect("chat-server");
    let s = |p: &Path| p.display().to_string();
    let chat = vec![
        "--server-pid".to_owned(),
        server.pid().expect("the server's pid").to_string(),
        "--server".to_owned(),
        server.url(),
        "--ca".into(),
        s(&server.ca()),
        "--directory-key".into(),
        s(&keys.path().join("directory.pub")),
    ];
    let mut raw = chat.clone();
    raw.insert(0, "--raw".into());
    let peer =
        |name: &str, url: String| vec!["--peer".to_owned(), name.into(), "--server".into(), url];
    let systems = [
        ("chat-server e2e", chat),
        ("chat-server --raw", raw),
        ("nats", peer("nats", format!("ws://127.0.0.1:{nats_ws}"))),
        (
            "relay",
            peer("relay", format!("ws://127.0.0.1:{relay_port}")),
        ),
    ];

    for (label, system) in &systems {
        for batch in ["16", "1"] {
            let (sent, delivered, report) =
                bench(system, &["pairs", "--pairs", "2", "--batch", batch]);
            assert_eq!(sent, delivered, "{label}, --batch {batch}: messages lost");
            // CPU over the window: the machine's share always, the server's with --server-pid
            // (the chat rows), both per delivery and above zero for a second of traffic.
            let busy = report["machine_busy_pct"]
                .as_f64()
                .expect("machine_busy_pct");
            assert!(busy > 0.0 && busy <= 100.0, "{label}: {busy}% busy");
            let own = report["load_generator_cpu_us_per_msg"].as_f64();
            assert!(own.is_some_and(|us| us > 0.0), "{label}: {report}");
            let server = report["server_cpu_us_per_msg"].as_f64();
            if label.starts_with("chat-server") {
                assert!(server.is_some_and(|us| us > 0.0), "{label}: {report}");
            } else {
                assert_eq!(server, None, "{label} had no --server-pid: {report}");
            }
            assert!(
                sent >= 100,
                "{label}, --batch {batch}: only {sent} sent in 1 s"
            );
        }
        // 4000/s over two senders against a 1 ms timer: a couple due at every tick.
        let (sent, delivered, _) = bench(system, &["pairs", "--pairs", "2", "--rate", "4000"]);
        assert_eq!(sent, delivered, "{label} at a fixed rate: messages lost");
        assert!(
            (2000..=6000).contains(&sent),
            "{label}: 4000/s for 1 s sent {sent}"
        );
    }
}
