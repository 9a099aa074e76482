//! `cargo bench --bench engine`: the engine in process, 64 concurrent callers
//! on one hot SKU, no disk (a counting in-memory journal).
//!
//! Scenarios, each run for a fixed time after a warm-up:
//! - `reserve`: hold one unit (the SKU actor's serialised step);
//! - `place`: a whole single-line order (reserve, then the order shard);
//! - `sold-out`: an order for a SKU with nothing left (answered from the
//!   actor's published hint, without a mailbox round trip);
//! - `actix-rtt` / `mpsc-rtt`: a bare round trip to a no-op actix actor and
//!   to a tokio mpsc task, the ceilings the engine's hops stand on.
//!
//! Every call is timed into an `hdrhistogram`; the table shows throughput
//! and p50/p99/p99.9/max. Set `BENCH_SECONDS` to change the run time,
//! `BENCH_CALLERS` the concurrency, `BENCH_ACTOR_THREADS` and
//! `BENCH_TOKIO_THREADS` the thread split, `BENCH_ONLY` to run one scenario.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message};
use flashcore::domain::event::SkuQty;
use flashcore::domain::sale::SaleWindow;
use flashcore::domain::{DomainError, SkuId, State, UserId};
use flashcore::engine::{Engine, EngineConfig, EngineError, NewSku, Reservation, SystemClock};
use flashcore::journal::MemJournal;
use hdrhistogram::Histogram;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Outcome {
    name: &'static str,
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latency_ns: Histogram<u64>,
}

impl Outcome {
    fn print(&self) {
        let rate = self.ops as f64 / self.elapsed.as_secs_f64();
        let us = |q: f64| self.latency_ns.value_at_quantile(q) as f64 / 1_000.0;
        println!(
            "{:<10} {:>12.0} ops/s  p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  max {:>9.1} us  errors {}",
            self.name,
            rate,
            us(0.5),
            us(0.99),
            us(0.999),
            self.latency_ns.max() as f64 / 1_000.0,
            self.errors
        );
    }
}

/// What one caller does, once per call.
trait Workload: Send + Sync + 'static {
    type Out: Send + 'static;
    fn call(&self, caller: usize) -> impl Future<Output = Result<Self::Out, ()>> + Send + '_;
}

/// Runs `callers` tasks, each calling the workload in a loop for `seconds`
/// after a warm-up, and merges their histograms.
async fn drive<W: Workload>(
    name: &'static str,
    callers: usize,
    seconds: f64,
    op: W,
) -> (Outcome, Vec<W::Out>) {
    let op = Arc::new(op);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let op = Arc::clone(&op);
        let measuring = Arc::clone(&measuring);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
            let (mut ops, mut errors) = (0u64, 0u64);
            let mut kept = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = op.call(caller).await;
                let took = started.elapsed();
                if measuring.load(Ordering::Relaxed) {
                    let _ = hist.record(took.as_nanos().max(1) as u64);
                    match result {
                        Ok(value) => {
                            ops += 1;
                            kept.push(value);
                        }
                        Err(()) => errors += 1,
                    }
                }
            }
            (hist, ops, errors, kept)
        }));
    }
    // The clock runs on a plain thread: a caller whose call never has to
    // wait (a sold-out answer) never yields, and would starve tokio's timers.
    let clock = {
        let (measuring, stop) = (Arc::clone(&measuring), Arc::clone(&stop));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            measuring.store(true, Ordering::Relaxed);
            let started = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(seconds));
            measuring.store(false, Ordering::Relaxed);
            let elapsed = started.elapsed();
            stop.store(true, Ordering::Relaxed);
            elapsed
        })
    };
    let mut latency_ns = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    let (mut ops, mut errors) = (0, 0);
    let mut kept = Vec::new();
    for task in tasks {
        let (hist, o, e, k) = task.await.expect("caller");
        latency_ns.add(hist).expect("same bounds");
        ops += o;
        errors += e;
        kept.extend(k);
    }
    let elapsed = clock.join().expect("clock thread");
    (
        Outcome {
            name,
            ops,
            errors,
            elapsed,
            latency_ns,
        },
        kept,
    )
}

fn engine(actor_threads: usize) -> Engine {
    let config = EngineConfig {
        actor_threads,
        ..EngineConfig::default()
    };
    Engine::start(
        config,
        Arc::new(MemJournal::counting()),
        Arc::new(SystemClock),
        State::default(),
    )
    .expect("engine")
}

fn sku(id: &str) -> SkuId {
    SkuId::parse(id).expect("sku id")
}

async fn hot_sku(engine: &Engine, id: &str, stock: u64) {
    engine
        .create_sku(NewSku {
            sku: sku(id),
            name: "Hot drop".into(),
            price_cents: 4_900,
            stock,
            per_user_limit: None,
            sale: SaleWindow::default(),
        })
        .await
        .expect("sku");
}

fn users(n: usize) -> Vec<UserId> {
    (0..n)
        .map(|i| UserId::parse(&format!("buyer-{i}")).expect("user id"))
        .collect()
}

struct Hold {
    engine: Engine,
    users: Vec<UserId>,
    sku: SkuId,
}
impl Workload for Hold {
    type Out = Reservation;
    async fn call(&self, c: usize) -> Result<Reservation, ()> {
        self.engine
            .reserve(self.users[c], self.sku, 1)
            .await
            .map_err(|_| ())
    }
}

struct Buy {
    engine: Engine,
    users: Vec<UserId>,
    line: [SkuQty; 1],
    expect_sold_out: bool,
}
impl Workload for Buy {
    type Out = ();
    async fn call(&self, c: usize) -> Result<(), ()> {
        let result = self
            .engine
            .place_order(self.users[c], &self.line, None, None)
            .await;
        match (result, self.expect_sold_out) {
            (Ok(_), false) => Ok(()),
            (Err(EngineError::Domain(DomainError::OutOfStock { .. })), true) => Ok(()),
            _ => Err(()),
        }
    }
}

struct Noop;
impl Actor for Noop {
    type Context = Context<Self>;
}
#[derive(Message)]
#[rtype(result = "()")]
struct Ping(tokio::sync::oneshot::Sender<u64>);
impl Handler<Ping> for Noop {
    type Result = ();
    fn handle(&mut self, msg: Ping, _: &mut Context<Self>) {
        let _ = msg.0.send(1);
    }
}

struct ActixRtt(actix::Addr<Noop>);
impl Workload for ActixRtt {
    type Out = ();
    async fn call(&self, _: usize) -> Result<(), ()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.0.try_send(Ping(reply)).map_err(|_| ())?;
        rx.await.map(|_| ()).map_err(|_| ())
    }
}

struct MpscRtt(tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<u64>>);
impl Workload for MpscRtt {
    type Out = ();
    async fn call(&self, _: usize) -> Result<(), ()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.0.try_send(reply).map_err(|_| ())?;
        rx.await.map(|_| ()).map_err(|_| ())
    }
}

fn main() {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let callers = env_usize("BENCH_CALLERS", 64);
    let actor_threads = env_usize("BENCH_ACTOR_THREADS", 1);
    let tokio_threads = env_usize("BENCH_TOKIO_THREADS", 2);
    let only = std::env::var("BENCH_ONLY").ok();
    let wants = |name: &str| only.as_deref().is_none_or(|o| o == name);
    println!(
        "engine bench: {callers} callers, {seconds} s per scenario, {actor_threads} actor thread(s), {tokio_threads} tokio worker(s), {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(tokio_threads)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if wants("reserve") {
            let e = engine(actor_threads);
            hot_sku(&e, "hot", 1_000_000_000).await;
            let load = Hold {
                engine: e.clone(),
                users: users(callers),
                sku: sku("hot"),
            };
            let (outcome, held) = drive("reserve", callers, seconds, load).await;
            outcome.print();
            // Not timed: giving the units back.
            drop(held);
            e.shutdown();
        }
        for (name, stock, expect_sold_out) in
            [("place", 1_000_000_000, false), ("sold-out", 0, true)]
        {
            if !wants(name) {
                continue;
            }
            let e = engine(actor_threads);
            hot_sku(&e, "hot", stock).await;
            let load = Buy {
                engine: e.clone(),
                users: users(callers),
                line: [SkuQty {
                    sku: sku("hot"),
                    qty: 1,
                }],
                expect_sold_out,
            };
            let (outcome, _) = drive(name, callers, seconds, load).await;
            outcome.print();
            e.shutdown();
        }
        if wants("actix-rtt") {
            let (tx, rx) = std::sync::mpsc::channel();
            let system_thread = std::thread::spawn(move || {
                let system = actix::System::new();
                system.block_on(async {
                    // The engine's mailbox size, bounded from the start.
                    let (sender, receiver) = actix::dev::channel::channel(4_096);
                    Context::with_receiver(receiver).run(Noop);
                    let _ = tx.send((actix::Addr::new(sender), actix::System::current()));
                });
                let _ = system.run();
            });
            let (addr, system) = rx.recv().expect("actix system");
            let (outcome, _) = drive("actix-rtt", callers, seconds, ActixRtt(addr)).await;
            outcome.print();
            system.stop();
            let _ = system_thread.join();
        }
        if wants("mpsc-rtt") {
            let (tx, mut rx) =
                tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<u64>>(4_096);
            let server = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    while let Some(reply) = rx.recv().await {
                        let _ = reply.send(1);
                    }
                });
            });
            let (outcome, _) = drive("mpsc-rtt", callers, seconds, MpscRtt(tx)).await;
            outcome.print();
            let _ = server.join();
        }
    });
}
