//! The scenarios: what each worker sends, and how a run is paced and bounded.
//!
//! A run is `--connections` workers. Each owns one [`Conn`] and one [`Agent`]
//! and loops: ask [`Load::admit`] (stop flag, deadline, request budget), wait
//! for its arrival time when the run is open-loop ([`Pacer`]), send exactly one
//! request, record it. The agents:
//!
//! * [`buyer::BuyerAgent`] (`flash-sale`, `overload`): buyers racing
//!   `POST /v1/orders` for one hot SKU;
//! * [`mixed::MixedAgent`] (`mixed`, `soak`): customers browsing, carting,
//!   checking out, paying, cancelling and refunding.
//!
//! Open loop: arrival `i` is due at `start + i / rate`. A free worker claims
//! the next arrival; if it is already late when claimed, no connection was
//! free at its intended time, so its latency is measured from the intended
//! time (it waited) rather than from when it was finally sent. That keeps the
//! numbers free of coordinated omission.

pub mod buyer;
pub mod mixed;
pub mod setup;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::books::AckedOrder;
use crate::client::{Answer, Call, Conn, Failure};
use crate::limits;
use crate::stats::{Outcome, Recorder, duration_us};

/// Endpoint labels, as the end table shows them.
pub mod endpoint {
    /// Place an order.
    pub const ORDERS_CREATE: &str = "POST /v1/orders";
    /// Read an order.
    pub const ORDERS_GET: &str = "GET /v1/orders/{id}";
    /// Pay an order (admin).
    pub const ORDERS_PAY: &str = "POST /v1/orders/{id}/pay";
    /// Cancel an order.
    pub const ORDERS_CANCEL: &str = "POST /v1/orders/{id}/cancel";
    /// Refund an order (admin).
    pub const ORDERS_REFUND: &str = "POST /v1/orders/{id}/refund";
    /// List the catalog.
    pub const SKUS_LIST: &str = "GET /v1/skus";
    /// Read one SKU.
    pub const SKUS_GET: &str = "GET /v1/skus/{id}";
    /// Read the cart.
    pub const CART_GET: &str = "GET /v1/cart";
    /// Put an item in the cart.
    pub const CART_PUT: &str = "PUT /v1/cart/items/{id}";
    /// Check the cart out.
    pub const CART_CHECKOUT: &str = "POST /v1/cart/checkout";
}

/// The bounds every worker obeys.
#[derive(Debug)]
pub struct Load {
    /// When the load started.
    pub started: Instant,
    /// When it must stop.
    pub deadline: Instant,
    budget: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl Load {
    /// A run of `duration` and at most `max_requests`, starting now.
    #[must_use]
    pub fn new(duration: Duration, max_requests: u64) -> Self {
        Self::with_stop(duration, max_requests, Arc::new(AtomicBool::new(false)))
    }

    /// The same, ended early when `stop` is set (by a Ctrl-C watcher).
    #[must_use]
    pub fn with_stop(duration: Duration, max_requests: u64, stop: Arc<AtomicBool>) -> Self {
        let started = Instant::now();
        Self {
            started,
            deadline: started + duration,
            budget: AtomicU64::new(max_requests),
            stop,
        }
    }

    /// Whether one more request may go: not stopped, before the deadline, and
    /// within the budget (which this call spends).
    pub fn admit(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Sleeps until `due`, waking early (and returning false) if the run is
    /// stopped meanwhile, so a low-rate run still stops promptly on Ctrl-C.
    pub async fn sleep_until(&self, due: Instant) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                return true;
            }
            let wake = due.min(now + limits::STOP_CHECK_INTERVAL);
            tokio::time::sleep_until(wake.into()).await;
        }
    }

    /// Ends the run early (Ctrl-C).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the run was ended early.
    #[must_use]
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Milliseconds since the start.
    #[must_use]
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Open-loop arrivals at a fixed rate, claimed in order by free workers.
#[derive(Debug)]
pub struct Pacer {
    started: Instant,
    /// Later than any run can last: where an absurd arrival index lands.
    horizon: Instant,
    rate_per_s: u64,
    next: AtomicU64,
}

impl Pacer {
    /// Arrivals every `1 / rate_per_s` seconds from `started`.
    #[must_use]
    pub fn new(started: Instant, rate_per_s: u64) -> Self {
        let horizon = started
            .checked_add(limits::DURATION_MAX.saturating_mul(2))
            .unwrap_or(started);
        Self {
            started,
            horizon,
            rate_per_s: rate_per_s.max(1),
            next: AtomicU64::new(0),
        }
    }

    /// When arrival `index` is due (at most the horizon, past any deadline).
    #[must_use]
    pub fn due(&self, index: u64) -> Instant {
        let nanos = u128::from(index) * 1_000_000_000 / u128::from(self.rate_per_s);
        let offset = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.started
            .checked_add(offset)
            .map_or(self.horizon, |due| due.min(self.horizon))
    }

    /// Claims the next arrival and returns when it is due.
    pub fn claim(&self) -> Instant {
        self.due(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Arrivals claimed so far.
    #[must_use]
    pub fn claimed(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Arrivals due strictly before `at`.
    #[must_use]
    pub fn due_before(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.started).as_nanos();
        let count = nanos
            .saturating_mul(u128::from(self.rate_per_s))
            .div_ceil(1_000_000_000);
        u64::try_from(count).unwrap_or(u64::MAX)
    }
}

/// What a worker hands back for the book check and the report.
#[derive(Debug, Default)]
pub struct WorkerOutput {
    /// Orders answered 201.
    pub acked: Vec<AckedOrder>,
    /// Units per SKU of order requests with no answer or a 5xx.
    pub unknown_units: BTreeMap<String, u64>,
    /// 201 answers without a readable order.
    pub unreadable_acks: u64,
    /// TCP connections opened (1 if keep-alive held throughout).
    pub connects: u64,
    /// When this worker first saw `out_of_stock`, ms since the start.
    pub first_sold_out_ms: Option<u64>,
    /// When this worker last got a 201 order, ms since the start.
    pub last_granted_ms: Option<u64>,
}

impl WorkerOutput {
    /// Remembers `units` of `sku_id` as maybe-granted.
    pub fn unknown(&mut self, sku_id: &str, units: u64) {
        let slot = self.unknown_units.entry(sku_id.to_owned()).or_insert(0);
        *slot = slot.saturating_add(units);
    }
}

/// What one request needs to be sent and recorded.
pub struct Ctx<'a> {
    /// The worker's connection.
    pub conn: &'a mut Conn,
    /// The worker's recorder.
    pub rec: &'a Mutex<Recorder>,
    /// Latency is measured from here (the intended start when it waited).
    pub start: Instant,
    /// It found no free connection at its intended start.
    pub waited: bool,
}

impl Ctx<'_> {
    /// Sends `call`, records it under `endpoint`, and returns the answer with
    /// its outcome.
    pub async fn send(
        &mut self,
        endpoint: &'static str,
        call: &Call<'_>,
    ) -> (Result<Answer, Failure>, Outcome) {
        let result = self.conn.send(call).await;
        let latency_us = duration_us(self.start.elapsed());
        let outcome = Outcome::of(&result);
        self.rec
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(endpoint, &outcome, latency_us, self.waited);
        if matches!(result, Err(Failure::Connect)) {
            // A dead or full server: do not spin on connects.
            tokio::time::sleep(limits::RECONNECT_BACKOFF).await;
        }
        (result, outcome)
    }

    /// Counts `units` granted by an order answered 201 (the chart's units
    /// sold over time).
    pub fn granted(&self, units: u64) {
        let mut rec = self.rec.lock().unwrap_or_else(PoisonError::into_inner);
        rec.interval.granted_units = rec.interval.granted_units.saturating_add(units);
    }
}

/// One worker's behaviour.
#[derive(Debug)]
pub enum Agent {
    /// Buyers racing for a hot SKU.
    Buyer(buyer::BuyerAgent),
    /// Customers doing everything.
    Mixed(Box<mixed::MixedAgent>),
}

impl Agent {
    async fn step(&mut self, ctx: &mut Ctx<'_>, load: &Load) {
        match self {
            Self::Buyer(agent) => agent.step(ctx, load).await,
            Self::Mixed(agent) => agent.step(ctx, load).await,
        }
    }

    fn finish(self) -> WorkerOutput {
        match self {
            Self::Buyer(agent) => agent.finish(),
            Self::Mixed(agent) => agent.finish(),
        }
    }
}

/// Runs one worker until the load says stop; returns what it learned.
pub async fn drive(
    load: Arc<Load>,
    pacer: Option<Arc<Pacer>>,
    mut conn: Conn,
    mut agent: Agent,
    rec: Arc<Mutex<Recorder>>,
) -> WorkerOutput {
    loop {
        if !load.admit() {
            break;
        }
        let (start, waited) = match &pacer {
            None => (Instant::now(), false),
            Some(pacer) => {
                let due = pacer.claim();
                if due >= load.deadline {
                    break;
                }
                let now = Instant::now();
                if now > due {
                    // No connection was free when it was due: it waited.
                    (due, true)
                } else {
                    if !load.sleep_until(due).await {
                        break;
                    }
                    (Instant::now(), false)
                }
            }
        };
        let mut ctx = Ctx {
            conn: &mut conn,
            rec: &rec,
            start,
            waited,
        };
        agent.step(&mut ctx, &load).await;
    }
    let mut out = agent.finish();
    out.connects = conn.connects();
    out
}

/// Milliseconds since the Unix epoch, for run ids.
#[must_use]
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The users a worker owns: `index` `w`, `w + n`, `w + 2n`, ... of `total`.
#[must_use]
pub fn share_of(worker: u32, workers: u32, total: u32) -> Vec<u32> {
    (0..total)
        .skip(usize::try_from(worker).unwrap_or(usize::MAX))
        .step_by(usize::try_from(workers.max(1)).unwrap_or(1))
        .collect()
}

/// The id of user `index` (0-based) with a prefix: `buyer-00001`, ...
#[must_use]
pub fn user_id(prefix: &str, index: u32) -> String {
    format!("{prefix}-{:05}", u64::from(index).saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_admissions() {
        let load = Load::new(Duration::from_secs(60), 3);
        assert!(load.admit());
        assert!(load.admit());
        assert!(load.admit());
        assert!(!load.admit());
    }

    #[test]
    fn the_deadline_and_stop_bound_admissions() {
        let load = Load::new(Duration::from_nanos(1), 100);
        std::thread::sleep(Duration::from_millis(1));
        assert!(!load.admit());
        let load = Load::new(Duration::from_secs(60), 100);
        load.stop();
        assert!(!load.admit());
    }

    #[tokio::test]
    async fn a_stop_wakes_a_sleeping_worker() {
        let load = Arc::new(Load::new(Duration::from_secs(600), 10));
        let sleeper = {
            let load = load.clone();
            tokio::spawn(async move {
                load.sleep_until(Instant::now() + Duration::from_secs(300))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        load.stop();
        let woke = tokio::time::timeout(Duration::from_secs(2), sleeper).await;
        assert!(
            !woke.unwrap().unwrap(),
            "woken by the stop, not the due time"
        );
        assert!(
            !load.sleep_until(Instant::now()).await,
            "a stopped run never sleeps"
        );
    }

    #[test]
    fn arrivals_are_evenly_spaced() {
        let start = Instant::now();
        let pacer = Pacer::new(start, 1000);
        assert_eq!(pacer.claim(), start);
        assert_eq!(pacer.claim(), start + Duration::from_millis(1));
        assert_eq!(pacer.due(1000), start + Duration::from_secs(1));
        assert_eq!(pacer.due_before(start + Duration::from_secs(1)), 1000);
        assert_eq!(pacer.claimed(), 2);
    }

    #[test]
    fn users_are_shared_out_without_overlap() {
        let a = share_of(0, 3, 10);
        let b = share_of(1, 3, 10);
        let c = share_of(2, 3, 10);
        assert_eq!(a, vec![0, 3, 6, 9]);
        assert_eq!(b, vec![1, 4, 7]);
        assert_eq!(c, vec![2, 5, 8]);
        assert!(share_of(5, 6, 3).is_empty());
        assert_eq!(user_id("buyer", 0), "buyer-00001");
    }
}
