//! `Watermark`: the durable prefix of the journal, and waiting for it.
//!
//! Every event with a sequence number at or below `durable` is durable. A
//! storage failure marks every sequence number from the failed batch on as
//! failed: waiters for those get an error instead of waiting for ever.
//! Waiting registers with a [`Notify`] before re-checking, so a wake-up that
//! lands between the check and the wait is never lost. Advancing only touches
//! the `Notify` (which takes a lock) when someone waits: the waiter count and
//! the watermark are both `SeqCst`, so either the advancer sees the waiter or
//! the waiter sees the new watermark.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::journal::{JournalError, Seq};

/// The durable prefix of a journal.
#[derive(Debug)]
pub struct Watermark {
    durable: AtomicU64,
    failed_from: AtomicU64,
    waiters: AtomicU64,
    notify: Notify,
}

impl Watermark {
    /// A watermark where everything up to `durable` is durable.
    pub fn new(durable: Seq) -> Watermark {
        Watermark {
            durable: AtomicU64::new(durable),
            failed_from: AtomicU64::new(u64::MAX),
            waiters: AtomicU64::new(0),
            notify: Notify::new(),
        }
    }

    /// The highest durable sequence number.
    pub fn durable(&self) -> Seq {
        self.durable.load(Ordering::SeqCst)
    }

    /// The first sequence number that failed, if any did.
    pub fn failed_from(&self) -> Option<Seq> {
        let failed = self.failed_from.load(Ordering::Acquire);
        (failed != u64::MAX).then_some(failed)
    }

    /// Marks everything up to `seq` durable and wakes the waiters.
    pub fn advance(&self, seq: Seq) {
        self.durable.fetch_max(seq, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Marks `seq` and everything after it as failed and wakes the waiters.
    pub fn fail_from(&self, seq: Seq) {
        self.failed_from.fetch_min(seq, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Clears a failure once the journal works again (after the engine went
    /// back to its last durable state).
    pub fn clear_failure(&self) {
        self.failed_from.store(u64::MAX, Ordering::SeqCst);
    }

    fn check(&self, seq: Seq) -> Option<Result<(), JournalError>> {
        if self.durable() >= seq {
            return Some(Ok(()));
        }
        if self.failed_from().is_some_and(|failed| seq >= failed) {
            return Some(Err(JournalError::NotDurable));
        }
        None
    }

    /// Waits until `seq` is durable.
    ///
    /// # Errors
    /// `NotDurable` when the batch holding `seq` failed.
    pub async fn wait(&self, seq: Seq) -> Result<(), JournalError> {
        if let Some(done) = self.check(seq) {
            return done;
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // Counted out again however this future ends, dropped included.
        let _counted = WaiterCount(&self.waiters);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(done) = self.check(seq) {
                return done;
            }
            notified.await;
        }
    }
}

struct WaiterCount<'a>(&'a AtomicU64);

impl Drop for WaiterCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waiters_are_released_by_advance_or_failure() {
        let mark = Arc::new(Watermark::new(0));
        let waiter = {
            let mark = Arc::clone(&mark);
            tokio::spawn(async move { mark.wait(5).await })
        };
        let failing = {
            let mark = Arc::clone(&mark);
            tokio::spawn(async move { mark.wait(9).await })
        };
        tokio::task::yield_now().await;
        mark.advance(4);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        mark.advance(6);
        mark.fail_from(8);
        assert!(matches!(waiter.await, Ok(Ok(()))));
        assert!(matches!(failing.await, Ok(Err(JournalError::NotDurable))));
        mark.advance(7);
        assert!(mark.wait(7).await.is_ok(), "7 sits below the failure");
        assert!(mark.wait(8).await.is_err());
    }
}
