//! `MemJournal`: a journal in memory, durable the moment it appends.
//!
//! Tests use it to replay everything the engine did through `State::apply`
//! and compare with the live state; benches use it in counting mode (events
//! are numbered and dropped) to measure the engine without a disk. It can be
//! told to fail, to test how the engine answers a storage failure.

use std::sync::{Arc, Mutex};

use crate::domain::Event;
use crate::journal::{
    Archive, IdemStore, Journal, JournalError, MemArchive, MemIdemStore, Seq, Watermark,
};

#[derive(Debug, Default)]
struct Inner {
    events: Vec<Event>,
    last: Seq,
    failing: bool,
}

/// A journal in memory.
#[derive(Debug)]
pub struct MemJournal {
    inner: Mutex<Inner>,
    keep: bool,
    watermark: Watermark,
    archive: Option<Arc<MemArchive>>,
    idem_store: Option<Arc<MemIdemStore>>,
}

impl MemJournal {
    /// A journal that keeps every event, for tests.
    pub fn new() -> MemJournal {
        MemJournal::with_keep(true)
    }

    /// A journal that numbers events and drops them, for benches.
    pub fn counting() -> MemJournal {
        MemJournal::with_keep(false)
    }

    fn with_keep(keep: bool) -> MemJournal {
        MemJournal {
            inner: Mutex::new(Inner::default()),
            keep,
            watermark: Watermark::new(0),
            archive: None,
            idem_store: None,
        }
    }

    /// A journal that keeps every event, with an archive in memory beside
    /// it (tests of archiving).
    pub fn with_archive(archive: Arc<MemArchive>) -> MemJournal {
        MemJournal {
            archive: Some(archive),
            ..MemJournal::new()
        }
    }

    /// This journal with a store of idempotency records in memory beside it
    /// (tests of records moving out of memory).
    pub fn with_idem_store(self, store: Arc<MemIdemStore>) -> MemJournal {
        MemJournal {
            idem_store: Some(store),
            ..self
        }
    }

    /// Every event appended so far, in order (empty in counting mode).
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// Makes every later append fail with `Stopped` (or work again).
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave `Inner` half-changed
        // (each change is one push or one store), so a poisoned lock is usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemJournal {
    fn default() -> MemJournal {
        MemJournal::new()
    }
}

impl Journal for MemJournal {
    fn append(&self, event: &Event) -> Result<Seq, JournalError> {
        let seq = {
            let mut inner = self.lock();
            if inner.failing {
                return Err(JournalError::stopped("the test journal is failing"));
            }
            inner.last += 1;
            if self.keep {
                inner.events.push(event.clone());
            }
            inner.last
        };
        self.watermark.advance(seq);
        Ok(seq)
    }

    fn watermark(&self) -> &Watermark {
        &self.watermark
    }

    fn last_seq(&self) -> Seq {
        self.lock().last
    }

    fn archive(&self) -> Option<Arc<dyn Archive>> {
        self.archive
            .as_ref()
            .map(|a| Arc::clone(a) as Arc<dyn Archive>)
    }

    fn idem_store(&self) -> Option<Arc<dyn IdemStore>> {
        self.idem_store
            .as_ref()
            .map(|s| Arc::clone(s) as Arc<dyn IdemStore>)
    }
}
