//! Strict recovery, in process: only a torn tail is cut; damage followed by
//! a long journal ends the start promptly instead of hanging; a record that
//! decodes but does not apply stops the start (naming it) unless repaired;
//! and a torn sled `conf` (written in place, never fsynced by sled) no
//! longer keeps the journal from opening.

mod support;

use std::path::Path;
use std::time::Duration;

use flashcore::domain::{Event, SkuId};
use flashcore::journal::{self, FlushPolicy, Journal, RecoveryError, codec, writer};
use support::damage::{Damage, damage};

/// Appends `events` through a real journal in `data_dir` and closes it.
fn write_journal(data_dir: &Path, events: &[Event]) -> u64 {
    let opened = journal::open(data_dir, FlushPolicy::Strict, false).expect("opens");
    let journal = opened.journal;
    let mut last = 0;
    for event in events {
        // The queue is bounded: wait for room rather than fail.
        loop {
            match journal.append(event) {
                Ok(seq) => {
                    last = seq;
                    break;
                }
                Err(journal::JournalError::Full) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("append: {e}"),
            }
        }
    }
    journal.close();
    assert_eq!(journal.watermark().durable(), last, "all durable");
    last
}

fn sku_created(id: &str) -> Event {
    Event::SkuCreated {
        sku: SkuId::parse(id).expect("valid id"),
        name: format!("Item {id}"),
        price_cents: 100,
        per_user_limit: None,
        stock: 1_000_000,
        at_ms: 0,
    }
}

fn restock(id: &str, qty: u64) -> Event {
    Event::Restocked {
        sku: SkuId::parse(id).expect("valid id"),
        qty,
        idem: None,
        at_ms: 0,
    }
}

/// Opens the data dir again (recovery) on a thread, giving up after `limit`.
fn recover_within(data_dir: &Path, repair: bool, limit: Duration) -> Result<u64, RecoveryError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = data_dir.to_path_buf();
    std::thread::spawn(move || {
        let result = journal::open(&dir, FlushPolicy::Strict, repair).map(|o| {
            let last = o.recovered.last_seq;
            o.journal.close();
            last
        });
        let _ = tx.send(result);
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("recovery did not finish within {limit:?}: it hangs"))
}

#[test]
fn damage_followed_by_a_long_journal_refuses_promptly_instead_of_hanging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut events = vec![sku_created("a")];
    // Far more records after the damage than the decoder runs ahead.
    events.extend((0..40_000).map(|_| restock("a", 1)));
    let last = write_journal(dir.path(), &events);
    damage(dir.path(), 100, Damage::Flip);
    match recover_within(dir.path(), false, Duration::from_secs(60)) {
        Err(RecoveryError::Corrupt { seq, why }) => {
            assert_eq!(seq, 100, "{why}");
        }
        other => panic!("expected corruption at 100, got {other:?}"),
    }
    // --repair cuts there, and says so; it must not hang either.
    let recovered = recover_within(dir.path(), true, Duration::from_secs(60)).expect("repaired");
    assert_eq!(recovered, 99);
    assert!(last > 40_000);
}

#[test]
fn a_record_that_decodes_but_does_not_apply_stops_the_start_unless_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A restock of a SKU that was never created: it decodes, it passes its
    // CRC, but it cannot apply. At the tail, where a torn write would be cut.
    let last = write_journal(
        dir.path(),
        &[sku_created("a"), restock("a", 5), restock("ghost", 7)],
    );
    assert_eq!(last, 3);
    match recover_within(dir.path(), false, Duration::from_secs(60)) {
        Err(RecoveryError::Corrupt { seq, why }) => {
            assert_eq!(seq, 3, "{why}");
            assert!(why.contains("does not apply"), "{why}");
            assert!(why.contains("ghost"), "the event is named: {why}");
        }
        other => panic!("a record that does not apply was cut as a torn tail: {other:?}"),
    }
    let message = recover_within(dir.path(), false, Duration::from_secs(60))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("--repair") && message.contains('3'),
        "{message}"
    );
    // With --repair the record goes, and the start goes on from record 2.
    assert_eq!(
        recover_within(dir.path(), true, Duration::from_secs(60)).expect("repaired"),
        2
    );
    assert_eq!(
        recover_within(dir.path(), false, Duration::from_secs(60)).expect("clean now"),
        2
    );
}

#[test]
fn a_torn_tail_record_is_still_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let last = write_journal(
        dir.path(),
        &[sku_created("a"), restock("a", 5), restock("a", 6)],
    );
    // Tear the last record: keep half of its bytes.
    let db = writer::open_db(&journal::journal_dir(dir.path())).expect("open");
    let (tree, key, block) = journal::Epochs::new(&db)
        .holding(last)
        .expect("readable")
        .expect("a block");
    let first = codec::seq_of(&key).expect("key");
    let records: Vec<_> = codec::block_records(first, &block).collect();
    let start = records.last().expect("records").offset;
    let mut bytes = block.to_vec();
    bytes.truncate(start + (block.len() - start) / 2);
    tree.insert(&key, bytes).expect("insert");
    db.flush().expect("flush");
    drop((tree, db));
    assert_eq!(
        recover_within(dir.path(), false, Duration::from_secs(60)).expect("cut"),
        last - 1
    );
}

/// A journal written before contract v2 may hold `IdempotentRefusal`
/// records (v1 kept a keyed request's `409` under its key). They still
/// decode and replay, and v2 ignores them: the key is free, and a change
/// recorded under another key in the same journal is kept.
#[test]
fn an_old_journal_with_a_keyed_refusal_recovers_and_keeps_no_refusal() {
    use flashcore::domain::idem::{Lookup, Refusal};
    use flashcore::domain::{IdemStamp, IdempotencyKey, UserId};

    let stamp = |key: &str| IdemStamp {
        user: UserId::parse("ann").expect("valid user"),
        key: IdempotencyKey::parse(key).expect("valid key"),
        fingerprint: [9; 16],
    };
    let refused = Event::IdempotentRefusal {
        idem: stamp("sold-out"),
        refusal: Refusal {
            status: 409,
            code: "out_of_stock".into(),
            message: "not enough of a".into(),
        },
        at_ms: 1,
    };
    let keyed_restock = Event::Restocked {
        sku: SkuId::parse("a").expect("valid id"),
        qty: 5,
        idem: Some(stamp("restock")),
        at_ms: 2,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let last = write_journal(
        dir.path(),
        &[sku_created("a"), refused, keyed_restock, restock("a", 1)],
    );
    let opened = journal::open(dir.path(), FlushPolicy::Strict, false).expect("recovers");
    let recovered = opened.recovered;
    opened.journal.close();
    assert_eq!(recovered.last_seq, last, "every record replayed");
    let idem = &recovered.state.idem;
    let look = |key: &str| {
        let s = stamp(key);
        idem.lookup(s.user, &s.key, s.fingerprint)
    };
    assert_eq!(look("sold-out"), Lookup::Fresh, "the refusal is not kept");
    assert!(
        matches!(look("restock"), Lookup::Replay(_)),
        "the change is"
    );
    assert_eq!(idem.len(), 1);
    recovered.state.check().expect("invariants hold");
}

#[test]
fn a_torn_sled_conf_is_written_again() {
    // What sled itself writes for our configuration.
    let plain = tempfile::tempdir().expect("tempdir");
    {
        let _db = sled::Config::new()
            .path(plain.path())
            .segment_size(16 << 20)
            .open()
            .expect("sled opens");
    }
    let sleds = std::fs::read(plain.path().join("conf")).expect("sled wrote conf");
    assert_eq!(
        writer::sled_conf_bytes(),
        sleds,
        "our conf is sled's, byte for byte"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let last = write_journal(dir.path(), &[sku_created("a"), restock("a", 5)]);
    let conf = journal::journal_dir(dir.path()).join("conf");
    // Torn as a power cut leaves it: the body without its CRC.
    let whole = std::fs::read(&conf).expect("conf");
    std::fs::write(&conf, &whole[..whole.len() - 4]).expect("tear");
    assert_eq!(
        recover_within(dir.path(), false, Duration::from_secs(60)).expect("opens"),
        last
    );
    assert_eq!(
        std::fs::read(&conf).expect("conf"),
        whole,
        "rewritten whole"
    );
}
