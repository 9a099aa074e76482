//! The durable journal in process: what was acknowledged comes back after a
//! reopen, a torn tail is cut, damage in the middle stops the start (unless
//! repaired), snapshots plus the tail rebuild the same state, and the
//! snapshotter keeps the journal short.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use flashcore::domain::idem::Lookup;
use flashcore::domain::order::OrderStatus;
use flashcore::domain::{IdemStamp, IdempotencyKey, PaymentRef};
use flashcore::engine::{Engine, EngineConfig, ManualClock, OrderScope};
use flashcore::journal::{
    self, FlushPolicy, Journal, RecoveryError, SnapshotPolicy, Snapshotter, codec, recovery,
};
use flashcore::limits::IDEMPOTENCY_TTL_MS;
use support::damage::{Damage, damage};
use support::*;

struct Node {
    engine: Engine,
    journal: Arc<journal::SledJournal>,
}

fn stop(node: Node) {
    node.engine.shutdown();
    node.journal.close();
}

/// Opens a data dir, rebuilds, starts an engine on it.
fn boot(dir: &Path, repair: bool) -> Result<(Node, u64, Option<u64>), RecoveryError> {
    let opened = journal::open(dir, FlushPolicy::Strict, repair)?;
    let recovered = opened.recovered;
    let (last, cut) = (recovered.last_seq, recovered.cut_at);
    let engine = Engine::start(
        EngineConfig::default(),
        opened.journal.clone(),
        Arc::new(ManualClock::new(T0_MS)),
        recovered.state,
    )
    .expect("engine starts");
    Ok((
        Node {
            engine,
            journal: opened.journal,
        },
        last,
        cut,
    ))
}

async fn some_history(e: &Engine, orders: usize) {
    create(e, "a", 300, 1_000, None).await;
    create(e, "b", 50, 1_000, Some(100)).await;
    for i in 0..orders {
        let o = e
            .place_order(
                user(&format!("u{}", i % 7)),
                &[line("a", 1), line("b", 2)],
                None,
                None,
            )
            .await
            .expect("placed");
        if i % 3 == 0 {
            e.pay(
                admin(),
                o.id,
                PaymentRef::parse(&format!("p{i}")).expect("valid"),
                400,
                None,
            )
            .await
            .expect("paid");
        }
        if i % 5 == 0 {
            let _ = e.cancel(admin(), o.id).await;
        }
    }
}

async fn books(
    e: &Engine,
) -> (
    Vec<flashcore::domain::sku::SkuView>,
    Vec<flashcore::domain::order::Order>,
) {
    (
        e.skus().await.expect("skus"),
        e.orders(OrderScope::All, 500).await.expect("orders"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_acknowledged_comes_back_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, last, cut) = boot(dir.path(), false).expect("boot");
    assert_eq!((last, cut), (0, None));
    some_history(&node.engine, 40).await;
    let before = books(&node.engine).await;
    let appended = node.journal.last_seq();
    assert_eq!(
        node.journal.watermark().durable(),
        appended,
        "strict: all durable"
    );
    stop(node);

    let (node, last, cut) = boot(dir.path(), false).expect("reboot");
    assert_eq!((last, cut), (appended, None));
    assert_eq!(books(&node.engine).await, before);
    // New ids and sequence numbers continue.
    let o = node
        .engine
        .place_order(user("late"), &[line("a", 1)], None, None)
        .await
        .expect("placed");
    assert!(before.1.iter().all(|old| old.id < o.id));
    assert!(node.journal.last_seq() > appended);
    stop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_the_journal_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, ..) = boot(dir.path(), false).expect("boot");
    some_history(&node.engine, 10).await;
    let last = node.journal.last_seq();
    stop(node);
    // Tear the last record: keep a prefix of its bytes.
    damage(dir.path(), last, Damage::Tear);

    let (node, recovered_last, cut) = boot(dir.path(), false).expect("a torn tail is not fatal");
    assert_eq!((recovered_last, cut), (last - 1, Some(last)));
    // Appends reuse the cut number, and the result survives another reopen.
    node.engine
        .place_order(user("after"), &[line("a", 1)], None, None)
        .await
        .expect("placed");
    assert!(node.journal.last_seq() >= last);
    let before = books(&node.engine).await;
    stop(node);
    let (node, _, cut) = boot(dir.path(), false).expect("reboot");
    assert_eq!(cut, None);
    assert_eq!(books(&node.engine).await, before);
    stop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_before_the_tail_refuses_to_start_unless_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, ..) = boot(dir.path(), false).expect("boot");
    some_history(&node.engine, 10).await;
    let last = node.journal.last_seq();
    stop(node);
    let victim = last / 2;
    damage(dir.path(), victim, Damage::Flip);

    match boot(dir.path(), false) {
        Err(RecoveryError::Corrupt { seq, .. }) => assert_eq!(seq, victim),
        Err(other) => panic!("expected corruption at {victim}, got {other}"),
        Ok(_) => panic!("started on a damaged journal"),
    }
    let message = boot(dir.path(), false)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains(&victim.to_string()) && message.contains("--repair"),
        "{message}"
    );

    let (node, recovered_last, cut) = boot(dir.path(), true).expect("repair starts");
    assert_eq!((recovered_last, cut), (victim - 1, Some(victim)));
    node.engine.skus().await.expect("usable");
    stop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_record_in_the_middle_is_damage_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, ..) = boot(dir.path(), false).expect("boot");
    some_history(&node.engine, 5).await;
    let last = node.journal.last_seq();
    stop(node);
    // The block holding record 3 goes; it must be in the middle: blocks
    // with later records remain after it (else this would be a torn tail).
    let db = journal::writer::open_db(&journal::journal_dir(dir.path())).expect("open");
    let blocks: Vec<u64> = journal::Epochs::new(&db)
        .blocks_from(0)
        .expect("readable")
        .map(|entry| codec::seq_of(&entry.expect("readable").0).expect("key"))
        .collect();
    drop(db);
    let holding = blocks
        .iter()
        .rposition(|&first| first <= 3)
        .expect("a block holds record 3");
    let first_of_block = blocks[holding];
    let next_block = *blocks
        .get(holding + 1)
        .expect("a block after the one dropped: the hole is in the middle");
    assert!(next_block > 3 && next_block <= last);
    damage(dir.path(), 3, Damage::DropBlock);
    match boot(dir.path(), false) {
        Err(RecoveryError::Corrupt { seq, .. }) => assert_eq!(seq, first_of_block),
        Err(other) => panic!("expected corruption at {first_of_block}, got {other}"),
        Ok(_) => panic!("started with a hole in the journal"),
    }
    // Repaired, the journal ends before the hole: the records after it,
    // which were there, are dropped with it rather than replayed over a gap.
    let (node, recovered_last, cut) = boot(dir.path(), true).expect("repair starts");
    assert_eq!(
        (recovered_last, cut),
        (first_of_block - 1, Some(first_of_block))
    );
    node.engine.skus().await.expect("usable");
    stop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_plus_the_tail_rebuilds_the_same_state_and_falls_back_when_damaged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, ..) = boot(dir.path(), false).expect("boot");
    some_history(&node.engine, 20).await;
    stop(node);
    // A snapshot at the current end, written from a replay.
    let (first_snapshot, full) = {
        let db = journal::writer::open_db(&journal::journal_dir(dir.path())).expect("open");
        let r = recovery::recover(
            &db,
            &journal::journal_dir(dir.path()),
            &journal::snapshot_dir(dir.path()),
            false,
        )
        .expect("recover");
        recovery::write_snapshot(&journal::snapshot_dir(dir.path()), &r.state, r.last_seq)
            .expect("snapshot");
        (r.last_seq, r.last_seq)
    };
    let (node, ..) = boot(dir.path(), false).expect("boot");
    some_history_more(&node.engine).await;
    let before = books(&node.engine).await;
    let last = node.journal.last_seq();
    stop(node);

    let db = journal::writer::open_db(&journal::journal_dir(dir.path())).expect("open");
    let r = recovery::recover(
        &db,
        &journal::journal_dir(dir.path()),
        &journal::snapshot_dir(dir.path()),
        false,
    )
    .expect("recover");
    assert_eq!(
        (r.snapshot_seq, r.last_seq, r.replayed),
        (first_snapshot, last, last - full)
    );
    drop(db);
    let (node, ..) = boot(dir.path(), false).expect("boot");
    assert_eq!(books(&node.engine).await, before);
    stop(node);

    // Damage the snapshot: recovery falls back to the full journal.
    let path = std::fs::read_dir(journal::snapshot_dir(dir.path()))
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "bin"))
        .expect("a snapshot");
    let mut bytes = std::fs::read(&path).expect("read");
    let at = bytes.len() - 3;
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).expect("write");
    let db = journal::writer::open_db(&journal::journal_dir(dir.path())).expect("open");
    let r = recovery::recover(
        &db,
        &journal::journal_dir(dir.path()),
        &journal::snapshot_dir(dir.path()),
        false,
    )
    .expect("recover");
    assert_eq!((r.snapshot_seq, r.last_seq), (0, last));
}

async fn some_history_more(e: &Engine) {
    for i in 0..15 {
        let o = e
            .place_order(user(&format!("v{i}")), &[line("b", 1)], None, None)
            .await
            .expect("placed");
        e.pay(
            admin(),
            o.id,
            PaymentRef::parse(&format!("q{i}")).expect("valid"),
            50,
            None,
        )
        .await
        .expect("paid");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshotter_keeps_the_journal_short_and_recovery_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, ..) = boot(dir.path(), false).expect("boot");
    let policy = SnapshotPolicy {
        every_events: 20,
        every_ms: 60_000,
    };
    let mut snapshotter = Snapshotter::start(
        Arc::new(node.engine.clone()),
        node.journal.clone(),
        journal::snapshot_dir(dir.path()),
        policy,
    );
    let snapshots = |dir: &Path| {
        std::fs::read_dir(journal::snapshot_dir(dir))
            .map(|d| d.filter_map(Result::ok).count())
            .unwrap_or(0)
    };
    let first_key = |node: &Node| {
        node.journal
            .epochs()
            .first_seq()
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    // The snapshotter runs at nice 19, paced: on a machine busy with other
    // work (the rest of the suite, a build) it may take a while, so the
    // waits are bounded generously (a bound, not a timing claim).
    let waited = || {
        let started = std::time::Instant::now();
        move || started.elapsed() < std::time::Duration::from_secs(60)
    };
    some_history(&node.engine, 30).await;
    let patient = waited();
    while patient() {
        if snapshots(dir.path()) >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A second snapshot lets the records the first covers go.
    some_history_more(&node.engine).await;
    let patient = waited();
    while patient() {
        if first_key(&node) > 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let before = books(&node.engine).await;
    let last = node.journal.last_seq();
    let first_kept = node
        .journal
        .epochs()
        .first_seq()
        .expect("first")
        .expect("some records");
    let files: Vec<_> = std::fs::read_dir(journal::snapshot_dir(dir.path()))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        snapshotter.healthy(),
        "the snapshotter runs; files {files:?}"
    );
    assert!(
        first_kept > 1,
        "records covered by an older snapshot were dropped: first {first_kept}, last {last}, files {files:?}"
    );
    // The last snapshot asks the engine's actors: stop it first.
    snapshotter.stop();
    node.engine.shutdown();
    node.journal.close();
    drop(node);

    let (node, recovered_last, _) = boot(dir.path(), false).expect("reboot");
    assert_eq!(recovered_last, last);
    assert_eq!(books(&node.engine).await, before);
    let (_, orders) = books(&node.engine).await;
    assert!(orders.iter().any(|o| o.status == OrderStatus::Paid));
    stop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_drop_idempotency_records_past_their_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = journal::open(dir.path(), FlushPolicy::Strict, false).expect("open");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::start(
        EngineConfig::default(),
        opened.journal.clone(),
        clock.clone(),
        opened.recovered.state,
    )
    .expect("engine starts");
    let policy = SnapshotPolicy {
        every_events: 1_000_000,
        every_ms: 3_600_000,
    };
    let mut snapshotter = Snapshotter::start(
        Arc::new(engine.clone()),
        opened.journal.clone(),
        journal::snapshot_dir(dir.path()),
        policy,
    );
    let key = |k: &str| IdempotencyKey::parse(k).expect("key");
    let stamp = |k: &str| IdemStamp {
        user: user("ops"),
        key: key(k),
        fingerprint: [7; 16],
    };
    create(&engine, "a", 100, 10, None).await;
    engine
        .restock(sku("a"), 1, Some(stamp("old")))
        .await
        .expect("restock");
    clock.advance_ms(IDEMPOTENCY_TTL_MS);
    engine
        .restock(sku("a"), 1, Some(stamp("new")))
        .await
        .expect("restock");
    // "old" is past its TTL now, "new" is not.
    clock.advance_ms(1);
    // Takes the last snapshot, which must leave "old" out.
    snapshotter.stop();
    engine.shutdown();
    opened.journal.close();
    drop(engine);
    drop(opened.journal);

    let (node, ..) = boot(dir.path(), false).expect("reboot");
    let lookup = |k: &str| {
        node.engine
            .idempotency(user("ops"), &key(k), [7; 16])
            .expect("looked up")
    };
    assert_eq!(lookup("old"), Lookup::Fresh, "dropped with its TTL");
    assert!(matches!(lookup("new"), Lookup::Replay(_)), "kept");
    stop(node);
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| match entry.metadata() {
                    Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// At least fifty snapshots under a steady stream of orders (relaxed, so
/// the journal passes several of sled's 16 MiB segments): the writer moves
/// to a new epoch at each capture and the epochs below the snapshot before
/// go whole, so the number of epochs and the journal's size on disk stay
/// flat (sled reuses the segments of dropped epochs), and a restart across
/// the epochs left rebuilds exactly the live books.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_snapshots_keep_the_journal_bounded_and_recovery_exact() {
    const SNAPSHOTS: usize = 50;
    // sled's segments are 16 MiB, and sled keeps five before it reuses
    // freed ones (measured: a journal that drops old epochs stays at 5
    // segments, 83,886,080 bytes, however long it runs). The run writes
    // seven segments' worth, so a journal that kept everything would be
    // past the bound below.
    const SEGMENT_BYTES: u64 = 16 << 20;
    const WRITTEN_MIN_BYTES: u64 = 7 * SEGMENT_BYTES;
    const JOURNAL_MAX_BYTES: u64 = 11 * SEGMENT_BYTES / 2;
    const TASKS: usize = 64;
    const ORDERS_PER_TASK: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let boot_relaxed = |dir: &Path| {
        let opened = journal::open(dir, FlushPolicy::Relaxed, false).expect("open");
        let config = EngineConfig {
            durability: flashcore::engine::DurabilityMode::Relaxed,
            ..EngineConfig::default()
        };
        let engine = Engine::start(
            config,
            opened.journal.clone(),
            Arc::new(ManualClock::new(T0_MS)),
            opened.recovered.state,
        )
        .expect("engine starts");
        let node = Node {
            engine,
            journal: opened.journal,
        };
        (node, opened.recovered.last_seq)
    };
    let (node, _) = boot_relaxed(dir.path());
    create(&node.engine, "z", 100, 100_000_000, None).await;
    let mut snapshotter = Snapshotter::start(
        Arc::new(node.engine.clone()),
        node.journal.clone(),
        journal::snapshot_dir(dir.path()),
        SnapshotPolicy {
            every_events: 8_000,
            every_ms: 60_000,
        },
    );
    let journal_dir = journal::journal_dir(dir.path());
    // (epochs, journal bytes, first sequence number kept) after each snapshot.
    let mut seen: Vec<(usize, u64, u64)> = Vec::new();
    let mut last_top = 0;
    let mut round = 0usize;
    let written = |node: &Node| node.journal.stats().bytes.load(Ordering::Relaxed);
    while seen.len() < SNAPSHOTS || written(&node) < WRITTEN_MIN_BYTES {
        round += 1;
        assert!(round < SNAPSHOTS * 8, "snapshots stopped coming: {seen:?}");
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let e = node.engine.clone();
                tokio::spawn(async move {
                    for i in 0..ORDERS_PER_TASK {
                        // Long ids (the most a user id may be), so that
                        // each event weighs more and the run is shorter.
                        let who = user(&format!("{:-<64}", format!("r{round}t{t}i{i}")));
                        let o = e
                            .place_order(who, &[line("z", 1)], None, None)
                            .await
                            .expect("placed");
                        if i % 2 == 0 {
                            e.cancel(admin(), o.id).await.expect("cancelled");
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        for _ in 0..500 {
            if snapshotter.last().is_some_and(|r| r.top > last_top) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if let Some(report) = snapshotter.last().filter(|r| r.top > last_top) {
            last_top = report.top;
            let epochs = node.journal.epochs().list().expect("epochs").len();
            let first = node
                .journal
                .epochs()
                .first_seq()
                .expect("first")
                .unwrap_or(0);
            seen.push((epochs, dir_bytes(&journal_dir), first));
        }
    }
    eprintln!("(epochs, journal bytes, first kept) after each snapshot: {seen:?}");
    assert!(snapshotter.healthy());
    // Epoch 0 and at most the epochs of the last three captures.
    let most_epochs = seen[3..].iter().map(|s| s.0).max().unwrap_or(0);
    assert!(most_epochs <= 4, "old epochs were dropped: {seen:?}");
    // The journal does not grow with history.
    let size = seen.last().map_or(0, |s| s.1);
    assert!(
        size <= JOURNAL_MAX_BYTES,
        "{} bytes written, the journal holds {size}",
        written(&node)
    );
    let firsts: Vec<u64> = seen.iter().map(|s| s.2).collect();
    assert!(
        firsts.windows(2).all(|w| w[0] <= w[1]) && firsts[SNAPSHOTS - 1] > firsts[5],
        "the journal's start moves forward: {firsts:?}"
    );

    let before = books(&node.engine).await;
    let last = node.journal.last_seq();
    snapshotter.stop();
    stop(node);
    let (node, recovered_last) = boot_relaxed(dir.path());
    assert_eq!(recovered_last, last);
    assert_eq!(books(&node.engine).await, before);
    stop(node);
}
