//! The machine's HTTP ceiling: a bare axum "hello" on two tokio workers (as
//! many as flashcore's HTTP runtime has), for `loadtest/wrk/hello.sh`.
//!
//! Whatever this serves per second under a load generator on the same
//! cores is the most any HTTP server doing real work can answer here.
//!
//! `cargo run --release -p loadtest --example axum_hello -- 127.0.0.1:18090`

use axum::Router;
use axum::routing::get;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18090".to_owned());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let app = Router::new().route("/", get(|| async { "hello" }));
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            axum::serve(listener, app).await
        })
}
