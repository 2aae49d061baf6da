//! TLS of the chat server and of the gateway, checked by Debian's testssl.sh (its JSON output):
//! no HIGH or CRITICAL finding, only TLS 1.2 and 1.3 offered, only AEAD cipher suites. A missing
//! testssl fails the test (install the Debian package `testssl.sh`, or `cargo xtask deps`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chat_tests::docker::free_port;
use chat_tests::{ServerProcess, World, binaries};

/// Protocols, standard cipher lists, forward secrecy, each cipher per protocol, vulnerabilities:
/// everything but the certificate checks (the certificate comes from the operator's own CA).
const TESTSSL_CHECKS: &[&str] = &["-p", "-s", "-f", "-E", "-U"];

#[derive(Debug)]
struct Finding {
    id: String,
    severity: String,
    finding: String,
}

/// Runs testssl against `127.0.0.1:port` and returns its findings.
fn testssl(port: u16, work: &Path) -> Vec<Finding> {
    let json = work.join(format!("testssl-{port}.json"));
    let start = Instant::now();
    let out = Command::new("testssl")
        .args(TESTSSL_CHECKS)
        .args(["--warnings", "off", "--color", "0", "--quiet", "--jsonfile"])
        .arg(&json)
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .expect("testssl (Debian package testssl.sh) must be installed: run `cargo xtask deps`");
    eprintln!("testssl against port {port} took {:?}", start.elapsed());
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "testssl wrote no JSON ({e}); its output:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let value: serde_json::Value = serde_json::from_str(&text).expect("testssl JSON");
    value
        .as_array()
        .expect("a JSON array of findings")
        .iter()
        .map(|f| Finding {
            id: f["id"].as_str().unwrap_or_default().to_owned(),
            severity: f["severity"].as_str().unwrap_or_default().to_owned(),
            finding: f["finding"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

fn assert_sound_tls(findings: &[Finding], what: &str) {
    let find = |id: &str| {
        findings
            .iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("{what}: testssl reported nothing for {id}"))
    };
    let severe: Vec<&Finding> = findings
        .iter()
        .filter(|f| matches!(f.severity.as_str(), "HIGH" | "CRITICAL"))
        .collect();
    assert!(severe.is_empty(), "{what}: severe findings {severe:#?}");
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            find(old).finding.starts_with("not offered"),
            "{what}: {old} {:?}",
            find(old)
        );
    }
    for current in ["TLS1_2", "TLS1_3"] {
        assert!(
            find(current).finding.starts_with("offered"),
            "{what}: {current} {:?}",
            find(current)
        );
    }
    let ciphers: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.id.starts_with("cipher-tls"))
        .collect();
    assert!(!ciphers.is_empty(), "{what}: no cipher listed");
    for cipher in &ciphers {
        let aead = ["AESGCM", "ChaCha20", "AESCCM"]
            .iter()
            .any(|a| cipher.finding.contains(a));
        assert!(
            aead,
            "{what}: a non-AEAD suite is offered: {}",
            cipher.finding
        );
    }
    eprintln!(
        "{what}: {} findings, none HIGH/CRITICAL; TLS 1.2 + 1.3; {} suites, all AEAD",
        findings.len(),
        ciphers.len()
    );
}

#[test]
fn chat_server_offers_only_tls_1_2_and_1_3_with_aead_suites_and_no_severe_finding() {
    let world = World::new().expect("world");
    let findings = testssl(world.server.port, world.work.path());
    assert_sound_tls(&findings, "chat-server");
}

/// A `chat-server gateway` in front of one server, on a free port.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gateway(server: &ServerProcess, work: &Path) -> (Gateway, u16) {
    let port = free_port();
    let log = std::fs::File::create(work.join("gateway.log")).expect("log");
    let child = Command::new(&binaries().chat_server)
        .args([
            "gateway",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--keys",
        ])
        .arg(&server.keys)
        .args(["--upstream", &format!("127.0.0.1:{}", server.port)])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("chat-server gateway");
    let gateway = Gateway(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the gateway did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (gateway, port)
}

#[test]
fn gateway_offers_only_tls_1_2_and_1_3_with_aead_suites_and_no_severe_finding() {
    let world = World::new().expect("world");
    let (_gateway, port) = start_gateway(&world.server, world.work.path());
    let findings = testssl(port, world.work.path());
    assert_sound_tls(&findings, "gateway");
}
