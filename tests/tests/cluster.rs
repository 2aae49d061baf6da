//! The Docker cluster end to end, against the real engine: `chatctl up` from nothing (offline
//! images from the static musl chat-server and the local nats-server), `ps --json`, an idempotent
//! second `up`, two native clients chatting through the gateway, `scale`, and `down --volumes`
//! leaving nothing labelled with the project. Without a Docker engine these tests fail; they
//! never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chat_tests::{Keys, binaries};
use chatctl::client::{Client, ClientOptions};
use chatctl::runtime::{ContainerStatus, Health};

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Builds (once per run) the static chat-server that goes into the image.
fn musl_server() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(&cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "--target",
                MUSL_TARGET,
                "-p",
                "chat-server",
            ])
            .status()
            .expect("cannot run cargo");
        assert!(
            status.success(),
            "cargo build --release --target {MUSL_TARGET} -p chat-server failed \
             (needs `rustup target add {MUSL_TARGET}` and `apt-get install musl-tools`)"
        );
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("target"));
        let target = if target.is_relative() {
            workspace_root().join(target)
        } else {
            target
        };
        target.join(MUSL_TARGET).join("release/chat-server")
    })
}

/// Fails the test with a clear message when no Docker engine answers.
fn require_docker() {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the cluster tests need a running Docker engine; `docker info` failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("the cluster tests need Docker; cannot run `docker info`: {e}"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A project under test; `down --volumes` when dropped, even after a failure.
struct Project {
    name: String,
    keys: Keys,
    work: tempfile::TempDir,
    port: u16,
}

impl Project {
    fn new(tag: &str) -> Self {
        require_docker();
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
        let started = Instant::now();
        let server = musl_server().display().to_string();
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
        ]);
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

#[test]
fn cluster_comes_up_healthy_is_idempotent_chats_through_the_gateway_scales_and_goes_away() {
    let project = Project::new("life");
    let cold = project.up(2);
    eprintln!("up (2 replicas) took {cold:?}");

    let first = project.ps();
    assert_eq!(
        services_and_health(&first),
        healthy(&[("gateway", 1), ("nats", 1), ("server", 1), ("server", 2)])
    );
    let gateway = first
        .iter()
        .find(|c| c.service.as_str() == "gateway")
        .expect("gateway");
    assert_eq!(
        gateway.ports,
        [format!("127.0.0.1:{}->8443/tcp", project.port)]
    );

    let warm = project.up(2);
    eprintln!("second up took {warm:?}");
    assert_eq!(
        summary(&project.ps()),
        summary(&first),
        "a second `up` with the same config must keep every container"
    );

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let home = project.work.path().join("clients");
        let mut alice = Client::register(&project.options(&home), "alice")
            .await
            .expect("alice registers through the gateway");
        let mut bob = Client::register(&project.options(&home), "bob")
            .await
            .expect("bob registers through the gateway");
        alice
            .send_text("bob", "hello through the gateway")
            .await
            .expect("send");
        let got = bob.receive(Duration::from_secs(2)).await.expect("receive");
        assert_eq!(
            got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["hello through the gateway"]
        );
        bob.send_text("alice", "and back").await.expect("reply");
        let got = alice
            .receive(Duration::from_secs(2))
            .await
            .expect("receive");
        assert_eq!(got.len(), 1);
    });

    project.ok(&["scale", "3"]);
    assert_eq!(
        services_and_health(&project.ps()),
        healthy(&[
            ("gateway", 1),
            ("nats", 1),
            ("server", 1),
            ("server", 2),
            ("server", 3)
        ])
    );
    project.ok(&["scale", "1"]);
    assert_eq!(
        services_and_health(&project.ps()),
        healthy(&[("gateway", 1), ("nats", 1), ("server", 1)])
    );

    project.ok(&["down", "--volumes"]);
    for kind in ["container", "network", "volume"] {
        assert_eq!(
            project.labelled(kind),
            Vec::<String>::new(),
            "{kind}s left behind"
        );
    }
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
