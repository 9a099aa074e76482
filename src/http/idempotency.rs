//! Idempotency keys (contract: "`Idempotency-Key`").
//!
//! A keyed request is fingerprinted (route, path and canonical body) and
//! looked up in the engine's durable records: the same key and fingerprint
//! replays the first answer, the same key with another fingerprint is `422`.
//! A fresh key runs once: the first request becomes the leader and journals
//! its change together with the key's record (one event, so a crash keeps
//! both or neither); a concurrent duplicate waits for the leader and gets
//! the same answer, errors included. Only changes are recorded: a refused
//! request changes nothing (guarantee 4), so a retry of it runs again.
//!
//! The in-flight map holds one entry per key being executed, so it is
//! bounded by the requests in flight; a leader that is cancelled (its client
//! went away) leaves, and a waiter then starts over.

use std::future::Future;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::domain::idem::{Lookup, Outcome};
use crate::domain::{IdemStamp, IdempotencyKey, UserId};
use crate::engine::Engine;
use crate::http::error::ApiError;

type Answer = Result<Outcome, ApiError>;

struct Running {
    fingerprint: [u8; 16],
    answer: watch::Receiver<Option<Answer>>,
}

/// Keys being executed right now.
#[derive(Default)]
pub struct InFlight {
    running: DashMap<(UserId, IdempotencyKey), Running>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("running", &self.running.len())
            .finish()
    }
}

/// The fingerprint of a request: SHA-256 of its route, path parameters and
/// canonical JSON body (re-serialised from the parsed body, so spacing and
/// key order do not matter), truncated to 128 bits.
pub fn fingerprint(route: &str, path: &str, body: &impl Serialize) -> [u8; 16] {
    let mut hash = Sha256::new();
    hash.update(route.as_bytes());
    hash.update([0]);
    hash.update(path.as_bytes());
    hash.update([0]);
    // Serialising a parsed request cannot fail.
    hash.update(serde_json::to_vec(body).unwrap_or_default());
    let digest = hash.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// Removes the leader's entry however its future ends.
struct Leave<'a> {
    map: &'a InFlight,
    key: (UserId, IdempotencyKey),
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.map.running.remove(&self.key);
    }
}

impl InFlight {
    /// Runs `change` at most once per (user, key): see the module doc.
    /// Without a key, simply runs it.
    ///
    /// # Errors
    /// `IdempotencyConflict` for a reused key with another request,
    /// `Overloaded` when no more keys can be kept, and whatever `change`
    /// answers.
    pub async fn run<F, Fut>(
        &self,
        engine: &Engine,
        user: UserId,
        key: Option<IdempotencyKey>,
        fingerprint: [u8; 16],
        change: F,
    ) -> Answer
    where
        F: FnOnce(Option<IdemStamp>) -> Fut,
        Fut: Future<Output = Answer>,
    {
        let Some(key) = key else {
            return change(None).await;
        };
        let mut change = Some(change);
        // Each round either answers or finds that a leader left without an
        // answer (cancelled); a new round then looks again. A leader only
        // leaves that way when its client went away, so rounds are few.
        loop {
            match engine.idempotency(user, &key, fingerprint) {
                Lookup::Replay(outcome) => return Ok(*outcome),
                Lookup::Conflict => return Err(ApiError::IdempotencyConflict),
                Lookup::Fresh => {}
            }
            let slot = (user, key.clone());
            let (tx, mut waiting) = match self.running.entry(slot.clone()) {
                Entry::Occupied(running) => {
                    if running.get().fingerprint != fingerprint {
                        return Err(ApiError::IdempotencyConflict);
                    }
                    (None, running.get().answer.clone())
                }
                Entry::Vacant(vacant) => {
                    if !engine.idempotency_has_room() {
                        return Err(ApiError::Overloaded(
                            "too many idempotency keys are kept; retry shortly".into(),
                        ));
                    }
                    let (tx, rx) = watch::channel(None);
                    vacant.insert(Running {
                        fingerprint,
                        answer: rx.clone(),
                    });
                    (Some(tx), rx)
                }
            };
            if let Some(tx) = tx {
                let _leave = Leave {
                    map: self,
                    key: slot,
                };
                let Some(change) = change.take() else {
                    return Err(ApiError::overloaded());
                };
                let stamp = IdemStamp {
                    user,
                    key: key.clone(),
                    fingerprint,
                };
                let answer = change(Some(stamp)).await;
                // The key's record (if the change succeeded) is in the
                // engine's book before the entry leaves: no gap for a late
                // duplicate to slip through.
                let _ = tx.send(Some(answer.clone()));
                return answer;
            }
            match waiting.wait_for(Option::is_some).await {
                Ok(answer) => {
                    if let Some(answer) = answer.as_ref() {
                        return answer.clone();
                    }
                }
                Err(_) => continue, // the leader was cancelled: look again
            }
        }
    }
}

/// An owned shared handle to the in-flight map.
pub type SharedInFlight = Arc<InFlight>;
