//! Where the load goes: a `--url` on loopback, or a server we `--spawn`.
//!
//! The tool talks to loopback only: [`loopback_addr`] refuses any other host
//! before a single packet is sent. [`SpawnedServer`] starts `flashcore serve`
//! on a free loopback port with a fresh temp data dir and an empty catalog,
//! waits for `/readyz`, and stops it with SIGTERM (SIGKILL only after
//! [`limits::STOP_GRACE`]). If the tool fails or panics first, `Drop` kills
//! the child, so no server outlives the tool.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hyper::Uri;

use crate::cli::Durability;
use crate::client::{Call, Conn};
use crate::limits;

/// The socket address of a `--url`, which must be `http://` on loopback.
///
/// # Errors
///
/// Not a URL, not `http`, a path other than `/`, or a host that is not (or
/// does not resolve only to) a loopback address.
pub fn loopback_addr(url: &str) -> Result<SocketAddr> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("--url {url:?} is not a URL"))?;
    ensure!(
        uri.scheme_str() == Some("http"),
        "--url must start with http:// (got {url:?})"
    );
    ensure!(
        matches!(uri.path(), "" | "/") && uri.query().is_none(),
        "--url must be just scheme, host and port (got {url:?})"
    );
    let host = uri.host().context("--url has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => (bare, port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve --url host {host:?}"))?
            .collect(),
    };
    ensure!(!addrs.is_empty(), "--url host {host:?} resolves to nothing");
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "--url host {host:?} is {}, not a loopback address: this tool only loads a server \
             on this machine (127.0.0.0/8 or ::1)",
            bad.ip()
        );
    }
    // Prefer IPv4 loopback when a name resolves to both.
    let chosen = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied();
    chosen.context("--url resolves to nothing")
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The flashcore binary.
    pub server_bin: PathBuf,
    /// The JWT secret it gets in `FLASHCORE_JWT_SECRET`.
    pub jwt_secret: String,
    /// `--durability`.
    pub durability: Durability,
    /// `--reservation-ttl`.
    pub reservation_ttl: Duration,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
    /// Holds the child's pid from the moment it exists (0 when none), so an
    /// abort (second Ctrl-C) can kill it even while we wait for `/readyz`.
    pub pid_slot: Arc<AtomicU32>,
}

/// The default server binary: `flashcore` next to this executable.
///
/// # Errors
///
/// The path of this executable is unknown.
pub fn default_server_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let dir = exe.parent().context("this executable has no directory")?;
    // Integration tests run from target/<profile>/deps; the binary is one up.
    let name = if cfg!(windows) {
        "flashcore.exe"
    } else {
        "flashcore"
    };
    let beside = dir.join(name);
    if !beside.exists()
        && dir.ends_with("deps")
        && let Some(up) = dir.parent()
    {
        return Ok(up.join(name));
    }
    Ok(beside)
}

/// Under `cargo run` (cargo sets `CARGO` and `CARGO_MANIFEST_DIR`), builds the
/// server with the same profile first, so one command runs a whole
/// demonstration from a fresh checkout and never spawns a stale server. Run
/// directly, it only points at `bin` (and [`SpawnedServer::start`] explains
/// when it is missing).
///
/// # Errors
///
/// The build failed.
pub fn build_server_under_cargo(bin: &Path) -> Result<()> {
    let (Some(cargo), Some(manifest_dir)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        return Ok(());
    };
    let profile = bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|p| p.to_str())
        .unwrap_or("release")
        .to_owned();
    let mut command = Command::new(cargo);
    command.args(["build", "--quiet", "-p", "flashcore", "--bin", "flashcore"]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    println!("building the server first (cargo build -p flashcore, profile {profile})");
    let status = command
        .current_dir(manifest_dir)
        .stdin(Stdio::null())
        .status()
        .context("running cargo to build flashcore")?;
    ensure!(
        status.success(),
        "building flashcore failed ({status}); fix the build, or pass --server-bin PATH"
    );
    Ok(())
}

/// A `flashcore serve` we started, with its temp data dir.
#[derive(Debug)]
pub struct SpawnedServer {
    child: Option<Child>,
    addr: SocketAddr,
    log_path: PathBuf,
    // Removed when the server is dropped, after the child is gone.
    _dir: tempfile::TempDir,
}

/// How a spawned server ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// Its exit status as text (`exit status: 0`, `signal: 9`, ...).
    pub status: String,
    /// Whether it exited 0 on SIGTERM, as the contract says it does.
    pub clean: bool,
    /// Whether it had to be killed after the grace period.
    pub killed: bool,
}

impl SpawnedServer {
    /// Starts the server and waits until `/readyz` answers 200.
    ///
    /// # Errors
    ///
    /// The binary is missing, it could not be started, it exited, or it did not
    /// become ready within [`limits::READY_TIMEOUT`].
    pub async fn start(opts: &SpawnOptions) -> Result<Self> {
        ensure!(
            opts.server_bin.is_file(),
            "the flashcore server binary is not at {}: build it first with \
             `cargo build --release` at the workspace root (or pass --server-bin PATH)",
            opts.server_bin.display()
        );
        let mut last_error = None;
        for _ in 0..limits::SPAWN_ATTEMPTS {
            match Self::start_once(opts).await {
                Ok(server) => return Ok(server),
                // Another process may have taken the free port: try a new one.
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the server did not start")))
    }

    async fn start_once(opts: &SpawnOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("flashcore-loadtest-")
            .tempdir()
            .context("creating a temp data dir")?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).context("creating the data dir")?;
        let catalog = dir.path().join("catalog.json");
        std::fs::write(&catalog, b"{\"skus\": [], \"promotions\": []}\n")
            .context("writing the empty catalog")?;
        let addr = free_loopback_port()?;
        let log = File::create(&opts.log_path)
            .with_context(|| format!("creating {}", opts.log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log handle")?;
        let child = Command::new(&opts.server_bin)
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--catalog")
            .arg(&catalog)
            .arg("--durability")
            .arg(opts.durability.as_str())
            .arg("--reservation-ttl")
            .arg(humantime::format_duration(opts.reservation_ttl).to_string())
            .env("FLASHCORE_JWT_SECRET", &opts.jwt_secret)
            .stdin(Stdio::null())
            // Its own process group: a Ctrl-C at the terminal reaches only the
            // load tester, which then checks the books before stopping it.
            .process_group(0)
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", opts.server_bin.display()))?;
        opts.pid_slot.store(child.id(), Ordering::Relaxed);
        let mut server = Self {
            child: Some(child),
            addr,
            log_path: opts.log_path.clone(),
            _dir: dir,
        };
        match server.wait_ready().await {
            Ok(()) => Ok(server),
            Err(e) => {
                // Do not leave a half-started server behind.
                let _ = server.stop().await;
                opts.pid_slot.store(0, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut conn = Conn::new(self.addr, limits::READY_POLL_INTERVAL.saturating_mul(20))?;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting on the server")?
            {
                bail!(
                    "the server exited during start ({status}); its log ({}) ends with:\n{}",
                    self.log_path.display(),
                    log_tail(&self.log_path)
                );
            }
            if let Ok(answer) = conn.send(&Call::get("/readyz")).await
                && answer.status == 200
            {
                return Ok(());
            }
            if started.elapsed() > limits::READY_TIMEOUT {
                bail!(
                    "the server did not answer /readyz 200 within {}; its log ({}) ends with:\n{}",
                    humantime::format_duration(limits::READY_TIMEOUT),
                    self.log_path.display(),
                    log_tail(&self.log_path)
                );
            }
            tokio::time::sleep(limits::READY_POLL_INTERVAL).await;
        }
    }

    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where its output goes.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGTERM, then wait up to [`limits::STOP_GRACE`], then SIGKILL.
    ///
    /// # Errors
    ///
    /// The child's status could not be read.
    pub async fn stop(&mut self) -> Result<StopReport> {
        let Some(mut child) = self.child.take() else {
            bail!("the server was already stopped");
        };
        if let Some(status) = child.try_wait().context("waiting on the server")? {
            return Ok(report(status, false));
        }
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // Failure means it already exited; try_wait below sees that.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let started = Instant::now();
        while started.elapsed() < limits::STOP_GRACE {
            if let Some(status) = child.try_wait().context("waiting on the server")? {
                return Ok(report(status, false));
            }
            tokio::time::sleep(limits::STOP_POLL_INTERVAL).await;
        }
        let _ = child.kill();
        let status = child.wait().context("waiting on the killed server")?;
        Ok(report(status, true))
    }
}

fn report(status: ExitStatus, killed: bool) -> StopReport {
    StopReport {
        status: status.to_string(),
        clean: status.success() && !killed,
        killed,
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Only reached when stop() was not: an error or a panic.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGKILL for `pid`, for an abort (second Ctrl-C).
pub fn kill_now(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// A loopback port nobody listens on right now.
fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    listener.local_addr().context("reading the free port")
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let Ok(file) = File::open(path) else {
        return "(no log)".to_owned();
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    let start = lines.len().saturating_sub(limits::LOG_TAIL_LINES);
    lines.get(start..).unwrap_or_default().join("\n")
}

/// The server's resident memory in KiB, read from `/proc/<pid>/status`.
#[must_use]
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_taken() {
        assert_eq!(loopback_addr("http://127.0.0.1:8080").unwrap().port(), 8080);
        assert_eq!(
            loopback_addr("http://127.0.0.1:8080/").unwrap().port(),
            8080
        );
        assert!(
            loopback_addr("http://127.3.2.1:9")
                .unwrap()
                .ip()
                .is_loopback()
        );
        assert!(
            loopback_addr("http://[::1]:8080")
                .unwrap()
                .ip()
                .is_loopback()
        );
        assert!(
            loopback_addr("http://localhost:8080")
                .unwrap()
                .ip()
                .is_loopback()
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for url in [
            "http://10.0.0.1:8080",
            "http://192.168.1.10:80",
            "http://8.8.8.8",
            "https://127.0.0.1:8443",
            "http://127.0.0.1:8080/v1",
            "127.0.0.1:8080",
            "not a url",
            "http://0.0.0.0:8080",
        ] {
            assert!(loopback_addr(url).is_err(), "{url} was accepted");
        }
    }

    #[test]
    fn rss_of_this_process_is_read() {
        assert!(rss_kib(std::process::id()).unwrap_or(0) > 0);
    }

    #[tokio::test]
    async fn a_missing_binary_is_explained() {
        let opts = SpawnOptions {
            server_bin: PathBuf::from("/nonexistent/flashcore"),
            jwt_secret: "x".repeat(40),
            durability: Durability::Strict,
            reservation_ttl: Duration::from_secs(900),
            log_path: std::env::temp_dir().join("loadtest-missing-bin.log"),
            pid_slot: Arc::default(),
        };
        let err = SpawnedServer::start(&opts).await.unwrap_err().to_string();
        assert!(err.contains("cargo build --release"), "{err}");
    }
}
