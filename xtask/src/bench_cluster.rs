//! `cargo xtask bench-cluster [--runs N] [--replicas N] [--duration SECS] [--rate R]`: the local
//! Docker cluster, measured.
//!
//! 1. Start-up: `chatctl up --detach` to all healthy (images cached) against Docker Compose
//!    starting the same containers (a compose file written from `docker inspect` of a cluster
//!    `chatctl up` made: same images, command lines, environment, health checks, network,
//!    volume, key mount and published port) until all are healthy (`docker compose up --wait`,
//!    or `docker-compose up -d` then the same wait when only Compose v1 exists). Runs alternate
//!    which goes first; medians and their ratio.
//! 2. Cross-instance delivery: `chatctl bench pairs --pairs 1 --rate R` through the gateway of a
//!    fresh cluster. Least connections puts the receiver on another instance than the sender;
//!    the gateway's `/gateway/metrics` is read during the run to prove it. Then the same after
//!    `chatctl scale 1` (both on one instance) as the baseline.
//!
//! Rewrites the `bench-cluster` section of docs/BENCHMARKS.md. Every project it makes carries a
//! unique name and is removed (`down --volumes`) even when a step fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench_sign::rewrite_section;
use crate::{status, workspace_root};

const START: &str = "<!-- bench-cluster:start -->";
const END: &str = "<!-- bench-cluster:end -->";
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// How often the Compose side's health is polled (`docker ps`, a process each time: about what
/// this machine sustains without slowing the containers it waits for). `chatctl up` re-reads
/// on engine events instead.
const POLL: Duration = Duration::from_millis(100);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(180);

struct Options {
    runs: usize,
    replicas: u32,
    duration_secs: u64,
    rate: u32,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        runs: 5,
        replicas: 3,
        duration_secs: 10,
        rate: 200,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => o.runs = value()?.parse()?,
            "--replicas" => o.replicas = value()?.parse()?,
            "--duration" => o.duration_secs = value()?.parse()?,
            "--rate" => o.rate = value()?.parse()?,
            other => {
                bail!("unknown argument {other} (--runs N --replicas N --duration SECS --rate R)")
            }
        }
    }
    if o.runs == 0 || o.replicas < 2 {
        bail!("--runs must be at least 1 and --replicas at least 2 (cross-instance delivery)");
    }
    Ok(o)
}

/// Which Compose answers here.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compose {
    /// `docker compose` (v2): `up --wait` waits for health itself.
    V2,
    /// `docker-compose` (v1): no `--wait`; `up -d`, then health is polled like v2 does.
    V1,
}

impl Compose {
    fn detect() -> Result<(Self, String)> {
        let version = |cmd: &mut Command| {
            cmd.output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        if let Some(v) = version(Command::new("docker").args(["compose", "version", "--short"])) {
            return Ok((Compose::V2, format!("docker compose {v}")));
        }
        if let Some(v) = version(Command::new("docker-compose").args(["version", "--short"])) {
            return Ok((Compose::V1, format!("docker-compose {v}")));
        }
        bail!(
            "neither `docker compose` nor `docker-compose` is installed: \
             `apt-get install docker-compose` (Debian) and run again"
        )
    }

    fn command(self, project: &str, file: &Path) -> Command {
        let mut cmd = match self {
            Compose::V2 => {
                let mut c = Command::new("docker");
                c.arg("compose");
                c
            }
            Compose::V1 => Command::new("docker-compose"),
        };
        cmd.args(["-p", project, "-f"]).arg(file);
        cmd
    }
}

/// Paths and names of one benchmark run; removes its projects when dropped.
struct Bench {
    chatctl: PathBuf,
    server: PathBuf,
    work: PathBuf,
    keys: PathBuf,
    port: u16,
    chatctl_project: String,
    compose_project: String,
    compose: Compose,
    compose_file: PathBuf,
}

impl Bench {
    fn chatctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.chatctl);
        cmd.current_dir(&self.work)
            .env("NO_COLOR", "1")
            .env_remove("CHATCTL_PROJECT")
            .args(args);
        cmd
    }

    fn up(&self, replicas: u32) -> Command {
        let (port, replicas) = (self.port.to_string(), replicas.to_string());
        let mut cmd = self.chatctl(&["up", "--detach", "--runtime", "docker"]);
        cmd.args(["--project", &self.chatctl_project, "--replicas", &replicas])
            .args(["--port", &port, "--keys"])
            .arg(&self.keys)
            .arg("--server-binary")
            .arg(&self.server);
        cmd
    }

    fn down(&self) -> Result<()> {
        quiet(&mut self.chatctl(&["down", "--volumes", "--project", &self.chatctl_project]))
    }

    fn compose_down(&self) -> Result<()> {
        let mut cmd = self
            .compose
            .command(&self.compose_project, &self.compose_file);
        cmd.args(["down", "--volumes", "--timeout", "12"]);
        quiet(&mut cmd)
    }

    fn compose_up(&self, containers: usize) -> Result<()> {
        let mut cmd = self
            .compose
            .command(&self.compose_project, &self.compose_file);
        match self.compose {
            Compose::V2 => {
                cmd.args(["up", "--detach", "--wait"]);
                quiet(&mut cmd)
            }
            Compose::V1 => {
                cmd.args(["up", "--detach"]);
                quiet(&mut cmd)?;
                wait_compose_healthy(&self.compose_project, containers)
            }
        }
    }

    fn metrics(&self) -> Result<String> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(self.keys.join("tls/ca.pem"))
            .arg(format!("https://localhost:{}/gateway/metrics", self.port))
            .output()
            .context("cannot run curl (apt-get install curl)")?;
        if !out.status.success() {
            bail!(
                "GET /gateway/metrics: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_upstreams_ready(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let metrics = self.metrics().unwrap_or_default();
            let ready = gauge(&metrics, "chat_gateway_upstream_ready")
                .iter()
                .filter(|(_, v)| *v == 1)
                .count();
            if ready == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the gateway did not see {n} ready upstreams within 60 s:\n{metrics}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// `chatctl bench pairs --pairs 1`, reading the gateway's per-upstream connection counts
    /// while it runs; returns the report and the most distinct upstreams seen busy at once.
    fn delivery(&self, o: &Options) -> Result<(Delivery, usize)> {
        let ca = self.keys.join("tls/ca.pem");
        let dk = self.keys.join("directory.pub");
        let mut cmd = self.chatctl(&["bench", "--json", "--server"]);
        cmd.arg(format!("https://localhost:{}", self.port))
            .arg("--ca")
            .arg(&ca)
            .arg("--directory-key")
            .arg(&dk)
            .args(["--duration", &format!("{}s", o.duration_secs)])
            .args(["pairs", "--pairs", "1", "--rate", &o.rate.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        eprintln!("xtask: running {cmd:?}");
        let child = cmd.spawn().context("cannot start chatctl bench")?;
        let mut spread = 0;
        let pid = child.id();
        let watcher = std::thread::spawn(move || child.wait_with_output());
        while !watcher.is_finished() {
            if let Ok(metrics) = self.metrics() {
                let busy = gauge(&metrics, "chat_gateway_upstream_active")
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .count();
                spread = spread.max(busy);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the chatctl bench watcher panicked (pid {pid})"))??;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "chatctl bench failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let field = |key: &str| {
            json_number(&text, key).with_context(|| format!("no {key} in bench output {text}"))
        };
        let report = Delivery {
            delivered: field("delivered")?,
            p50_ms: field("p50_ms")?,
            p99_ms: field("p99_ms")?,
            max_ms: field("max_ms")?,
        };
        Ok((report, spread))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.down();
        let _ = self.compose_down();
        let _ = fs::remove_dir_all(&self.work);
    }
}

struct Delivery {
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    status(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "chatctl",
    ]))?;
    status(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "--target",
        MUSL_TARGET,
        "--package",
        "chat-server",
    ]))?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let target = if target.is_relative() {
        root.join(target)
    } else {
        target
    };
    let (compose, compose_version) = Compose::detect()?;
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("chatapp-bench-cluster-{pid}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let bench = Bench {
        chatctl: target.join("release/chatctl"),
        server: target.join(MUSL_TARGET).join("release/chat-server"),
        keys: work.join("keys"),
        compose_file: work.join("compose.yaml"),
        work,
        port: free_port()?,
        chatctl_project: format!("benchc-{pid}"),
        compose_project: format!("benchcompose{pid}"),
        compose,
    };
    quiet(
        bench
            .chatctl(&["keys", "init", "--unencrypted", "--dir"])
            .arg(&bench.keys),
    )?;

    // Warm-up: builds (or finds) the images; its containers are the model for the compose file.
    eprintln!("xtask: warm-up `chatctl up` (images built once, then cached)");
    quiet(&mut bench.up(o.replicas))?;
    let file = compose_file(&bench, o.replicas)?;
    fs::write(&bench.compose_file, file)?;
    bench.down()?;
    // One untimed compose round too, so both start with the engine in the same state.
    let containers = o.replicas as usize + 2;
    bench.compose_up(containers)?;
    bench.compose_down()?;

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..o.runs {
        let mut chatctl_run = || -> Result<()> {
            ours.push(time(&mut bench.up(o.replicas))?);
            bench.down()
        };
        let mut compose_run = || -> Result<()> {
            let start = Instant::now();
            bench.compose_up(containers)?;
            theirs.push(start.elapsed());
            bench.compose_down()
        };
        if run % 2 == 0 {
            chatctl_run()?;
            compose_run()?;
        } else {
            compose_run()?;
            chatctl_run()?;
        }
        eprintln!(
            "xtask: run {}: chatctl up {:.2} s, compose {:.2} s",
            run + 1,
            ours.last().map_or(0.0, Duration::as_secs_f64),
            theirs.last().map_or(0.0, Duration::as_secs_f64)
        );
    }

    // Cross-instance delivery through the gateway, then one instance as the baseline.
    quiet(&mut bench.up(o.replicas))?;
    bench.wait_upstreams_ready(o.replicas as usize)?;
    let (cross, spread) = bench.delivery(&o)?;
    if spread < 2 {
        bail!("sender and receiver were never seen on two different upstreams");
    }
    quiet(&mut bench.chatctl(&["scale", "1", "--project", &bench.chatctl_project]))?;
    bench.wait_upstreams_ready(1)?;
    let (same, _) = bench.delivery(&o)?;
    bench.down()?;

    let (ours_med, theirs_med) = (median(&mut ours), median(&mut theirs));
    let secs = |d: &[Duration]| {
        d.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let wait_how = match compose {
        Compose::V2 => "`up --detach --wait`",
        Compose::V1 => {
            "`up --detach`, then `docker ps` polled every 100 ms until all are healthy \
             (what v2's `--wait` does; v1 has no `--wait`)"
        }
    };
    let section = format!(
        "{START}\n\
         Command: `cargo xtask bench-cluster --runs {runs} --replicas {r} --duration {d} --rate {rate}` \
         (Docker {docker}, {compose_version}; {cores} cores shared with other builds; release \
         `chatctl`, static musl `chat-server`; images cached).\n\n\
         **Start-up to all healthy**: NATS, {r} chat-servers and the gateway, from no containers \
         (network and volume created too). `chatctl up --replicas {r} --detach` against Compose \
         on a file with the same images, command lines, environment, health checks (1 s \
         interval), network alias, volume, key mount and published port, written from \
         `docker inspect` of containers `chatctl up` made, with the servers and gateway \
         `depends_on` NATS `service_healthy` (as `chatctl up` starts them after NATS is \
         healthy); Compose: {wait_how}. {runs} runs, alternating which goes first; each ends \
         with `down --volumes`.\n\n\
         | | chatctl up | compose up, wait | ratio chatctl / compose (target ≤ 1.0) |\n\
         |---|---|---|---|\n\
         | median | {om:.2} s | {tm:.2} s | **{ratio:.2}x** |\n\
         | runs | {os} s | {ts} s | |\n\n\
         **Delivery latency** (`chatctl bench pairs --pairs 1 --rate {rate} --duration {d}s` \
         through the gateway, end-to-end encrypted 256-byte messages, send to `Deliver` at the \
         receiver): with {r} servers least connections puts the sender and the receiver on \
         different instances (the gateway's `/gateway/metrics` showed {spread} upstreams with \
         an active connection during the run), so every message crosses NATS; after `chatctl \
         scale 1` both are on the same instance.\n\n\
         | path | delivered | p50 | p99 | max |\n\
         |---|---|---|---|---|\n\
         | sender on instance A, receiver on B (via NATS) | {cd:.0} | {c50:.2} ms | {c99:.2} ms | {cmax:.2} ms |\n\
         | both on one instance | {sd:.0} | {s50:.2} ms | {s99:.2} ms | {smax:.2} ms |\n\
         {END}",
        runs = o.runs,
        r = o.replicas,
        d = o.duration_secs,
        rate = o.rate,
        docker = docker_version(),
        cores = std::thread::available_parallelism().map_or(0, usize::from),
        om = ours_med.as_secs_f64(),
        tm = theirs_med.as_secs_f64(),
        ratio = ours_med.as_secs_f64() / theirs_med.as_secs_f64().max(1e-9),
        os = secs(&ours),
        ts = secs(&theirs),
        cd = cross.delivered,
        c50 = cross.p50_ms,
        c99 = cross.p99_ms,
        cmax = cross.max_ms,
        sd = same.delivered,
        s50 = same.p50_ms,
        s99 = same.p99_ms,
        smax = same.max_ms,
    );
    println!("{section}");
    rewrite_section(&root.join("docs/BENCHMARKS.md"), START, END, &section)?;
    eprintln!("xtask: wrote the bench-cluster section of docs/BENCHMARKS.md");
    Ok(())
}

/// The compose file for the containers `chatctl up` made in `bench.chatctl_project`.
fn compose_file(bench: &Bench, replicas: u32) -> Result<String> {
    let p = &bench.chatctl_project;
    let nats = Inspected::of(&format!("{p}-nats-1"))?;
    let server = Inspected::of(&format!("{p}-server-1"))?;
    let gateway = Inspected::of(&format!("{p}-gateway-1"))?;
    let keys = fs::canonicalize(&bench.keys)?.display().to_string();
    let depends = "    depends_on:\n      nats:\n        condition: service_healthy\n";
    Ok(format!(
        "# Written by `cargo xtask bench-cluster` from `docker inspect` of `chatctl up`'s containers.\n\
         version: \"2.4\"\n\
         services:\n\
         \x20 nats:\n{nats}\
         \x20   volumes: [\"nats-data:/data\"]\n\
         \x20 server:\n{server}\
         \x20   scale: {replicas}\n\
         \x20   volumes: [\"{keys}:/keys:ro\"]\n{depends}\
         \x20 gateway:\n{gateway}\
         \x20   volumes: [\"{keys}:/keys:ro\"]\n\
         \x20   ports: [\"127.0.0.1:{port}:8443\"]\n{depends}\
         networks:\n  net: {{}}\n\
         volumes:\n  nats-data: {{}}\n",
        nats = nats.yaml(),
        server = server.yaml(),
        gateway = gateway.yaml(),
        port = bench.port,
    ))
}

/// What the compose file copies from one container.
struct Inspected {
    image: String,
    /// JSON arrays, which are YAML flow sequences as they are.
    command: String,
    env: String,
    health_test: String,
    interval: String,
    timeout: String,
    retries: String,
    start_period: String,
    restart: String,
}

impl Inspected {
    fn of(container: &str) -> Result<Self> {
        let format = [
            "{{.Config.Image}}",
            "{{json .Config.Cmd}}",
            "{{json .Config.Env}}",
            "{{json .Config.Healthcheck.Test}}",
            "{{.Config.Healthcheck.Interval}}",
            "{{.Config.Healthcheck.Timeout}}",
            "{{.Config.Healthcheck.Retries}}",
            "{{.Config.Healthcheck.StartPeriod}}",
            "{{.HostConfig.RestartPolicy.Name}}",
        ]
        .join("\n");
        let out = Command::new("docker")
            .args(["inspect", "--format", &format, container])
            .output()
            .context("cannot run docker inspect")?;
        if !out.status.success() {
            bail!(
                "docker inspect {container}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().map(str::to_owned);
        let mut next = || {
            lines
                .next()
                .with_context(|| format!("short docker inspect output for {container}"))
        };
        Ok(Self {
            image: next()?,
            command: next()?,
            env: next()?,
            health_test: next()?,
            interval: next()?,
            timeout: next()?,
            retries: next()?,
            start_period: next()?,
            restart: next()?,
        })
    }

    fn yaml(&self) -> String {
        format!(
            "    image: {}\n    command: {}\n    environment: {}\n    restart: {}\n\
             \x20   networks: [net]\n\
             \x20   healthcheck:\n      test: {}\n      interval: {}\n      timeout: {}\n\
             \x20     retries: {}\n      start_period: {}\n",
            self.image,
            self.command,
            self.env,
            self.restart,
            self.health_test,
            self.interval,
            self.timeout,
            self.retries,
            self.start_period
        )
    }
}

/// Polls until `count` containers of the compose project run and are healthy.
fn wait_compose_healthy(project: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + HEALTH_TIMEOUT;
    loop {
        let out = Command::new("docker")
            .args(["ps", "-a", "--format", "{{.Names}} {{.Status}}", "--filter"])
            .arg(format!("label=com.docker.compose.project={project}"))
            .output()
            .context("cannot run docker ps")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let healthy = text.lines().filter(|l| l.contains("(healthy)")).count();
        if healthy == count && text.lines().count() == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("compose project {project} not healthy within {HEALTH_TIMEOUT:?}:\n{text}");
        }
        std::thread::sleep(POLL);
    }
}

/// `upstream -> value` of a per-upstream gauge of `/gateway/metrics`.
fn gauge(metrics: &str, name: &str) -> Vec<(String, u64)> {
    let prefix = format!("{name}{{upstream=\"");
    metrics
        .lines()
        .filter_map(|line| {
            let (addr, value) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
            Some((addr.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The number after `"key":` in one-line JSON.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let rest = &json[json.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn docker_version() -> String {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn time(cmd: &mut Command) -> Result<Duration> {
    let start = Instant::now();
    quiet(cmd)?;
    Ok(start.elapsed())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers_are_read_by_key() {
        let json = r#"{"scenario":"pairs","delivered":2000,"p50_ms":1.25,"p99_ms":3e1}"#;
        assert_eq!(json_number(json, "delivered"), Some(2000.0));
        assert_eq!(json_number(json, "p50_ms"), Some(1.25));
        assert_eq!(json_number(json, "p99_ms"), Some(30.0));
        assert_eq!(json_number(json, "max_ms"), None);
    }

    #[test]
    fn gauges_are_read_per_upstream() {
        let m = "chat_gateway_upstream_active{upstream=\"10.0.0.2:8443\"} 1\n\
                 chat_gateway_upstream_active{upstream=\"10.0.0.3:8443\"} 0\n\
                 chat_gateway_upstream_ready{upstream=\"10.0.0.2:8443\"} 1\n";
        assert_eq!(
            gauge(m, "chat_gateway_upstream_active"),
            [
                ("10.0.0.2:8443".to_owned(), 1),
                ("10.0.0.3:8443".to_owned(), 0)
            ]
        );
    }
}
