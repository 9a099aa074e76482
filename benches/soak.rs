//! `cargo bench --bench soak`: the engine in process on the real sled journal
//! (strict durability) in a temp dir, with the snapshotter running, driven at
//! a steady rate for a long while: what memory, disk and restart time do as
//! history grows.
//!
//! Each order goes reserve -> pay -> ship -> deliver; one in twenty is
//! cancelled and one in twenty left unpaid to expire (a short reservation
//! TTL), so ~10% end without a sale. Every second a row shows the orders
//! finished, the process's RSS (`/proc/self/statm`), the data dir's size
//! (journal and snapshots apart) and the last snapshot. At the end the
//! engine stops (a last snapshot), and the data dir is opened again and
//! timed: the restart.
//!
//! Finished orders move to the archive on disk after `SOAK_ARCHIVE_MS`
//! (default 5,000), so memory should follow the orders in flight, not the
//! history: the summary gives RSS's range after a warm-up (the first fifth of
//! the run) and the data dir's size against the orders archived.
//!
//! The allocator's arenas are capped as the server's `main` caps them
//! (`flashcore::memory`).
//!
//! Environment: `SOAK_ORDERS` (default 60,000), `SOAK_RATE` orders a second
//! (default 1,000: a ~60 s run), `SOAK_SNAPSHOT_EVENTS` (default 50,000),
//! `SOAK_SNAPSHOT_MS` (default 10,000), `SOAK_INFLIGHT` orders in flight at
//! most (default 256), `SOAK_ARCHIVE_MS` (default 5,000), `SOAK_DIR` to keep
//! the data dir somewhere (default: a temp dir, removed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashcore::domain::event::SkuQty;
use flashcore::domain::{PaymentRef, SkuId, UserId};
use flashcore::engine::{Caller, Engine, EngineConfig, NewSku, SystemClock};
use flashcore::journal::{self, FlushPolicy, Journal, SnapshotPolicy, Snapshotter};

/// The system allocator, keeping the bytes allocated and not yet freed:
/// heap in use, apart from RSS (which also holds sled's and the allocator's
/// free pages), to tell retained data from fragmentation.
struct Live;

static HEAP: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call goes to `System` with the caller's own arguments, so
// `GlobalAlloc`'s contract holds; the counter is a plain atomic.
unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's layout, unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP.fetch_add(new_size as u64, Ordering::Relaxed);
        HEAP.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Live = Live;

const SKUS: usize = 8;
const USERS: u64 = 20_000;
const TTL_MS: u64 = 2_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    // statm: size resident shared ... in pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Bytes the files under `dir` occupy on disk (allocated blocks).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn sku(i: usize) -> SkuId {
    SkuId::parse(&format!("soak-{i}")).expect("valid id")
}

fn admin() -> Caller {
    Caller {
        user: UserId::parse("admin").expect("valid id"),
        admin: true,
    }
}

/// One order's life; returns whether it was sold (delivered).
async fn order_flow(engine: Engine, n: u64) -> Result<bool, String> {
    let user = UserId::parse(&format!("u{}", n % USERS)).map_err(|e| e.to_string())?;
    let line = SkuQty {
        sku: sku((n % SKUS as u64) as usize),
        qty: 1,
    };
    let order = engine
        .place_order(user, &[line], None, None)
        .await
        .map_err(|e| format!("place: {e}"))?;
    match n % 20 {
        0 => {
            engine
                .cancel(admin(), order.id)
                .await
                .map_err(|e| format!("cancel: {e}"))?;
            return Ok(false);
        }
        1 => return Ok(false), // left to expire
        _ => {}
    }
    let payment = PaymentRef::parse(&format!("pay{n}")).map_err(|e| e.to_string())?;
    engine
        .pay(admin(), order.id, payment, order.total_cents, None)
        .await
        .map_err(|e| format!("pay: {e}"))?;
    engine
        .ship(admin(), order.id)
        .await
        .map_err(|e| format!("ship: {e}"))?;
    engine
        .deliver(admin(), order.id)
        .await
        .map_err(|e| format!("deliver: {e}"))?;
    Ok(true)
}

struct Counters {
    started: AtomicU64,
    sold: AtomicU64,
    unsold: AtomicU64,
    errors: AtomicU64,
}

fn main() {
    flashcore::memory::limit_arenas();
    // `cargo bench` passes `--bench`; nothing else to parse.
    let orders = env_u64("SOAK_ORDERS", 60_000);
    let rate = env_u64("SOAK_RATE", 1_000).max(1);
    let inflight = env_u64("SOAK_INFLIGHT", 256).max(1) as usize;
    let policy = SnapshotPolicy {
        every_events: env_u64("SOAK_SNAPSHOT_EVENTS", 50_000),
        every_ms: env_u64("SOAK_SNAPSHOT_MS", 10_000),
    };
    let temp = tempfile::Builder::new()
        .prefix("flashcore-soak-")
        .tempdir()
        .expect("tempdir");
    let dir = std::env::var("SOAK_DIR").map_or_else(|_| temp.path().to_path_buf(), Into::into);
    println!(
        "soak: {orders} orders at {rate}/s, strict, snapshots every {} events or {} ms, data dir {}",
        policy.every_events,
        policy.every_ms,
        dir.display()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let opened = journal::open(&dir, FlushPolicy::Strict, false).expect("open");
    let journal_handle = opened.journal.clone();
    let config = EngineConfig {
        reservation_ttl_ms: TTL_MS,
        archive_after_ms: Some(env_u64("SOAK_ARCHIVE_MS", 5_000)),
        ..EngineConfig::default()
    };
    let engine = Engine::start(
        config,
        opened.journal.clone(),
        Arc::new(SystemClock),
        opened.recovered.state,
    )
    .expect("engine");
    runtime.block_on(async {
        for i in 0..SKUS {
            let _ = engine
                .create_sku(NewSku {
                    sku: sku(i),
                    name: format!("Soak item {i}"),
                    price_cents: 1_999,
                    stock: 1_000_000_000,
                    per_user_limit: None,
                    sale: flashcore::domain::sale::SaleWindow::default(),
                })
                .await;
        }
    });
    let mut snapshotter = Snapshotter::start(
        Arc::new(engine.clone()),
        opened.journal.clone(),
        journal::snapshot_dir(&dir),
        policy,
    );

    let counters = Arc::new(Counters {
        started: AtomicU64::new(0),
        sold: AtomicU64::new(0),
        unsold: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let done = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    println!(
        "{:>5} {:>9} {:>9} {:>7} {:>8} {:>8} {:>9} {:>10} {:>10} {:>9} {:>10} {:>9}",
        "t_s",
        "orders",
        "events",
        "errors",
        "rss_MB",
        "heap_MB",
        "data_MB",
        "journal_MB",
        "archive_MB",
        "snaps_MB",
        "snap_seq",
        "snap_MB"
    );
    // (orders finished, RSS) once a second, for the summary.
    let samples: Arc<std::sync::Mutex<Vec<(u64, u64)>>> = Arc::default();
    let sampler = {
        let (counters, done, dir) = (Arc::clone(&counters), Arc::clone(&done), dir.clone());
        let samples = Arc::clone(&samples);
        let journal = journal_handle.clone();
        let last = {
            // The snapshotter is owned by main; share its reports by polling
            // the files instead: the newest snapshot's name and size.
            move |dir: &Path| -> (u64, u64) {
                let sdir = journal::snapshot_dir(dir);
                std::fs::read_dir(sdir)
                    .map(|d| {
                        d.filter_map(Result::ok)
                            .filter_map(|e| {
                                let name = e.file_name().into_string().ok()?;
                                let seq = name
                                    .strip_prefix("snapshot-")?
                                    .strip_suffix(".bin")?
                                    .parse::<u64>()
                                    .ok()?;
                                Some((seq, e.metadata().ok()?.len()))
                            })
                            .max()
                            .unwrap_or((0, 0))
                    })
                    .unwrap_or((0, 0))
            }
        };
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_secs(1));
                let (snap_seq, snap_bytes) = last(&dir);
                let finished =
                    counters.sold.load(Ordering::Relaxed) + counters.unsold.load(Ordering::Relaxed);
                let rss = rss_bytes();
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((finished, rss));
                println!(
                    "{:>5.0} {:>9} {:>9} {:>7} {:>8.1} {:>8.1} {:>9.1} {:>10.1} {:>10.1} {:>9.1} {:>10} {:>9.1}",
                    began.elapsed().as_secs_f64(),
                    finished,
                    journal.last_seq(),
                    counters.errors.load(Ordering::Relaxed),
                    mb(rss),
                    mb(HEAP.load(Ordering::Relaxed)),
                    mb(dir_bytes(&dir)),
                    mb(dir_bytes(&journal::journal_dir(&dir))),
                    mb(dir_bytes(&journal::archive_dir(&dir))),
                    mb(dir_bytes(&journal::snapshot_dir(&dir))),
                    snap_seq,
                    mb(snap_bytes),
                );
            }
        })
    };

    runtime.block_on(async {
        let permits = Arc::new(tokio::sync::Semaphore::new(inflight));
        let tick = Duration::from_millis(10);
        let per_tick = (rate as f64 / 100.0).max(0.01);
        let mut owed = 0.0f64;
        let mut interval = tokio::time::interval(tick);
        let mut n = 0u64;
        while n < orders {
            interval.tick().await;
            owed += per_tick;
            while owed >= 1.0 && n < orders {
                owed -= 1.0;
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break;
                };
                let (engine, counters) = (engine.clone(), Arc::clone(&counters));
                counters.started.fetch_add(1, Ordering::Relaxed);
                let this = n;
                tokio::spawn(async move {
                    match order_flow(engine, this).await {
                        Ok(true) => counters.sold.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => counters.unsold.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if counters.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("order {this}: {e}");
                            }
                            0
                        }
                    };
                    drop(permit);
                });
                n += 1;
            }
        }
        // Every flow finished.
        let _ = permits.acquire_many(inflight as u32).await;
        // Let the unpaid ones expire.
        tokio::time::sleep(Duration::from_millis(TTL_MS + 500)).await;
    });
    let ran = began.elapsed();
    let last_seq = journal_handle.last_seq();
    // Walks the archive's tree: once, here, not in the per-second rows.
    let archived = journal_handle.sled_archive().map_or(0, |a| a.len());
    let stopping = Instant::now();
    snapshotter.stop();
    let final_snapshot = stopping.elapsed();
    let report = snapshotter.last();
    // The snapshotter holds the engine and the journal: let go of every
    // handle, so sled's lock is free for the restart below.
    drop(snapshotter);
    engine.shutdown();
    opened.journal.close();
    drop(opened.journal);
    drop(engine);

    done.store(true, Ordering::Release);
    let _ = sampler.join();
    drop(journal_handle);
    let data_after = dir_bytes(&dir);
    {
        let samples = samples.lock().unwrap_or_else(|p| p.into_inner());
        let warm = samples.len() / 5;
        let after: Vec<u64> = samples.iter().skip(warm).map(|s| s.1).collect();
        if let (Some(lo), Some(hi)) = (after.iter().min(), after.iter().max()) {
            let mid = (*lo + *hi) as f64 / 2.0;
            println!(
                "RSS after warm-up ({} of {} samples): {:.1} to {:.1} MB, +-{:.1}% around {:.1} MB",
                after.len(),
                samples.len(),
                mb(*lo),
                mb(*hi),
                (*hi - *lo) as f64 / 2.0 / mid * 100.0,
                mb(mid as u64),
            );
        }
        if archived > 0 {
            println!(
                "{archived} orders archived; data dir {:.0} bytes per archived order",
                data_after as f64 / archived as f64
            );
        }
    }
    println!(
        "ran {:.1} s: {} orders ({} sold, {} cancelled or expired, {} errors), {} events; \
         final snapshot {:.2} s ({:?}); data dir {:.1} MB (journal {:.1} MB, archive {:.1} MB, snapshots {:.1} MB)",
        ran.as_secs_f64(),
        counters.started.load(Ordering::Relaxed),
        counters.sold.load(Ordering::Relaxed),
        counters.unsold.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
        last_seq,
        final_snapshot.as_secs_f64(),
        report,
        mb(data_after),
        mb(dir_bytes(&journal::journal_dir(&dir))),
        mb(dir_bytes(&journal::archive_dir(&dir))),
        mb(dir_bytes(&journal::snapshot_dir(&dir))),
    );

    // The restart as an operator sees it: the server binary started on the
    // data dir, timed from exec until `/readyz` answers 200 (sled's open,
    // the snapshot, the tail, the actors), then stopped with SIGTERM.
    match restart_time(&dir) {
        Ok(took) => println!(
            "restart (server exec to ready): {:.3} s",
            took.as_secs_f64()
        ),
        Err(e) => println!("restart failed: {e}"),
    }

    // And in process, with what recovery found.
    let restarting = Instant::now();
    let reopened = journal::open(&dir, FlushPolicy::Strict, false).expect("reopen");
    let took = restarting.elapsed();
    println!(
        "journal::open in process: {:.3} s (snapshot at {}, {} events replayed, {} orders in memory, last seq {})",
        took.as_secs_f64(),
        reopened.recovered.snapshot_seq,
        reopened.recovered.replayed,
        reopened.recovered.state.orders.len(),
        reopened.recovered.last_seq,
    );
    reopened.journal.close();
}

/// Starts the server on `dir` and times it to its first ready answer.
fn restart_time(dir: &Path) -> Result<Duration, String> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flashcore"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let ready = loop {
        if started.elapsed() > Duration::from_secs(120) {
            break Err("not ready after 120 s".to_string());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("the server exited: {status}"));
        }
        let answer = TcpStream::connect(&addr).and_then(|mut s| {
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)?;
            Ok(head)
        });
        if matches!(answer, Ok(head) if head.ends_with(b"200")) {
            break Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: a plain signal to our own child, whose pid is live (not reaped).
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = child.wait();
    ready
}
