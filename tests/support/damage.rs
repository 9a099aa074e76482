//! Damaging a stopped server's journal on purpose: a torn record, a
//! flipped bit, a missing block.

use std::path::Path;

/// How to damage a record.
pub enum Damage {
    /// Keep only the first half of the record's frame (and nothing after it
    /// in its block): a write torn by a crash.
    Tear,
    /// Flip a bit in the middle of the record's frame.
    Flip,
    /// Remove the whole block holding the record.
    DropBlock,
}

/// Damages the record `seq` in its block (the server must be stopped).
pub fn damage(dir: &Path, seq: u64, how: Damage) {
    let db =
        flashcore::journal::writer::open_db(&flashcore::journal::journal_dir(dir)).expect("open");
    let (tree, key, block) = flashcore::journal::Epochs::new(&db)
        .holding(seq)
        .expect("readable")
        .expect("a block");
    let first = flashcore::journal::codec::seq_of(&key).expect("key");
    let records: Vec<_> = flashcore::journal::codec::block_records(first, &block).collect();
    let index = records
        .iter()
        .position(|r| r.seq == seq)
        .expect("record in block");
    let start = records[index].offset;
    let end = records.get(index + 1).map_or(block.len(), |r| r.offset);
    let mut bytes = block.to_vec();
    match how {
        Damage::Tear => bytes.truncate(start + (end - start) / 2),
        Damage::Flip => bytes[start + (end - start) / 2] ^= 0x40,
        Damage::DropBlock => bytes.clear(),
    }
    if bytes.is_empty() {
        tree.remove(&key).expect("remove");
    } else {
        tree.insert(&key, bytes).expect("insert");
    }
    db.flush().expect("flush");
}
