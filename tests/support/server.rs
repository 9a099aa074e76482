//! The real `flashcore` binary as a child process, and a small blocking
//! HTTP/1.1 client that can also send raw (hostile) bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flashcore::domain::UserId;
use flashcore::http::auth::JwtKeys;
use serde_json::Value;

/// The secret every test server signs with.
pub const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";

/// A running server.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    log: Arc<Mutex<String>>,
    keys: JwtKeys,
}

impl Server {
    /// Starts the binary on a free loopback port with `data_dir`, waits until
    /// `/readyz` answers 200. The catalog is empty unless `args` name one.
    pub fn start(data_dir: &Path, args: &[&str]) -> Server {
        Server::try_start(data_dir, args, Duration::from_secs(60)).expect("server starts")
    }

    /// Like `start`, but returns the log when the server exits or is not
    /// ready in time.
    pub fn try_start(data_dir: &Path, args: &[&str], patience: Duration) -> Result<Server, String> {
        Server::launch(data_dir, args, &[], true, patience)
    }

    /// Starts the binary with extra environment variables (such as
    /// `FLASHCORE_FAULTS`); waits until it listens and, if `wait_ready`,
    /// until `/readyz` answers 200.
    pub fn launch(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        wait_ready: bool,
        patience: Duration,
    ) -> Result<Server, String> {
        let mut child = serve_command(data_dir, args, env)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().ok_or("no stderr")?;
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let started = Instant::now();
        let addr = loop {
            let found = {
                let log = log.lock().unwrap_or_else(|p| p.into_inner());
                log.lines()
                    .find_map(|l| l.split("address=").nth(1))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            if let Some(addr) = found {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited {status} before listening:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                ));
            }
            if started.elapsed() > patience {
                let _ = child.kill();
                return Err("never listened".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut server = Server {
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
            log,
            keys: JwtKeys::new(SECRET.as_bytes()),
        };
        if !wait_ready {
            return Ok(server);
        }
        loop {
            let ready = Client::try_connect(server.addr)
                .and_then(|mut c| c.try_send("GET", "/readyz", &[], None));
            if ready.is_ok_and(|r| r.status == 200) {
                return Ok(server);
            }
            if let Some(Ok(Some(status))) = server.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "exited {status} before it was ready:\n{}",
                    server.log()
                ));
            }
            if started.elapsed() > patience {
                return Err(format!("not ready in time:\n{}", server.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A new keep-alive connection.
    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A customer token.
    pub fn customer(&self, user: &str) -> String {
        self.token(user, false, 3_600)
    }

    /// An admin token.
    pub fn admin(&self) -> String {
        self.token("ops", true, 3_600)
    }

    /// A token with any role and lifetime (negative: already expired).
    pub fn token(&self, user: &str, admin: bool, ttl_secs: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (start, ttl) = if ttl_secs < 0 {
            (now - 2 * ttl_secs.unsigned_abs(), ttl_secs.unsigned_abs())
        } else {
            (now, ttl_secs.unsigned_abs())
        };
        self.keys
            .issue(UserId::parse(user).expect("valid user"), admin, start, ttl)
            .expect("signs")
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`, ...) to the running process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        // `kill` the command, not libc: test crates stay free of unsafe.
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits up to `patience` for the process to exit by itself.
    pub fn wait_exit(&mut self, patience: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if started.elapsed() > patience {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if started.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
                panic!("no exit within 40 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The error code of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A blocking HTTP/1.1 client on one keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).expect("connects")
    }

    /// A new connection, or why there is none (a server that may have exited).
    pub fn try_connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            reader: BufReader::new(stream),
            addr,
        })
    }

    /// The connection itself, to wait on it directly.
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    /// Sends raw bytes.
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// A request; reconnects once if the server closed the connection.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        match self.try_send(method, path, headers, body) {
            Ok(r) => r,
            Err(_) => {
                *self = Client::connect(self.addr);
                self.try_send(method, path, headers, body)
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
            }
        }
    }

    pub fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> std::io::Result<Response> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(body) = body {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        if let Some(body) = body {
            request.push_str(body);
        }
        self.write_raw(request.as_bytes())?;
        self.read_response()
    }

    /// Reads one response (Content-Length or chunked bodies).
    pub fn read_response(&mut self) -> std::io::Result<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v): &(String, String)| v.clone())
        };
        let mut body = Vec::new();
        if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(len, 0);
            self.reader.read_exact(&mut body)?;
        } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// JSON request headers with a token (and optionally an idempotency key).
pub fn json_auth<'a>(token: &'a str, key: Option<&'a str>) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("Content-Type", "application/json".to_string()),
        ("Authorization", format!("Bearer {token}")),
    ];
    if let Some(key) = key {
        h.push(("Idempotency-Key", key.to_string()));
    }
    h
}

/// Borrows owned header pairs for `Client::send`.
pub fn hdrs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A small API wrapper for the common calls.
pub struct Api<'a> {
    pub client: Client,
    pub server: &'a Server,
}

impl<'a> Api<'a> {
    pub fn new(server: &'a Server) -> Api<'a> {
        Api {
            client: server.client(),
            server,
        }
    }

    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        let mut h: Vec<(&'static str, String)> = Vec::new();
        if body.is_some() {
            h.push(("Content-Type", "application/json".into()));
        }
        if let Some(t) = token {
            h.push(("Authorization", format!("Bearer {t}")));
        }
        if let Some(k) = key {
            h.push(("Idempotency-Key", k.into()));
        }
        self.client.send(method, path, &hdrs(&h), body)
    }

    pub fn create_sku(&mut self, id: &str, price: u64, stock: u64, limit: Option<u32>) -> Response {
        let admin = self.server.admin();
        let limit = limit.map_or("null".to_string(), |l| l.to_string());
        let body = format!(
            r#"{{"sku_id":"{id}","name":"Item {id}","price_cents":{price},"stock":{stock},"per_user_limit":{limit}}}"#
        );
        self.call("POST", "/v1/skus", Some(&admin), None, Some(&body))
    }

    pub fn order(&mut self, token: &str, lines: &[(&str, u32)], key: Option<&str>) -> Response {
        let items: Vec<String> = lines
            .iter()
            .map(|(s, q)| format!(r#"{{"sku_id":"{s}","qty":{q}}}"#))
            .collect();
        let body = format!(r#"{{"items":[{}]}}"#, items.join(","));
        self.call("POST", "/v1/orders", Some(token), key, Some(&body))
    }

    pub fn sku(&mut self, id: &str) -> Value {
        let r = self.call("GET", &format!("/v1/skus/{id}"), None, None, None);
        assert_eq!(
            r.status,
            200,
            "GET sku {id}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    /// Every SKU and every order (admin), to compare before and after.
    pub fn books(&mut self) -> (Value, Value) {
        let admin = self.server.admin();
        let skus = self.call("GET", "/v1/skus", None, None, None).json();
        let orders = self
            .call("GET", "/v1/orders?limit=500", Some(&admin), None, None)
            .json();
        (skus, orders)
    }
}

/// Runs `flashcore serve` on `data_dir` (with the test secret, overridden by
/// `env`) expecting it to refuse to start: waits up to `patience` for it to
/// exit and returns its exit status and everything it wrote to stderr. A
/// server still running then did not refuse: it is killed, and that panics.
pub fn refused_start(
    data_dir: &Path,
    env: &[(&str, &str)],
    patience: Duration,
) -> (ExitStatus, String) {
    let mut child = serve_command(data_dir, &[], env).spawn().expect("spawns");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if started.elapsed() > patience {
            let _ = child.kill();
            let _ = child.wait();
            let log = reader.join().unwrap_or_default();
            panic!("still running after {patience:?}, so it did not refuse to start:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().expect("stderr read"))
}

/// `flashcore serve` on a free loopback port with `data_dir`, the test
/// secret, no catalog unless `args` names one, `args` and `env`; stderr
/// piped, the rest closed.
fn serve_command(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flashcore"));
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir);
    if !args.contains(&"--catalog") {
        command
            .arg("--catalog")
            .arg(data_dir.join("no-catalog.json"));
    }
    command
        .args(args)
        .env("FLASHCORE_JWT_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .env_remove("FLASHCORE_CATALOG")
        .env_remove("FLASHCORE_FAULTS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Whether the server closed `stream` (EOF or reset), without waiting.
pub fn closed_by_server(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    let mut s = stream;
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    stream.set_nonblocking(false).expect("blocking");
    closed
}

/// An open `GET /v1/stream`, read event by event.
pub struct Stream {
    reader: BufReader<TcpStream>,
    /// The answer's status line and headers.
    pub head: String,
}

impl Stream {
    pub fn open(addr: SocketAddr) -> Stream {
        let mut tcp = TcpStream::connect(addr).expect("connects");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            tcp,
            "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .expect("sends");
        let mut reader = BufReader::new(tcp);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).expect("reads the head");
            assert!(n > 0, "closed before the end of the head: {head}");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        Stream { reader, head }
    }

    /// The next event's JSON, or `None` when the stream ended.
    pub fn next(&mut self) -> Option<Value> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            // Chunk sizes and `retry:` lines are skipped; an event is one
            // `data:` line of compact JSON.
            if let Some(json) = line.strip_prefix("data: ") {
                return Some(serde_json::from_str(json.trim_end()).expect("the event is JSON"));
            }
        }
    }
}
