//! `cargo bench --bench order_model`: one actor per order, or order shards?
//!
//! Both models get the same work: create an order, then three moves of it
//! (pay, ship, read), from 64 concurrent callers on one actor thread, with
//! `try_send` and a oneshot reply like the engine. Reported: orders per
//! second through the whole life, and resident memory per live order.
//!
//! - `per-order`: each order is its own actix actor (its own mailbox and
//!   context), found through a `DashMap<order id, Addr>` registry;
//! - `sharded`: 8 shard actors each own a `HashMap` of orders; a caller
//!   finds the shard from the order id.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use actix::dev::channel;
use actix::{Actor, Addr, ArbiterHandle, Context, Handler, Message, System};
use dashmap::DashMap;
use tokio::sync::oneshot;

const CALLERS: u64 = 64;
const SHARDS: usize = 8;

/// A small order, like the engine's (a line and a history).
#[derive(Clone)]
struct Order {
    id: u64,
    status: u8,
    lines: Vec<(u64, u32, u64)>,
    history: Vec<(u8, u64)>,
}

impl Order {
    fn new(id: u64) -> Order {
        Order {
            id,
            status: 0,
            lines: vec![(1, 1, 4_900)],
            history: vec![(0, id)],
        }
    }

    fn step(&mut self, to: u8) -> u8 {
        self.status = to;
        self.history.push((to, self.id + self.lines.len() as u64));
        self.status
    }
}

// ----- one actor per order -----

struct OrderActor(Order);
impl Actor for OrderActor {
    type Context = Context<Self>;
}
#[derive(Message)]
#[rtype(result = "()")]
struct Step(u8, oneshot::Sender<u8>);
impl Handler<Step> for OrderActor {
    type Result = ();
    fn handle(&mut self, msg: Step, _: &mut Context<Self>) {
        let _ = msg.1.send(self.0.step(msg.0));
    }
}

// ----- order shards -----

#[derive(Default)]
struct Shard(HashMap<u64, Order>);
impl Actor for Shard {
    type Context = Context<Self>;
}
#[derive(Message)]
#[rtype(result = "()")]
struct Create(u64, oneshot::Sender<u8>);
#[derive(Message)]
#[rtype(result = "()")]
struct ShardStep(u64, u8, oneshot::Sender<u8>);
impl Handler<Create> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Create, _: &mut Context<Self>) {
        self.0.insert(msg.0, Order::new(msg.0));
        let _ = msg.1.send(0);
    }
}
impl Handler<ShardStep> for Shard {
    type Result = ();
    fn handle(&mut self, msg: ShardStep, _: &mut Context<Self>) {
        let status = self.0.get_mut(&msg.0).map_or(255, |o| o.step(msg.1));
        let _ = msg.2.send(status);
    }
}

fn start_in<A: Actor<Context = Context<A>> + Send>(arbiter: &ArbiterHandle, actor: A) -> Addr<A> {
    let (tx, rx) = channel::channel(4_096);
    arbiter.spawn_fn(move || {
        Context::with_receiver(rx).run(actor);
    });
    Addr::new(tx)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

async fn ask<A, M>(addr: &Addr<A>, make: impl FnOnce(oneshot::Sender<u8>) -> M) -> u8
where
    A: Actor<Context = Context<A>> + Handler<M>,
    M: Message<Result = ()> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let mut msg = make(tx);
    loop {
        match addr.try_send(msg) {
            Ok(()) => break,
            Err(actix::prelude::SendError::Full(back)) => {
                msg = back;
                tokio::task::yield_now().await;
            }
            Err(actix::prelude::SendError::Closed(_)) => return 255,
        }
    }
    rx.await.unwrap_or(255)
}

fn main() {
    // Each model runs in a process of its own, so the memory one leaves
    // behind does not hide what the other takes.
    let Ok(model) = std::env::var("BENCH_MODEL") else {
        for model in ["per-order", "sharded"] {
            let status = std::process::Command::new(std::env::current_exe().expect("own path"))
                .env("BENCH_MODEL", model)
                .status()
                .expect("runs");
            assert!(status.success(), "{model} failed");
        }
        return;
    };
    let orders: u64 = std::env::var("BENCH_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let (tx, rx) = std::sync::mpsc::channel();
    let system_thread = std::thread::spawn(move || {
        let system = System::new();
        system.block_on(async {
            let _ = tx.send((actix::Arbiter::current(), System::current()));
        });
        let _ = system.run();
    });
    let (arbiter, system) = rx.recv().expect("actor thread");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let next = Arc::new(AtomicU64::new(0));
    let before = rss_bytes();
    let started = Instant::now();
    // Kept alive until measured.
    let registry: Arc<DashMap<u64, Arc<Addr<OrderActor>>>> = Arc::new(DashMap::new());
    let shards: Arc<Vec<Addr<Shard>>> = Arc::new(
        (0..SHARDS)
            .map(|_| start_in(&arbiter, Shard::default()))
            .collect(),
    );
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CALLERS {
            let (registry, shards, next, arbiter) = (
                Arc::clone(&registry),
                Arc::clone(&shards),
                Arc::clone(&next),
                arbiter.clone(),
            );
            let per_order = model == "per-order";
            tasks.push(tokio::spawn(async move {
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if id >= orders {
                        break;
                    }
                    if per_order {
                        let addr = start_in(&arbiter, OrderActor(Order::new(id)));
                        registry.insert(id, Arc::new(addr));
                        for to in [1, 2, 2] {
                            let addr = registry.get(&id).map(|a| Arc::clone(&a));
                            if let Some(addr) = addr {
                                ask(&addr, |tx| Step(to, tx)).await;
                            }
                        }
                    } else {
                        let shard = &shards[(id as usize) % SHARDS];
                        ask(shard, |tx| Create(id, tx)).await;
                        for to in [1, 2, 2] {
                            ask(shard, |tx| ShardStep(id, to, tx)).await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let took = started.elapsed();
    // Let the actor thread finish starting what was spawned.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let per_order = rss_bytes().saturating_sub(before) / orders;
    println!(
        "{model:<10} {:>9.0} orders/s (create + 3 moves, {orders} orders, {CALLERS} callers, 1 actor thread), ~{per_order} bytes resident per live order",
        orders as f64 / took.as_secs_f64()
    );
    system.stop();
    let _ = system_thread.join();
}
