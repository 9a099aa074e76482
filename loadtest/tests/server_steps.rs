//! The server's background steps beside the per-second p99: the `/metrics`
//! gauge parser, the placement of samples in the timeline's buckets, the
//! stall table and the with/without-snapshot split, and whole runs against
//! the fake flashcore with and without `/metrics`.

mod support;

use std::collections::BTreeMap;

use clap::Parser;
use loadtest::cli::Cli;
use loadtest::report::Report;
use loadtest::run::{Summary, execute};
use loadtest::server_steps::{self, ParsedSteps, PollCounts, StepSample};
use loadtest::stats::TimelinePoint;
use support::{Fake, Fault, SECRET};

const SAMPLE_TEXT: &str = r#"# HELP flashcore_step_seconds background steps
# TYPE flashcore_step_seconds histogram
flashcore_step_seconds_bucket{step="capture",le="0.1"} 3
flashcore_step_seconds_sum{step="capture"} 0.5
flashcore_requests_total{route="/v1/orders"} 120
# HELP flashcore_step_last_second_max_seconds longest run of each background step in the last whole second
# TYPE flashcore_step_last_second_max_seconds gauge
flashcore_step_last_second_max_seconds{step="journal_write"} 0.000412
flashcore_step_last_second_max_seconds{step="journal_sync"} 0.0031
flashcore_step_last_second_max_seconds{step="capture"} 0.18
flashcore_step_last_second_max_seconds{step="snapshot_write"} 0
flashcore_step_last_second_max_seconds{instance="a\"}b", step="epoch_drop"} 2e-3 1700000000000
  flashcore_step_last_second_max_seconds {step="expiry"} 0.001
flashcore_step_last_second_max_seconds{step="journal_write"} 0.0002
flashcore_step_last_second_max_seconds_total{step="spill"} 9
flashcore_step_last_second_max_seconds{step="archive",} 0.0005
"#;

/// Each of these is one bad line of the gauge.
const BAD_LINES: [&str; 10] = [
    r#"flashcore_step_last_second_max_seconds 0.1"#,
    r#"flashcore_step_last_second_max_seconds{kind="capture"} 0.1"#,
    r#"flashcore_step_last_second_max_seconds{step="capture"} NaN"#,
    r#"flashcore_step_last_second_max_seconds{step="capture"} -0.1"#,
    r#"flashcore_step_last_second_max_seconds{step="capture"} fast"#,
    r#"flashcore_step_last_second_max_seconds{step="Capture-X"} 0.1"#,
    r#"flashcore_step_last_second_max_seconds{step="capture"}"#,
    r#"flashcore_step_last_second_max_seconds{step="capture" 0.1"#,
    r#"flashcore_step_last_second_max_seconds{step="capture"} 0.1 12 extra"#,
    r#"flashcore_step_last_second_max_seconds{step="capture"} +Inf"#,
];

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() < 1e-9
}

#[test]
fn the_gauge_is_read_and_everything_else_skipped() {
    let parsed = server_steps::parse(SAMPLE_TEXT);
    assert_eq!(parsed.bad_lines, 0, "{parsed:?}");
    let steps: Vec<&str> = parsed.steps_max_ms.keys().map(String::as_str).collect();
    assert_eq!(
        steps,
        [
            "archive",
            "capture",
            "epoch_drop",
            "expiry",
            "journal_sync",
            "journal_write",
            "snapshot_write"
        ],
        "histogram lines, other metrics and `_total` are not the gauge"
    );
    let ms = |step: &str| parsed.steps_max_ms[step];
    assert!(close(ms("journal_write"), 0.412), "the larger of two lines");
    assert!(close(ms("journal_sync"), 3.1));
    assert!(close(ms("capture"), 180.0));
    assert!(close(ms("snapshot_write"), 0.0), "zeros are read");
    assert!(
        close(ms("epoch_drop"), 2.0),
        "another label first, an escaped quote, exponent and timestamp"
    );
    assert!(close(ms("expiry"), 1.0), "space before the labels");
    assert!(close(ms("archive"), 0.5), "a trailing comma");

    // A sample keeps only the steps that ran.
    let sample = StepSample::from_scrape(3.5, &parsed);
    assert!(close(sample.at_s, 2.5), "the second before the scrape");
    assert!(!sample.steps_max_ms.contains_key("snapshot_write"));
    assert_eq!(sample.steps_max_ms.len(), 6);
}

#[test]
fn bad_gauge_lines_are_counted_one_by_one() {
    for line in BAD_LINES {
        let parsed = server_steps::parse(line);
        assert_eq!(parsed.bad_lines, 1, "not caught: {line}");
        assert!(parsed.steps_max_ms.is_empty(), "read from {line}");
    }
    let mixed = format!("{SAMPLE_TEXT}{}\n", BAD_LINES.join("\n"));
    let parsed = server_steps::parse(&mixed);
    assert_eq!(parsed.bad_lines, 10);
    assert!(
        close(parsed.steps_max_ms["capture"], 180.0),
        "good lines survive bad ones"
    );
    assert_eq!(server_steps::parse(""), ParsedSteps::default());
}

fn point(t_s: f64, span_s: f64, p99_ms: f64) -> TimelinePoint {
    TimelinePoint {
        t_s,
        span_s,
        requests: 100,
        throughput_rps: 100.0,
        ok: 100,
        errors: 0,
        shed: 0,
        p50_ms: 1.0,
        p99_ms,
        granted_units: 0,
        server_rss_kib: None,
        server_steps_samples: 0,
        server_steps_max_ms: BTreeMap::new(),
    }
}

fn sample(at_s: f64, steps: &[(&str, f64)]) -> StepSample {
    StepSample {
        at_s,
        steps_max_ms: steps.iter().map(|(s, ms)| ((*s).to_owned(), *ms)).collect(),
    }
}

#[test]
fn samples_land_in_the_bucket_of_the_second_they_describe() {
    // Buckets: [0, 1], (1, 2], (2, 3], (3, 3.4].
    let mut timeline = vec![
        point(1.0, 1.0, 2.0),
        point(2.0, 1.0, 2.0),
        point(3.0, 1.0, 2.0),
        point(3.4, 0.4, 2.0),
    ];
    let samples = [
        sample(-1.0, &[("capture", 500.0)]),
        sample(0.0, &[("journal_sync", 1.0)]),
        sample(0.5, &[("journal_sync", 4.0), ("capture", 180.0)]),
        sample(1.0, &[("journal_sync", 2.0)]),
        sample(1.01, &[("epoch_drop", 7.0)]),
        sample(2.2, &[]),
        sample(3.3, &[("spill", 0.25)]),
        sample(3.41, &[("capture", 900.0)]),
    ];
    let outside = server_steps::attribute(&mut timeline, &samples);
    assert_eq!(outside, 2, "before the load and after its last bucket");

    let first = &timeline[0];
    assert_eq!(first.server_steps_samples, 3, "at 0, 0.5 and the end, 1");
    assert!(
        close(first.server_steps_max_ms["journal_sync"], 4.0),
        "the max"
    );
    assert!(close(first.server_steps_max_ms["capture"], 180.0));
    assert_eq!(first.server_steps_max_ms.len(), 2);

    assert_eq!(timeline[1].server_steps_samples, 1);
    assert_eq!(
        timeline[1].server_steps_max_ms.keys().collect::<Vec<_>>(),
        ["epoch_drop"]
    );
    assert_eq!(timeline[2].server_steps_samples, 1, "sampled, nothing ran");
    assert!(timeline[2].server_steps_max_ms.is_empty());
    assert_eq!(timeline[3].server_steps_samples, 1);
    assert!(close(timeline[3].server_steps_max_ms["spill"], 0.25));

    let mut empty: Vec<TimelinePoint> = Vec::new();
    assert_eq!(server_steps::attribute(&mut empty, &samples), 8);
}

#[test]
fn the_summary_puts_each_stall_beside_its_cause() {
    // Ten seconds: snapshots in seconds 3 (capture) and 7 (write, then the
    // epoch drop); second 9 is unsampled and the worst; second 5 had no answers.
    let p99s = [2.0, 2.5, 40.0, 3.0, 0.0, 2.2, 25.0, 8.0, 90.0, 2.1];
    let mut timeline: Vec<TimelinePoint> = p99s
        .iter()
        .enumerate()
        .map(|(i, p99)| {
            #[allow(clippy::cast_precision_loss)]
            let t_s = (i + 1) as f64;
            point(t_s, 1.0, *p99)
        })
        .collect();
    timeline[4].requests = 0;
    let mut samples = Vec::new();
    for (i, steps) in [
        (0, vec![("journal_sync", 1.0)]),
        (1, vec![("journal_sync", 1.0)]),
        (2, vec![("journal_sync", 1.0), ("capture", 35.0)]),
        (3, vec![("journal_sync", 1.0)]),
        (4, vec![("journal_sync", 1.0), ("capture", 50.0)]),
        (5, vec![("journal_sync", 1.0)]),
        (6, vec![("snapshot_write", 300.0), ("journal_sync", 20.0)]),
        (7, vec![("epoch_drop", 6.0), ("future_step", 1.0)]),
        (9, vec![("journal_sync", 1.0)]),
    ] {
        #[allow(clippy::cast_precision_loss)]
        let at_s = i as f64 + 0.5;
        samples.push(sample(at_s, &steps));
    }
    assert_eq!(server_steps::attribute(&mut timeline, &samples), 0);
    let polls = PollCounts {
        polls: 11,
        samples: 9,
        ..PollCounts::default()
    };
    let summary = server_steps::summarize(&timeline, polls);

    assert_eq!(
        summary.seconds_sampled, 8,
        "not the unsampled nor the idle one"
    );
    assert_eq!(summary.with_snapshot.seconds, 3);
    assert!(close(summary.with_snapshot.p99_max_ms, 40.0));
    assert!(close(summary.with_snapshot.p99_median_ms, 25.0));
    assert_eq!(summary.without_snapshot.seconds, 5);
    assert!(close(summary.without_snapshot.p99_max_ms, 3.0));
    assert!(close(summary.without_snapshot.p99_median_ms, 2.2));

    let rows: Vec<(f64, bool, bool)> = summary
        .stalls
        .iter()
        .map(|r| (r.t_s, r.snapshot, r.worst))
        .collect();
    assert_eq!(
        rows,
        [
            (3.0, true, true),
            (4.0, false, true),
            (5.0, true, false),
            (7.0, true, true),
            (8.0, true, true),
            (9.0, false, true),
        ],
        "snapshot seconds and the five worst p99s, in time order"
    );
    assert_eq!(summary.stalls_left_out, 0);
    let worst_unsampled = summary.stalls.iter().find(|r| close(r.t_s, 9.0)).unwrap();
    assert_eq!(worst_unsampled.samples, 0);
    assert!(close(
        summary
            .stalls
            .iter()
            .find(|r| close(r.t_s, 7.0))
            .unwrap()
            .steps_max_ms["snapshot_write"],
        300.0
    ));
    assert_eq!(
        server_steps::columns(&summary.stalls),
        [
            "journal_sync",
            "capture",
            "snapshot_write",
            "epoch_drop",
            "future_step"
        ],
        "the server's order, unknown steps after"
    );
}

async fn run(fake: &Fake, dir: &std::path::Path, secs: &str) -> Summary {
    let out = dir.to_str().unwrap();
    let url = fake.url();
    let args = [
        "loadtest",
        "overload",
        "--rate",
        "200",
        "--buyers",
        "50",
        "--connections",
        "4",
        "--duration",
        secs,
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--out",
        out,
        "--progress",
        "off",
    ];
    execute(Cli::try_parse_from(args).unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_records_the_servers_steps_in_its_timeline() {
    let fake = Fake::start(Fault::None).await;
    fake.set_metrics(SAMPLE_TEXT);
    let dir = tempfile::tempdir().unwrap();
    // Three seconds: scrapes at about 0 s (describing the second before the
    // load, so outside it), 1 s and 2 s.
    let summary = run(&fake, dir.path(), "3s").await;
    let r = &summary.report;
    assert_eq!(summary.exit_code, 0, "{}", r.table());
    let steps = r.server_steps.as_ref().expect("a summary of the steps");
    assert!(steps.polls.samples >= 1, "{:?}", steps.polls);
    assert_eq!(steps.polls.failures, 0, "{:?}", steps.polls);
    assert_eq!(
        steps.polls.bad_lines, 0,
        "the fake's counter is another metric"
    );
    assert!(fake.scrapes() >= steps.polls.polls);

    let sampled: Vec<&TimelinePoint> = r
        .timeline
        .iter()
        .filter(|p| p.server_steps_samples > 0)
        .collect();
    assert!(!sampled.is_empty(), "{:?}", r.timeline);
    for p in &sampled {
        assert!(close(p.server_steps_max_ms["capture"], 180.0), "{p:?}");
        assert!(
            close(p.server_steps_max_ms["journal_write"], 0.412),
            "{p:?}"
        );
        assert!(
            !p.server_steps_max_ms.contains_key("snapshot_write"),
            "zeros are left out"
        );
    }
    let placed: u64 = r
        .timeline
        .iter()
        .map(|p| u64::from(p.server_steps_samples))
        .sum();
    assert_eq!(placed + steps.polls.outside_run, steps.polls.samples);
    assert!(steps.with_snapshot.seconds >= 1);
    assert!(steps.stalls.iter().any(|row| row.snapshot));

    let table = r.table();
    assert!(table.contains("server steps:"), "{table}");
    assert!(table.contains("capture"), "{table}");
    assert!(
        table.contains("per-second p99: with a snapshot step"),
        "{table}"
    );

    // report.json carries it, and a report from before the steps still loads.
    let text = std::fs::read(dir.path().join("report.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert!(json["server_steps"]["with_snapshot"]["p99_max_ms"].is_number());
    assert!(
        json["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["server_steps_max_ms"]["capture"].is_number())
    );
    json.as_object_mut().unwrap().remove("server_steps");
    for p in json["timeline"].as_array_mut().unwrap() {
        let p = p.as_object_mut().unwrap();
        p.remove("server_steps_samples");
        p.remove("server_steps_max_ms");
    }
    let old: Report = serde_json::from_value(json).unwrap();
    assert!(old.server_steps.is_none());
    assert!(
        old.timeline
            .iter()
            .all(|p| p.server_steps_max_ms.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_metrics_is_not_fatal() {
    let fake = Fake::start(Fault::None).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = run(&fake, dir.path(), "1s").await;
    let r = &summary.report;
    assert_eq!(summary.exit_code, 0, "{}", r.table());
    let steps = r.server_steps.as_ref().unwrap();
    assert_eq!(steps.polls.samples, 0);
    assert_eq!(steps.polls.failures, steps.polls.polls, "every 404 counted");
    assert!(r.timeline.iter().all(|p| p.server_steps_samples == 0));
    assert!(steps.stalls.iter().all(|row| !row.snapshot));
    assert_eq!(steps.with_snapshot.seconds, 0);
}
