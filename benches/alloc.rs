//! `cargo bench --bench alloc`: heap allocations per request, counted by a
//! counting global allocator, for the flash-sale requests.
//!
//! The whole process is counted (every thread: the HTTP task, the actors,
//! the journal writer and sled), over the front in process (`http::Front`, as
//! the accept loop calls it, no socket: hyper's own per-connection buffers are not in the
//! count) on a real strict journal in a temp dir. Each scenario warms up,
//! then sends `BENCH_REQUESTS` requests from 64 concurrent callers and
//! prints allocations and bytes per request; every answer's status is
//! checked, so a scenario that stops doing what it says fails the bench.
//!
//! Scenarios: `grant` (a durable 201), `sold-out` (409, no key),
//! `sold-out+key` (409 with a fresh `Idempotency-Key` each), `get-sku`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flashcore::clock::SystemClock;
use flashcore::domain::UserId;
use flashcore::domain::sale::SaleWindow;
use flashcore::engine::{Engine, EngineConfig, NewSku};
use flashcore::http::auth::JwtKeys;
use flashcore::http::{AppState, Backend, Front, FrontConfig};
use flashcore::journal::{self, FlushPolicy};

/// Counts every allocation and its bytes, then asks the system allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds
// `GlobalAlloc`'s contract; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's layout, unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CALLERS: usize = 64;
const USERS: usize = 1_000;
const SECRET: &[u8] = b"alloc-bench-fixed-secret-0123456789abcdef";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Scenario {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: &'static str,
    keyed: bool,
    status: StatusCode,
}

fn request(scenario: &Scenario, token: &str, key: Option<String>) -> Request<Body> {
    let mut builder = Request::builder()
        .method(scenario.method)
        .uri(scenario.path)
        .header("authorization", format!("Bearer {token}"));
    if !scenario.body.is_empty() {
        builder = builder
            .header("content-type", "application/json")
            .header("content-length", scenario.body.len());
    }
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Body::from(scenario.body))
        .expect("a valid request")
}

/// Sends `count` requests of `scenario` from [`CALLERS`] tasks; panics on
/// an answer with another status.
async fn drive(
    app: &Front,
    tokens: &Arc<Vec<String>>,
    scenario: &'static Scenario,
    round: &str,
    count: usize,
) {
    let mut tasks = Vec::with_capacity(CALLERS);
    for caller in 0..CALLERS {
        let app = app.clone();
        let tokens = Arc::clone(tokens);
        let round = round.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut n = caller;
            while n < count {
                let key = scenario.keyed.then(|| format!("{round}-{n}"));
                let req = request(scenario, &tokens[n % tokens.len()], key);
                let response = app.clone().call(req).await;
                assert_eq!(
                    response.status(),
                    scenario.status,
                    "{}: unexpected status",
                    scenario.name
                );
                let _ = axum::body::to_bytes(response.into_body(), 1 << 20).await;
                n += CALLERS;
            }
        }));
    }
    for task in tasks {
        task.await.expect("a caller panicked");
    }
}

static SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "grant",
        method: "POST",
        path: "/v1/orders",
        body: r#"{"items":[{"sku_id":"hot","qty":1}]}"#,
        keyed: false,
        status: StatusCode::CREATED,
    },
    Scenario {
        name: "sold-out",
        method: "POST",
        path: "/v1/orders",
        body: r#"{"items":[{"sku_id":"gone","qty":1}]}"#,
        keyed: false,
        status: StatusCode::CONFLICT,
    },
    Scenario {
        name: "sold-out+key",
        method: "POST",
        path: "/v1/orders",
        body: r#"{"items":[{"sku_id":"gone","qty":1}]}"#,
        keyed: true,
        status: StatusCode::CONFLICT,
    },
    Scenario {
        name: "get-sku",
        method: "GET",
        path: "/v1/skus/hot",
        body: "",
        keyed: false,
        status: StatusCode::OK,
    },
];

fn main() {
    let requests = env_usize("BENCH_REQUESTS", 20_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = journal::open(dir.path(), FlushPolicy::Strict, false).expect("journal");
    let engine = Engine::start(
        EngineConfig::default(),
        opened.journal.clone(),
        Arc::new(SystemClock),
        opened.recovered.state,
    )
    .expect("engine");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for (sku, stock) in [("hot", 1_000_000_000), ("gone", 0)] {
            engine
                .create_sku(NewSku {
                    sku: flashcore::domain::SkuId::parse(sku).expect("sku id"),
                    name: sku.into(),
                    price_cents: 100,
                    stock,
                    per_user_limit: None,
                    sale: SaleWindow::default(),
                })
                .await
                .expect("sku");
        }
        let backend = Arc::new(Backend::recovering());
        backend.install(engine.clone());
        let keys = JwtKeys::new(SECRET);
        let tokens: Arc<Vec<String>> = Arc::new(
            (0..USERS)
                .map(|i| {
                    let user = UserId::parse(&format!("buyer-{i}")).expect("user id");
                    keys.issue(user, false, jsonwebtoken::get_current_timestamp(), 7_200)
                        .expect("token")
                })
                .collect(),
        );
        let app = Front::new(AppState::new(backend, keys, FrontConfig::new(10_000)).expect("state"));
        println!(
            "alloc bench: {requests} requests per scenario, {CALLERS} callers, front in process, strict journal"
        );
        let only = std::env::var("BENCH_ONLY").ok();
        for scenario in SCENARIOS
            .iter()
            .filter(|s| only.as_deref().is_none_or(|o| o == s.name))
        {
            // The bench's own cost of building such a request and reading an
            // answer, counted apart and subtracted.
            let (a0, b0) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
            for n in 0..requests {
                let key = scenario.keyed.then(|| format!("own-{n}"));
                let req = request(scenario, &tokens[n % USERS], key);
                let _ = axum::body::to_bytes(req.into_body(), 1 << 20).await;
            }
            let own_allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / requests as f64;
            let own_bytes = (BYTES.load(Ordering::Relaxed) - b0) as f64 / requests as f64;
            // Warm-up: token cache, maps and buffers at their working size.
            drive(&app, &tokens, scenario, "warm", requests / 4).await;
            let (a0, b0) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
            drive(&app, &tokens, scenario, "run", requests).await;
            let (a1, b1) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
            let n = requests as f64;
            println!(
                "{:<13} {:>7.1} allocations/request  {:>8.0} bytes/request  (bench's own {own_allocs:.1}, {own_bytes:.0} subtracted)",
                scenario.name,
                (a1 - a0) as f64 / n - own_allocs,
                (b1 - b0) as f64 / n - own_bytes
            );
        }
    });
    engine.shutdown();
}
