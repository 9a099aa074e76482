//! A partition's snapshots in a replicated object store
//! (`src/cluster/snapshots.rs`), against three real servers: written
//! snapshots read back byte for byte and list per partition, newest first;
//! a write whose encoding fails is never listed; a server killed between
//! writes loses nothing.

mod support;

use async_nats::jetstream;
use flashcore::cluster::snapshots::{ObjectSnapshots, open_bucket};
use flashcore::journal::SnapshotStore;
use support::nats::NatsCluster;

/// Bytes that differ at every offset (so a chunk out of place shows).
fn pattern(len: usize, salt: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 7) as u8)
        .collect()
}

struct Setup {
    runtime: tokio::runtime::Runtime,
    cluster: NatsCluster,
    bucket: async_nats::jetstream::object_store::ObjectStore,
}

fn setup() -> Setup {
    let cluster = NatsCluster::start(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bucket = runtime.block_on(async {
        let client = async_nats::connect(cluster.addrs()).await.expect("connect");
        open_bucket(&jetstream::new(client), "fc_snapshots", 3)
            .await
            .expect("bucket")
    });
    Setup {
        runtime,
        cluster,
        bucket,
    }
}

#[test]
fn snapshots_round_trip_per_partition_and_a_failed_write_is_never_listed() {
    let setup = setup();
    let handle = setup.runtime.handle().clone();
    let three = ObjectSnapshots::new(setup.bucket.clone(), 3, handle.clone());
    let four = ObjectSnapshots::new(setup.bucket.clone(), 4, handle.clone());
    assert_eq!(three.list().expect("list"), Vec::<u64>::new());

    // Several chunks of the object store and of the pipe, and an odd tail.
    let big = pattern((3 << 20) + 12_345, 1);
    three.write(17, &big).expect("write 17");
    three.write(250, &pattern(10, 2)).expect("write 250");
    // Written in many small pieces, as the streamed encoder does.
    let pieces = pattern(700_001, 3);
    three
        .write_with(9, &mut |out| {
            for piece in pieces.chunks(333) {
                out.write_all(piece)?;
            }
            Ok(())
        })
        .expect("write 9");
    four.write(18, &pattern(5, 4))
        .expect("write 18 of partition 4");

    assert_eq!(three.list().expect("list"), vec![250, 17, 9]);
    assert_eq!(four.list().expect("list"), vec![18]);
    assert_eq!(three.read(17).expect("read 17"), big);
    assert_eq!(three.read(9).expect("read 9"), pieces);
    assert_eq!(three.read(250).expect("read 250"), pattern(10, 2));

    // An encoding that fails halfway leaves nothing behind.
    let failed = three.write_with(300, &mut |out| {
        out.write_all(&pattern(2 << 20, 5))?;
        Err(std::io::Error::other("the encoder gave up"))
    });
    assert!(failed.is_err(), "a failed fill must fail the write");
    assert_eq!(three.list().expect("list"), vec![250, 17, 9]);
    assert!(three.read(300).is_err(), "a failed snapshot cannot be read");

    three.remove(17).expect("remove");
    assert_eq!(three.list().expect("list"), vec![250, 9]);
    assert!(three.read(17).is_err());
    assert_eq!(four.list().expect("list"), vec![18]);
}

#[test]
fn a_killed_server_loses_no_snapshot() {
    let mut setup = setup();
    let handle = setup.runtime.handle().clone();
    let store = ObjectSnapshots::new(setup.bucket.clone(), 0, handle);
    let first = pattern(1 << 20, 7);
    store.write(1, &first).expect("write 1");

    setup.cluster.kill(0);
    // Two of three still make a quorum: writes and reads go on (after the
    // bucket's stream elects a leader, if the killed server led it).
    let second = pattern(300_000, 8);
    let mut written = store.write(2, &second);
    for _ in 1..50 {
        if written.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        written = store.write(2, &second);
    }
    written.expect("a write with one server down");
    // A call that meets the client's reconnect (it was connected to the
    // killed server) times out and is retried, as a takeover retries.
    let listed = retried(|| store.list());
    assert_eq!(listed, vec![2, 1]);
    assert_eq!(retried(|| store.read(1)), first);

    setup.cluster.restart(0);
    assert_eq!(store.read(2).expect("read 2"), second);
}

/// `call` retried every 200 ms, at most 50 times, while the cluster settles
/// after a server was killed; panics with the last error.
fn retried<T, E: std::fmt::Debug>(mut call: impl FnMut() -> Result<T, E>) -> T {
    let mut last = None;
    for _ in 0..50 {
        match call() {
            Ok(value) => return value,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("still failing after 10 s: {last:?}");
}
