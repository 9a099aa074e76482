//! The HTTP client: one persistent HTTP/1.1 keep-alive connection per worker.
//!
//! [`Conn`] owns a single `hyper` connection over a `TcpStream` with
//! `TCP_NODELAY`, so `--connections` is exactly the number of sockets the
//! server sees. A connection that fails or times out is dropped and opened
//! again on the next request; nothing here ever retries a request, because a
//! mutating request that got no answer may or may not have happened.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::limits;

/// Why a request got no answer. Such a request may or may not have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// The TCP connect or the HTTP handshake failed.
    Connect,
    /// No whole answer within the request timeout.
    Timeout,
    /// The connection broke while sending or receiving.
    Broken,
    /// The answer's body was larger than we read.
    BodyTooLarge,
    /// The request could not be built (a bad header value).
    BadRequest,
}

impl Failure {
    /// A short label for tables and the report.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Broken => "connection broken",
            Self::BodyTooLarge => "body too large",
            Self::BadRequest => "request not built",
        }
    }
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// GET, POST, PUT, ...
    pub method: Method,
    /// Path and query, e.g. `/v1/orders`.
    pub path: &'a str,
    /// A bearer token, if the route needs one.
    pub token: Option<&'a str>,
    /// An `Idempotency-Key`, for the routes that take one.
    pub idempotency_key: Option<&'a str>,
    /// A JSON body.
    pub body: Option<Bytes>,
}

impl<'a> Call<'a> {
    /// A GET of `path`.
    #[must_use]
    pub fn get(path: &'a str) -> Self {
        Self {
            method: Method::GET,
            path,
            token: None,
            idempotency_key: None,
            body: None,
        }
    }

    /// A request with a JSON body.
    #[must_use]
    pub fn json(method: Method, path: &'a str, body: Bytes) -> Self {
        Self {
            method,
            path,
            token: None,
            idempotency_key: None,
            body: Some(body),
        }
    }

    /// The same request with a bearer token.
    #[must_use]
    pub fn token(mut self, token: &'a str) -> Self {
        self.token = Some(token);
        self
    }

    /// The same request with an `Idempotency-Key`.
    #[must_use]
    pub fn idempotency_key(mut self, key: &'a str) -> Self {
        self.idempotency_key = Some(key);
        self
    }
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
    /// Whether a `Retry-After` header came with it.
    pub retry_after: bool,
}

/// The contract's error body: `{"error": {"code", "message"}}`.
#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, serde::Deserialize)]
struct ErrorDetail {
    code: String,
}

impl Answer {
    /// Whether the status is 2xx.
    #[must_use]
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error.code` of a non-2xx answer; `None` for 2xx or a body that is
    /// not the contract's error shape.
    #[must_use]
    pub fn error_code(&self) -> Option<String> {
        if self.is_success() {
            return None;
        }
        serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .map(|b| b.error.code)
    }

    /// The body parsed as JSON into `T`.
    ///
    /// # Errors
    ///
    /// The body is not valid JSON of that shape.
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The body as text, cut short, for error messages.
    #[must_use]
    pub fn body_excerpt(&self) -> String {
        const EXCERPT_BYTES_MAX: usize = 300;
        let end = self.body.len().min(EXCERPT_BYTES_MAX);
        String::from_utf8_lossy(self.body.get(..end).unwrap_or_default()).into_owned()
    }
}

/// One keep-alive HTTP/1.1 connection to the server, reopened after a failure.
#[derive(Debug)]
pub struct Conn {
    addr: SocketAddr,
    host: HeaderValue,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
    connects: u64,
    /// When the last answer ended (or the connection opened).
    last_used: Instant,
    /// Reopen before use when idle this long.
    idle_reopen_after: Duration,
}

impl Conn {
    /// A connection to `addr`, opened lazily; each request may take `timeout`.
    ///
    /// # Errors
    ///
    /// Never in practice: the host header is built from a socket address.
    pub fn new(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let host = HeaderValue::from_str(&addr.to_string())?;
        Ok(Self {
            addr,
            host,
            timeout,
            sender: None,
            connects: 0,
            last_used: Instant::now(),
            idle_reopen_after: limits::IDLE_REOPEN_AFTER,
        })
    }

    /// Changes how long the connection may idle before it is reopened
    /// (default [`limits::IDLE_REOPEN_AFTER`]).
    pub fn set_idle_reopen_after(&mut self, idle: Duration) {
        self.idle_reopen_after = idle;
    }

    /// Opens the connection now (before a run starts, so all are warm).
    ///
    /// # Errors
    ///
    /// The connect or the handshake failed or timed out.
    pub async fn open(&mut self) -> Result<(), Failure> {
        if self.sender.is_none() {
            let sender = tokio::time::timeout(limits::CONNECT_TIMEOUT, self.handshake())
                .await
                .map_err(|_| Failure::Connect)??;
            self.sender = Some(sender);
        }
        Ok(())
    }

    /// How many TCP connections this `Conn` has opened so far (1 when
    /// keep-alive held for the whole run).
    #[must_use]
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Sends one request and reads the whole answer.
    ///
    /// # Errors
    ///
    /// The request got no answer: see [`Failure`]. The connection is dropped
    /// and the next request opens a fresh one.
    pub async fn send(&mut self, call: &Call<'_>) -> Result<Answer, Failure> {
        match tokio::time::timeout(self.timeout, self.send_inner(call)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(failure)) => {
                self.sender = None;
                Err(failure)
            }
            Err(_) => {
                self.sender = None;
                Err(Failure::Timeout)
            }
        }
    }

    async fn send_inner(&mut self, call: &Call<'_>) -> Result<Answer, Failure> {
        // A connection idle near the server's cutoff is reopened, not raced.
        let fresh = self.last_used.elapsed() < self.idle_reopen_after;
        let usable = match self.sender.as_mut() {
            Some(sender) if fresh => sender.ready().await.is_ok(),
            _ => false,
        };
        if !usable {
            self.sender = None;
            let sender = tokio::time::timeout(limits::CONNECT_TIMEOUT, self.handshake())
                .await
                .map_err(|_| Failure::Connect)??;
            self.sender = Some(sender);
        }
        let request = self.build(call)?;
        let sender = self.sender.as_mut().ok_or(Failure::Connect)?;
        sender.ready().await.map_err(|_| Failure::Broken)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| Failure::Broken)?;
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key(RETRY_AFTER);
        let body = Limited::new(response.into_body(), limits::RESPONSE_BODY_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Failure::BodyTooLarge
                } else {
                    Failure::Broken
                }
            })?
            .to_bytes();
        self.last_used = Instant::now();
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    fn build(&self, call: &Call<'_>) -> Result<Request<Full<Bytes>>, Failure> {
        let mut builder = Request::builder()
            .method(call.method.clone())
            .uri(call.path)
            .header(HOST, self.host.clone());
        if let Some(token) = call.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(key) = call.idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        let body = match &call.body {
            Some(bytes) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                Full::new(bytes.clone())
            }
            None => Full::new(Bytes::new()),
        };
        builder.body(body).map_err(|_| Failure::BadRequest)
    }

    async fn handshake(&mut self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        self.connects = self.connects.saturating_add(1);
        self.last_used = Instant::now();
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|_| Failure::Connect)?;
        stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        // The connection task ends when the sender is dropped or the socket
        // breaks; its error reaches us through the sender.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}
