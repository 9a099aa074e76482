//! Reads from the last durable state while the journal refuses changes
//! (contract, guarantee 5): a full or failing disk must not make the hot
//! SKU of a sale unreadable.
//!
//! After a failed flush the actors still hold what the failed batch did
//! (it was applied before it was journaled), and no read may show it: its
//! answer would wait for a sequence number that never becomes durable, and
//! fail. So a read that fails that way is asked again of a *reader*: a
//! second, read-only engine started on the state rebuilt from disk up to
//! the durable watermark (the newest snapshot plus the journal up to
//! there). It is built once, on the first such read, and lives until the
//! server reloads the storage (then this engine and its reader stop). What
//! a failed batch touched reads as it was before that batch; what it
//! created is not there.
//!
//! The reader journals nothing: no expiries (an order overdue during the
//! outage reads as reserved until the reload expires it), no changes
//! (changes go to this engine, whose journal refuses them).

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Runs `read` on this engine; if it fails because the journal failed,
    /// runs it again on the reader of the last durable state.
    pub(super) async fn durably<T, F, Fut>(&self, read: F) -> Result<T, EngineError>
    where
        F: Fn(Engine) -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
    {
        match read(self.clone()).await {
            Err(
                why @ (EngineError::Storage(_)
                | EngineError::Spawn { .. }
                | EngineError::Task { .. }
                | EngineError::IdsExhausted),
            ) if !self.inner.read_only && self.inner.journal.failure().is_some() => {
                tracing::debug!(failure = %why, "a read meets a failed journal; answering from the durable state");
                let reader = self.durable_reader().await?;
                read(reader).await
            }
            other => other,
        }
    }

    /// The reader of the last durable state, started on first use.
    async fn durable_reader(&self) -> Result<Engine, EngineError> {
        let reader = self
            .inner
            .reader
            .get_or_try_init(|| async {
                let journal = Arc::clone(&self.inner.journal);
                let (state, durable) = tokio::task::spawn_blocking(move || journal.durable_state())
                    .await
                    .map_err(|e| EngineError::Task {
                        what: "rebuilding the durable state",
                        source: Arc::new(e),
                    })??;
                tracing::warn!(
                    durable_seq = durable,
                    "the journal refuses changes; reads answer from the last durable state"
                );
                let config = EngineConfig {
                    actor_threads: 1,
                    ..self.inner.config.clone()
                };
                let reader = Engine::launch(
                    config,
                    Arc::clone(&self.inner.journal),
                    Arc::clone(&self.inner.shared.clock),
                    state,
                    durable,
                    true,
                )?;
                // Built while this engine was being shut down (a reload):
                // its shutdown did not see the reader, so stop it here.
                if self.inner.health.is_stopping() {
                    reader.shutdown();
                    return Err(EngineError::Stopped);
                }
                Ok(reader)
            })
            .await?;
        Ok(reader.clone())
    }
}
