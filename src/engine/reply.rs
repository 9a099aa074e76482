//! How actors answer: an [`Answer`] carries the result and the journal
//! sequence number of the state it saw; a [`Completion`] fires once every
//! SKU actor has applied its part of a move; [`send`] never waits.

#[allow(clippy::wildcard_imports)]
use super::*;

/// An actor's answer: the result, and the journal sequence number of the
/// state it saw (the answer may only be given once that is durable).
pub(crate) struct Answer<T> {
    pub(crate) result: Result<T, EngineError>,
    pub(crate) seen: Seq,
}

/// Where an actor sends its answer.
pub(crate) type Reply<T> = oneshot::Sender<Answer<T>>;

/// Fires its receiver when the last clone is dropped: each SKU actor drops
/// its clone once it has applied its part of an order move.
pub(crate) struct Completion(Option<oneshot::Sender<()>>);

impl Completion {
    pub(crate) fn new() -> (Arc<Completion>, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Arc::new(Completion(Some(tx))), rx)
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Sends without waiting: a full mailbox is `Overloaded` at once.
pub(super) fn send<A, M>(addr: &Addr<A>, msg: M) -> Result<(), EngineError>
where
    A: actix::Actor<Context = actix::Context<A>> + actix::Handler<M>,
    M: actix::Message<Result = ()> + Send + 'static,
{
    addr.try_send(msg).map_err(|error| match error {
        actix::prelude::SendError::Full(_) => EngineError::Overloaded,
        actix::prelude::SendError::Closed(_) => EngineError::Stopped,
    })
}
