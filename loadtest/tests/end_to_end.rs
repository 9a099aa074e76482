//! Whole runs of the real load tester (CLI parsing, client, scenarios, book
//! check, report, chart) against the fake flashcore in `support/`: a correct
//! one must give clean books, and each deliberately broken one must be caught.

mod support;

use clap::Parser;
use loadtest::cli::Cli;
use loadtest::run::{EXIT_BOOKS_VIOLATED, Summary, execute};
use support::{Fake, Fault, SECRET};

async fn run(fake: &Fake, dir: &std::path::Path, scenario: &[&str]) -> Summary {
    let out = dir.to_str().unwrap();
    let url = fake.url();
    let mut args = vec!["loadtest"];
    args.extend_from_slice(scenario);
    args.extend_from_slice(&[
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--out",
        out,
        "--progress",
        "plain",
    ]);
    execute(Cli::try_parse_from(args).unwrap()).await.unwrap()
}

async fn flash_sale(fault: Fault) -> (Summary, tempfile::TempDir) {
    let fake = Fake::start(fault).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = run(
        &fake,
        dir.path(),
        &[
            "flash-sale",
            "--buyers",
            "300",
            "--stock",
            "25",
            "--connections",
            "8",
            "--duration",
            "2s",
            "--max-requests",
            "1500",
        ],
    )
    .await;
    (summary, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_against_a_correct_server_has_clean_books() {
    let (summary, dir) = flash_sale(Fault::None).await;
    let r = &summary.report;
    assert_eq!(summary.exit_code, 0, "{}", r.table());
    assert!(r.books.ok, "{:?}", r.books);
    assert_eq!(r.ok, 25, "exactly the stock is granted");
    assert!(r.rejected > 0, "the sold-out SKU keeps being hammered");
    assert_eq!(r.errors, 0);
    assert_eq!(r.books.orders_checked, 25);
    assert_eq!(r.run.connects, 8, "one keep-alive connection per worker");
    assert_eq!(r.detail["granted_acked"], 25);
    assert!(r.latency_ms.p99 > 0.0 && r.latency_ms.p99 <= r.latency_ms.max);
    assert!(r.ok_latency_ms.max > 0.0, "2xx latency is reported apart");
    assert!(!r.timeline.is_empty(), "a per-second timeline");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], "flash-sale");
    assert_eq!(json["books"]["oversold"], 0);
    assert_eq!(json["books"]["acked_missing"], 0);
    assert!(json["throughput_rps"].as_f64().unwrap() > 0.0);
    let sold: u64 = r.timeline.iter().map(|p| p.granted_units).sum();
    assert_eq!(sold, 25, "the timeline counts every unit granted, once");
    let svg = std::fs::read_to_string(dir.path().join("latency.svg")).unwrap();
    assert!(svg.contains("p99 latency (ms)"));
    assert!(svg.contains("units sold (cumulative)"));
    assert!(svg.contains("stock: 25 units"));
    let sold_out_ms = r.detail["first_sold_out_ms"].as_u64().expect("it sold out");
    #[allow(clippy::cast_precision_loss)]
    let mark = format!("sold out at {:.2} s", sold_out_ms as f64 / 1000.0);
    assert!(svg.contains(&mark), "no {mark:?} in the chart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overselling_is_caught() {
    let (summary, _dir) = flash_sale(Fault::Oversell).await;
    let books = &summary.report.books;
    assert_eq!(summary.exit_code, EXIT_BOOKS_VIOLATED);
    assert!(books.oversold > 0, "{books:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_orders_are_caught() {
    let (summary, _dir) = flash_sale(Fault::LoseEveryOtherOrder).await;
    let books = &summary.report.books;
    assert_eq!(summary.exit_code, EXIT_BOOKS_VIOLATED);
    assert_eq!(
        books.acked_missing, 12,
        "orders 2, 4, .., 24 read 404: {books:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_read_back_with_another_qty_is_caught() {
    let (summary, _dir) = flash_sale(Fault::WrongQty).await;
    assert_eq!(summary.exit_code, EXIT_BOOKS_VIOLATED);
    assert!(
        summary.report.books.acked_missing >= 1,
        "{:?}",
        summary.report.books
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_read_back_as_another_user_is_caught() {
    let (summary, _dir) = flash_sale(Fault::WrongUser).await;
    assert_eq!(summary.exit_code, EXIT_BOOKS_VIOLATED);
    assert!(
        summary.report.books.acked_missing >= 1,
        "{:?}",
        summary.report.books
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbalanced_sku_counters_are_caught() {
    let (summary, _dir) = flash_sale(Fault::Unbalanced).await;
    assert_eq!(summary.exit_code, EXIT_BOOKS_VIOLATED);
    assert_eq!(
        summary.report.books.sku_invariant, 1,
        "{:?}",
        summary.report.books
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_reserved_by_a_refusal_are_caught() {
    let (summary, _dir) = flash_sale(Fault::ReserveOnRefusal).await;
    assert_eq!(summary.exit_code, EXIT_BOOKS_VIOLATED);
    assert!(
        summary.report.books.phantom_units > 0,
        "{:?}",
        summary.report.books
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_run_pays_cancels_refunds_and_balances() {
    let fake = Fake::start(Fault::None).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = run(
        &fake,
        dir.path(),
        &[
            "mixed",
            "--buyers",
            "40",
            "--connections",
            "4",
            "--duration",
            "2s",
            "--max-requests",
            "3000",
        ],
    )
    .await;
    let r = &summary.report;
    assert_eq!(summary.exit_code, 0, "{}", r.table());
    assert_eq!(r.errors, 0, "{}", r.table());
    let endpoints: Vec<&str> = r.endpoints.iter().map(|e| e.endpoint.as_str()).collect();
    for wanted in [
        "GET /v1/skus",
        "GET /v1/skus/{id}",
        "PUT /v1/cart/items/{id}",
        "POST /v1/cart/checkout",
        "POST /v1/orders",
        "POST /v1/orders/{id}/pay",
        "POST /v1/orders/{id}/cancel",
        "POST /v1/orders/{id}/refund",
        "GET /v1/orders/{id}",
    ] {
        assert!(
            endpoints.contains(&wanted),
            "{wanted} never ran: {endpoints:?}"
        );
    }
    assert_eq!(r.books.skus_checked, 20);
    assert!(r.books.orders_checked > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_run_is_paced_open_loop() {
    let fake = Fake::start(Fault::None).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = run(
        &fake,
        dir.path(),
        &[
            "overload",
            "--rate",
            "400",
            "--buyers",
            "50",
            "--connections",
            "4",
            "--duration",
            "1s",
        ],
    )
    .await;
    let r = &summary.report;
    assert_eq!(summary.exit_code, 0, "{}", r.table());
    // 400/s for 1 s: 400 arrivals are due; each was sent or is counted as
    // never sent (all connections busy), and none is invented.
    assert_eq!(r.requests + r.run.backlog_unsent, 400, "{}", r.table());
    assert!(r.requests >= 200, "{} requests", r.requests);
    assert_eq!(r.ok, r.requests);
    // Paced, not flooded: a closed loop against this fake runs far faster.
    assert!(r.detail["rate_achieved_rps"].as_f64().unwrap() <= 410.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_run_paces_the_mixed_workload_and_reports_drift() {
    let fake = Fake::start(Fault::None).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = run(
        &fake,
        dir.path(),
        &[
            "soak",
            "--rate",
            "300",
            "--buyers",
            "20",
            "--connections",
            "4",
            "--duration",
            "2s",
        ],
    )
    .await;
    let r = &summary.report;
    assert_eq!(summary.exit_code, 0, "{}", r.table());
    assert_eq!(r.errors, 0, "{}", r.table());
    assert_eq!(r.requests + r.run.backlog_unsent, 600, "{}", r.table());
    assert!(
        r.endpoints.len() >= 5,
        "the mixed workload: {:?}",
        r.endpoints
    );
    let drift = &r.detail["drift"];
    assert!(
        drift["p99_first_ms"].is_number() && drift["p99_last_ms"].is_number(),
        "{drift}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_cap_ends_a_run() {
    let fake = Fake::start(Fault::None).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = run(
        &fake,
        dir.path(),
        &[
            "flash-sale",
            "--buyers",
            "10",
            "--stock",
            "5",
            "--connections",
            "2",
            "--duration",
            "60s",
            "--max-requests",
            "50",
        ],
    )
    .await;
    assert_eq!(summary.report.requests, 50);
    assert!(summary.report.run.elapsed_s < 30.0);
}
