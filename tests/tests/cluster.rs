//! The Docker cluster end to end, against the real engine: `chatctl up --replicas 3` from
//! nothing (offline images from the static musl chat-server and the local nats-server), `ps
//! --json`, an idempotent second `up`, two native clients balanced onto different instances
//! chatting through the gateway, `scale 5` and `scale 2`, and `down --volumes` leaving nothing
//! labelled with the project. Without a Docker engine these tests fail; they never skip.
//!
//! A browser chats through the gateway too: `up --bundle` mounts a signed client into the
//! servers, headless Chromium (the CDP harness of `chat_tests::browser`, trusting only the
//! project's certificate key) loads and verifies it over the gateway's TLS, and chats with a
//! native client.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chat_tests::docker::{free_port, musl_server, require_docker};
use chat_tests::{Keys, binaries};
use chatctl::client::{Client, ClientOptions};
use chatctl::runtime::{ContainerStatus, Health};

/// A project under test; `down --volumes` when dropped, even after a failure.
struct Project {
    name: String,
    keys: Keys,
    work: tempfile::TempDir,
    port: u16,
}

impl Project {
    fn new(tag: &str) -> Self {
        require_docker("cluster");
        Self {
            name: format!("ct-{tag}-{}", std::process::id()),
            keys: Keys::new().expect("keys"),
            work: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
        }
    }

    fn chatctl(&self, args: &[&str]) -> Output {
        let out = Command::new(&binaries().chatctl)
            .current_dir(self.work.path())
            .env("NO_COLOR", "1")
            .env_remove("CHATCTL_PROJECT")
            .args(args)
            .args(["--project", &self.name])
            .output()
            .expect("cannot run chatctl");
        eprintln!(
            "$ chatctl {} --project {}\n{}{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.chatctl(args);
        assert!(out.status.success(), "chatctl {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn up(&self, replicas: u32) -> Duration {
        self.up_with(replicas, &[])
    }

    fn up_with(&self, replicas: u32, extra: &[&str]) -> Duration {
        let server = musl_server().display().to_string();
        let started = Instant::now();
        let keys = self.keys.path().display().to_string();
        self.ok(&[
            "up",
            "--detach",
            "--runtime",
            "docker",
            "--replicas",
            &replicas.to_string(),
            "--port",
            &self.port.to_string(),
            "--keys",
            &keys,
            "--server-binary",
            &server,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>());
        started.elapsed()
    }

    fn ps(&self) -> Vec<ContainerStatus> {
        ContainerStatus::parse_list(&self.ok(&["ps", "--json"])).expect("ps --json")
    }

    fn options(&self, home: &Path) -> ClientOptions {
        ClientOptions {
            server: format!("https://localhost:{}", self.port),
            ca: self.keys.path().join("tls/ca.pem"),
            home: home.to_owned(),
            directory_key: self.keys.path().join("directory.pub"),
        }
    }

    fn labelled(&self, kind: &str) -> Vec<String> {
        let filter = format!("label=io.chatapp.project={}", self.name);
        let args: Vec<&str> = match kind {
            "container" => vec!["ps", "-a", "-q", "--filter", &filter],
            "network" => vec!["network", "ls", "-q", "--filter", &filter],
            _ => vec!["volume", "ls", "-q", "--filter", &filter],
        };
        let out = Command::new("docker").args(&args).output().expect("docker");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // A failed test takes its containers down with it: keep what they logged first.
        if std::thread::panicking() {
            for id in self.labelled("container") {
                if let Ok(out) = Command::new("docker")
                    .args(["logs", "--timestamps", "--tail", "400", &id])
                    .output()
                {
                    eprintln!(
                        "--- docker logs {id} (last 400 lines)\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        let _ = self.chatctl(&["down", "--volumes"]);
    }
}

/// (service, instance, health, container_id) of every container, sorted.
fn summary(ps: &[ContainerStatus]) -> Vec<(String, u32, String, String)> {
    let mut rows: Vec<_> = ps
        .iter()
        .map(|c| {
            (
                c.service.to_string(),
                c.instance,
                c.health.as_str().to_owned(),
                c.container_id.clone(),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn services_and_health(ps: &[ContainerStatus]) -> Vec<(String, u32, String)> {
    summary(ps)
        .into_iter()
        .map(|(s, i, h, _)| (s, i, h))
        .collect()
}

fn healthy(services: &[(&str, u32)]) -> Vec<(String, u32, String)> {
    let mut v: Vec<_> = services
        .iter()
        .map(|(s, i)| ((*s).to_owned(), *i, Health::Healthy.as_str().to_owned()))
        .collect();
    v.sort();
    v
}

/// `(service, instance)` of NATS, the gateway and `servers` servers, all healthy.
fn healthy_cluster(servers: u32) -> Vec<(String, u32, String)> {
    let mut wanted = vec![("gateway", 1), ("nats", 1)];
    wanted.extend((1..=servers).map(|i| ("server", i)));
    healthy(&wanted)
}

/// The gateway's `/gateway/metrics` (fetched with curl, trusting the project CA).
fn gateway_metrics(project: &Project) -> String {
    let ca = project.keys.path().join("tls/ca.pem");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(&ca)
        .arg(format!(
            "https://localhost:{}/gateway/metrics",
            project.port
        ))
        .output()
        .expect("cannot run curl");
    assert!(
        out.status.success(),
        "GET /gateway/metrics failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `upstream address -> value` of one per-upstream gauge in the gateway's metrics.
fn per_upstream(metrics: &str, name: &str) -> Vec<(String, u64)> {
    let prefix = format!("{name}{{upstream=\"");
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (addr, value) = rest.split_once("\"} ")?;
            Some((addr.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until the gateway has probed `n` ready upstreams (it resolves and probes every second).
fn wait_gateway_upstreams_ready(project: &Project, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = gateway_metrics(project);
        let ready = per_upstream(&metrics, "chat_gateway_upstream_ready")
            .into_iter()
            .filter(|(_, v)| *v == 1)
            .count();
        if ready == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not see {n} ready upstreams within 30 s:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One project for the whole life cycle (Docker is slow on shared machines): up with 3
/// replicas from nothing, a second up, two clients on different instances, scale 5 and 2,
/// down. Every phase asserts before the next one starts.
#[test]
fn three_replicas_come_up_healthy_chat_across_instances_stay_put_on_a_second_up_scale_and_go_away()
{
    let project = Project::new("life");
    assert_eq!(
        project.ps(),
        Vec::<ContainerStatus>::new(),
        "the project must start from nothing"
    );

    // From nothing: NATS, the gateway and 3 healthy servers.
    let cold = project.up(3);
    eprintln!("up (3 replicas, from nothing) took {cold:?}");
    let first = project.ps();
    assert_eq!(services_and_health(&first), healthy_cluster(3));
    let gateway = first
        .iter()
        .find(|c| c.service.as_str() == "gateway")
        .expect("gateway");
    assert_eq!(
        gateway.ports,
        [format!("127.0.0.1:{}->8443/tcp", project.port)]
    );

    // A second `up` with the same config restarts nothing.
    let warm = project.up(3);
    eprintln!("second up took {warm:?}");
    assert_eq!(
        summary(&project.ps()),
        summary(&first),
        "a second `up` with the same config must keep every container"
    );

    // Two clients through the gateway land on different instances and chat.
    wait_gateway_upstreams_ready(&project, 3);
    let servers: Vec<String> = first
        .iter()
        .filter(|c| c.service.as_str() == "server")
        .map(|c| c.name.clone())
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let home = project.work.path().join("clients");
        let mut alice = Client::register(&project.options(&home), "alice")
            .await
            .expect("alice registers through the gateway");
        let mut bob = Client::register(&project.options(&home), "bob")
            .await
            .expect("bob registers through the gateway");
        // A server greets with its hostname, which `chatctl up` sets to the container name.
        let (on_a, on_b) = (alice.conn.server_name.clone(), bob.conn.server_name.clone());
        eprintln!("alice is on {on_a}, bob is on {on_b}; servers {servers:?}");
        assert!(
            servers.contains(&on_a),
            "alice's server {on_a:?} is not one of {servers:?}"
        );
        assert!(
            servers.contains(&on_b),
            "bob's server {on_b:?} is not one of {servers:?}"
        );
        assert_ne!(
            on_a, on_b,
            "least connections must put the second client elsewhere"
        );
        let busy = per_upstream(&gateway_metrics(&project), "chat_gateway_upstream_active")
            .into_iter()
            .filter(|(_, active)| *active == 1)
            .count();
        assert_eq!(
            busy, 2,
            "the gateway must count one connection on each of two upstreams"
        );

        alice
            .send_text("bob", "hello from another instance")
            .await
            .expect("send");
        let got = bob.receive(Duration::from_secs(2)).await.expect("receive");
        assert_eq!(
            got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["hello from another instance"]
        );
        bob.send_text("alice", "and back").await.expect("reply");
        let got = alice
            .receive(Duration::from_secs(2))
            .await
            .expect("receive");
        assert_eq!(
            got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["and back"]
        );
    });

    // Scale out, then in.
    project.ok(&["scale", "5"]);
    assert_eq!(services_and_health(&project.ps()), healthy_cluster(5));
    project.ok(&["scale", "2"]);
    assert_eq!(services_and_health(&project.ps()), healthy_cluster(2));

    // Down with volumes leaves nothing labelled with the project.
    project.ok(&["down", "--volumes"]);
    for kind in ["container", "network", "volume"] {
        assert_eq!(
            project.labelled(kind),
            Vec::<String>::new(),
            "{kind}s left behind"
        );
    }
}

/// A browser loads the signed client through the gateway of a 2-replica cluster (`up --bundle`),
/// over the gateway's TLS with the provisioned certificate, and chats with a native client.
#[test]
fn a_browser_loads_the_signed_client_through_the_gateway_and_chats_with_a_native_client() {
    use chat_tests::browser::{Browser, signed_bundle};

    let project = Project::new("web");
    let bundle = project.work.path().join("bundle");
    signed_bundle(project.keys.path(), &bundle, "1.0.0", "30d").expect("a signed bundle");
    let bundle_arg = bundle.display().to_string();
    project.up_with(2, &["--bundle", &bundle_arg]);
    assert_eq!(services_and_health(&project.ps()), healthy_cluster(2));
    wait_gateway_upstreams_ready(&project, 2);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let cert = project.keys.path().join("tls/server.pem");
        let browser = Browser::launch_trusting(&project.work.path().join("profile-web"), &cert)
            .await
            .expect("chromium");
        let page = browser.page().await.expect("page");
        let url = format!("https://localhost:{}/", project.port);
        page.goto(&url).await.expect("goto");
        assert_eq!(
            page.verdict().await.expect("the loader's verdict"),
            "verified",
            "the loader must verify the bundle served through the gateway at {url}"
        );
        assert_eq!(
            page.eval("location.protocol + ' ' + window.isSecureContext")
                .await
                .expect("eval"),
            serde_json::json!("https: true")
        );
        page.register("webby").await.expect("the browser registers");

        let home = project.work.path().join("native");
        let mut nate = Client::register(&project.options(&home), "nate")
            .await
            .expect("nate registers through the gateway");
        nate.send_text("webby", "hello from the terminal")
            .await
            .expect("native send");
        page.open_conversation("nate").await.expect("open");
        page.wait_incoming("hello from the terminal")
            .await
            .expect("the browser receives from the native client");
        page.send("hello from the browser").await.expect("send");
        page.wait_state("hello from the browser", &["sent", "delivered", "read"])
            .await
            .expect("sent");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while got.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the native client got nothing from the browser within 30 s"
            );
            got = nate.receive(Duration::from_secs(2)).await.expect("receive");
        }
        assert_eq!(
            got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["hello from the browser"]
        );
    });
    project.ok(&["down", "--volumes"]);
}

#[test]
fn cluster_commands_exit_3_when_no_engine_answers() {
    let out = Command::new(&binaries().chatctl)
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env("NO_COLOR", "1")
        .args(["ps", "--project", "nobody"])
        .output()
        .expect("chatctl");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Docker engine"));
}
