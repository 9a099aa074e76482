//! Crash safety: the real binary under load is killed with SIGKILL at a
//! random moment, `CRASH_ROUNDS` times (default 50) over one data dir, and
//! restarted each time. After every restart: every acknowledged order is
//! there in a state at least as far as acknowledged, no change is
//! half-applied (each SKU's counters equal what the orders hold), every SKU
//! balances, and unpaid orders whose deadline passed (while running or while
//! down) are expired. The workload and the checks are `support/load.rs`.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::load::{self, Book, SKUS, Users};
use support::server::{Api, Server};

/// Rounds unless `CRASH_ROUNDS` says otherwise.
const ROUNDS_DEFAULT: usize = 50;

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    eprintln!("crash test seed {seed} (set CRASH_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let rounds = load::rounds("CRASH_ROUNDS", ROUNDS_DEFAULT);
    let dir = tempfile::tempdir().expect("tempdir");
    let book: Book = Arc::new(Mutex::new(HashMap::new()));
    let users: Users = Arc::default();
    load::create_skus(&Server::start(dir.path(), &["--reservation-ttl", "2s"]));
    // Snapshots every 500 events: kills land in captures, epoch switches,
    // epoch drops and snapshot writes too.
    let args = ["--reservation-ttl", "2s", "--snapshot-every-events", "500"];
    for round in 0..rounds {
        let mut server = Server::start(dir.path(), &args);
        load::verify(&server, &book, &users, &format!("round {round}"));
        let workers = load::spawn_workers(&server, round, &mut rng, &book, &users);
        std::thread::sleep(Duration::from_millis(rng.random_range(30..400)));
        server.kill();
        for w in workers {
            w.join().expect("worker");
        }
    }
    let server = Server::start(dir.path(), &["--reservation-ttl", "2s"]);
    load::verify(&server, &book, &users, "after the last round");
    let acked = book.lock().expect("book").len();
    eprintln!("{rounds} SIGKILLs: {acked} acknowledged orders, none lost");
    assert!(
        acked > rounds * 10,
        "the load did something: {acked} acknowledged orders"
    );
    // Past every deadline: every unpaid order is expired, its units back.
    std::thread::sleep(Duration::from_millis(2_500));
    let server = {
        drop(server);
        Server::start(dir.path(), &["--reservation-ttl", "2s"])
    };
    let mut api = Api::new(&server);
    for (sku, ..) in SKUS {
        assert_eq!(
            api.sku(sku)["reserved"],
            0,
            "{sku}: every unpaid order expired"
        );
    }
    load::verify(&server, &book, &users, "past every deadline");
}
