//! The journal's epochs: the blocks of records live in a run of sled trees,
//! one per epoch, so that dropping the journal below a snapshot drops whole
//! trees instead of deleting blocks.
//!
//! # Why
//!
//! Deleting 27,000 blocks after a snapshot is 27,000 sled operations on the
//! database the journal writer is flushing into (and as a sled batch, one
//! process-wide write lock that every insert and flush waits on). A tree
//! dropped whole (`Db::drop_tree`) takes no such lock: it unlinks the
//! tree's root from sled's metadata and frees its pages, on the snapshot
//! thread, while the writer goes on in the newest tree.
//!
//! # The rules
//!
//! - Epoch `n` is the tree [`EPOCH_PREFIX`] followed by `n` as 8 big-endian
//!   bytes; sled's default tree is epoch 0, where journals written before
//!   epochs existed keep their blocks (it cannot be dropped, so it is
//!   truncated block by block, as before).
//! - The writer appends to the newest epoch only, and moves to a new one
//!   between two batches when a snapshot asks ([`crate::journal::SledJournal::next_epoch`]).
//!   So epochs hold consecutive, increasing ranges of sequence numbers, and
//!   the journal is their blocks read epoch after epoch.
//! - An epoch goes when every record in it is at or below the sequence
//!   number a snapshot makes unneeded: when the next non-empty epoch starts
//!   at or below that number plus one. Oldest first, and never the newest
//!   epoch (the writer's), so what is left is always a suffix of the
//!   journal. A drop that a crash takes back leaves an epoch recovery skips
//!   (a snapshot covers it) and the next snapshot drops again.
//! - The creation of a new epoch and its first blocks reach sled's log in
//!   that order, so a crash never leaves blocks in a tree sled forgot.

use std::sync::{Arc, Mutex};

use crate::journal::history::{self, BlockBytes, History, HistoryError, StoredBlock};
use crate::journal::{Seq, codec};

/// The name of an epoch's tree is this, then the epoch's number (8 bytes,
/// big-endian, so names sort as numbers).
pub const EPOCH_PREFIX: &[u8] = b"journal.epoch.";

/// An epoch's number: 0 is sled's default tree.
pub type EpochNo = u64;

/// The run of epoch trees in one journal database. Cheap to clone.
#[derive(Clone)]
pub struct Epochs {
    db: sled::Db,
    /// Held while the list of trees is read and while trees are dropped:
    /// a list read during a drop could reopen (and so recreate) a tree
    /// being dropped. The writer's new epoch does not take it (a new
    /// epoch's number is above every epoch a drop considers).
    listing: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Epochs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epochs").finish_non_exhaustive()
    }
}

/// One epoch: its number and its tree.
#[derive(Clone)]
pub struct Epoch {
    /// Its number.
    pub number: EpochNo,
    /// Its tree of blocks.
    pub tree: sled::Tree,
}

pub use crate::journal::history::Dropped;

fn name(number: EpochNo) -> Vec<u8> {
    let mut name = EPOCH_PREFIX.to_vec();
    name.extend_from_slice(&number.to_be_bytes());
    name
}

fn number(name: &[u8]) -> Option<EpochNo> {
    let digits = name.strip_prefix(EPOCH_PREFIX)?;
    let bytes: [u8; 8] = digits.try_into().ok()?;
    Some(EpochNo::from_be_bytes(bytes))
}

/// The first sequence number of a tree's first block, if it has one.
fn first_seq(tree: &sled::Tree) -> Result<Option<Seq>, sled::Error> {
    Ok(match tree.first()? {
        Some((key, _)) => codec::seq_of(&key).ok(),
        None => None,
    })
}

impl Epochs {
    /// The epochs of the journal database `db`.
    pub fn new(db: &sled::Db) -> Epochs {
        Epochs {
            db: db.clone(),
            listing: Arc::new(Mutex::new(())),
        }
    }

    /// Every epoch, oldest first (epoch 0 always).
    ///
    /// # Errors
    /// sled's, when a tree cannot be opened.
    pub fn list(&self) -> Result<Vec<Epoch>, sled::Error> {
        let _listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        self.list_locked()
    }

    fn list_locked(&self) -> Result<Vec<Epoch>, sled::Error> {
        let mut numbers: Vec<EpochNo> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| number(n))
            .filter(|n| *n > 0)
            .collect();
        numbers.sort_unstable();
        let mut epochs = Vec::with_capacity(numbers.len() + 1);
        epochs.push(Epoch {
            number: 0,
            tree: sled::Tree::clone(&self.db),
        });
        for number in numbers {
            let tree = self.db.open_tree(name(number))?;
            epochs.push(Epoch { number, tree });
        }
        Ok(epochs)
    }

    /// The epoch a writer starting now appends to: the newest, or a first
    /// epoch tree when there is only epoch 0 (a new journal, or one from
    /// before epochs, whose blocks stay where they are).
    ///
    /// # Errors
    /// sled's.
    pub fn for_writer(&self) -> Result<Epoch, sled::Error> {
        let newest = self.list()?.pop();
        match newest {
            Some(epoch) if epoch.number > 0 => Ok(epoch),
            _ => self.open_after(0),
        }
    }

    /// Creates (or opens) the epoch after `number`.
    ///
    /// # Errors
    /// sled's.
    pub fn open_after(&self, number: EpochNo) -> Result<Epoch, sled::Error> {
        let next = number.checked_add(1).ok_or_else(|| {
            sled::Error::Unsupported("the journal ran out of epoch numbers".into())
        })?;
        Ok(Epoch {
            number: next,
            tree: self.db.open_tree(name(next))?,
        })
    }

    /// The journal's blocks, from the one holding `from + 1` on, epoch
    /// after epoch.
    ///
    /// # Errors
    /// sled's.
    pub fn blocks_from(&self, from: Seq) -> Result<Blocks, sled::Error> {
        let want = codec::key(from.saturating_add(1));
        let epochs = self.list()?;
        // The block holding `from + 1` is in the last epoch that starts at
        // or before it; every epoch before that one lies wholly below it.
        let mut start_at = 0;
        for (index, epoch) in epochs.iter().enumerate() {
            match epoch.tree.first()? {
                Some((key, _)) if key.as_ref() <= want.as_slice() => start_at = index,
                Some(_) => break,
                None => {}
            }
        }
        let mut trees = epochs.into_iter().skip(start_at).map(|e| e.tree);
        let current = match trees.next() {
            Some(tree) => {
                let start = match tree.range(..=want.as_slice()).next_back() {
                    Some(entry) => entry?.0.to_vec(),
                    None => want.to_vec(),
                };
                Some(tree.range(start..))
            }
            None => None,
        };
        Ok(Blocks {
            trees: trees.collect::<Vec<_>>().into_iter(),
            current,
        })
    }

    /// The block holding record `seq` (the last block starting at or
    /// before it), with the tree it is in.
    ///
    /// # Errors
    /// sled's.
    pub fn holding(
        &self,
        seq: Seq,
    ) -> Result<Option<(sled::Tree, sled::IVec, sled::IVec)>, sled::Error> {
        let key = codec::key(seq);
        for epoch in self.list()?.into_iter().rev() {
            if let Some(entry) = epoch.tree.range(..=key.as_slice()).next_back() {
                let (k, block) = entry?;
                return Ok(Some((epoch.tree, k, block)));
            }
        }
        Ok(None)
    }

    /// Makes sled write what it holds (and `sync_file_range` it; the
    /// caller fdatasyncs).
    ///
    /// # Errors
    /// sled's.
    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }

    /// The first sequence number the journal still holds, if any.
    ///
    /// # Errors
    /// sled's.
    pub fn first_seq(&self) -> Result<Option<Seq>, sled::Error> {
        for epoch in self.list()? {
            if let Some(seq) = first_seq(&epoch.tree)? {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }

    /// Removes, after a snapshot, every epoch whose records all lie at or
    /// below `seq`, oldest first, never the newest; in epoch 0, the blocks
    /// wholly at or below `seq`, one by one (see [`truncate_blocks`]). Not
    /// synced: a removal a crash takes back is removed again later.
    ///
    /// # Errors
    /// sled's.
    pub fn drop_through(&self, seq: Seq) -> Result<Dropped, sled::Error> {
        let _listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        let epochs = self.list_locked()?;
        let mut firsts = Vec::with_capacity(epochs.len());
        for epoch in &epochs {
            firsts.push(first_seq(&epoch.tree)?);
        }
        let mut dropped = Dropped::default();
        for (index, epoch) in epochs.iter().enumerate() {
            let Some(later) = firsts.get(index + 1..) else {
                break;
            };
            // Where the next records start: this epoch ends just before.
            let next_first = later.iter().flatten().next().copied();
            let whole = next_first.is_some_and(|first| first.saturating_sub(1) <= seq);
            if epoch.number == 0 {
                dropped.blocks = truncate_blocks(&epoch.tree, seq, whole)?;
                if !whole {
                    break;
                }
                continue;
            }
            if !whole || index + 1 == epochs.len() {
                break;
            }
            if self.db.drop_tree(name(epoch.number))? {
                dropped.epochs += 1;
            }
        }
        Ok(dropped)
    }
}

/// Blocks removed one at a time before a rest (see [`truncate_blocks`]).
const TRUNCATE_REMOVES_PER_REST: u64 = 512;
/// See [`TRUNCATE_REMOVES_PER_REST`].
const TRUNCATE_REST_US: u64 = 1_000;
/// Block keys listed at a time when truncating.
const TRUNCATE_LIST_MAX: usize = 10_000;

/// Removes the blocks of `tree` whose records all lie at or below `seq`
/// (every block, when the caller knows the tree ends at or below `seq`:
/// `whole`); returns how many went. One by one, oldest first (what is left is always
/// a suffix of the journal), never in a sled batch (which would take sled's
/// process-wide write lock that every insert and flush of the journal
/// writer waits on), with a rest every [`TRUNCATE_REMOVES_PER_REST`]. Only
/// epoch 0 (a journal from before epochs) is truncated this way.
///
/// # Errors
/// sled's.
fn truncate_blocks(tree: &sled::Tree, seq: Seq, whole: bool) -> Result<u64, sled::Error> {
    if seq == 0 {
        return Ok(0);
    }
    let mut removed = 0u64;
    loop {
        // A block ends where the next one starts; the block holding `seq`
        // itself may hold later records too, so it stays.
        let keys: Vec<sled::IVec> = tree
            .range(..=codec::key(seq.saturating_add(1)))
            .keys()
            .take(TRUNCATE_LIST_MAX + 1)
            .collect::<Result<_, _>>()?;
        let doomed: Vec<sled::IVec> = if whole {
            keys
        } else {
            keys.windows(2)
                .filter(|pair| codec::seq_of(&pair[1]).unwrap_or(0).saturating_sub(1) <= seq)
                .map(|pair| pair[0].clone())
                .collect()
        };
        if doomed.is_empty() {
            return Ok(removed);
        }
        for key in &doomed {
            tree.remove(key)?;
            removed += 1;
            if removed.is_multiple_of(TRUNCATE_REMOVES_PER_REST) {
                std::thread::sleep(std::time::Duration::from_micros(TRUNCATE_REST_US));
            }
        }
    }
}

/// The epochs as a journal's stored blocks, for recovery before the writer
/// starts (the live journal adds its capture point: `SledJournal`).
impl History for Epochs {
    fn blocks_from(&self, from: Seq) -> Result<history::Blocks<'_>, HistoryError> {
        let blocks = Epochs::blocks_from(self, from).map_err(read_error)?;
        Ok(Box::new(blocks.map(|entry| {
            let (key, bytes) = entry.map_err(read_error)?;
            let first = codec::seq_of(&key).map_err(|e| HistoryError::BadKey(e.to_string()))?;
            Ok(StoredBlock {
                first,
                bytes: BlockBytes::Sled(bytes),
            })
        })))
    }

    fn drop_through(&self, seq: Seq) -> Result<Dropped, HistoryError> {
        Epochs::drop_through(self, seq)
            .map_err(|e| HistoryError::storage("truncating the journal", e))
    }
}

fn read_error(e: sled::Error) -> HistoryError {
    HistoryError::storage("reading the journal", e)
}

/// The journal's blocks in order, across epochs: `(key, block)` pairs as
/// sled gives them.
pub struct Blocks {
    trees: std::vec::IntoIter<sled::Tree>,
    current: Option<sled::Iter>,
}

impl Iterator for Blocks {
    type Item = Result<(sled::IVec, sled::IVec), sled::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.current.as_mut().and_then(Iterator::next) {
                return Some(entry);
            }
            self.current = Some(self.trees.next()?.iter());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(tree: &sled::Tree, first: Seq) {
        tree.insert(codec::key(first), vec![0u8; 4])
            .expect("insert");
    }

    fn keys(epochs: &Epochs, from: Seq) -> Vec<Seq> {
        epochs
            .blocks_from(from)
            .expect("blocks")
            .map(|e| codec::seq_of(&e.expect("entry").0).expect("key"))
            .collect()
    }

    #[test]
    fn names_round_trip_and_sort_as_numbers() {
        for n in [1u64, 255, 256, u64::MAX] {
            assert_eq!(number(&name(n)), Some(n));
        }
        assert!(name(255) < name(256));
        assert_eq!(number(b"journal.epoch.x"), None);
        assert_eq!(number(b"archive"), None);
    }

    #[test]
    fn blocks_read_across_epochs_and_drops_keep_a_suffix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("open");
        let epochs = Epochs::new(&db);
        // Epoch 0 from before epochs: blocks at 1 and 11.
        block(&db, 1);
        block(&db, 11);
        let one = epochs.for_writer().expect("writer");
        assert_eq!(one.number, 1);
        block(&one.tree, 21);
        block(&one.tree, 31);
        let two = epochs.open_after(one.number).expect("next");
        let three = epochs.open_after(two.number).expect("next");
        // Epoch 2 stays empty (a switch with nothing written after it).
        block(&three.tree, 41);
        assert_eq!(keys(&epochs, 0), vec![1, 11, 21, 31, 41]);
        assert_eq!(keys(&epochs, 25), vec![21, 31, 41]);
        assert_eq!(keys(&epochs, 29), vec![21, 31, 41]);
        assert_eq!(keys(&epochs, 30), vec![31, 41]);
        assert_eq!(keys(&epochs, 31), vec![31, 41]);
        assert_eq!(keys(&epochs, 45), vec![41]);
        assert_eq!(epochs.first_seq().expect("first"), Some(1));
        let (_, key, _) = epochs.holding(35).expect("holding").expect("a block");
        assert_eq!(codec::seq_of(&key).expect("key"), 31);

        // Through 15: epoch 0 loses block 1 only (11..20 may hold 16..20).
        let dropped = epochs.drop_through(15).expect("drop");
        assert_eq!(
            dropped,
            Dropped {
                epochs: 0,
                blocks: 1
            }
        );
        assert_eq!(keys(&epochs, 0), vec![11, 21, 31, 41]);
        // Through 40: epoch 1 (21..40) and the empty epoch 2 go; epoch 0
        // is emptied, and the newest stays.
        let dropped = epochs.drop_through(40).expect("drop");
        assert_eq!(
            dropped,
            Dropped {
                epochs: 2,
                blocks: 1
            }
        );
        assert_eq!(keys(&epochs, 0), vec![41]);
        assert_eq!(epochs.first_seq().expect("first"), Some(41));
        // The newest epoch is never dropped, even when wholly covered.
        let dropped = epochs.drop_through(1_000).expect("drop");
        assert_eq!(dropped, Dropped::default());
        assert_eq!(epochs.for_writer().expect("writer").number, 3);
    }
}
