//! Idempotency keys (contract: "`Idempotency-Key`").
//!
//! A keyed request is fingerprinted (route, path and canonical body) and
//! looked up in the engine's durable records: the same key and fingerprint
//! replays the first answer, the same key with another fingerprint is `422`.
//! A fresh key runs once: the first request becomes the leader and journals
//! its change together with the key's record (one event, so a crash keeps
//! both or neither). Only a change is recorded (contract v2): a refusal of
//! the business rules (`409`), bad input and shed or failed requests leave
//! no record, and once the leader has answered, a retry with the same key
//! is decided afresh, with any body (a key that recorded nothing cannot
//! conflict).
//!
//! A concurrent duplicate (the same key and body while the leader runs)
//! waits for the leader and gets the same answer, errors included: a
//! refusal decided while it waited is as true for it as for the leader,
//! and handing it over costs no second decision. Only a request that
//! arrives after the leader has left decides again.
//!
//! The in-flight map holds one entry per key being executed, so it is
//! bounded by the requests in flight. A leader's change runs in a task of
//! its own and the key stays taken until the engine has answered, even if
//! the client went away: a retry can never run the change a second time. A
//! replayed answer is given once everything journaled before it is durable,
//! rendered again from the order it refers to (`Engine::first_answer`).
//! No count of keys refuses a new one: records past the memory budget move
//! to disk (`engine/keyed.rs`).

use std::future::Future;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::domain::idem::{FirstAnswer, Lookup};
use crate::domain::{IdemStamp, IdempotencyKey, UserId};
use crate::engine::Engine;
use crate::http::error::ApiError;

type Answer = Result<FirstAnswer, ApiError>;

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

/// Removes the leader's entry however its task ends.
struct Leave {
    map: Arc<InFlight>,
    key: (UserId, IdempotencyKey),
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.map.running.remove(&self.key);
    }
}

impl InFlight {
    /// Runs `change` at most once per (user, key): see the module doc.
    /// Without a key, simply runs it (`fingerprint` is only called with one).
    ///
    /// A leader's change runs in a task of its own: if its client goes
    /// away, the change (already on its way through the actors) still
    /// finishes, and the key stays taken until it has, so a retry cannot
    /// run it a second time.
    ///
    /// # Errors
    /// `IdempotencyConflict` for a reused key with another request,
    /// `StorageUnavailable` when the records on disk cannot be read, and
    /// whatever `change` answers.
    pub async fn run<F, Fut>(
        self: &Arc<Self>,
        engine: &Engine,
        user: UserId,
        key: Option<IdempotencyKey>,
        fingerprint: impl FnOnce() -> [u8; 16],
        change: F,
    ) -> Answer
    where
        F: FnOnce(Option<IdemStamp>) -> Fut + Send + 'static,
        Fut: Future<Output = Answer> + Send + 'static,
    {
        let Some(key) = key else {
            return change(None).await;
        };
        // Only a keyed request needs its fingerprint (a SHA-256).
        let fingerprint = fingerprint();
        let mut change = Some(change);
        // Each round either answers or finds that the leader it waited for
        // left without an answer (it panicked, or the server is stopping); a
        // new round then looks again. Rounds are few.
        loop {
            if let Some(answer) = self.recorded(engine, user, &key, fingerprint).await {
                return answer;
            }
            let slot = (user, key.clone());
            let mut waiting = match self.running.entry(slot.clone()) {
                Entry::Occupied(running) => {
                    if running.get().fingerprint != fingerprint {
                        return Err(ApiError::IdempotencyConflict);
                    }
                    running.get().answer.clone()
                }
                Entry::Vacant(vacant) => {
                    let (tx, rx) = watch::channel(None);
                    vacant.insert(Running {
                        fingerprint,
                        answer: rx,
                    });
                    let leave = Leave {
                        map: Arc::clone(self),
                        key: slot,
                    };
                    // A leader that finished between our look and our entry:
                    // its record is in the book before its entry left.
                    if let Some(answer) = self.recorded(engine, user, &key, fingerprint).await {
                        drop(leave);
                        return answer;
                    }
                    let Some(change) = change.take() else {
                        return Err(ApiError::overloaded());
                    };
                    let stamp = IdemStamp {
                        user,
                        key: key.clone(),
                        fingerprint,
                    };
                    let leader = tokio::spawn(async move {
                        // A refusal is answered as it is: nothing records it.
                        let answer = change(Some(stamp)).await;
                        // The record of a change is in the book before the
                        // entry leaves with `leave`; a refusal leaves none,
                        // so the next request with this key decides afresh.
                        let _ = tx.send(Some(answer.clone()));
                        drop(leave);
                        answer
                    });
                    return leader.await.unwrap_or_else(|_| Err(ApiError::overloaded()));
                }
            };
            match waiting.wait_for(Option::is_some).await {
                Ok(answer) => {
                    if let Some(answer) = answer.as_ref() {
                        return answer.clone();
                    }
                }
                Err(_) => continue, // the leader left without an answer: look again
            }
        }
    }

    /// The recorded answer for this key, if any: a replay (once what the
    /// record saw is durable) or a conflict.
    async fn recorded(
        &self,
        engine: &Engine,
        user: UserId,
        key: &IdempotencyKey,
        fingerprint: [u8; 16],
    ) -> Option<Answer> {
        let lookup = match engine.idempotency(user, key, fingerprint) {
            Ok(lookup) => lookup,
            Err(e) => return Some(Err(e.into())),
        };
        match lookup {
            Lookup::Fresh => None,
            Lookup::Conflict => Some(Err(ApiError::IdempotencyConflict)),
            Lookup::Replay(outcome) => {
                // The record may sit in the batch still being written.
                if let Err(e) = engine.settle_everything().await {
                    return Some(Err(e.into()));
                }
                Some(
                    engine
                        .first_answer(user, &outcome)
                        .await
                        .map_err(ApiError::from),
                )
            }
        }
    }
}
