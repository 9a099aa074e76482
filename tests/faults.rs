//! Faults beyond SIGKILL, on the real binary with its test-only fault hooks
//! (`FLASHCORE_FAULTS`, see `src/faults.rs`): a signal during recovery, and
//! actors that panic. A dead actor must never leave a server that says it
//! is ready: the process stops with a non-zero exit (for its supervisor to
//! restart it), and a restart finds everything acknowledged.

mod support;

use std::time::{Duration, Instant};

use support::server::{Api, Client, Server};

const FAULTS: &str = "FLASHCORE_FAULTS";

#[test]
fn sigterm_during_recovery_exits_zero_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::launch(
        dir.path(),
        &[],
        &[(FAULTS, "stall-recovery-ms=8000")],
        false,
        Duration::from_secs(30),
    )
    .expect("listens");
    let mut client = server.client();
    assert_eq!(client.send("GET", "/healthz", &[], None).status, 200);
    assert_eq!(
        client.send("GET", "/readyz", &[], None).status,
        503,
        "still recovering"
    );
    let sent = Instant::now();
    let status = server.terminate();
    let log = server.log();
    assert!(status.success(), "exit {status} after SIGTERM:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "SIGTERM waited for the recovery ({:?}):\n{log}",
        sent.elapsed()
    );
}

/// Starts a server with `fault`, creates SKUs `fine` and `doomed`, places
/// an order on `fine` (acknowledged), then lets `trigger` hit the fault.
/// The process must exit non-zero on its own; a restart without the fault
/// must have the acknowledged order and balanced books.
fn dead_actor_stops_the_process(fault: &str, trigger: impl FnOnce(&mut Api<'_>, &str)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::launch(
        dir.path(),
        &[],
        &[(FAULTS, fault)],
        true,
        Duration::from_secs(60),
    )
    .expect("starts");
    let acknowledged = {
        let mut api = Api::new(&server);
        assert_eq!(api.create_sku("fine", 100, 50, None).status, 201);
        assert_eq!(api.create_sku("doomed", 100, 50, None).status, 201);
        let token = server.customer("alice");
        let placed = api.order(&token, &[("fine", 2)], None);
        assert_eq!(
            placed.status,
            201,
            "{}",
            String::from_utf8_lossy(&placed.body)
        );
        let id = placed.json()["order_id"]
            .as_str()
            .expect("order id")
            .to_string();
        trigger(&mut api, &id);
        id
    };
    // Between the panic and the exit, the server is not ready (if it still
    // answers at all).
    let ready =
        Client::try_connect(server.addr).and_then(|mut c| c.try_send("GET", "/readyz", &[], None));
    if let Ok(ready) = ready {
        assert_eq!(ready.status, 503, "a dead actor behind a ready server");
    }
    let status = server
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("still running after the fault:\n{}", server.log()));
    let log = server.log();
    assert!(!status.success(), "exit {status}:\n{log}");
    assert!(log.contains("injected fault"), "{log}");

    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let admin = server.admin();
    let order = api.call(
        "GET",
        &format!("/v1/orders/{acknowledged}"),
        Some(&admin),
        None,
        None,
    );
    assert_eq!(order.status, 200, "the acknowledged order is back");
    let fine = api.sku("fine");
    assert_eq!(fine["reserved"], 2, "{fine}");
    assert_eq!(fine["available"], 48, "{fine}");
    let doomed = api.sku("doomed");
    assert_eq!(
        doomed["on_hand"],
        doomed["available"].as_u64().unwrap_or(0)
            + doomed["reserved"].as_u64().unwrap_or(0)
            + doomed["allocated"].as_u64().unwrap_or(0),
        "{doomed}"
    );
}

#[test]
fn a_panicking_sku_actor_stops_the_process_non_zero() {
    dead_actor_stops_the_process("panic-sku=doomed", |api, _| {
        let auth = format!("Bearer {}", api.server.customer("bob"));
        let answer = api.client.try_send(
            "POST",
            "/v1/orders",
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            Some(r#"{"items":[{"sku_id":"doomed","qty":1}]}"#),
        );
        if let Ok(answer) = answer {
            assert!(
                answer.status >= 500,
                "an order on a panicking SKU: {}",
                answer.status
            );
        }
    });
}

#[test]
fn a_panicking_order_shard_stops_the_process_non_zero() {
    dead_actor_stops_the_process("panic-shard-pay=1", |api, id| {
        let auth = format!("Bearer {}", api.server.admin());
        let answer = api.client.try_send(
            "POST",
            &format!("/v1/orders/{id}/pay"),
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            Some(r#"{"payment_ref":"p-1","amount_cents":200}"#),
        );
        if let Ok(answer) = answer {
            assert!(
                answer.status >= 500,
                "paying on a panicking shard: {}",
                answer.status
            );
        }
    });
}
