//! Hostile clients against the real binary on loopback (contract,
//! guarantee 6): no single client, signed in or not, can hold more than a
//! small share of any pool, every route goes through admission, and a
//! connection that sends nothing is closed at 10 s whatever the others do.
//!
//! Clients come from several loopback addresses (127.0.0.2, .3, ...: the
//! whole 127/8 is this machine), so the server sees several clients the
//! way it would on a network. Bursts of connections are opened at once
//! from a tokio runtime, as a crowd (or a bot) opens them.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::server::{Api, Client, Server, closed_by_server};

/// A runtime for opening bursts of connections (and room for them: a test
/// holds up to ~2,200 sockets, and tests run two at a time).
fn runtime() -> tokio::runtime::Runtime {
    let _ = rlimit::increase_nofile_limit(16_384);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Opens `count` connections to `addr` from `from` all at once (their
/// handshakes in one burst) and gives them back as blocking std streams.
fn burst(
    rt: &tokio::runtime::Runtime,
    from: IpAddr,
    addr: SocketAddr,
    count: usize,
) -> Vec<TcpStream> {
    rt.block_on(async {
        let connects = (0..count).map(|_| async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(SocketAddr::new(from, 0))
                .expect("bind the source");
            let stream = socket.connect(addr).await.expect("connect");
            let stream = stream.into_std().expect("std");
            stream.set_nonblocking(false).expect("blocking");
            stream
        });
        futures_util::future::join_all(connects).await
    })
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The status of the first answer on `stream`, waiting at most `patience`;
/// `None` when the connection closed or nothing came.
fn status_of(stream: &mut TcpStream, patience: Duration) -> Option<u16> {
    stream.set_read_timeout(Some(patience)).expect("timeout");
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ').nth(1).and_then(|code| code.parse().ok())
}

fn customer_order_head(token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "POST /v1/orders HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{"
    )
}

#[test]
fn silent_connections_close_at_10_s_beside_dribbling_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let rt = runtime();
    // 600 that send nothing, opened in one burst, then 300 that send a
    // request head a byte a second. Before the fix, tokio's default accept
    // queue of 128 dropped handshakes of such a burst: the client thought
    // it was connected, the server never saw it, and it stayed open.
    let silent = burst(&rt, loopback(2), server.addr, 600);
    let mut dribbling = burst(&rt, loopback(3), server.addr, 300);
    let opened = Instant::now();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64)
    );
    let mut sent = 0;
    while opened.elapsed() < Duration::from_millis(11_000) {
        for stream in &mut dribbling {
            let _ = stream.write(&head.as_bytes()[sent..=sent]);
        }
        sent += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    let open: usize = silent.iter().filter(|s| !closed_by_server(s)).count();
    assert_eq!(
        open,
        0,
        "{open} of {} silent connections still open 11 s after they were opened",
        silent.len()
    );
    let dribblers_open = dribbling.iter().filter(|s| !closed_by_server(s)).count();
    assert_eq!(
        dribblers_open, 0,
        "a head dribbled a byte a second is cut at 10 s too"
    );
}

#[test]
fn stalled_bodies_of_one_client_leave_room_for_honest_orders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    assert_eq!(api.create_sku("hat", 100, 10, None).status, 201);
    let rt = runtime();
    let honest = server.customer("honest");

    // An anonymous bot: 1,100 orders whose body never comes. No token: 401
    // from the head alone, before a byte of the body is awaited.
    let mut anonymous = burst(&rt, loopback(2), server.addr, 1_100);
    let head = customer_order_head(None);
    for stream in &mut anonymous {
        stream.write_all(head.as_bytes()).expect("head");
    }
    let started = Instant::now();
    let order = api.order(&honest, &[("hat", 1)], None);
    assert_eq!(
        order.status, 201,
        "an honest order beside 1,100 stalled bodies"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );
    let mut refused = 0;
    for stream in &mut anonymous {
        refused += usize::from(status_of(stream, Duration::from_secs(5)) == Some(401));
    }
    assert_eq!(
        refused, 1_100,
        "every unsigned order is 401 before its body"
    );
    drop(anonymous);

    // A signed-in bot: 1,100 stalled bodies. It gets its share of the
    // body-read pool (1,024 / 16) and a 503 for the rest at once; the share
    // it holds is cut at the minimum rate, long before 10 s.
    let bot = server.customer("bot");
    let mut signed = burst(&rt, loopback(3), server.addr, 1_100);
    let head = customer_order_head(Some(&bot));
    let sent_at = Instant::now();
    for stream in &mut signed {
        stream.write_all(head.as_bytes()).expect("head");
    }
    let started = Instant::now();
    let order = api.order(&honest, &[("hat", 1)], None);
    assert_eq!(order.status, 201, "an honest order beside a signed-in bot");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );
    let (mut shed, mut timed_out, mut other) = (0, 0, Vec::new());
    for stream in &mut signed {
        match status_of(stream, Duration::from_secs(15)) {
            Some(503) => shed += 1,
            Some(408) => {
                timed_out += 1;
                assert!(
                    sent_at.elapsed() < Duration::from_secs(8),
                    "a stalled body is cut at the minimum rate, not at 10 s"
                );
            }
            status => other.push(status),
        }
    }
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    // The share is 64 at once. On a loaded machine the last heads may
    // arrive after the first 408s (2 s) freed places, which they may take
    // again: that is still a share, so allow one more round of it.
    assert!(
        timed_out <= 2 * (1_024 / 16),
        "one client held {timed_out} body reads"
    );
    assert_eq!(shed + timed_out, 1_100);
    assert_eq!(api.sku("hat")["reserved"], 2, "the bot placed nothing");
}

#[test]
fn one_address_cannot_take_every_event_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let rt = runtime();
    let mut greedy = burst(&rt, loopback(2), server.addr, 1_000);
    for stream in &mut greedy {
        stream
            .write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("ask");
    }
    let (mut open, mut refused) = (0, 0);
    for stream in &mut greedy {
        match status_of(stream, Duration::from_secs(10)) {
            Some(200) => open += 1,
            Some(503) => refused += 1,
            other => panic!("a stream answered {other:?}"),
        }
    }
    assert!(
        (1..=1_000 / 16).contains(&open),
        "{open} streams for one address"
    );
    assert_eq!(open + refused, 1_000);
    let mut other = burst(&rt, loopback(3), server.addr, 1).remove(0);
    other
        .write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("ask");
    assert_eq!(
        status_of(&mut other, Duration::from_secs(10)),
        Some(200),
        "another address still gets a stream"
    );
}

/// The value of an unlabelled counter in a metrics text.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

#[test]
fn metrics_scraped_in_a_loop_reach_the_engine_once_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut client = server.client();
    let started = Instant::now();
    let first = client.send("GET", "/metrics", &[], None);
    assert_eq!(first.status, 200);
    let before = counter(
        &String::from_utf8_lossy(&first.body),
        "flashcore_metrics_renders_total",
    );
    let mut scrapes = 0u64;
    while started.elapsed() < Duration::from_millis(2_500) {
        assert_eq!(client.send("GET", "/metrics", &[], None).status, 200);
        scrapes += 1;
    }
    let elapsed_s = started.elapsed().as_secs() + 1;
    std::thread::sleep(Duration::from_millis(1_100));
    let last = client.send("GET", "/metrics", &[], None);
    let after = counter(
        &String::from_utf8_lossy(&last.body),
        "flashcore_metrics_renders_total",
    );
    assert!(scrapes > 20, "the loop scraped {scrapes} times");
    assert!(
        after - before <= elapsed_s + 1,
        "{scrapes} scrapes in {elapsed_s} s rendered {} times",
        after - before
    );
}

#[test]
fn every_route_is_rate_limited_but_the_probes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--rate-limit", "3/s"]);
    let mut client = server.client();
    for path in ["/metrics", "/dashboard", "/openapi.json", "/v1/skus"] {
        let statuses: Vec<u16> = (0..8)
            .map(|_| client.send("GET", path, &[], None).status)
            .collect();
        let limited = statuses.iter().filter(|&&s| s == 429).count();
        assert!(limited >= 3, "{path}: {statuses:?}");
        std::thread::sleep(Duration::from_millis(1_100));
    }
    for path in ["/healthz", "/readyz"] {
        for _ in 0..10 {
            assert_eq!(client.send("GET", path, &[], None).status, 200, "{path}");
        }
    }
}

/// Sends `GET /v1/skus` from `from` with `X-Forwarded-For: forwarded`.
fn skus_from(rt: &tokio::runtime::Runtime, server: &Server, from: u8, forwarded: &str) -> u16 {
    let mut stream = burst(rt, loopback(from), server.addr, 1).remove(0);
    let request =
        format!("GET /v1/skus HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {forwarded}\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("ask");
    status_of(&mut stream, Duration::from_secs(10)).unwrap_or(0)
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &["--rate-limit", "1/s", "--trusted-proxies", "127.0.0.2/32"],
    );
    let rt = runtime();
    // Through the trusted proxy, each forwarded client has its own bucket
    // (one request a second: the second within the second is refused).
    let first: Vec<u16> = (0..2)
        .map(|_| skus_from(&rt, &server, 2, "203.0.113.5"))
        .collect();
    assert_eq!(first, [200, 429]);
    assert_eq!(
        skus_from(&rt, &server, 2, "203.0.113.6"),
        200,
        "another client behind it"
    );
    // Only the right-most untrusted hop counts: a spoofed left part does not.
    assert_eq!(
        skus_from(&rt, &server, 2, "198.51.100.1, 203.0.113.5"),
        429,
        "the same client, whatever it wrote to the left"
    );
    // From an address that is not a trusted proxy the header is ignored:
    // changing it does not buy a fresh bucket.
    let direct: Vec<u16> = (0..2)
        .map(|i| skus_from(&rt, &server, 3, &format!("203.0.113.{}", 20 + i)))
        .collect();
    assert_eq!(direct, [200, 429]);
}

#[test]
fn one_address_holds_at_most_its_share_of_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--max-connections-per-client", "20"]);
    let rt = runtime();
    let mut crowd = burst(&rt, loopback(2), server.addr, 30);
    std::thread::sleep(Duration::from_millis(300));
    let mut served = 0;
    let mut refused = 0;
    for stream in &mut crowd {
        let asked = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        match (asked, status_of(stream, Duration::from_secs(5))) {
            (Ok(()), Some(200)) => served += 1,
            (_, Some(503) | None) | (Err(_), _) => refused += 1,
            (Ok(()), other) => panic!("answered {other:?}"),
        }
    }
    assert_eq!(served, 20, "the address's share");
    assert_eq!(refused, 10);
    let mut other = Client::connect(server.addr);
    assert_eq!(
        other.send("GET", "/healthz", &[], None).status,
        200,
        "another address is served"
    );
}
