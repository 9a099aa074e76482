//! The HTTP client against a real (fake) server: keep-alive holds, an idle
//! connection is reopened before the server's idle cutoff, a dead server is
//! "no answer", and error bodies are read.

mod support;

use std::time::Duration;

use loadtest::client::{Call, Conn, Failure};
use support::{Fake, Fault};

#[tokio::test]
async fn keep_alive_holds_and_idle_connections_are_reopened() {
    let fake = Fake::start(Fault::None).await;
    let mut conn = Conn::new(fake.addr, Duration::from_secs(5)).unwrap();
    for _ in 0..20 {
        let answer = conn.send(&Call::get("/readyz")).await.unwrap();
        assert_eq!(answer.status, 200);
    }
    assert_eq!(conn.connects(), 1, "one connection for twenty requests");

    conn.set_idle_reopen_after(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(40)).await;
    assert_eq!(conn.send(&Call::get("/readyz")).await.unwrap().status, 200);
    assert_eq!(conn.connects(), 2, "reopened after idling");
}

#[tokio::test]
async fn error_bodies_give_their_code() {
    let fake = Fake::start(Fault::None).await;
    let mut conn = Conn::new(fake.addr, Duration::from_secs(5)).unwrap();
    let answer = conn.send(&Call::get("/v1/skus/nope")).await.unwrap();
    assert_eq!(answer.status, 404);
    assert_eq!(answer.error_code().as_deref(), Some("not_found"));
    let unauthorized = conn.send(&Call::get("/v1/orders/x")).await.unwrap();
    assert_eq!(unauthorized.error_code().as_deref(), Some("unauthorized"));
}

#[tokio::test]
async fn a_dead_server_is_no_answer() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut conn = Conn::new(addr, Duration::from_millis(500)).unwrap();
    assert_eq!(
        conn.send(&Call::get("/readyz")).await.unwrap_err(),
        Failure::Connect
    );
}
