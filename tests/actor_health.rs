//! No silently dead actor, in process: an actor that stops without a panic
//! (here through the test-only `stop-sku` fault) marks the engine dead —
//! `Engine::failure` names it and `Engine::dead` resolves — while a planned
//! shutdown does not. The panic hook of the server is not involved here, so
//! this fails if the actors' guards are removed.
//!
//! Its own test binary: it sets `FLASHCORE_FAULTS` for this process before
//! the engine reads it.

mod support;

use std::time::Duration;

use flashcore::engine::EngineConfig;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_that_stops_marks_the_engine_dead_and_a_shutdown_does_not() {
    // SAFETY: set before any thread of this test binary reads the
    // environment (the fault hooks read it once, on first use below).
    unsafe { std::env::set_var(flashcore::faults::FAULTS_ENV, "stop-sku=quitter") };
    let h = harness(EngineConfig::default());
    create(&h.engine, "quitter", 100, 10, None).await;
    create(&h.engine, "stayer", 100, 10, None).await;
    assert_eq!(h.engine.failure(), None, "alive at first");

    let dead = h.engine.dead();
    let refused = h.engine.reserve(user("ann"), sku("quitter"), 1).await;
    assert!(refused.is_err(), "a stopped actor grants nothing");
    let why = tokio::time::timeout(Duration::from_secs(10), dead)
        .await
        .expect("the engine is reported dead at once");
    assert!(why.contains("quitter"), "{why}");
    assert!(
        h.engine.failure().is_some_and(|f| f.contains("quitter")),
        "{:?}",
        h.engine.failure()
    );

    // A planned shutdown of a healthy engine reports nothing.
    let healthy = harness(EngineConfig::default());
    create(&healthy.engine, "stayer", 100, 10, None).await;
    healthy.engine.shutdown();
    assert_eq!(healthy.engine.failure(), None, "a shutdown is not a death");
}
