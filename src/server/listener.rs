//! The accept loop: HTTP/1.1 with keep-alive and pipelining, guarded
//! against hostile clients (contract, guarantee 6).
//!
//! - A bound on open connections: a semaphore permit per connection; at the
//!   bound, new connections wait in the kernel's backlog.
//! - A connection that has not sent a whole request head within 10 s of
//!   opening, or of the end of its previous answer, is closed. hyper's
//!   header read timeout alone misses some idle connections (it is armed
//!   only once hyper polls for a head), so each connection task runs a
//!   watchdog of its own: the service is wrapped to count the requests in
//!   progress (from a whole head to the last byte of the answer handed to
//!   hyper) and to note when the connection last became idle, and the
//!   watchdog drops the connection once it has been idle for the limit. A
//!   request in progress (a slow handler, a strict order waiting for its
//!   flush, a body being read) is never cut; but an answer being written
//!   (a live stream, say) whose body has not made progress for the limit is:
//!   hyper asks for the next frame only once it could write the last, so a
//!   client that asks and then stops reading holds its connection (and its
//!   stream's place) for the limit, not for good.
//! - A request head over 16 KiB is refused with `431`.
//! - Accept errors (such as running out of file descriptors) are logged and
//!   retried after a short pause instead of ending the loop.
//!
//! Shutdown: stop accepting, let every connection finish its request in
//! flight (up to a grace period), then return.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::http::Front;
use crate::http::admission::{ClientKey, Shares, TrustedProxies};
use crate::limits::{BODY_BYTES_MAX, HEADER_BYTES_MAX, HEADER_READ_TIMEOUT_MS, SHUTDOWN_GRACE_MS};

/// How long the loop pauses after a failed accept.
const ACCEPT_BACKOFF_MS: u64 = 20;

/// The bounds on open connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most open connections (`--max-connections`); at the bound, new ones
    /// wait in the kernel's backlog.
    pub max: usize,
    /// Most open connections from one address (IPv6 by /64); past it a new
    /// one is answered `503` and closed at once.
    pub per_client: usize,
    /// Addresses not bound by `per_client`: their connections carry many
    /// clients (`--trusted-proxies`).
    pub trusted_proxies: TrustedProxies,
}

impl ConnectionLimits {
    /// `max` connections, each address holding at most `per_client`, no
    /// proxy trusted.
    #[cfg(test)]
    pub fn new(max: usize, per_client: usize) -> ConnectionLimits {
        ConnectionLimits {
            max,
            per_client,
            trusted_proxies: TrustedProxies::default(),
        }
    }
}

/// What a connection over its address's share is told before it is closed:
/// the contract's overload answer, written without reading the request.
const SHARE_USED_ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 97\r\n\r\n\
{\"error\":{\"code\":\"overloaded\",\"message\":\"too many connections from this address; retry shortly\"}}";

/// Binds `addr` with an accept queue of `backlog` connections (the
/// kernel caps it at `net.core.somaxconn`, 4096 on current Linux).
///
/// The queue must hold a burst: a flash sale opens with thousands of
/// connections in the same second. tokio's `TcpListener::bind` asks for
/// 128, like the standard library, and when that queue is full Linux drops
/// the client's last handshake packet: the client believes it is
/// connected, the server never sees the connection, and a client that
/// sends nothing is never closed (it was measured: of 600 silent
/// connections opened in one burst, 184 stayed open for good).
///
/// # Errors
/// The socket cannot be made, bound or listened on.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    if let Some(cap) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|&cap| cap < backlog)
    {
        tracing::warn!(
            somaxconn = cap,
            wanted = backlog,
            "the kernel caps the accept queue below what a burst of connections needs; \
             raise net.core.somaxconn"
        );
    }
    socket.listen(backlog)
}

/// Serves `app` on `listener` until `shutdown` turns true, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Front,
    limits: ConnectionLimits,
    shutdown: watch::Receiver<bool>,
) {
    let idle_limit = Duration::from_millis(HEADER_READ_TIMEOUT_MS);
    serve_with_idle_limit(listener, app, limits, shutdown, idle_limit).await;
}

/// [`serve`], with the idle limit as a parameter (tests use a short one).
async fn serve_with_idle_limit(
    listener: TcpListener,
    app: Front,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    idle_limit: Duration,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max.max(1)));
    let shares = Arc::new(Shares::new(limits.per_client));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The idle watchdog below closes a connection that has no whole
        // head `idle_limit` after opening or after its last answer; hyper's
        // own head timer would arm a second timer for every request.
        .header_read_timeout(None)
        .max_header_size(HEADER_BYTES_MAX)
        // Room for a full head and a pipelined body or two, no more.
        .max_buf_size(HEADER_BYTES_MAX + BODY_BYTES_MAX)
        .keep_alive(true)
        .pipeline_flush(false);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // closed: never happens, the loop owns it
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                continue;
            }
        };
        let share = if limits.trusted_proxies.contains(peer.ip()) {
            None
        } else {
            match shares.try_take(ClientKey::addr(peer.ip())) {
                Some(share) => Some(share),
                None => {
                    // Best effort: a client past its share gets the answer
                    // if the socket takes it at once, and is closed either
                    // way; nothing waits on it.
                    let _ = stream.try_write(SHARE_USED_ANSWER);
                    tracing::debug!(%peer, "too many connections from one address; closed");
                    continue;
                }
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let activity = Arc::new(Activity::new());
        let service = tracked_service(app.clone(), Arc::clone(&activity), peer);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            match close_when_idle(connection, &activity, idle_limit).await {
                Some(Err(error)) => tracing::debug!(%error, "connection ended with an error"),
                Some(Ok(())) => {}
                None => tracing::debug!("closed a connection idle without a whole request head"),
            }
            drop((share, permit));
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("every connection finished"),
        () = tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
}

/// What a connection's watchdog knows of it.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    /// Requests whose head has arrived and whose answer hyper has not
    /// finished sending (pipelined requests can make it more than one).
    in_progress: u32,
    /// When the connection last had no request in progress: its opening,
    /// or the end of its latest answer.
    ///
    /// Invariant: only read as an idle start while `in_progress == 0`.
    idle_since: Instant,
    /// Answers handed to hyper whose body it has not finished (a stream
    /// lives here for its whole life).
    answering: u32,
    /// When an answer's body last gave hyper a frame, or the latest answer
    /// was handed over: hyper asks for the next frame only once it could
    /// write the last, so a client that stops reading stops this clock.
    ///
    /// Invariant: only read as a stall start while `answering > 0`.
    answer_progress: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                in_progress: 0,
                idle_since: Instant::now(),
                answering: 0,
                answer_progress: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // Each change is one field store: a poisoned lock is still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A whole request head has arrived: the connection is busy until the
    /// returned guard is dropped.
    fn begin(self: &Arc<Activity>) -> InProgress {
        let mut state = self.lock();
        state.in_progress = state
            .in_progress
            .checked_add(1)
            .expect("fewer requests in progress than u32::MAX on one connection");
        InProgress(Arc::clone(self))
    }

    /// When the connection may be closed: `limit` after it became idle,
    /// or `limit` after an answer last made progress (a client that does
    /// not read what it asked for); `None` while a request is handled and
    /// no answer is being written.
    fn deadline(&self, limit: Duration) -> Option<Instant> {
        let state = self.lock();
        if state.in_progress == 0 {
            Some(state.idle_since + limit)
        } else if state.answering > 0 {
            Some(state.answer_progress + limit)
        } else {
            None
        }
    }

    /// An answer was handed to hyper; until the returned guard is dropped
    /// its body counts as being written.
    fn answer(self: &Arc<Activity>) -> Answering {
        let mut state = self.lock();
        state.answering = state
            .answering
            .checked_add(1)
            .expect("fewer answers being written than u32::MAX on one connection");
        state.answer_progress = Instant::now();
        Answering(Arc::clone(self))
    }

    /// An answer's body gave hyper a frame.
    fn progressed(&self) {
        self.lock().answer_progress = Instant::now();
    }
}

/// A request in progress on a connection; dropped when its answer has been
/// sent (or abandoned).
#[derive(Debug)]
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        assert!(state.in_progress > 0, "a request ended twice");
        state.in_progress -= 1;
        if state.in_progress == 0 {
            state.idle_since = Instant::now();
        }
    }
}

/// An answer being written; dropped with its body.
#[derive(Debug)]
struct Answering(Arc<Activity>);

impl Drop for Answering {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        assert!(state.answering > 0, "an answer ended twice");
        state.answering -= 1;
    }
}

/// An answer's body that keeps its request in progress until hyper drops
/// it, which it does once the last byte is written (or the connection went),
/// and notes each frame it hands over.
struct Tracked {
    body: Body,
    answering: Answering,
    _in_progress: InProgress,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.answering.0.progressed();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `app` as a hyper service that marks each request in progress on
/// `activity`, from its head to the end of its answer.
fn tracked_service(
    app: Front,
    activity: Arc<Activity>,
    peer: std::net::SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let in_progress = activity.begin();
        // The client address, for rate limits on requests without a token.
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let app = app.clone();
        let activity = Arc::clone(&activity);
        async move {
            let response = app.call(request).await;
            let answering = activity.answer();
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(Tracked {
                    body,
                    answering,
                    _in_progress: in_progress,
                })
            }))
        }
    })
}

/// Runs `connection` to its end, unless it stays idle (no request in
/// progress) for `limit`: then drops it, which closes the socket, and
/// returns `None`.
async fn close_when_idle<F: Future>(
    connection: F,
    activity: &Activity,
    limit: Duration,
) -> Option<F::Output> {
    tokio::pin!(connection);
    let mut check_at = Instant::now() + limit;
    loop {
        tokio::select! {
            output = &mut connection => return Some(output),
            () = tokio::time::sleep_until(check_at) => {
                let now = Instant::now();
                check_at = match activity.deadline(limit) {
                    Some(deadline) if deadline <= now => return None,
                    Some(deadline) => deadline,
                    // A request being handled (a slow handler, a strict
                    // order waiting for its flush): never cut; look again
                    // a limit later.
                    None => now + limit,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LISTEN_BACKLOG;
    use axum::Router;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const LIMIT: Duration = Duration::from_millis(400);

    async fn start() -> (std::net::SocketAddr, watch::Sender<bool>) {
        let app = Router::new().route("/fast", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(LIMIT * 3).await;
                "done"
            }),
        );
        serve_app(app)
    }

    /// Serves `app` on a free port with the test's idle limit.
    fn serve_app(app: Router) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = bind("127.0.0.1:0".parse().expect("addr"), LISTEN_BACKLOG).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(serve_with_idle_limit(
            listener,
            app.into(),
            ConnectionLimits::new(100, 100),
            shutdown,
            LIMIT,
        ));
        (addr, stop)
    }

    /// Reads until `needle` has arrived; panics on EOF first.
    async fn read_until(stream: &mut TcpStream, needle: &str) {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before {needle:?}: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits for the server to close `stream`; returns how long that took.
    async fn closed_after(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(LIMIT * 10, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("not closed within {:?}", LIMIT * 10),
            }
        }
    }

    #[test]
    fn the_share_answer_is_well_framed() {
        let text = std::str::from_utf8(SHARE_USED_ANSWER).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let declared: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|n| n.parse().ok())
            .expect("a content length");
        assert_eq!(declared, body.len());
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(json["error"]["code"], "overloaded");
    }

    /// An endless answer, a frame every `every`.
    fn endless(every: Duration, frame_bytes: usize) -> axum::body::Body {
        let frames = futures_util::stream::unfold((), move |()| async move {
            tokio::time::sleep(every).await;
            let frame = Bytes::from(vec![b'x'; frame_bytes]);
            Some((Ok::<_, std::convert::Infallible>(frame), ()))
        });
        axum::body::Body::from_stream(frames)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_an_endless_answer_is_cut_and_a_reader_is_not() {
        let app = Router::new()
            .route(
                "/flood",
                get(|| async { endless(Duration::from_millis(1), 64 * 1024) }),
            )
            .route("/trickle", get(|| async { endless(LIMIT / 4, 16) }));
        let (addr, _stop) = serve_app(app);
        // A reader of a slow endless answer stays, well past the limit.
        let reader = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /trickle HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let until = Instant::now() + LIMIT * 4;
            let mut buf = [0u8; 4096];
            while Instant::now() < until {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "a reading client was cut");
            }
        });
        // Asks for a flood and never reads: the buffers fill, the body
        // stops making progress, and the connection is closed.
        let mut stalled = TcpStream::connect(addr).await.expect("connect");
        stalled
            .write_all(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        tokio::time::sleep(LIMIT * 6).await;
        let mut received = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let closed = loop {
            match tokio::time::timeout(LIMIT * 4, stalled.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(n)) => received += n,
                Err(_) => break false,
            }
            // Only what the buffers held: an open connection would
            // stream on for ever.
            if received > 64 << 20 {
                break false;
            }
        };
        assert!(closed, "still streaming after {received} bytes");
        reader.await.expect("the reader was served throughout");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_close_at_the_limit_and_busy_ones_do_not() {
        let (addr, _stop) = start().await;
        // Silent from its opening, and with half a head.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut partial = TcpStream::connect(addr).await.expect("connect");
        partial
            .write_all(b"GET /fast HTTP/1.1\r\n")
            .await
            .expect("write");
        // A slow handler outlasts the limit and is answered in full, then
        // the connection is closed a limit after that answer.
        let slow = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            read_until(&mut s, "done").await;
            closed_after(&mut s).await
        });
        // Pipelined requests, then one every half limit: stays open.
        let busy = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(
                b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n",
            )
            .await
            .expect("write");
            read_until(&mut s, "done").await;
            for _ in 0..6 {
                tokio::time::sleep(LIMIT / 2).await;
                s.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .expect("write");
                read_until(&mut s, "ok").await;
            }
        });
        let silent_for = closed_after(&mut silent).await;
        let partial_for = closed_after(&mut partial).await;
        assert!(
            silent_for >= LIMIT - Duration::from_millis(50),
            "{silent_for:?}"
        );
        assert!(silent_for < LIMIT * 3, "{silent_for:?}");
        assert!(partial_for < LIMIT * 3, "{partial_for:?}");
        let slow_idle = slow.await.expect("slow");
        assert!(
            slow_idle >= LIMIT - Duration::from_millis(50) && slow_idle < LIMIT * 3,
            "closed {slow_idle:?} after the slow answer"
        );
        busy.await.expect("busy connection served throughout");
    }
}
