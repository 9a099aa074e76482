//! The flashcore load tester: storms a server like a real flash sale, then
//! checks its books through the API.
//!
//! Data flow of one run (see [`run::execute`]):
//!
//! 1. [`target`] finds the server: a `--url` on loopback, or `--spawn`s
//!    `flashcore serve` on a free loopback port with a fresh data dir.
//! 2. [`scenario`] creates what the run needs through the admin API (a hot SKU,
//!    a catalog) and builds one agent per connection.
//! 3. Each worker owns one keep-alive [`client::Conn`] and one agent, and records
//!    every answer into its own [`stats::Recorder`]; a run stops by itself at
//!    `--duration` or `--max-requests`, whichever comes first.
//! 4. [`progress`] drains the recorders a few times a second into a live view
//!    and a per-second [`stats::TimelinePoint`] series; meanwhile
//!    [`server_steps`] scrapes the server's `/metrics` once a second for its
//!    background steps (snapshot capture, journal sync, ...), merged into that
//!    series so each p99 stall shows beside its cause.
//! 5. [`books`] reads every acknowledged order and every SKU back and counts
//!    violations; [`report`] writes `report.json` and prints the end table;
//!    [`chart`] draws `latency.svg`.
//!
//! The tool never talks to anything but loopback, and never retries a
//! mutating request: an unanswered one is counted as "may or may not have
//! happened", exactly as the contract says.

#![forbid(unsafe_code)]

pub mod books;
pub mod chart;
pub mod cli;
pub mod client;
pub mod limits;
pub mod progress;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenario;
pub mod server_steps;
pub mod stats;
pub mod target;
pub mod token;
