//! The live view end to end: `GET /v1/stream` read as raw server-sent events,
//! and `GET /dashboard` rendered by a real headless Chromium, both against
//! the real binary after a small sale, and both compared with `GET /v1/skus`.
//!
//! Chromium is Debian's `chromium` (`.ci/run` installs it); without it the
//! browser test fails and says how to install it. `FLASHCORE_CHROMIUM` names
//! another binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::server::{Api, Server, Stream};

/// The SKUs of the sale: one that sells out, one that does not.
const DROP: &str = "drop";
const STEADY: &str = "steady";

/// Places one order of `qty` units of `sku` per user; each answer's body
/// (or error code) with its status under `_status`.
fn buy(api: &mut Api<'_>, server: &Server, sku: &str, qty: u32, users: &[&str]) -> Vec<Value> {
    users
        .iter()
        .map(|user| {
            let r = api.order(&server.customer(user), &[(sku, qty)], None);
            let mut body = if r.status == 201 {
                r.json()
            } else {
                Value::Null
            };
            if let Value::Object(map) = &mut body {
                map.insert("_status".into(), r.status.into());
            } else {
                body = serde_json::json!({ "_status": r.status, "error": r.code() });
            }
            body
        })
        .collect()
}

fn pay(api: &mut Api<'_>, server: &Server, order: &Value) {
    let id = order["order_id"].as_str().expect("order id");
    let body = format!(
        r#"{{"payment_ref":"pay-{id}","amount_cents":{}}}"#,
        order["total_cents"]
    );
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/pay"),
        Some(&server.admin()),
        None,
        Some(&body),
    );
    assert_eq!(
        r.status,
        200,
        "pay {id}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

/// A small sale: DROP (5 units) sells out to 8 buyers, 2 of them pay;
/// STEADY (40 units) gets 6 orders of 3, one paid and one cancelled.
fn run_sale(server: &Server) {
    let mut api = Api::new(server);
    assert_eq!(api.create_sku(DROP, 1_500, 5, None).status, 201);
    assert_eq!(api.create_sku(STEADY, 900, 40, None).status, 201);
    let drop = buy(
        &mut api,
        server,
        DROP,
        1,
        &["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"],
    );
    let granted: Vec<&Value> = drop.iter().filter(|o| o["_status"] == 201).collect();
    assert_eq!(granted.len(), 5, "{drop:?}");
    assert!(
        drop.iter()
            .filter(|o| o["_status"] == 409)
            .all(|o| o["error"] == "out_of_stock")
    );
    pay(&mut api, server, granted[0]);
    pay(&mut api, server, granted[1]);
    let steady = buy(
        &mut api,
        server,
        STEADY,
        3,
        &["u1", "u2", "u3", "u4", "u5", "u6"],
    );
    assert!(steady.iter().all(|o| o["_status"] == 201), "{steady:?}");
    pay(&mut api, server, &steady[0]);
    let cancelled = steady[1]["order_id"].as_str().expect("order id");
    let r = api.call(
        "POST",
        &format!("/v1/orders/{cancelled}/cancel"),
        Some(&server.customer("u2")),
        None,
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// `(available, reserved, sold)` of each SKU as `GET /v1/skus` shows it.
fn api_levels(server: &Server) -> Vec<(String, [u64; 3])> {
    let mut api = Api::new(server);
    let r = api.call("GET", "/v1/skus", None, None, None);
    assert_eq!(r.status, 200);
    r.json()["skus"]
        .as_array()
        .expect("skus")
        .iter()
        .map(|s| {
            let n = |f: &str| s[f].as_u64().unwrap_or_else(|| panic!("{f} in {s}"));
            (
                s["sku_id"].as_str().expect("id").to_string(),
                [n("available"), n("reserved"), n("allocated") + n("shipped")],
            )
        })
        .collect()
}

/// The same triple from a stream event.
fn event_levels(event: &Value) -> Vec<(String, [u64; 3])> {
    event["skus"]
        .as_array()
        .expect("skus in the event")
        .iter()
        .map(|s| {
            let n = |f: &str| s[f].as_u64().unwrap_or_else(|| panic!("{f} in {s}"));
            (
                s["sku_id"].as_str().expect("id").to_string(),
                [n("available"), n("reserved"), n("sold")],
            )
        })
        .collect()
}

/// Reads events until one shows `want` (the sampler catches up within a
/// second or two); that event.
fn event_showing(stream: &mut Stream, want: &[(String, [u64; 3])]) -> Value {
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < Duration::from_secs(15) {
        let Some(event) = stream.next() else {
            panic!("the stream ended early; last event: {last}");
        };
        if event_levels(&event) == want {
            return event;
        }
        last = event;
    }
    panic!("no event showed {want:?} within 15 s; last: {last}");
}

#[test]
fn the_stream_sends_public_counters_every_second_and_matches_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    run_sale(&server);
    let want = api_levels(&server);
    assert_eq!(want.len(), 2);

    let mut stream = Stream::open(server.addr);
    assert!(stream.head.starts_with("HTTP/1.1 200"), "{}", stream.head);
    assert!(
        stream
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{}",
        stream.head
    );
    let event = event_showing(&mut stream, &want);
    let before = Instant::now();
    let next = stream.next().expect("a second event");
    let gap = before.elapsed();
    assert!(gap < Duration::from_millis(2_500), "events {gap:?} apart");
    assert_eq!(event_levels(&next), want, "quiet: nothing changed");

    // What the dashboard shows, and nothing about users or orders.
    let drop = &event["skus"][0];
    assert_eq!(drop["sku_id"], DROP);
    assert!(drop["sold_out_at"].is_string(), "{drop}");
    assert!(event["skus"][1]["sold_out_at"].is_null(), "{event}");
    assert_eq!(event["skus_total"], 2);
    let totals = &next["requests_total"];
    // 2 SKUs, 5 + 6 orders granted, 3 payments, 1 cancel, 1 list: 18
    // answers of 2xx at least, and the 3 refused orders are 409s.
    assert!(totals["2xx"].as_u64().expect("2xx") >= 18, "{totals}");
    assert!(totals["409"].as_u64().expect("409") >= 3, "{totals}");
    for field in ["p99_ms", "shed_per_s", "shed_total", "stream_clients"] {
        assert!(next.get(field).is_some(), "no {field} in {next}");
    }
    assert!(next["stream_clients"].as_u64() >= Some(1), "{next}");
    let journal = &next["journal"];
    assert!(journal["batches_per_s"].is_number(), "{next}");
    assert!(journal.get("batch_events_mean").is_some(), "{next}");
    assert!(journal.get("flush_ms_mean").is_some(), "{next}");
    // Every background step's longest run in the last second, by name.
    let steps = next["steps_max_ms"].as_object().expect("steps_max_ms");
    for step in [
        "journal_write",
        "journal_sync",
        "capture",
        "epoch_drop",
        "expiry",
    ] {
        assert!(
            steps.get(step).is_some_and(serde_json::Value::is_number),
            "{next}"
        );
    }
    let text = next.to_string();
    for private in ["u1", "user", "order_id", "payment_ref", "pay-"] {
        assert!(!text.contains(private), "{private} in {text}");
    }
}

#[test]
fn an_open_stream_does_not_hold_up_a_graceful_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let mut stream = Stream::open(server.addr);
    assert!(stream.next().is_some(), "a first event");
    let started = Instant::now();
    let status = server.terminate();
    let took = started.elapsed();
    assert!(status.success(), "{status}: {}", server.log());
    // The listener's grace for requests in flight is 30 s; a stream that
    // kept the connection busy would use it up.
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    let mut ended = false;
    for _ in 0..3 {
        if stream.next().is_none() {
            ended = true;
            break;
        }
    }
    assert!(ended, "the stream went on after the server stopped");
}

/// The browser: `FLASHCORE_CHROMIUM` or Debian's `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    let path = std::env::var_os("FLASHCORE_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "{} is not installed: the dashboard test needs a headless Chromium. \
         Install it with `apt-get install -y chromium` (.ci/run does), or point \
         FLASHCORE_CHROMIUM at one.",
        path.display()
    );
    path
}

/// What one Chromium run printed.
struct Rendered {
    /// Its stdout: the page with `--dump-dom`.
    stdout: String,
    /// The page's console (errors, CSP violations), one message a line.
    console: String,
}

/// The page's console messages in Chromium's log (`--enable-logging`),
/// each once (an error in the event handler repeats every second).
fn console_of(log: &str) -> String {
    let mut messages: Vec<&str> = Vec::new();
    for line in log.lines().filter(|line| line.contains(":CONSOLE")) {
        // `[pid:tid:time:INFO:CONSOLE:line] "message", source: url (line)`
        let message = line.split_once("] ").map_or(line, |(_, m)| m);
        if !messages.contains(&message) {
            messages.push(message);
        }
    }
    messages.join("\n")
}

/// Runs headless Chromium on `url` with `extra` arguments; its stdout.
fn run_chromium(url: &str, extra: &[&str]) -> String {
    render(url, extra).stdout
}

/// Runs headless Chromium on `url` with `extra` arguments. A page that never
/// closes its stream keeps virtual time from running out (Chromium waits for
/// open requests), so a run past 90 s fails, showing the page's console.
fn render(url: &str, extra: &[&str]) -> Rendered {
    let profile = tempfile::tempdir().expect("tempdir");
    // A file, not a pipe: nothing reads the log until Chromium is done.
    let log_path = profile.path().join("chromium.log");
    let log_file = std::fs::File::create(&log_path).expect("the log file");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // The page's console goes to stderr, as `INFO:CONSOLE` lines.
            "--enable-logging=stderr",
            "--v=0",
            // Timers run ahead, but the page's stream is real: it closes
            // itself after `?events=N`, and then the budget runs out.
            "--virtual-time-budget=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("chromium starts");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("waits").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within 90 s on {url} (the page never \
                 closed its stream); its console:\n{}",
                console_of(&read_log())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("chromium output");
    let log = read_log();
    assert!(
        output.status.success(),
        "chromium failed ({}): {log}",
        output.status
    );
    Rendered {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        console: console_of(&log),
    }
}

/// The text of the element with `attrs` (as the page writes them, in
/// order) in the dumped DOM.
fn text_of(dom: &str, attrs: &str) -> String {
    let start = dom
        .find(&format!("{attrs}>"))
        .unwrap_or_else(|| panic!("no element with {attrs} in the page:\n{dom}"));
    let rest = &dom[start + attrs.len() + 1..];
    rest[..rest.find('<').expect("the element closes")].to_string()
}

fn number_of(dom: &str, sku: &str, field: &str) -> u64 {
    let text = text_of(dom, &format!(r#"data-sku="{sku}" data-field="{field}""#));
    text.parse()
        .unwrap_or_else(|_| panic!("{sku} {field} shows {text:?}, not a number"))
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .to_path_buf()
}

#[test]
fn the_dashboard_in_a_browser_shows_what_the_api_says() {
    let browser = chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    run_sale(&server);
    let want = api_levels(&server);
    // The browser's first event is the latest snapshot: wait until that
    // shows the quiet state.
    let mut stream = Stream::open(server.addr);
    event_showing(&mut stream, &want);
    drop(stream);

    let url = format!("http://{}/dashboard?events=3", server.addr);
    let dom = run_chromium(&url, &["--dump-dom"]);
    assert!(
        dom.contains(r#"data-state="done""#) && dom.contains(r#"data-events="3""#),
        "the page did not get its 3 events from {browser:?}:\n{dom}"
    );
    for (sku, [available, reserved, sold]) in &want {
        assert_eq!(number_of(&dom, sku, "available"), *available, "{sku}");
        assert_eq!(number_of(&dom, sku, "reserved"), *reserved, "{sku}");
        assert_eq!(number_of(&dom, sku, "sold"), *sold, "{sku}");
    }
    // The sale's story: DROP is marked sold out, on its chart too; STEADY is not.
    let drop_out = text_of(&dom, r#"data-sku="drop" data-field="sold_out_at""#);
    assert_eq!(drop_out.len(), "12:34:56".len(), "{drop_out:?}");
    assert_eq!(
        text_of(&dom, r#"data-sku="steady" data-field="sold_out_at""#),
        ""
    );
    assert_eq!(
        dom.matches(r#"data-mark="sold-out""#).count(),
        1,
        "one sold-out mark"
    );
    // Server numbers are filled in, not left at their placeholder.
    for name in ["rps_2xx", "shed_total", "stream_clients", "skus_total"] {
        let value = text_of(&dom, &format!(r#"data-server="{name}""#));
        assert!(value.parse::<f64>().is_ok(), "{name} shows {value:?}");
    }
    assert_eq!(text_of(&dom, r#"data-server="skus_total""#), "2");

    let shot = target_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
            "--hide-scrollbars",
        ],
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "a {} byte screenshot is blank",
        png.len()
    );
}

/// SKU ids that are also built-in property names of a JavaScript object,
/// and an ordinary one: a page that keys plain objects by id breaks on them.
const PROPERTY_NAMED: [&str; 5] = [
    "__proto__",
    "constructor",
    "hasOwnProperty",
    "plain",
    "toString",
];

#[test]
fn the_dashboard_draws_skus_named_like_object_properties_under_a_hash_csp() {
    let browser = chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    // Different numbers per SKU, so a card showing another SKU's row fails.
    for (i, sku) in (1_u32..).zip(PROPERTY_NAMED) {
        let r = api.create_sku(sku, 100, 20 + u64::from(i), None);
        assert_eq!(r.status, 201, "{sku}: {}", String::from_utf8_lossy(&r.body));
        let orders = buy(&mut api, &server, sku, i, &["u1", "u2"]);
        assert!(orders.iter().all(|o| o["_status"] == 201), "{orders:?}");
        pay(&mut api, &server, &orders[0]);
    }
    let want = api_levels(&server);
    let ids: Vec<&str> = want.iter().map(|(id, _)| id.as_str()).collect();
    let mut sorted = PROPERTY_NAMED;
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "GET /v1/skus lists every SKU");

    // The page's headers: scripts and styles admitted by hash only.
    let r = api.call("GET", "/dashboard", None, None, None);
    assert_eq!(r.status, 200);
    let csp = r.header("content-security-policy").expect("a CSP");
    assert!(!csp.contains("'unsafe-inline'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(csp.contains("style-src 'sha256-"), "{csp}");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));

    let mut stream = Stream::open(server.addr);
    event_showing(&mut stream, &want);
    drop(stream);

    // The numbers are written by the page's script: drawn numbers prove
    // that Chromium ran it under the hash policy above.
    let url = format!("http://{}/dashboard?events=2", server.addr);
    let Rendered {
        stdout: dom,
        console,
    } = render(&url, &["--dump-dom"]);
    assert!(
        dom.contains(r#"data-state="done""#) && dom.contains(r#"data-events="2""#),
        "the page did not take its 2 events from {browser:?} (a script error, \
         or a policy that blocked the script):\n{console}\n{dom}"
    );
    // Nothing was refused: not the script, not the style block, no attribute.
    assert!(
        !console.contains("Content Security Policy") && !console.contains("Uncaught"),
        "the page's console:\n{console}"
    );
    for (sku, [available, reserved, sold]) in &want {
        let card = format!(r#"class="panel sku" data-sku="{sku}""#);
        assert_eq!(dom.matches(&card).count(), 1, "one card for {sku}");
        assert_eq!(number_of(&dom, sku, "available"), *available, "{sku}");
        assert_eq!(number_of(&dom, sku, "reserved"), *reserved, "{sku}");
        assert_eq!(number_of(&dom, sku, "sold"), *sold, "{sku}");
    }
    assert_eq!(
        text_of(&dom, r#"data-server="skus_total""#),
        PROPERTY_NAMED.len().to_string()
    );
}
