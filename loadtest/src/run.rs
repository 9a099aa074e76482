//! One whole run: target, setup, load, book check, stop, report.
//!
//! Order matters: the server (when spawned) is stopped only after the book
//! check, and is stopped even when the run fails; the report is written even
//! when the books are violated, and the exit code then says so
//! ([`EXIT_BOOKS_VIOLATED`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, anyhow};
use tokio::sync::oneshot;

use crate::books::{self, BookInput};
use crate::cli::{Cli, CommonArgs, ScenarioCmd};
use crate::client::Conn;
use crate::progress::Collector;
use crate::report::{Report, RunInfo, ServerInfo, endpoint_reports, per_s};
use crate::scenario::{self, Load, Pacer, WorkerOutput, setup};
use crate::server_steps::{self, Poller};
use crate::stats::{self, LatencyMs, Recorder, TimelinePoint};
use crate::target::{self, SpawnOptions, SpawnedServer};
use crate::token::{Minter, random_secret_hex};
use crate::{chart, limits};

/// Exit code when the run worked but the books did not add up.
pub const EXIT_BOOKS_VIOLATED: u8 = 3;

/// What a finished run produced.
#[derive(Debug)]
pub struct Summary {
    /// The report (also written to disk).
    pub report: Report,
    /// `report.json`.
    pub report_path: PathBuf,
    /// `latency.svg`.
    pub chart_path: PathBuf,
    /// 0, or [`EXIT_BOOKS_VIOLATED`].
    pub exit_code: u8,
}

/// Runs the scenario on the command line from start to end.
///
/// # Errors
///
/// The target could not be reached or started, setup failed, or the report
/// could not be written. Book violations are not errors: see
/// [`Summary::exit_code`].
pub async fn execute(cli: Cli) -> Result<Summary> {
    let cmd = &cli.scenario;
    let common = cmd.common();
    std::fs::create_dir_all(&common.out)
        .with_context(|| format!("creating --out {}", common.out.display()))?;

    // Installed before anything is spawned: the server runs in its own
    // process group, so Ctrl-C must reach it through us.
    let interrupted = Arc::new(AtomicBool::new(false));
    let server_pid = Arc::new(AtomicU32::new(0));
    let watcher = watch_interrupts(interrupted.clone(), server_pid.clone());
    let started = start_target(common, &server_pid).await;
    let Target {
        addrs,
        secret,
        mut server,
        label: target_label,
    } = match started {
        Ok(target) => target,
        Err(e) => {
            watcher.abort();
            return Err(e);
        }
    };

    let rss_pid = server
        .as_ref()
        .and_then(SpawnedServer::pid)
        .or(common.server_pid);
    let outcome = load_and_check(cmd, &addrs, &secret, rss_pid, &target_label, interrupted).await;

    let mut server_info = ServerInfo {
        pid: rss_pid,
        ..ServerInfo::default()
    };
    if let Some(server) = server.as_mut() {
        server_info.spawned = true;
        server_info.log = Some(server.log_path().display().to_string());
        match server.stop().await {
            Ok(stop) => {
                server_info.exit = Some(if stop.killed {
                    format!("{} after SIGKILL", stop.status)
                } else {
                    stop.status
                });
                server_info.exit_clean = Some(stop.clean);
            }
            Err(e) => server_info.exit = Some(format!("could not stop: {e:#}")),
        }
    }
    watcher.abort();
    let mut report = outcome?;
    fill_rss(&mut server_info, &report.timeline);
    report.server = server_info;

    let report_path = report.write_json(&common.out)?;
    let title = format!(
        "flashcore {}: units sold, throughput and p99 latency ({})",
        report.scenario, report.run.durability
    );
    let sale = chart::Sale::from_detail(&report.detail);
    let chart_path = chart::write_svg(&common.out, &title, &report.timeline, sale)?;
    print!("{}", report.table());
    println!(
        "wrote {} and {}",
        report_path.display(),
        chart_path.display()
    );
    let exit_code = if report.books.ok {
        0
    } else {
        EXIT_BOOKS_VIOLATED
    };
    Ok(Summary {
        report,
        report_path,
        chart_path,
        exit_code,
    })
}

/// First Ctrl-C: stop sending, then check the books and stop the server as
/// usual. Second Ctrl-C: kill the spawned server and exit at once.
fn watch_interrupts(
    flag: Arc<AtomicBool>,
    server_pid: Arc<AtomicU32>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        eprintln!(
            "\nCtrl-C: finishing requests in flight, then checking the books (Ctrl-C again to abort)"
        );
        flag.store(true, Ordering::Relaxed);
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        eprintln!("second Ctrl-C: aborting");
        let pid = server_pid.load(Ordering::Relaxed);
        if pid != 0 {
            target::kill_now(pid);
        }
        std::process::exit(130);
    })
}

fn fill_rss(info: &mut ServerInfo, timeline: &[TimelinePoint]) {
    let samples: Vec<u64> = timeline.iter().filter_map(|p| p.server_rss_kib).collect();
    info.rss_first_kib = samples.first().copied();
    info.rss_last_kib = samples.last().copied();
    info.rss_max_kib = samples.iter().max().copied();
}

async fn load_and_check(
    cmd: &ScenarioCmd,
    addrs: &[SocketAddr],
    secret: &str,
    rss_pid: Option<u32>,
    target_label: &str,
    interrupted: Arc<AtomicBool>,
) -> Result<Report> {
    let common = cmd.common();
    let minter = Minter::new(
        secret,
        common.duration.saturating_add(limits::TOKEN_TTL_MARGIN),
    )?;
    let admin = minter.admin("loadtest-admin")?;
    let run_id = scenario::unix_millis().to_string();
    let seed = scenario::unix_millis() ^ u64::from(std::process::id()).rotate_left(32);

    // Several nodes of a cluster: setup through the first, connections
    // round-robin, the books read through the last (any node must show
    // every acknowledged change).
    let (Some(&addr), Some(&check_addr)) = (addrs.first(), addrs.last()) else {
        anyhow::bail!("no server to load");
    };
    let mut setup_conn = Conn::new(addr, common.timeout)?;
    let plan = setup::plan(cmd, &mut setup_conn, &minter, &admin, &run_id, seed).await?;
    drop(setup_conn);

    let mut conns = Vec::with_capacity(plan.agents.len());
    for i in 0..common.connections {
        let addr = addrs[i as usize % addrs.len()];
        let mut conn = Conn::new(addr, common.timeout)?;
        conn.open().await.map_err(|f| {
            anyhow!(
                "opening connection {} of {}: {}",
                i + 1,
                common.connections,
                f.label()
            )
        })?;
        conns.push(conn);
    }
    println!(
        "{}: {} connections, {} or {} requests, whichever comes first",
        cmd.name(),
        common.connections,
        humantime::format_duration(common.duration),
        common.max_requests
    );

    let load = Arc::new(Load::with_stop(
        common.duration,
        common.max_requests,
        interrupted,
    ));
    let pacer = plan
        .rate_per_s
        .map(|rate| Arc::new(Pacer::new(load.started, rate)));
    let recorders: Vec<Arc<Mutex<Recorder>>> = (0..common.connections)
        .map(|_| Arc::new(Mutex::new(Recorder::default())))
        .collect();
    let (done_tx, done_rx) = oneshot::channel();
    let poller = Poller::spawn(addr, load.started);
    let collector = tokio::spawn(
        Collector::new(
            recorders.clone(),
            load.started,
            common.duration,
            rss_pid,
            common.progress,
        )
        .run(done_rx),
    );
    let mut workers = Vec::with_capacity(conns.len());
    for ((conn, agent), rec) in conns
        .into_iter()
        .zip(plan.agents)
        .zip(recorders.iter().cloned())
    {
        workers.push(tokio::spawn(scenario::drive(
            load.clone(),
            pacer.clone(),
            conn,
            agent,
            rec,
        )));
    }
    let mut outputs: Vec<WorkerOutput> = Vec::with_capacity(workers.len());
    for worker in workers {
        outputs.push(worker.await.context("a worker panicked")?);
    }
    let elapsed = load.started.elapsed();
    let _ = done_tx.send(());
    let mut timeline = collector.await.context("the progress view panicked")?;
    let polled = poller.finish().await;
    let mut poll_counts = polled.counts;
    poll_counts.outside_run = server_steps::attribute(&mut timeline, &polled.samples);
    let steps_summary = server_steps::summarize(&timeline, poll_counts);

    let endpoint_tables: Vec<_> = recorders
        .iter()
        .map(|r| std::mem::take(&mut r.lock().unwrap_or_else(PoisonError::into_inner).endpoints))
        .collect();
    let endpoints = stats::merge_endpoints(endpoint_tables.iter())?;
    let all = stats::total(&endpoints)?;

    let mut input = BookInput {
        skus: plan.skus,
        ..BookInput::default()
    };
    let mut detail = plan.detail;
    let mut connects = 0_u64;
    let mut first_sold_out_ms: Option<u64> = None;
    let mut last_granted_ms: Option<u64> = None;
    for out in outputs {
        input.acked.extend(out.acked);
        for (sku, units) in out.unknown_units {
            let slot = input.unknown_units.entry(sku).or_insert(0);
            *slot = slot.saturating_add(units);
        }
        input.unreadable_acks = input.unreadable_acks.saturating_add(out.unreadable_acks);
        connects = connects.saturating_add(out.connects);
        first_sold_out_ms = min_some(first_sold_out_ms, out.first_sold_out_ms);
        last_granted_ms = last_granted_ms.max(out.last_granted_ms);
    }
    println!(
        "checking the books: {} acked orders, {} SKUs",
        input.acked.len(),
        input.skus.len()
    );
    let book = books::check(
        check_addr,
        common.timeout,
        &admin,
        &input,
        common.connections,
    )
    .await?;

    let elapsed_s = elapsed.as_secs_f64();
    let backlog_unsent = match &pacer {
        Some(pacer) if !load.stopped() && all.counts.requests < common.max_requests => pacer
            .due_before(load.deadline)
            .saturating_sub(all.counts.requests),
        _ => 0,
    };
    if matches!(cmd, ScenarioCmd::FlashSale(_)) {
        detail.insert("granted_acked".into(), serde_json::json!(input.acked.len()));
        detail.insert(
            "first_sold_out_ms".into(),
            serde_json::json!(first_sold_out_ms),
        );
        detail.insert("last_granted_ms".into(), serde_json::json!(last_granted_ms));
    }
    if pacer.is_some() {
        detail.insert(
            "rate_achieved_rps".into(),
            serde_json::json!(per_s(all.counts.requests, elapsed_s)),
        );
    }
    if matches!(cmd, ScenarioCmd::Soak(_)) {
        detail.insert("drift".into(), drift(&timeline));
    }

    Ok(Report {
        scenario: cmd.name().to_owned(),
        requests: all.counts.requests,
        ok: all.counts.ok,
        rejected: all.counts.rejected,
        shed: all.counts.shed,
        errors: all.counts.errors,
        throughput_rps: per_s(all.counts.served(), elapsed_s),
        ok_rps: per_s(all.counts.ok, elapsed_s),
        latency_ms: LatencyMs::of(&all.latency),
        shed_latency_ms: LatencyMs::of(&all.shed_latency),
        ok_latency_ms: LatencyMs::of(&all.ok_latency),
        books: book,
        run: run_info(
            common,
            target_label,
            connects,
            elapsed_s,
            load.stopped(),
            all.counts.waited,
            backlog_unsent,
        ),
        endpoints: endpoint_reports(&endpoints, elapsed_s),
        detail,
        timeline,
        server_steps: Some(steps_summary),
        server: ServerInfo::default(),
    })
}

fn run_info(
    common: &CommonArgs,
    target: &str,
    connects: u64,
    elapsed_s: f64,
    stopped_early: bool,
    waited: u64,
    backlog_unsent: u64,
) -> RunInfo {
    RunInfo {
        target: target.to_owned(),
        durability: common.durability.as_str().to_owned(),
        connections: common.connections,
        connects,
        duration_s: common.duration.as_secs_f64(),
        max_requests: common.max_requests,
        elapsed_s,
        stopped_early,
        waited,
        backlog_unsent,
        cores: std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1),
        loadtest_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// The server a run loads.
struct Target {
    /// One address, or one per node of a cluster.
    addrs: Vec<SocketAddr>,
    /// The JWT secret tokens are signed with.
    secret: String,
    /// Set when we spawned it.
    server: Option<SpawnedServer>,
    /// For the report: `spawned 127.0.0.1:port` or the `--url`.
    label: String,
}

/// The server to load: spawned, or the `--url`.
async fn start_target(common: &CommonArgs, server_pid: &Arc<AtomicU32>) -> Result<Target> {
    if common.spawn {
        let secret = random_secret_hex()?;
        let server_bin = match &common.server_bin {
            Some(path) => path.clone(),
            None => {
                let bin = target::default_server_bin()?;
                target::build_server_under_cargo(&bin)?;
                bin
            }
        };
        let opts = SpawnOptions {
            server_bin,
            jwt_secret: secret.clone(),
            durability: common.durability,
            reservation_ttl: common.reservation_ttl,
            log_path: common.out.join("server.log"),
            pid_slot: server_pid.clone(),
        };
        let server = SpawnedServer::start(&opts).await?;
        let addr = server.addr();
        println!(
            "spawned flashcore on {addr} (pid {}), log in {}",
            server.pid().unwrap_or(0),
            opts.log_path.display()
        );
        Ok(Target {
            addrs: vec![addr],
            secret,
            server: Some(server),
            label: format!("spawned {addr}"),
        })
    } else {
        anyhow::ensure!(!common.url.is_empty(), "give --url or --spawn");
        let addrs = common
            .url
            .iter()
            .map(|url| target::loopback_addr(url))
            .collect::<Result<Vec<_>>>()?;
        let secret = common.jwt_secret.clone().context(
            "--url needs the server's JWT secret to mint tokens: pass --jwt-secret or set FLASHCORE_JWT_SECRET",
        )?;
        Ok(Target {
            addrs,
            secret,
            server: None,
            label: common.url.join(" "),
        })
    }
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Soak drift: p99 and server memory in the first and last tenth of the run.
fn drift(timeline: &[TimelinePoint]) -> serde_json::Value {
    let tenth = timeline.len().div_ceil(10).max(1);
    let first = timeline
        .get(..tenth.min(timeline.len()))
        .unwrap_or_default();
    let last = timeline
        .get(timeline.len().saturating_sub(tenth)..)
        .unwrap_or_default();
    let median_p99 = |points: &[TimelinePoint]| -> f64 {
        let mut v: Vec<f64> = points.iter().map(|p| p.p99_ms).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let rss = |points: &[TimelinePoint]| points.iter().filter_map(|p| p.server_rss_kib).max();
    serde_json::json!({
        "p99_first_ms": median_p99(first),
        "p99_last_ms": median_p99(last),
        "rss_first_kib": rss(first),
        "rss_last_kib": rss(last),
    })
}
