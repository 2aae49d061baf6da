//! `cargo xtask bench-peers [--duration 5s] [--latency-duration 15s] [--latency-repeats 3]
//! [--idle 10000] [--pairs 16] [--members 8] [--windows 16,64]`: chat-server
//! beside the systems users would pick instead, measured by the same load generator
//! (`chatctl bench --peer ...`) in one run, and the bare relay that is the limit.
//!
//! Installs what is missing (Debian `nats-server`, `ejabberd`; Matrix Synapse from PyPI into a
//! venv under `~/.cache/chatapp-bench/synapse-venv`), builds chatctl and chat-server in release
//! mode, starts on loopback: chat-server with plain HTTP and with TLS (embedded store, every
//! envelope committed with fsync before its ack), nats-server with a WebSocket listener,
//! ejabberd with a WebSocket listener (no shaper, in-band registration; started as the
//! `ejabberd` user through `setpriv`, not `su`, so the raised open-file limit holds), `chatctl
//! bench relay`,
//! and Synapse with a plain HTTP client listener (SQLite, open registration, rate limits
//! raised out of the way, presence off). Every process runs with RLIMIT_NOFILE raised to the
//! hard limit. Runs pairs (max, 50% and 90% of max), group, idle and connect against each (and
//! chat-server's `--raw` maximum right after its e2e maximum, on the same server) and
//! rewrites the `bench-peers` section of docs/BENCHMARKS.md. The two fixed-rate runs last
//! `--latency-duration`: a p99 needs more samples than a throughput figure. Each is run
//! `--latency-repeats` times and the run with the median p99 is shown, with the range of all:
//! one stall of the disk or of a shared core moves a single run's p99 by 2-3x. Before the peers
//! start and after the last run, a 10 s steadiness probe (`crate::steadiness`) spins a thread
//! per core and counts the 10 ms slices that got far less done than a fast one: the tables
//! say how steadily the host ran the cores while they were measured.
//!
//! A system's maximum depends on how many messages may be in flight: with too small a window
//! the load generator waits on latency while the CPU idles. Each throughput point (pairs,
//! `--batch 1`, group) is therefore run once per window of `--windows`, the same list for every
//! system, and the fastest run is kept (a run that lost messages is kept whatever its speed).

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench_sign::rewrite_section;
use crate::steadiness::{self, Steadiness};
use crate::{status, workspace_root};

const START: &str = "<!-- bench-peers:start -->";
const END: &str = "<!-- bench-peers:end -->";
/// How long each steadiness probe spins (one before the peers start, one after the last run).
const STEADINESS_SECS: u64 = 10;

const CHAT_PLAIN: &str = "127.0.0.1:19080";
const CHAT_TLS: &str = "localhost:19443";
const NATS_WS: &str = "127.0.0.1:19222";
const XMPP_WS: &str = "127.0.0.1:19290";
const RELAY_WS: &str = "127.0.0.1:19700";
const SYNAPSE_HTTP: &str = "127.0.0.1:19808";
const EJABBERD_NODE: &str = "chatapp_bench@localhost";
/// Every idle Synapse client is a user registered for it (25 to 65 a second here): 1000 keep
/// the run bounded.
const SYNAPSE_IDLE: usize = 1000;
/// Rate limits of Synapse set out of the way (per second and burst).
const SYNAPSE_RATE_LIMITS: [&str; 17] = [
    "rc_message",
    "rc_registration",
    "rc_login.address",
    "rc_login.account",
    "rc_login.failed_attempts",
    "rc_joins.local",
    "rc_joins.remote",
    "rc_joins_per_room",
    "rc_invites.per_room",
    "rc_invites.per_user",
    "rc_invites.per_issuer",
    "rc_room_creation",
    "rc_presence.per_user",
    "rc_key_requests",
    "rc_user_directory",
    "rc_profile",
    "rc_admin_redaction",
];

struct Options {
    duration: String,
    /// Of the fixed-rate (latency) runs.
    latency_duration: String,
    /// How many times each fixed-rate point is run (the median p99 is kept).
    latency_repeats: usize,
    idle: usize,
    pairs: usize,
    members: usize,
    /// Windows (messages in flight per sender) each throughput point is tried with.
    windows: Vec<usize>,
}

/// One system under test: how `chatctl bench` reaches it.
struct System {
    label: &'static str,
    /// Idle connections to open (Synapse opens at most 1000: each is a user registered for it).
    idle: Option<usize>,
    /// `chatctl bench` arguments before the scenario.
    args: Vec<String>,
    pid: u32,
}

/// The figures of one `chatctl bench --json` run.
#[derive(Debug, Clone, Default)]
struct Run {
    command: String,
    sent: f64,
    delivered: f64,
    msgs_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_per_connection: Option<f64>,
    load: f64,
    /// Share of both cores busy over the measured window (%), and CPU per delivery (µs) of the
    /// system under test and of the load generator (pairs, group).
    busy: Option<f64>,
    server_us: Option<f64>,
    load_generator_us: Option<f64>,
    /// The `--window` of the run, when [`best_window`] chose it.
    window: Option<usize>,
    /// The p99 of every repeat of a fixed-rate point, in run order, when [`median_run`] chose it.
    p99_runs: Vec<f64>,
    /// Why the run produced no figures.
    failed: Option<String>,
}

#[derive(Default)]
struct Results {
    max: Run,
    /// `pairs` with every message written alone (`--batch 1`).
    one_write: Run,
    at50: Run,
    at90: Run,
    group: Run,
    idle: Run,
    connect: Run,
}

impl Results {
    /// Every run, in the order of the tables.
    fn runs(&self) -> [&Run; 7] {
        [
            &self.max,
            &self.one_write,
            &self.at50,
            &self.at90,
            &self.group,
            &self.idle,
            &self.connect,
        ]
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut opts = Options {
        duration: "5s".into(),
        latency_duration: "15s".into(),
        latency_repeats: 3,
        idle: 10_000,
        pairs: 16,
        members: 8,
        windows: vec![16, 64],
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => opts.duration = value()?.clone(),
            "--latency-duration" => opts.latency_duration = value()?.clone(),
            "--latency-repeats" => opts.latency_repeats = parse_repeats(value()?)?,
            "--idle" => opts.idle = value()?.parse()?,
            "--pairs" => opts.pairs = value()?.parse()?,
            "--members" => opts.members = value()?.parse()?,
            "--windows" => opts.windows = parse_windows(value()?)?,
            other => bail!("unknown argument {other}"),
        }
    }
    let started = Instant::now();
    install_peers()?;
    let synapse = install_synapse()?;
    let root = workspace_root();
    status(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "--package",
                "chatctl",
                "--package",
                "chat-server",
            ]),
    )?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("release");
    let chatctl = target.join("chatctl");
    let server = target.join("chat-server");

    let work = std::env::temp_dir().join(format!("chatapp-bench-peers-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let mut peers = Peers::default();
    let result = measure(
        &opts, &work, &chatctl, &server, &synapse, &mut peers, started,
    );
    peers.stop(&work);
    let _ = fs::remove_dir_all(&work);
    result
}

/// The processes this run started; stopped (by pid) whatever happens. Synapse is one of the
/// `children` (one Python process, started directly).
#[derive(Default)]
struct Peers {
    children: Vec<Child>,
    ejabberd: bool,
}

impl Peers {
    fn stop(&mut self, work: &Path) {
        if self.ejabberd {
            let _ = Command::new("ejabberdctl")
                .args(ejabberdctl_base(work))
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn install_peers() -> Result<()> {
    let missing: Vec<&str> = [("nats-server", "nats-server"), ("ejabberdctl", "ejabberd")]
        .into_iter()
        .filter(|(program, _)| !crate::have(program))
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    status(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("cannot install {}", missing.join(" ")))
}

/// Installs Matrix Synapse from PyPI into `~/.cache/chatapp-bench/synapse-venv` unless it is
/// there already; the venv's python.
fn install_synapse() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set: where does the cache go?")?;
    let venv = PathBuf::from(home).join(".cache/chatapp-bench/synapse-venv");
    let python = venv.join("bin/python");
    let installed = Command::new(&python)
        .args(["-c", "import synapse.app.homeserver"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        eprintln!(
            "xtask: Matrix Synapse already installed in {}",
            venv.display()
        );
        return Ok(python);
    }
    eprintln!(
        "xtask: installing Matrix Synapse (PyPI matrix-synapse) into {} (about 4 minutes)",
        venv.display()
    );
    if let Some(parent) = venv.parent() {
        fs::create_dir_all(parent)?;
    }
    status(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("cannot create the Synapse venv (is python3 with venv installed?)")?;
    status(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "matrix-synapse",
    ]))
    .context("cannot install Matrix Synapse from PyPI")?;
    Ok(python)
}

/// Synapse's settings over the generated config (a second `-c` file overrides its top-level
/// keys): the loopback listener, SQLite, open registration for the driver, bcrypt at its
/// cheapest (a login should measure the server, not 2^12 bcrypt rounds; ejabberd keeps plain
/// passwords), presence off, rate limits out of the way, warnings-only logging.
fn synapse_config(dir: &Path) -> String {
    let (host, port) = SYNAPSE_HTTP
        .split_once(':')
        .unwrap_or(("127.0.0.1", "19808"));
    let mut yaml = format!(
        "listeners:\n  - port: {port}\n    bind_addresses: ['{host}']\n    type: http\n    tls: false\n    x_forwarded: false\n    resources:\n      - names: [client]\n        compress: false\n\
         database:\n  name: sqlite3\n  args:\n    database: {db}\n\
         log_config: {log}\n\
         enable_registration: true\n\
         enable_registration_without_verification: true\n\
         bcrypt_rounds: 4\n\
         presence:\n  enabled: false\n\
         trusted_key_servers: []\n\
         suppress_key_server_warning: true\n\
         filter_timeline_limit: 1000\n",
        db = dir.join("data/homeserver.db").display(),
        log = dir.join("log.yaml").display(),
    );
    // `a.b` keys nest: `rc_login: {address: {...}}`.
    let mut nested: Vec<(&str, Vec<&str>)> = Vec::new();
    for key in SYNAPSE_RATE_LIMITS {
        let (top, sub) = key
            .split_once('.')
            .map_or((key, None), |(t, s)| (t, Some(s)));
        match nested.iter_mut().find(|(t, _)| *t == top) {
            Some((_, subs)) => subs.extend(sub),
            None => nested.push((top, sub.into_iter().collect())),
        }
    }
    let unlimited = "{per_second: 1000000, burst_count: 1000000}";
    for (top, subs) in nested {
        if subs.is_empty() {
            let _ = writeln!(yaml, "{top}: {unlimited}");
        } else {
            let _ = writeln!(yaml, "{top}:");
            for sub in subs {
                let _ = writeln!(yaml, "  {sub}: {unlimited}");
            }
        }
    }
    yaml
}

const SYNAPSE_LOG_CONFIG: &str = "version: 1\n\
    formatters:\n  precise:\n    format: '%(asctime)s - %(name)s - %(levelname)s - %(message)s'\n\
    handlers:\n  console:\n    class: logging.StreamHandler\n    formatter: precise\n\
    root:\n  level: WARNING\n  handlers: [console]\n\
    disable_existing_loggers: false\n";

/// Generates Synapse's config in `work/synapse`, starts it and waits for `/health`; its pid.
fn start_synapse(work: &Path, python: &Path, peers: &mut Peers) -> Result<u32> {
    let dir = work.join("synapse");
    fs::create_dir_all(dir.join("data"))?;
    let homeserver = dir.join("homeserver.yaml");
    let mut generate = Command::new(python);
    generate
        .current_dir(&dir)
        .args(["-m", "synapse.app.homeserver", "--server-name", "localhost"])
        .arg("--config-path")
        .arg(&homeserver)
        .args(["--generate-config", "--report-stats=no"])
        .arg("--data-directory")
        .arg(dir.join("data"))
        .stdout(Stdio::null());
    status(&mut generate).context("cannot generate Synapse's config")?;
    fs::write(dir.join("bench.yaml"), synapse_config(&dir))?;
    fs::write(dir.join("log.yaml"), SYNAPSE_LOG_CONFIG)?;
    let args: Vec<String> = [
        "-m",
        "synapse.app.homeserver",
        "-c",
        &homeserver.display().to_string(),
        "-c",
        &dir.join("bench.yaml").display().to_string(),
    ]
    .map(str::to_owned)
    .into();
    let log = work.join("synapse.log");
    let mut cmd = with_nofile(python, &args);
    cmd.current_dir(&dir);
    eprintln!(
        "xtask: starting Synapse on {SYNAPSE_HTTP} (log {})",
        log.display()
    );
    let pid = spawn_logged(peers, cmd, &log)?;
    wait_for_health(SYNAPSE_HTTP, "Synapse", &log)?;
    Ok(pid)
}

/// Waits until `GET /health` on `addr` answers 200 (Synapse opens its port before it is
/// ready; the first start also creates its database).
fn wait_for_health(addr: &str, what: &str, log: &Path) -> Result<()> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(mut tcp) = TcpStream::connect(addr) {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            let mut answer = String::new();
            let asked =
                tcp.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
            if asked.is_ok()
                && tcp.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.")
                && answer.split_whitespace().nth(1) == Some("200")
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!(
        "{what} did not answer GET /health on {addr} within 120 s; its log, {}:\n{}",
        log.display(),
        fs::read_to_string(log).unwrap_or_default()
    )
}

/// Runs `program args` with the file-descriptor limit raised to the hard limit.
fn with_nofile(program: &Path, args: &[String]) -> Command {
    let mut line = String::from("ulimit -n \"$(ulimit -Hn)\" && exec");
    for a in std::iter::once(program.display().to_string()).chain(args.iter().cloned()) {
        line.push_str(" '");
        line.push_str(&a.replace('\'', "'\\''"));
        line.push('\'');
    }
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &line]);
    cmd
}

fn spawn_logged(peers: &mut Peers, mut cmd: Command, log: &Path) -> Result<u32> {
    let file = fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id();
    peers.children.push(child);
    Ok(pid)
}

fn wait_for_port(addr: &str, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let resolved = addr.replace("localhost", "127.0.0.1");
    while Instant::now() < deadline {
        if TcpStream::connect(&resolved).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "{what} did not listen on {addr} within 60 s; its log, {}:\n{}",
        log.display(),
        fs::read_to_string(log).unwrap_or_default()
    )
}

/// The home directory of `user` in the text of /etc/passwd
/// (`name:password:uid:gid:gecos:home:shell`).
fn home_of(passwd: &str, user: &str) -> Option<String> {
    passwd
        .lines()
        .find_map(|l| l.strip_prefix(user)?.strip_prefix(':'))
        .and_then(|rest| rest.split(':').nth(4))
        .filter(|home| !home.is_empty())
        .map(str::to_owned)
}

fn ejabberdctl_base(work: &Path) -> Vec<String> {
    let dir = work.join("ejabberd");
    vec![
        "--config-dir".into(),
        dir.display().to_string(),
        "--spool".into(),
        dir.join("spool").display().to_string(),
        "--logs".into(),
        dir.join("logs").display().to_string(),
        "--node".into(),
        EJABBERD_NODE.into(),
    ]
}

fn ejabberd_config() -> String {
    let port = XMPP_WS.rsplit(':').next().unwrap_or("19290");
    format!(
        "loglevel: warning\n\
         hosts:\n  - localhost\n\
         listen:\n  -\n    port: {port}\n    ip: \"127.0.0.1\"\n    backlog: 4096\n    module: ejabberd_http\n    request_handlers:\n      /ws: ejabberd_http_ws\n\
         auth_method: internal\n\
         auth_password_format: plain\n\
         registration_timeout: infinity\n\
         acl:\n  local:\n    user_regexp: \"\"\n\
         access_rules:\n  local:\n    allow: local\n  c2s:\n    allow: all\n  register:\n    allow: all\n\
         shaper_rules:\n  max_user_sessions: infinity\n  max_user_offline_messages: infinity\n  c2s_shaper: none\n\
         modules:\n  mod_register:\n    access: register\n    ip_access: all\n  mod_offline: {{}}\n  mod_stream_mgmt: {{}}\n  mod_ping: {{}}\n"
    )
}

fn start_peers(
    work: &Path,
    chatctl: &Path,
    server: &Path,
    synapse: &Path,
    peers: &mut Peers,
) -> Result<Vec<System>> {
    let s = |p: &Path| p.display().to_string();
    let quiet = |cmd: &mut Command| -> Result<()> {
        let out = cmd
            .output()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    quiet(Command::new(chatctl).current_dir(work).args([
        "keys",
        "init",
        "--dir",
        "keys",
        "--unencrypted",
    ]))?;
    fs::write(
        work.join("server.toml"),
        "[limits]\nregistrations_per_minute = 1000000\nmax_connections = 30000\nmax_mailbox_depth = 1000000\n",
    )?;
    let keys = work.join("keys");
    let chat_common = |dir: &str, listen: &str| {
        vec![
            "serve".to_owned(),
            "--listen".into(),
            listen.replace("localhost", "127.0.0.1"),
            "--data".into(),
            s(&work.join(dir)),
            "--keys".into(),
            s(&keys),
            "--config".into(),
            s(&work.join("server.toml")),
        ]
    };
    let mut plain_args = chat_common("data-plain", CHAT_PLAIN);
    plain_args.push("--plain-http".into());
    let log = work.join("chat-plain.log");
    let plain_pid = spawn_logged(peers, with_nofile(server, &plain_args), &log)?;
    wait_for_port(CHAT_PLAIN, "chat-server (plain)", &log)?;
    let log = work.join("chat-tls.log");
    let tls_pid = spawn_logged(
        peers,
        with_nofile(server, &chat_common("data-tls", CHAT_TLS)),
        &log,
    )?;
    wait_for_port(CHAT_TLS, "chat-server (TLS)", &log)?;

    let (nats_host, nats_port) = NATS_WS.split_once(':').unwrap_or(("127.0.0.1", "19222"));
    fs::write(
        work.join("nats.conf"),
        format!(
            "host: 127.0.0.1\nport: 14222\nmax_connections: 100000\nwebsocket {{\n  host: {nats_host}\n  port: {nats_port}\n  no_tls: true\n}}\n"
        ),
    )?;
    let log = work.join("nats.log");
    let nats_pid = spawn_logged(
        peers,
        with_nofile(
            Path::new("nats-server"),
            &["-c".into(), s(&work.join("nats.conf"))],
        ),
        &log,
    )?;
    wait_for_port(NATS_WS, "nats-server", &log)?;

    let relay_args = vec![
        "bench".into(),
        "relay".into(),
        "--listen".into(),
        RELAY_WS.into(),
    ];
    let log = work.join("relay.log");
    let relay_pid = spawn_logged(peers, with_nofile(chatctl, &relay_args), &log)?;
    wait_for_port(RELAY_WS, "chatctl bench relay", &log)?;

    // ejabberd runs as its own user (ejabberdctl switches to it), from a private config dir.
    let ej = work.join("ejabberd");
    fs::create_dir_all(ej.join("spool"))?;
    fs::create_dir_all(ej.join("logs"))?;
    fs::write(ej.join("ejabberd.yml"), ejabberd_config())?;
    fs::write(
        ej.join("ejabberdctl.cfg"),
        format!(
            "ERL_MAX_PORTS=65536\nEJABBERD_CONFIG_PATH={}\n",
            s(&ej.join("ejabberd.yml"))
        ),
    )?;
    if Path::new("/etc/ejabberd/inetrc").exists() {
        fs::copy("/etc/ejabberd/inetrc", ej.join("inetrc"))?;
    }
    status(Command::new("chmod").args(["755", &s(work)]))?;
    status(Command::new("chown").args(["-R", "ejabberd", &s(&ej)]))?;
    // ejabberdctl run by root switches to the `ejabberd` user through `su`, whose PAM session
    // sets the soft open-file limit back to 1024: ejabberd then failed near 1000 sockets. Run as
    // that user from the start instead (setpriv does not go through PAM), so the raised limit
    // of `with_nofile` holds.
    // HOME is where Erlang keeps its cookie; su set it, setpriv does not.
    let home = home_of(&fs::read_to_string("/etc/passwd")?, "ejabberd")
        .context("the ejabberd package made no `ejabberd` user (no line in /etc/passwd)")?;
    let mut ejabberd_args = vec![
        format!("HOME={home}"),
        "setpriv".into(),
        "--reuid=ejabberd".into(),
        "--regid=ejabberd".into(),
        "--init-groups".into(),
        "ejabberdctl".into(),
    ];
    ejabberd_args.extend(ejabberdctl_base(work));
    ejabberd_args.push("foreground".into());
    let log = work.join("ejabberd.log");
    spawn_logged(peers, with_nofile(Path::new("env"), &ejabberd_args), &log)?;
    peers.ejabberd = true;
    wait_for_port(XMPP_WS, "ejabberd", &log)?;
    let out = Command::new("pgrep")
        .args(["-n", "-f", &format!("beam.*{EJABBERD_NODE}")])
        .output()?;
    let ejabberd_pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("cannot find the pid of ejabberd's beam.smp")?;

    let synapse_pid = start_synapse(work, synapse, peers)?;

    let chat = |url: &str| {
        vec![
            "--server".to_owned(),
            url.to_owned(),
            "--ca".into(),
            s(&keys.join("tls/ca.pem")),
            "--directory-key".into(),
            s(&keys.join("directory.pub")),
        ]
    };
    let peer = |name: &str, url: String| {
        vec!["--peer".to_owned(), name.to_owned(), "--server".into(), url]
    };
    Ok(vec![
        System {
            label: "chat-server, e2e, plain WS",
            idle: None,
            args: chat(&format!("http://{CHAT_PLAIN}")),
            pid: plain_pid,
        },
        System {
            label: "chat-server, e2e, TLS",
            idle: None,
            args: chat(&format!("https://{CHAT_TLS}")),
            pid: tls_pid,
        },
        System {
            label: "NATS core (WS)",
            idle: None,
            args: peer("nats", format!("ws://{NATS_WS}")),
            pid: nats_pid,
        },
        System {
            label: "ejabberd (XMPP over WS)",
            idle: None,
            args: peer("xmpp", format!("ws://{XMPP_WS}/ws")),
            pid: ejabberd_pid,
        },
        System {
            label: "bare relay (limit)",
            idle: None,
            args: peer("relay", format!("ws://{RELAY_WS}")),
            pid: relay_pid,
        },
        System {
            label: "Matrix Synapse (HTTP + /sync)",
            idle: Some(SYNAPSE_IDLE),
            args: peer("matrix", format!("http://{SYNAPSE_HTTP}")),
            pid: synapse_pid,
        },
    ])
}

/// Runs one `chatctl bench --json`; the command line is kept for the table.
fn bench(chatctl: &Path, system: &System, common: &[&str], scenario: &[String]) -> Result<Run> {
    let mut args: Vec<String> = vec!["bench".into()];
    args.extend(system.args.iter().cloned());
    // The system's RSS (idle) and CPU time (pairs, group) are read from its process.
    args.extend(["--server-pid".into(), system.pid.to_string()]);
    args.extend(common.iter().map(|s| s.to_string()));
    args.push("--json".into());
    args.extend(scenario.iter().cloned());
    let command = format!(
        "chatctl {}",
        args.iter()
            .filter(|a| !a.starts_with('/')
                && !a.contains("--ca")
                && !a.contains("--directory-key"))
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!("xtask: {command}");
    let out = with_nofile(chatctl, &args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {command}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    if json.is_empty() {
        // One system failing (ejabberd may die under the idle load) must not end the run.
        let why = String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("no output")
            .to_owned();
        eprintln!("xtask:   failed: {why}");
        return Ok(Run {
            command,
            failed: Some(why),
            ..Run::default()
        });
    }
    let num = |k: &str| json_number(json, k);
    let run = Run {
        command,
        sent: num("sent").unwrap_or_default(),
        delivered: num("delivered").unwrap_or_default(),
        msgs_per_sec: num("msgs_per_sec").unwrap_or_default(),
        p50_ms: num("p50_ms").unwrap_or_default(),
        p99_ms: num("p99_ms").unwrap_or_default(),
        rss_per_connection: num("rss_per_connection"),
        load: num("load_average").unwrap_or_default(),
        busy: num("machine_busy_pct"),
        server_us: num("server_cpu_us_per_msg"),
        load_generator_us: num("load_generator_cpu_us_per_msg"),
        window: None,
        p99_runs: Vec::new(),
        failed: None,
    };
    eprintln!(
        "xtask:   {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, sent {} delivered {}{}{} (load {:.2})",
        run.msgs_per_sec,
        run.p50_ms,
        run.p99_ms,
        run.sent,
        run.delivered,
        run.rss_per_connection
            .map(|r| format!(", {:.1} KiB/conn", r / 1024.0))
            .unwrap_or_default(),
        run.busy
            .map(|_| format!(", CPU {}", cpu_cell(&run)))
            .unwrap_or_default(),
        run.load
    );
    Ok(run)
}

/// A number field of a flat JSON object (`"key":1.5`); `None` if absent or null.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let pattern = format!("\"{key}\":");
    let start = json.find(&pattern)? + pattern.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

fn measure(
    opts: &Options,
    work: &Path,
    chatctl: &Path,
    server: &Path,
    synapse: &Path,
    peers: &mut Peers,
    started: Instant,
) -> Result<()> {
    // Before any peer runs: how steadily the cores run on their own (see `steadiness`).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "xtask: how steadily the cores run: {cores} spinning threads for {STEADINESS_SECS} s"
    );
    let steady_start = steadiness::probe(cores, Duration::from_secs(STEADINESS_SECS));
    let systems = start_peers(work, chatctl, server, synapse, peers)?;
    let load_start = crate_load();
    let common = ["--duration", opts.duration.as_str()];
    let latency_common = ["--duration", opts.latency_duration.as_str()];
    let pairs = vec!["pairs".to_owned(), "--pairs".into(), opts.pairs.to_string()];
    let raw_pairs = {
        let mut p = pairs.clone();
        p.insert(0, "--raw".into());
        p
    };
    let mut raw = None;
    let mut results = Vec::new();
    for (i, system) in systems.iter().enumerate() {
        let windows = &opts.windows;
        let mut r = Results {
            max: best_window(chatctl, system, &common, &pairs, windows)?,
            one_write: best_window(chatctl, system, &common, &one_write(&pairs), windows)?,
            ..Results::default()
        };
        // chat-server's relay alone (the first system is chat-server over plain WebSocket), on
        // the same server right after its e2e maximum, so that both rows meet the same disk.
        // Measured last, after every peer had written to that disk, it read 2.5-3x lower on a
        // virtio disk (likely because its flushes take everyone's writes along; not proven:
        // docs/BENCHMARKS.md, session 23).
        if i == 0 {
            raw = Some([
                best_window(chatctl, system, &common, &raw_pairs, windows)?,
                best_window(chatctl, system, &common, &one_write(&raw_pairs), windows)?,
            ]);
        }
        for (fraction, slot) in [(0.5, &mut r.at50), (0.9, &mut r.at90)] {
            let mut scenario = pairs.clone();
            scenario.extend([
                "--rate".into(),
                format!("{:.0}", r.max.msgs_per_sec * fraction),
            ]);
            let mut runs = Vec::with_capacity(opts.latency_repeats);
            for _ in 0..opts.latency_repeats {
                runs.push(bench(chatctl, system, &latency_common, &scenario)?);
            }
            *slot = median_run(runs).context("--latency-repeats is 0")?;
        }
        r.group = best_window(
            chatctl,
            system,
            &common,
            &["group".into(), "--members".into(), opts.members.to_string()],
            windows,
        )?;
        r.idle = bench(
            chatctl,
            system,
            &[],
            &[
                "idle".into(),
                "--connections".into(),
                system.idle.unwrap_or(opts.idle).min(opts.idle).to_string(),
            ],
        )?;
        r.connect = bench(chatctl, system, &common, &["connect".into()])?;
        results.push(r);
    }
    let raw = raw.context("no chat-server to measure `--raw` on")?;
    let load_end = crate_load();
    eprintln!("xtask: how steadily the cores run, again at the end");
    let steady_end = steadiness::probe(cores, Duration::from_secs(STEADINESS_SECS));
    let section = render(
        opts,
        &systems,
        &results,
        &raw,
        [load_start, load_end],
        [&steady_start, &steady_end],
        started.elapsed(),
    );
    println!("{section}");
    rewrite_section(
        &workspace_root().join("docs/BENCHMARKS.md"),
        START,
        END,
        &section,
    )
}

/// `16,64` -> [16, 64]: at least one window, each at least 1.
fn parse_windows(list: &str) -> Result<Vec<usize>> {
    let windows = list
        .split(',')
        .map(|w| match w.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("--windows takes whole numbers of at least 1, like 16,64 (got {w:?})"),
        })
        .collect::<Result<Vec<_>>>()?;
    if windows.is_empty() {
        bail!("--windows needs at least one window");
    }
    Ok(windows)
}

/// The fastest run of `scenario` over `windows` (each run with `--window W` added); a run that
/// lost messages or failed is returned at once, so the table shows it.
fn best_window(
    chatctl: &Path,
    system: &System,
    common: &[&str],
    scenario: &[String],
    windows: &[usize],
) -> Result<Run> {
    let mut best: Option<Run> = None;
    for window in windows {
        let mut s = scenario.to_vec();
        s.extend(["--window".into(), window.to_string()]);
        let run = Run {
            window: Some(*window),
            ..bench(chatctl, system, common, &s)?
        };
        if run.failed.is_some() || run.sent != run.delivered {
            return Ok(run);
        }
        if best
            .as_ref()
            .is_none_or(|b| run.msgs_per_sec > b.msgs_per_sec)
        {
            best = Some(run);
        }
    }
    best.context("--windows is empty")
}

/// `3` -> 3: a whole number of at least 1.
fn parse_repeats(text: &str) -> Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => bail!("--latency-repeats takes a whole number of at least 1 (got {text:?})"),
    }
}

/// Of the repeats of one fixed-rate point, the run whose p99 is the median (the upper of the
/// middle two for an even count), so the figures shown all come from one real run; every
/// repeat's p99 goes along in `p99_runs`. A repeat that failed or lost messages is returned
/// instead, so the table shows it. `None` for no runs.
fn median_run(runs: Vec<Run>) -> Option<Run> {
    let p99_runs: Vec<f64> = runs.iter().map(|r| r.p99_ms).collect();
    let chosen = match runs
        .iter()
        .position(|r| r.failed.is_some() || r.sent != r.delivered)
    {
        Some(bad) => runs.into_iter().nth(bad),
        None => {
            let mut sorted = runs;
            sorted.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
            let middle = sorted.len() / 2;
            sorted.into_iter().nth(middle)
        }
    }?;
    Some(Run { p99_runs, ..chosen })
}

/// A fixed-rate p99 for the tables: `6.06` alone, or `6.06 (4.07–6.64)` with the range of
/// its repeats.
fn p99_cell(r: &Run) -> String {
    let (lo, hi) = r
        .p99_runs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &p| {
            (lo.min(p), hi.max(p))
        });
    if r.p99_runs.len() > 1 {
        format!("{:.2} ({lo:.2}–{hi:.2})", r.p99_ms)
    } else {
        format!("{:.2}", r.p99_ms)
    }
}

/// The same scenario with every message written alone.
fn one_write(scenario: &[String]) -> Vec<String> {
    let mut s = scenario.to_vec();
    s.extend(["--batch".into(), "1".into()]);
    s
}

fn crate_load() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_default()
}

/// Peers the ratios are taken against: NATS, ejabberd, the relay (indices into `systems`).
const REFERENCES: [(usize, &str); 3] = [(2, "NATS"), (3, "ejabberd"), (4, "relay")];

fn ratio_cells(value: f64, all: &[f64]) -> String {
    REFERENCES
        .iter()
        .map(|(i, _)| match all.get(*i) {
            Some(r) if *r > 0.0 => format!(" {:.2}x |", value / r),
            _ => " – |".into(),
        })
        .collect()
}

fn ratio_header() -> (String, String) {
    let names: String = REFERENCES
        .iter()
        .map(|(_, n)| format!(" ÷ {n} |"))
        .collect();
    let rule: String = REFERENCES.iter().map(|_| "---|").collect();
    (names, rule)
}

fn render(
    opts: &Options,
    systems: &[System],
    results: &[Results],
    raw: &[Run; 2],
    [load_start, load_end]: [f64; 2],
    [steady_start, steady_end]: [&Steadiness; 2],
    took: Duration,
) -> String {
    let (names, rule) = ratio_header();
    // The machine's cores: the header says how many, and the e2e ceiling counts on every one.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = String::new();
    let _ = writeln!(md, "{START}");
    let _ = writeln!(
        md,
        "Command: `cargo xtask bench-peers --duration {} --latency-duration {} --latency-repeats {} \
         --idle {} --pairs {} --members {} --windows {}` ({:.0} s in all; load average {load_start:.2} at the start, {load_end:.2} \
         at the end; {cores} shared cores, every server and the load generator on the same machine, \
         loopback). Short runs ({} per point, {} per fixed-rate latency point): treat \
         differences under ~15% as noise. Every row is one \
         `chatctl bench --json` run; each fixed-rate latency point was run {} times and the run \
         with the median p99 is shown, the range of the {} p99s in brackets; the load generator, payloads (256 bytes), {} pairs and \
         windows are the same for every system: each throughput point was run with a window \
         (undelivered messages per sender) of {} and the faster run is shown, its window in the \
         `window` column. Senders pipeline: what the window allows (or, at a fixed rate, what is due) leaves in \
         one write of up to 16 messages; the second throughput table writes each message \
         alone (`--batch 1`). CPU: microseconds of CPU per delivery over the measured window, of \
         the system under test (its process, every thread) and of the load generator, and how \
         busy the {cores} cores were (every process). Ratios are row ÷ column (higher is better for rates, lower for latency and memory).",
        opts.duration,
        opts.latency_duration,
        opts.latency_repeats,
        opts.idle,
        opts.pairs,
        opts.members,
        windows_arg(&opts.windows),
        took.as_secs_f64(),
        opts.duration,
        opts.latency_duration,
        opts.latency_repeats,
        opts.latency_repeats,
        opts.pairs,
        windows_text(&opts.windows),
    );
    let col = |f: &dyn Fn(&Results) -> f64| results.iter().map(f).collect::<Vec<_>>();

    for (title, pick, raw) in [
        (
            "as fast as the window allows",
            (|r: &Results| &r.max) as fn(&Results) -> &Run,
            &raw[0],
        ),
        (
            "each message written alone, `--batch 1`",
            |r: &Results| &r.one_write,
            &raw[1],
        ),
    ] {
        let _ = writeln!(
            md,
            "\n**1:1 throughput, {title}** (`pairs --pairs {}`)\n",
            opts.pairs
        );
        let _ = writeln!(
            md,
            "| system | msgs/s | window | sent = delivered | CPU µs/msg: server, load generator; machine busy | load |{names}"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|{rule}");
        let all = col(&|r| pick(r).msgs_per_sec);
        let rows = systems
            .iter()
            .zip(results)
            .map(|(s, r)| (s.label, pick(r)))
            .chain([("chat-server, `--raw` (no e2e), plain WS", raw)]);
        for (label, run) in rows {
            let _ = writeln!(
                md,
                "| {label} | {:.0} | {} | {} | {} | {:.2} |{}",
                run.msgs_per_sec,
                window_cell(run),
                same(run),
                cpu_cell(run),
                run.load,
                ratio_cells(run.msgs_per_sec, &all)
            );
        }
    }

    let _ = writeln!(
        md,
        "\n**Send-to-deliver latency at 50% and 90% of each system's maximum** (`pairs --rate R`)\n"
    );
    let _ = writeln!(
        md,
        "| system | rate 50% | p50 ms | p99 ms | CPU at 50% | rate 90% | p50 ms | p99 ms | sent = delivered |{}",
        names.replace(" |", " (p99 at 50%) |")
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|{rule}");
    let all = col(&|r| r.at50.p99_ms);
    for (s, r) in systems.iter().zip(results) {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {} | {} | {:.0} | {:.2} | {} | {} |{}",
            s.label,
            r.at50.msgs_per_sec,
            r.at50.p50_ms,
            p99_cell(&r.at50),
            cpu_cell(&r.at50),
            r.at90.msgs_per_sec,
            r.at90.p50_ms,
            p99_cell(&r.at90),
            if same(&r.at50) == "yes" && same(&r.at90) == "yes" {
                "yes"
            } else {
                "**no**"
            },
            ratio_cells(r.at50.p99_ms, &all)
        );
    }

    let _ = writeln!(
        md,
        "\n**Group fan-out** (`group --members {}`: one sender; chat, ejabberd and the relay send one \
         message per member, NATS publishes once to a subject every member subscribes to, \
         Synapse takes one event into a room every member joined)\n",
        opts.members
    );
    let _ = writeln!(
        md,
        "| system | deliveries/s | window | p50 ms | p99 ms | sent = delivered |{names}"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|{rule}");
    let all = col(&|r| r.group.msgs_per_sec);
    for (s, r) in systems.iter().zip(results) {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {:.2} | {:.2} | {} |{}",
            s.label,
            r.group.msgs_per_sec,
            window_cell(&r.group),
            r.group.p50_ms,
            r.group.p99_ms,
            same(&r.group),
            ratio_cells(r.group.msgs_per_sec, &all)
        );
    }

    let _ = writeln!(
        md,
        "\n**Idle connections** (`idle --connections {}`: chat-server: logged-in sockets of \
         one user; ejabberd: one user per socket; Synapse: one user per socket, each with a \
         pending `/sync` long-poll; NATS: one connection each; the relay: one name per socket; \
         server RSS from /proc before and after, 2 s after the last one opened)\n",
        opts.idle
    );
    let _ = writeln!(md, "| system | opened | RSS per connection | load |{names}");
    let _ = writeln!(md, "|---|---|---|---|{rule}");
    let all = col(&|r| r.idle.rss_per_connection.unwrap_or_default());
    for (s, r) in systems.iter().zip(results) {
        let rss = r.idle.rss_per_connection.unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {:.0} of {:.0} | {:.1} KiB | {:.2} |{}",
            s.label,
            r.idle.delivered,
            r.idle.sent,
            rss / 1024.0,
            r.idle.load,
            ratio_cells(rss, &all)
        );
    }

    let _ = writeln!(
        md,
        "\n**New connection + login** (`connect`, 4 at a time)\n"
    );
    let _ = writeln!(md, "| system | per second | p50 ms | p99 ms |{names}");
    let _ = writeln!(md, "|---|---|---|---|{rule}");
    let all = col(&|r| r.connect.msgs_per_sec);
    for (s, r) in systems.iter().zip(results) {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {:.2} |{}",
            s.label,
            r.connect.msgs_per_sec,
            r.connect.p50_ms,
            r.connect.p99_ms,
            ratio_cells(r.connect.msgs_per_sec, &all)
        );
    }

    // Targets of issue #8, judged on the plain-WebSocket chat row (the peers run without TLS).
    let chat = &results[0];
    let tls = &results[1];
    let (nats, ejabberd) = (&results[2], &results[3]);
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let all_runs = results
        .iter()
        .flat_map(|r| [&r.max, &r.one_write, &r.at50, &r.at90, &r.group])
        .chain(raw);
    let lossless = all_runs.clone().all(|r| same(r) != "**no**");
    let _ = writeln!(
        md,
        "\n**Targets** (chat-server row with plain WS unless stated)\n"
    );
    let _ = writeln!(md, "| target | measured | |\n|---|---|---|");
    let mut target = |name: &str, measured: String, ok: bool| {
        let _ = writeln!(md, "| {name} | {measured} | {} |", verdict(ok));
    };
    // Twice: with the e2e load generator (Double Ratchet on every send and receive, on the
    // same two cores), and `--raw`, where the load generator does what it does for the peers.
    for (row, rate) in [
        ("e2e", chat.max.msgs_per_sec),
        ("`--raw`", raw[0].msgs_per_sec),
    ] {
        let vs_nats = rate / nats.max.msgs_per_sec.max(1e-9);
        let vs_ej = rate / ejabberd.max.msgs_per_sec.max(1e-9);
        target(
            &format!("throughput ≥ 0.5x NATS core over WS ({row})"),
            format!("{vs_nats:.2}x"),
            vs_nats >= 0.5,
        );
        target(
            &format!("throughput ≥ 5x ejabberd ({row})"),
            format!("{vs_ej:.2}x"),
            vs_ej >= 5.0,
        );
    }
    target(
        "p99 ≤ 5 ms at 50% of max",
        format!(
            "{} ms at {:.0}/s (TLS: {} ms); median of {} runs, range in brackets",
            p99_cell(&chat.at50),
            chat.at50.msgs_per_sec,
            p99_cell(&tls.at50),
            opts.latency_repeats
        ),
        chat.at50.p99_ms <= 5.0,
    );
    let plain_kib = chat.idle.rss_per_connection.unwrap_or(f64::MAX) / 1024.0;
    let tls_kib = tls.idle.rss_per_connection.unwrap_or(f64::MAX) / 1024.0;
    target(
        "≤ 8 KiB per idle plaintext WebSocket",
        format!("{plain_kib:.1} KiB"),
        plain_kib <= 8.0,
    );
    target(
        "≤ 16 KiB per idle TLS WebSocket",
        format!("{tls_kib:.1} KiB"),
        tls_kib <= 16.0,
    );
    let opened = chat.idle.delivered.min(tls.idle.delivered);
    target(
        "10k idle connections per instance",
        format!("{opened:.0} (plain and TLS)"),
        opened >= 10_000.0,
    );
    target(
        "no message lost (sent = delivered, every run)",
        (if lossless { "yes" } else { "no" }).to_owned(),
        lossless,
    );

    if let Some(text) = e2e_ceiling(&chat.max, cores, nats.max.msgs_per_sec) {
        let _ = writeln!(md, "\n{text}");
    }
    let _ = writeln!(
        md,
        "\n**How steadily this machine's cores ran** (`cargo xtask steadiness`: one thread \
         spinning per core, the work each 10 ms slice got done against a fast slice; \
         alone, before the peers started and after the last run): at the start {}; at the end \
         {}. Where a shared host slows every core at once in stretches, a system kept 70-80% \
         busy falls behind in them, whichever it is: read a p99 at 50% beside the peers' and \
         the relay's.",
        steady_start.describe(),
        steady_end.describe()
    );

    let failed = systems
        .iter()
        .zip(results)
        .flat_map(|(s, r)| r.runs().map(|run| (s.label, run)))
        .chain(raw.iter().map(|run| (systems[0].label, run)));
    for (label, run) in failed {
        if let Some(why) = &run.failed {
            let _ = writeln!(md, "\nFailed ({label}): `{}`: {why}", run.command);
        }
    }
    let _ = writeln!(md, "\n<details><summary>Commands of this run</summary>\n");
    for (s, r) in systems.iter().zip(results) {
        let _ = writeln!(md, "- {}:", s.label);
        for run in r.runs() {
            let _ = writeln!(md, "  - `{}`", run.command);
        }
    }
    for run in raw {
        let _ = writeln!(md, "- `{}`", run.command);
    }
    let _ = writeln!(md, "\n</details>");
    let _ = write!(md, "{END}");
    md
}

/// What the e2e throughput target can reach on this machine at best: the rate at which the
/// load generator's own work per message (the Double Ratchet on every send and receive, its
/// sockets) would keep every core busy with a chat-server that cost nothing, as a ratio to
/// NATS. `None` when the run gave no load generator CPU figure.
fn e2e_ceiling(e2e: &Run, cores: usize, nats_rate: f64) -> Option<String> {
    let generator_us = e2e.load_generator_us.filter(|us| *us > 0.0)?;
    let ceiling = cores as f64 * 1e6 / generator_us;
    let vs_nats = if nats_rate > 0.0 {
        format!("{:.2}x NATS", ceiling / nats_rate)
    } else {
        "NATS gave no rate".to_owned()
    };
    Some(format!(
        "**Ceiling of the e2e row on this machine:** the e2e load generator alone spent \
         {generator_us:.1} µs of CPU per message at the maximum, so its own work would keep \
         all {cores} cores busy at {ceiling:.0} msgs/s even if chat-server cost nothing: \
         {vs_nats}."
    ))
}

/// `10.3, 8.6; 97%`: server and load generator CPU per delivery (µs) and how busy both cores
/// were; `–` for a figure the run did not give.
fn cpu_cell(r: &Run) -> String {
    let us = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
    let busy = r
        .busy
        .map_or_else(|| "–".to_owned(), |b| format!("{b:.0}%"));
    format!("{}, {}; {busy}", us(r.server_us), us(r.load_generator_us))
}

fn window_cell(r: &Run) -> String {
    r.window.map_or_else(|| "–".into(), |w| w.to_string())
}

/// `16,64` as given on the command line.
fn windows_arg(windows: &[usize]) -> String {
    windows
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `16 and 64` (or `16, 32 and 64`) for prose.
fn windows_text(windows: &[usize]) -> String {
    match windows.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            let rest: Vec<String> = rest.iter().map(|w| w.to_string()).collect();
            format!("{} and {last}", rest.join(", "))
        }
        _ => windows_arg(windows),
    }
}

fn same(r: &Run) -> &'static str {
    if r.sent == r.delivered && r.sent > 0.0 {
        "yes"
    } else {
        "**no**"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_from_a_list_and_refuse_zero_or_junk() {
        assert_eq!(parse_windows("16,64").expect("a list"), vec![16, 64]);
        assert_eq!(parse_windows(" 8 ").expect("one window"), vec![8]);
        for bad in ["", "0", "16,", "16,x", "-4"] {
            assert!(parse_windows(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(windows_arg(&[16, 64]), "16,64");
        assert_eq!(windows_text(&[16, 64]), "16 and 64");
        assert_eq!(windows_text(&[8, 16, 64]), "8, 16 and 64");
        assert_eq!(windows_text(&[16]), "16");
    }

    fn latency_run(p99_ms: f64, delivered: f64) -> Run {
        Run {
            command: format!("p99 {p99_ms}"),
            sent: 100.0,
            delivered,
            p99_ms,
            ..Run::default()
        }
    }

    #[test]
    fn the_e2e_ceiling_is_the_load_generators_own_rate_on_every_core() {
        let run = |us: Option<f64>| Run {
            load_generator_us: us,
            ..Run::default()
        };
        let text = e2e_ceiling(&run(Some(5.0)), 2, 800_000.0).expect("a ceiling");
        assert!(text.contains("5.0 µs"), "{text}");
        assert!(text.contains("all 2 cores busy at 400000 msgs/s"), "{text}");
        assert!(text.contains("0.50x NATS"), "{text}");
        // Four cores, twice the ceiling.
        let text = e2e_ceiling(&run(Some(5.0)), 4, 800_000.0).expect("a ceiling");
        assert!(text.contains("all 4 cores busy at 800000 msgs/s"), "{text}");
        assert!(text.contains("1.00x NATS"), "{text}");
        assert!(
            e2e_ceiling(&run(Some(5.0)), 2, 0.0)
                .expect("a ceiling")
                .contains("NATS gave no rate")
        );
        assert!(e2e_ceiling(&run(None), 2, 800_000.0).is_none());
        assert!(e2e_ceiling(&run(Some(0.0)), 2, 800_000.0).is_none());
    }

    #[test]
    fn the_cpu_cell_shows_both_figures_and_the_busy_share_or_a_dash() {
        let json = r#"{"msgs_per_sec":77285.1,"machine_busy_pct":96.6,"server_cpu_us_per_msg":10.26,"load_generator_cpu_us_per_msg":8.6}"#;
        let r = Run {
            busy: json_number(json, "machine_busy_pct"),
            server_us: json_number(json, "server_cpu_us_per_msg"),
            load_generator_us: json_number(json, "load_generator_cpu_us_per_msg"),
            ..Run::default()
        };
        assert_eq!(cpu_cell(&r), "10.3, 8.6; 97%");
        assert_eq!(cpu_cell(&Run::default()), "–, –; –");
    }

    #[test]
    fn the_median_p99_run_is_kept_with_the_range_of_all_repeats() {
        let runs = [6.64, 4.07, 15.9].map(|p| latency_run(p, 100.0)).to_vec();
        let kept = median_run(runs).expect("a run");
        assert_eq!(kept.command, "p99 6.64");
        assert_eq!(kept.p99_runs, [6.64, 4.07, 15.9]);
        assert_eq!(p99_cell(&kept), "6.64 (4.07–15.90)");
        // Even count: the upper of the middle two.
        let runs = [1.0, 4.0, 2.0, 3.0].map(|p| latency_run(p, 100.0)).to_vec();
        assert_eq!(median_run(runs).expect("a run").p99_ms, 3.0);
        // One repeat: the run itself, shown without a range.
        let one = median_run(vec![latency_run(2.5, 100.0)]).expect("a run");
        assert_eq!(p99_cell(&one), "2.50");
        assert!(median_run(Vec::new()).is_none());
    }

    #[test]
    fn a_repeat_that_lost_messages_or_failed_is_the_one_shown() {
        let runs = vec![
            latency_run(1.0, 100.0),
            latency_run(2.0, 99.0),
            latency_run(3.0, 100.0),
        ];
        let kept = median_run(runs).expect("a run");
        assert_eq!(kept.command, "p99 2");
        assert_eq!(same(&kept), "**no**");
        let failed = Run {
            failed: Some("connection refused".into()),
            ..latency_run(0.0, 0.0)
        };
        let kept = median_run(vec![latency_run(1.0, 100.0), failed]).expect("a run");
        assert!(kept.failed.is_some());
    }

    #[test]
    fn repeats_parse_as_a_whole_number_of_at_least_one() {
        assert_eq!(parse_repeats("3").expect("3"), 3);
        for bad in ["0", "-1", "three", ""] {
            let err = parse_repeats(bad).expect_err(bad).to_string();
            assert!(err.contains("--latency-repeats"), "{err}");
        }
    }

    #[test]
    fn reads_numbers_of_flat_json() {
        let json =
            r#"{"scenario":"idle","sent":10,"p99_ms":1.5,"rate":null,"rss_per_connection":8192.0}"#;
        assert_eq!(json_number(json, "sent"), Some(10.0));
        assert_eq!(json_number(json, "p99_ms"), Some(1.5));
        assert_eq!(json_number(json, "rate"), None);
        assert_eq!(json_number(json, "rss_per_connection"), Some(8192.0));
        assert_eq!(json_number(json, "missing"), None);
    }

    #[test]
    fn synapse_rate_limits_nest_under_their_section() {
        let yaml = synapse_config(Path::new("/w/synapse"));
        let unlimited = "{per_second: 1000000, burst_count: 1000000}";
        assert!(yaml.contains(&format!("\nrc_message: {unlimited}\n")));
        assert!(yaml.contains(&format!(
            "\nrc_login:\n  address: {unlimited}\n  account: {unlimited}\n  failed_attempts: {unlimited}\n"
        )));
        assert_eq!(yaml.matches("\nrc_joins:").count(), 1);
        assert!(yaml.contains("enable_registration_without_verification: true\n"));
        assert!(yaml.contains("    database: /w/synapse/data/homeserver.db\n"));
    }

    #[test]
    fn home_of_reads_the_sixth_field_of_the_named_user_only() {
        let passwd =
            "ejabberd2:x:1:1::/nope:/bin/sh\nejabberd:x:105:114::/var/lib/ejabberd:/bin/sh\n";
        assert_eq!(
            home_of(passwd, "ejabberd").as_deref(),
            Some("/var/lib/ejabberd")
        );
        assert_eq!(home_of(passwd, "nats"), None);
        assert_eq!(home_of("ejabberd:x:105:114::", "ejabberd"), None);
    }
}
