//! The end-to-end harness: real `chat-server` processes on loopback with keys from
//! `chatctl keys init`, and native clients (the `chatctl` library) talking to them.
//!
//! Binaries are built once per test run with the cargo that runs the tests (`cargo build -p
//! chat-server -p chatctl`, plus the test-only `chat-server-hostile`), so `cargo test -p
//! chat-tests` works on its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chat_core::identity::DeviceKeys;
use chat_core::wire::{ClientFrame, ErrorCode, ServerFrame, SignedPrekey};
use chatctl::client::conn::Connection;
use chatctl::client::{Client, ClientOptions};
use tempfile::TempDir;

pub mod browser;
pub mod docker;

/// Paths of the binaries under test.
#[derive(Debug)]
pub struct Binaries {
    pub chat_server: PathBuf,
    pub chat_server_hostile: PathBuf,
    pub chatctl: PathBuf,
}

/// The workspace root (the parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, relative to the workspace, or `target/`).
pub fn target_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    }
}

/// Builds (once) and returns the binaries.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build = |args: &[&str]| {
            let status = Command::new(&cargo)
                .current_dir(workspace_root())
                .arg("build")
                .args(args)
                .status()
                .expect("cannot run cargo");
            assert!(status.success(), "cargo build {args:?} failed");
        };
        build(&["-p", "chat-server", "-p", "chatctl"]);
        build(&[
            "-p",
            "chat-server",
            "--features",
            "hostile",
            "--bin",
            "chat-server-hostile",
        ]);
        let dir = target_dir().join("debug");
        Binaries {
            chat_server: dir.join("chat-server"),
            chat_server_hostile: dir.join("chat-server-hostile"),
            chatctl: dir.join("chatctl"),
        }
    })
}

/// A key directory made by `chatctl keys init --unencrypted`.
#[derive(Debug)]
pub struct Keys {
    pub dir: TempDir,
}

impl Keys {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let out = Command::new(&binaries().chatctl)
            .args(["keys", "init", "--unencrypted", "--dir"])
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "chatctl keys init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A chat-server process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    pub port: u16,
    pub keys: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    hostile: Option<String>,
    /// More `serve` arguments (such as `--store nats://...`), kept across restarts.
    extra_args: Vec<String>,
}

impl ServerProcess {
    /// Starts a server on a free loopback port with its own data directory inside `work`.
    pub fn start(keys: &Path, work: &Path) -> Result<Self> {
        Self::spawn(keys, &work.join("data"), &work.join("server.log"), 0, None)
    }

    /// Starts the test-only hostile server (`--hostile MODE`).
    pub fn start_hostile(keys: &Path, work: &Path, mode: &str) -> Result<Self> {
        Self::spawn(
            keys,
            &work.join("data"),
            &work.join("server.log"),
            0,
            Some(mode.to_owned()),
        )
    }

    /// Starts a server with more `serve` arguments, e.g. `["--store", "nats://127.0.0.1:4222"]`.
    pub fn start_with_args(keys: &Path, work: &Path, extra_args: &[&str]) -> Result<Self> {
        Self::spawn_with_args(
            keys,
            &work.join("data"),
            &work.join("server.log"),
            0,
            None,
            extra_args.iter().map(|a| (*a).to_owned()).collect(),
        )
    }

    fn spawn(
        keys: &Path,
        data: &Path,
        log: &Path,
        port: u16,
        hostile: Option<String>,
    ) -> Result<Self> {
        Self::spawn_with_args(keys, data, log, port, hostile, Vec::new())
    }

    fn spawn_with_args(
        keys: &Path,
        data: &Path,
        log: &Path,
        port: u16,
        hostile: Option<String>,
        extra_args: Vec<String>,
    ) -> Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let binary = match hostile {
            Some(_) => &binaries().chat_server_hostile,
            None => &binaries().chat_server,
        };
        let mut cmd = Command::new(binary);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .arg("--keys")
            .arg(keys)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .stdin(Stdio::null());
        if let Some(mode) = &hostile {
            cmd.args(["--hostile", mode]);
        }
        cmd.args(&extra_args);
        let before = std::fs::read_to_string(log).map(|s| s.len()).unwrap_or(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut server = Self {
            child: Some(child),
            port,
            keys: keys.to_owned(),
            data: data.to_owned(),
            log: log.to_owned(),
            hostile,
            extra_args,
        };
        server.port = server.wait_listening(before)?;
        Ok(server)
    }

    /// Waits for the "listening" line the server logs and reads the port from it.
    fn wait_listening(&mut self, log_offset: usize) -> Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let new = text.get(log_offset..).unwrap_or_default();
            if let Some(line) = new.lines().find(|l| l.contains("chat-server listening")) {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .ok_or_else(|| anyhow!("no addr in {line:?}"))?;
                let port = addr.rsplit(':').next().unwrap_or_default().parse()?;
                return Ok(port);
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("chat-server exited with {status}: {new}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "chat-server did not start within 20 s; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn ca(&self) -> PathBuf {
        self.keys.join("tls/ca.pem")
    }

    /// Client options for users kept under `home`.
    pub fn client_options(&self, home: &Path) -> ClientOptions {
        ClientOptions {
            server: self.url(),
            ca: self.ca(),
            home: home.to_owned(),
            directory_key: self.keys.join("directory.pub"),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .context("server not running")
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn sigterm(&mut self) -> Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid()?.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        self.wait_exit(Duration::from_secs(15))
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("server not running")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("chat-server did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port, data and keys.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.sigterm()?;
        }
        let again = Self::spawn_with_args(
            &self.keys,
            &self.data,
            &self.log,
            self.port,
            self.hostile.clone(),
            self.extra_args.clone(),
        )?;
        *self = again;
        Ok(())
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `nats-server -js` process (Debian package `nats-server`) on a free loopback port with its
/// own store directory; killed on drop. Missing `nats-server` is an error, never a skip.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: TempDir,
}

impl NatsServer {
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut server = Self {
            child: None,
            port,
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let before = std::fs::metadata(self.log()).map_or(0, |m| m.len() as usize);
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("jetstream"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context(
                "cannot run `nats-server`: these tests need the real server; \
                 install it with `apt-get install nats-server` (or `cargo xtask deps`)",
            )?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(self.log()).unwrap_or_default();
            if text
                .get(before..)
                .unwrap_or_default()
                .contains("Server is ready")
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("nats-server exited with {status}:\n{text}");
                }
            }
            if Instant::now() > deadline {
                bail!("nats-server not ready within 20 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A test world: one key directory, one server, a home for client state.
#[derive(Debug)]
pub struct World {
    pub keys: Keys,
    pub work: TempDir,
    pub server: ServerProcess,
}

impl World {
    pub fn new() -> Result<Self> {
        let keys = Keys::new()?;
        let work = tempfile::tempdir()?;
        let server = ServerProcess::start(keys.path(), work.path())?;
        Ok(Self { keys, work, server })
    }

    pub fn hostile(mode: &str) -> Result<Self> {
        let keys = Keys::new()?;
        let work = tempfile::tempdir()?;
        let server = ServerProcess::start_hostile(keys.path(), work.path(), mode)?;
        Ok(Self { keys, work, server })
    }

    pub fn options(&self) -> ClientOptions {
        self.server
            .client_options(&self.work.path().join("clients"))
    }

    pub async fn register(&self, name: &str) -> Result<Client> {
        Client::register(&self.options(), name).await
    }

    pub async fn open(&self, name: &str) -> Result<Client> {
        Client::open(&self.options(), name).await
    }
}

/// How long a raw connection waits for the server's answer to one frame.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A `Register` frame for `name`, device 1, with the identity and signed prekey of `keys` and no
/// one-time prekeys: for tests that speak the protocol frame by frame.
pub fn register_frame(name: &str, keys: &DeviceKeys) -> ClientFrame {
    let identity = keys.identity().public();
    let spk = keys.signed_prekey();
    ClientFrame::Register {
        username: name.into(),
        device_id: 1,
        identity_ed25519: *identity.signing_key().as_bytes(),
        identity_x25519: *identity.dh_key().as_bytes(),
        identity_signature: identity.dh_signature().to_bytes(),
        signed_prekey: SignedPrekey {
            id: spk.id,
            public: *spk.key.as_bytes(),
            signature: spk.signature.to_bytes(),
        },
        one_time_prekeys: vec![],
    }
}

/// The next frame on `conn` (waiting up to 5 s), or why there was none.
pub async fn answer(conn: &mut Connection) -> Result<ServerFrame, String> {
    conn.next_frame(ANSWER_WAIT)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// The code of `frame` if it is an `Error`, else `None`.
pub fn error_code_of(frame: &Result<ServerFrame, String>) -> Option<ErrorCode> {
    match frame {
        Ok(ServerFrame::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

/// The code of the next frame on `conn` if it is an `Error` (see [`answer`]), else `None`.
pub async fn error_code(conn: &mut Connection) -> Option<ErrorCode> {
    error_code_of(&answer(conn).await)
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Whether `needle` occurs in any file under `dir`.
pub fn dir_contains(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    files_under(dir).into_iter().find(|f| {
        std::fs::read(f)
            .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
    })
}
