//! `JetStreamJournal` against a real 3-server NATS cluster (R3 stream):
//! concurrent appends read back in order, two writers on one partition
//! (one is fenced), the stream leader killed or paused mid-stream (every
//! acknowledged append survives, appends go on), purge below a snapshot,
//! and a restart from the resume point a read returns.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use flashcore::cluster::journal::{
    ClusterJournalError, JetStreamJournal, JournalStream, ResumePoint, StoredBlock, WriterTerm,
    blocks_after, ensure_stream, purge_through, resume_point,
};
use flashcore::domain::{Event, UserId};
use flashcore::journal::{Journal, JournalError, Seq, codec};
use support::nats::NatsCluster;

const PARTITION: u32 = 3;

/// A small event that says who appended it and which it was.
fn event(writer: &str, i: u64) -> Event {
    Event::CartCleared {
        user: UserId::parse(writer).expect("valid user id"),
        at_ms: i,
    }
}

async fn connect(cluster: &NatsCluster) -> Context {
    let client = async_nats::connect(cluster.addrs())
        .await
        .expect("connect to the cluster");
    jetstream::new(client)
}

async fn journal_stream(js: &Context) -> JournalStream {
    let spec = JournalStream::new(3);
    ensure_stream(js, &spec)
        .await
        .expect("the R3 journal stream");
    spec
}

fn start(js: &Context, spec: &JournalStream, point: ResumePoint, term: u64) -> JetStreamJournal {
    JetStreamJournal::start(
        js.clone(),
        spec,
        PARTITION,
        point,
        WriterTerm(term),
        &tokio::runtime::Handle::current(),
    )
    .expect("the journal starts")
}

/// Every record of `blocks`, decoded, in order.
fn records(blocks: &[StoredBlock]) -> Vec<(Seq, Event)> {
    blocks
        .iter()
        .flat_map(|b| codec::block_records(b.first_seq, &b.bytes))
        .map(|r| (r.seq, r.event.expect("every record read back decodes")))
        .collect()
}

/// Appends, retrying while the queue is full.
fn append(journal: &JetStreamJournal, event: &Event) -> Result<Seq, JournalError> {
    loop {
        match journal.append(event) {
            Err(JournalError::Full) => std::thread::sleep(Duration::from_millis(1)),
            other => return other,
        }
    }
}

/// Appends `count` events in rounds of `round`, waiting for each round;
/// returns what was acknowledged.
async fn append_rounds(
    journal: &JetStreamJournal,
    writer: &str,
    count: u64,
    round: u64,
) -> Vec<(Seq, Event)> {
    let mut acked = Vec::new();
    let mut i = 0;
    while i < count {
        let mut pending = Vec::new();
        for _ in 0..round.min(count - i) {
            let e = event(writer, i);
            pending.push((append(journal, &e).expect("append"), e));
            i += 1;
        }
        let last = pending.last().map_or(0, |p| p.0);
        journal.watermark().wait(last).await.expect("durable");
        acked.extend(pending);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_read_back_in_order() {
    let cluster = NatsCluster::start(3);
    let js = connect(&cluster).await;
    let spec = journal_stream(&js).await;
    let journal = Arc::new(start(&js, &spec, ResumePoint::default(), 1));
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 500;
    // One event made durable first: appends never wait, so the threads'
    // events may all be queued before the writer's first publish, and one
    // block would hold everything (seen once in a run).
    let first = event("t-first", 0);
    let first_seq = append(&journal, &first).expect("append");
    journal.watermark().wait(first_seq).await.expect("durable");
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let journal = Arc::clone(&journal);
        threads.push(tokio::task::spawn_blocking(move || {
            (0..PER_THREAD)
                .map(|i| {
                    let e = event(&format!("t{t}"), i);
                    (append(&journal, &e).expect("append"), e)
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut appended = BTreeMap::from([(first_seq, first)]);
    for thread in threads {
        for (seq, e) in thread.await.expect("appender") {
            journal.watermark().wait(seq).await.expect("durable");
            assert!(
                appended.insert(seq, e).is_none(),
                "seq {seq} handed out twice"
            );
        }
    }
    assert_eq!(appended.len() as u64, THREADS * PER_THREAD + 1);
    let read = blocks_after(&js, &spec, PARTITION, 0)
        .await
        .expect("read back");
    let stored = records(&read.blocks);
    let expected: Vec<(Seq, Event)> = appended.into_iter().collect();
    assert_eq!(
        stored, expected,
        "everything appended, in order, nothing else"
    );
    assert_eq!(read.resume.last_seq, THREADS * PER_THREAD + 1);
    assert_eq!(read.resume, journal.durable_point());
    assert!(read.blocks.len() > 1, "several blocks were written");
    // Each thread's events kept their order among themselves.
    for t in 0..THREADS {
        let name = format!("t{t}");
        let mine: Vec<u64> = stored
            .iter()
            .filter_map(|(_, e)| match e {
                Event::CartCleared { user, at_ms } if user.as_str() == name => Some(*at_ms),
                _ => None,
            })
            .collect();
        assert_eq!(mine, (0..PER_THREAD).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_writers_on_a_partition_one_is_fenced() {
    let cluster = NatsCluster::start(3);
    let js = connect(&cluster).await;
    let spec = journal_stream(&js).await;
    let first = start(&js, &spec, ResumePoint::default(), 1);
    let base = append_rounds(&first, "base", 10, 10).await;
    first.closed().await;
    let point = resume_point(&js, &spec, PARTITION).await.expect("resume");
    assert_eq!(point.last_seq, 10);

    let writers: Vec<Arc<JetStreamJournal>> = (0..2)
        .map(|w| Arc::new(start(&js, &spec, point, 2 + w)))
        .collect();
    let mut runs = Vec::new();
    for (w, journal) in writers.iter().enumerate() {
        let journal = Arc::clone(journal);
        runs.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = 0u32;
            for round in 0..10u64 {
                let mut pending = Vec::new();
                for i in 0..10 {
                    let e = event(&format!("w{w}"), round * 10 + i);
                    match journal.append(&e) {
                        Ok(seq) => pending.push((seq, e)),
                        Err(_) => refused += 1,
                    }
                }
                for (seq, e) in pending {
                    if journal.watermark().wait(seq).await.is_ok() {
                        acked.push((seq, e));
                    }
                }
            }
            (acked, refused)
        }));
    }
    let mut outcomes = Vec::new();
    for run in runs {
        outcomes.push(run.await.expect("writer"));
    }
    let fenced: Vec<bool> = writers.iter().map(|w| w.is_fenced()).collect();
    assert_eq!(
        fenced.iter().filter(|&&f| f).count(),
        1,
        "exactly one writer is fenced: {fenced:?}"
    );
    let loser = fenced.iter().position(|&f| f).expect("a loser");
    let winner = 1 - loser;
    assert_eq!(
        outcomes[winner].0.len(),
        100,
        "the winner's appends all land"
    );
    assert!(
        outcomes[loser].1 > 0,
        "the loser refuses appends once fenced"
    );
    assert!(
        writers[loser]
            .failure()
            .is_some_and(|why| why.to_string().contains("fenced")),
        "the failure says why"
    );
    assert!(matches!(
        writers[loser].append(&event("late", 0)),
        Err(JournalError::Stopped { .. })
    ));

    let read = blocks_after(&js, &spec, PARTITION, 0)
        .await
        .expect("read back");
    let mut expected: Vec<(Seq, Event)> = base;
    let mut acked: Vec<(Seq, Event)> = outcomes.iter().flat_map(|o| o.0.clone()).collect();
    acked.sort_by_key(|(seq, _)| *seq);
    expected.extend(acked);
    assert_eq!(
        records(&read.blocks),
        expected,
        "exactly what was acknowledged is stored"
    );
}

/// The index of the server leading the journal stream.
async fn stream_leader(js: &Context, spec: &JournalStream) -> usize {
    let mut stream = js.get_stream(&spec.name).await.expect("stream");
    let info = stream.info().await.expect("stream info");
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the stream has a leader");
    leader
        .strip_prefix('n')
        .and_then(|i| i.parse().ok())
        .expect("servers are named n{i}")
}

/// Appends in rounds of 20 while `disturb` runs at `at` into the run, and
/// until `after_rounds` rounds succeeded after it; returns what was
/// acknowledged and the longest wait for a round.
async fn append_through(
    journal: &JetStreamJournal,
    at: Duration,
    after_rounds: u32,
    disturb: impl FnOnce(),
) -> (Vec<(Seq, Event)>, Duration) {
    let started = Instant::now();
    let mut disturb = Some(disturb);
    let mut acked = Vec::new();
    let mut longest = Duration::ZERO;
    let mut rounds_after = 0;
    let mut i = 0u64;
    while rounds_after < after_rounds {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "appends resume"
        );
        if started.elapsed() >= at
            && let Some(disturb) = disturb.take()
        {
            disturb();
        }
        let mut pending = Vec::new();
        for _ in 0..20 {
            let e = event("k", i);
            i += 1;
            pending.push((append(journal, &e).expect("append"), e));
        }
        let round = Instant::now();
        let last = pending.last().map_or(0, |p| p.0);
        journal
            .watermark()
            .wait(last)
            .await
            .unwrap_or_else(|e| panic!("a round fails: {e} ({:?})", journal.failure()));
        longest = longest.max(round.elapsed());
        acked.extend(pending);
        if disturb.is_none() {
            rounds_after += 1;
        }
    }
    (acked, longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_appends_survive_the_leader_killed() {
    let mut cluster = NatsCluster::start(3);
    let js = connect(&cluster).await;
    let spec = journal_stream(&js).await;
    let journal = start(&js, &spec, ResumePoint::default(), 1);
    let leader = stream_leader(&js, &spec).await;
    let (acked, longest) = append_through(&journal, Duration::from_millis(500), 30, || {
        cluster.kill(leader)
    })
    .await;
    eprintln!(
        "killed n{leader}: {} acked, longest round {longest:?}, {} publishes unconfirmed",
        acked.len(),
        journal.unconfirmed_publishes()
    );
    assert!(!journal.is_fenced());
    let read = blocks_after(&js, &spec, PARTITION, 0)
        .await
        .expect("read back");
    assert_eq!(
        records(&read.blocks),
        acked,
        "every acknowledged append is there"
    );
    assert_eq!(read.resume, journal.durable_point());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_makes_acks_ambiguous_but_nothing_is_lost_or_doubled() {
    let cluster = NatsCluster::start(3);
    let js = connect(&cluster).await;
    let spec = journal_stream(&js).await;
    let journal = start(&js, &spec, ResumePoint::default(), 1);
    let leader = stream_leader(&js, &spec).await;
    let (acked, longest) = {
        let cluster = &cluster;
        let resume_later = async {
            tokio::time::sleep(Duration::from_millis(500 + 3_000)).await;
            cluster.resume(leader);
        };
        let appends = append_through(&journal, Duration::from_millis(500), 30, || {
            cluster.pause(leader)
        });
        let (outcome, ()) = tokio::join!(appends, resume_later);
        outcome
    };
    eprintln!(
        "paused n{leader} for 3 s: {} acked, longest round {longest:?}, {} publishes unconfirmed",
        acked.len(),
        journal.unconfirmed_publishes()
    );
    assert!(longest >= Duration::from_secs(1), "the pause was felt");
    assert!(
        journal.unconfirmed_publishes() > 0,
        "a publish went unconfirmed and was checked"
    );
    let read = blocks_after(&js, &spec, PARTITION, 0)
        .await
        .expect("read back");
    // `blocks_after` refuses a block that repeats records (a gap check), so
    // equality here also says that no republished block landed twice.
    assert_eq!(records(&read.blocks), acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_drops_only_blocks_wholly_below_the_snapshot() {
    let cluster = NatsCluster::start(3);
    let js = connect(&cluster).await;
    let spec = journal_stream(&js).await;
    let journal = start(&js, &spec, ResumePoint::default(), 1);
    let acked = append_rounds(&journal, "p", 300, 10).await;
    let before = blocks_after(&js, &spec, PARTITION, 0).await.expect("read");
    assert!(before.blocks.len() >= 30);

    let k = 95;
    let gone = before.blocks.iter().filter(|b| b.last_seq <= k).count() as u64;
    let kept_first = before
        .blocks
        .iter()
        .find(|b| b.last_seq > k)
        .expect("a block after k");
    assert_eq!(
        purge_through(&js, &spec, PARTITION, k)
            .await
            .expect("purge"),
        gone
    );

    let after = blocks_after(&js, &spec, PARTITION, k)
        .await
        .expect("read after k");
    assert_eq!(after.blocks[0], *kept_first, "the straddling block stays");
    let tail: Vec<(Seq, Event)> = acked.iter().filter(|(s, _)| *s > k).cloned().collect();
    let read_tail: Vec<(Seq, Event)> = records(&after.blocks)
        .into_iter()
        .filter(|(s, _)| *s > k)
        .collect();
    assert_eq!(read_tail, tail, "everything after k is still there");
    // The subject now starts at the kept block: reading from 0 finds a gap.
    match blocks_after(&js, &spec, PARTITION, 0).await {
        Err(ClusterJournalError::Gap { expected, found }) => {
            assert_eq!((expected, found), (1, kept_first.first_seq));
        }
        other => panic!("expected a gap, got {other:?}"),
    }

    // Purging past the end keeps the last block: the journal still resumes
    // there and its writer's compare-and-set still holds.
    let point = journal.durable_point();
    purge_through(&js, &spec, PARTITION, u64::MAX)
        .await
        .expect("purge all");
    assert_eq!(
        resume_point(&js, &spec, PARTITION).await.expect("resume"),
        point
    );
    let seq = journal.append(&event("p", 300)).expect("append");
    journal
        .watermark()
        .wait(seq)
        .await
        .expect("durable after purge");
    let read = blocks_after(&js, &spec, PARTITION, point.last_seq)
        .await
        .expect("read");
    assert_eq!(records(&read.blocks).last(), Some(&(seq, event("p", 300))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_from_the_read_resume_point_continues_the_sequence() {
    let cluster = NatsCluster::start(3);
    let js = connect(&cluster).await;
    let spec = journal_stream(&js).await;
    let first = start(&js, &spec, ResumePoint::default(), 1);
    let mut acked = append_rounds(&first, "a", 100, 25).await;
    first.closed().await;
    assert!(matches!(
        first.append(&event("a", 100)),
        Err(JournalError::Closed)
    ));

    let read = blocks_after(&js, &spec, PARTITION, 0).await.expect("read");
    assert_eq!(read.resume.last_seq, 100);
    let second = start(&js, &spec, read.resume, 2);
    let more = append_rounds(&second, "b", 50, 10).await;
    assert_eq!(more[0].0, 101, "numbering continues");
    acked.extend(more);

    // A writer started from the old point is fenced at once.
    let stale = start(&js, &spec, read.resume, 3);
    let seq = stale.append(&event("c", 0)).expect("taken");
    assert_eq!(seq, 101);
    assert!(stale.watermark().wait(seq).await.is_err());
    assert!(stale.is_fenced());

    let all = blocks_after(&js, &spec, PARTITION, 0)
        .await
        .expect("read all");
    assert_eq!(records(&all.blocks), acked);
    assert_eq!(all.resume, second.durable_point());
}
