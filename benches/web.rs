//! The dashboard, in three parts:
//!
//! - `commit to event`: `runledger serve` as a child process, an open
//!   `/api/events` stream read over a socket, and this process committing
//!   `begin_run`: the time from the call to the run's first event arriving
//!   on the stream (issue 18: goal p99 ≤ 100 ms), p50/p99 over
//!   `RUNLEDGER_BENCH_SAMPLES` samples (default 200), beside `begin_run`
//!   alone; on SQLite, and on PostgreSQL too when the bench is built with
//!   `postgres` and `RUNLEDGER_PG_URL` is set (in a schema of its own,
//!   dropped at the end). Needs the `cli` feature (the `runledger` binary).
//! - `idle memory`: the resident memory (`VmRSS` of `/proc/PID/status`) of
//!   `runledger serve` on SQLite just started, and idle with ten open
//!   pages: ten loads of `/`, then ten open `/api/events` streams, as ten
//!   live pages hold, after 3 s. Needs `cli`, and Linux.
//! - `web`: the runs page and `/api/runs` over a long history (goal p50 ≤
//!   20 ms of server time with a million runs, as for a hundred), requests
//!   sent to the router in-process, by criterion.
//!
//! `RUNLEDGER_BENCH_RUNS` sets the long history's size; it defaults to
//! 100 000 to stay quick to seed. The issue's figure is 1 000 000:
//!
//! ```text
//! cargo bench --bench web --features web,cli
//! RUNLEDGER_BENCH_RUNS=1000000 cargo bench --bench web --features web,cli -- web/
//! cargo bench --bench web --features web,cli -- "idle memory"
//! RUNLEDGER_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo bench --bench web --features web,cli,postgres -- "commit to event"
//! ```

#![allow(missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use criterion::{Criterion, criterion_group};
use http_body_util::BodyExt as _;
use runledger::{Ledger, RunSpec};
use tower::ServiceExt as _;

mod common;
use common::percentile;

/// A SQLite ledger with `n` finished runs: one made by the library, the
/// rest copies of it in one transaction, with names `job-0` to `job-99`
/// and sources `cron`, `shell`, `ci`.
fn ledger_with(dir: &std::path::Path, n: u64) -> Ledger {
    let started = Instant::now();
    let path = dir.join(format!("ledger-{n}.db"));
    let ledger = Ledger::open(&path).unwrap();
    ledger
        .begin_run(RunSpec::new("job-0").source("cron"))
        .unwrap()
        .succeed()
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA busy_timeout = 10000;").unwrap();
    conn.execute(
        "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?1)
         INSERT INTO runs (name, source, status, instance_id, pid, host, created_at,
                           started_at, finished_at)
         SELECT 'job-' || (k.i % 100),
                CASE k.i % 3 WHEN 0 THEN 'cron' WHEN 1 THEN 'shell' ELSE 'ci' END,
                r.status, r.instance_id, r.pid, r.host, r.created_at + k.i,
                r.started_at + k.i, r.finished_at + k.i
         FROM k, (SELECT * FROM runs WHERE id = 1) r",
        [n.saturating_sub(1) as i64],
    )
    .unwrap();
    conn.execute_batch("ANALYZE;").unwrap();
    println!(
        "seeded {n} runs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    ledger
}

fn get(rt: &tokio::runtime::Runtime, app: &axum::Router, path: &str) -> usize {
    rt.block_on(async {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len()
    })
}

fn pages(c: &mut Criterion) {
    let n: u64 = std::env::var("RUNLEDGER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("web");
    for size in [100, n] {
        let app = runledger::web::router(ledger_with(dir.path(), size));
        for (what, path) in [
            ("runs page", "/runs"),
            ("api runs", "/api/runs"),
            ("runs page by name", "/runs?name=job-7"),
            ("runs page by source", "/runs?source=ci"),
        ] {
            get(&rt, &app, path);
            group.bench_function(format!("{what}, {size} runs"), |b| {
                b.iter(|| get(&rt, &app, path));
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = pages
}

fn main() {
    let wanted = wanted_parts();
    if wanted("commit to event") {
        commit_to_event();
    }
    if wanted("idle memory") {
        idle_memory();
    }
    // Criterion filters its benches by the same argument itself.
    benches();
    Criterion::default().configure_from_args().final_summary();
}

/// Which of this bench's own parts to run: the first argument that is
/// neither a flag nor the value of one of criterion's options
/// (`-- --measurement-time 2 "commit to event"`) selects the parts whose
/// name it is in, or that are in it; none selects all.
fn wanted_parts() -> impl Fn(&str) -> bool {
    const WITH_VALUE: &[&str] = &[
        "--measurement-time",
        "--warm-up-time",
        "--sample-size",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--profile-time",
        "--output-format",
        "--color",
        "--plotting-backend",
        "--format",
        "--logfile",
        "--skip",
    ];
    let mut filter = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if WITH_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            filter = arg;
            break;
        }
    }
    move |part: &str| filter.is_empty() || part.contains(&filter) || filter.contains(part)
}

/// The `runledger` binary of this build, if it has one (feature `cli`).
fn runledger_exe() -> Option<&'static str> {
    let exe = option_env!("CARGO_BIN_EXE_runledger");
    if exe.is_none() {
        println!("(skipped: build with --features web,cli for the runledger binary)");
    }
    exe
}

/// `runledger serve` on `location`, a child process killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(exe: &str, location: &str) -> Server {
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("RUNLEDGER_DB", location)
            .env_remove("RUNLEDGER_TOKEN")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Server { child, addr }
    }

    /// Resident and peak resident memory, in KiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a GET and reads the reply's head; the stream is left at the
/// body. Returns whether the body is chunked.
fn request(stream: &mut BufReader<TcpStream>, addr: &str, path: &str, close: bool) -> bool {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        stream.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: {connection}\r\n\r\n"
    )
    .unwrap();
    let mut status = String::new();
    stream.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{path}: {status}");
    let mut chunked = false;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            return chunked;
        }
        chunked |= line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
}

/// Opens `/api/events` on `addr` and reads it on a thread of its own,
/// which sends each event's run and the instant it arrived.
fn subscribe(addr: &str) -> mpsc::Receiver<(Option<i64>, Instant)> {
    let mut stream = BufReader::new(TcpStream::connect(addr).unwrap());
    // The reply's head comes once the server's watch is subscribed.
    assert!(
        request(&mut stream, addr, "/api/events", false),
        "not chunked"
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut pending = String::new();
        loop {
            // One chunk of the chunked body.
            let mut size = String::new();
            if stream.read_line(&mut size).unwrap_or(0) == 0 {
                return;
            }
            let size =
                usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            if size == 0 || stream.read_exact(&mut chunk).is_err() {
                return;
            }
            let arrived = Instant::now();
            pending.push_str(&String::from_utf8_lossy(&chunk[..size]));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                    let value: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
                    if tx.send((value["run"].as_i64(), arrived)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Waits for an event of run `id`: when it arrived.
fn arrival(rx: &mpsc::Receiver<(Option<i64>, Instant)>, id: i64) -> Instant {
    loop {
        let (run, at) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no event within 10 s");
        if run == Some(id) {
            return at;
        }
    }
}

fn show(what: &str, mut micros: Vec<u64>) {
    micros.sort_unstable();
    println!(
        "{what:<44} p50 {:>7} µs  p99 {:>7} µs  max {:>7} µs  (n={})",
        percentile(&micros, 0.5),
        percentile(&micros, 0.99),
        micros.last().copied().unwrap_or(0),
        micros.len()
    );
}

/// `commit to event` on `location`: a server, a stream, and commits from
/// this process.
fn commit_to_event_on(exe: &str, store: &str, location: &str) {
    let samples: usize = std::env::var("RUNLEDGER_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let ledger = Ledger::open(location).unwrap();
    let server = Server::start(exe, location);
    let rx = subscribe(&server.addr);
    let (mut to_event, mut commit) = (Vec::new(), Vec::new());
    for i in 0..samples + 10 {
        let start = Instant::now();
        let run = ledger.begin_run(RunSpec::new("latency")).unwrap();
        let committed = start.elapsed();
        let id = i64::from(run.id());
        let arrived = arrival(&rx, id);
        // The first ten warm up the connections and the server's pools.
        if i >= 10 {
            to_event.push(arrived.saturating_duration_since(start).as_micros() as u64);
            commit.push(committed.as_micros() as u64);
        }
        run.succeed().unwrap();
        arrival(&rx, id);
        // Commits spread over time, not back to back with the last read.
        std::thread::sleep(Duration::from_millis(5 + (i % 7) as u64));
    }
    show(
        &format!("{store}: commit to event on /api/events"),
        to_event,
    );
    show(&format!("{store}: begin_run alone (the commit)"), commit);
}

fn commit_to_event() {
    println!("commit to event: runledger serve as a child, this process commits");
    let Some(exe) = runledger_exe() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("latency.db");
    commit_to_event_on(exe, "sqlite", db.to_str().unwrap());
    #[cfg(feature = "postgres")]
    if let Some(url) = std::env::var("RUNLEDGER_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        let schema = format!("bench_web_{}", std::process::id());
        commit_to_event_on(exe, "postgres", &format!("{url}#{schema}"));
        let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let _ = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    }
}

/// `idle memory`: `runledger serve` just started, then idle with ten open
/// pages.
fn idle_memory() {
    println!("idle memory: runledger serve on SQLite, VmRSS (VmHWM the peak)");
    let Some(exe) = runledger_exe() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("memory.db");
    let ledger = Ledger::open(&db).unwrap();
    for _ in 0..20 {
        ledger
            .begin_run(RunSpec::new("job").source("cron"))
            .unwrap()
            .succeed()
            .unwrap();
    }
    let server = Server::start(exe, db.to_str().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let (rss, hwm) = server.memory();
    println!("{:<44} {rss:>7} KiB  (peak {hwm} KiB)", "just started");
    let mut pages = Vec::new();
    for _ in 0..10 {
        // The page, then its stream, as a browser loads it.
        let mut page = BufReader::new(TcpStream::connect(&server.addr).unwrap());
        request(&mut page, &server.addr, "/", true);
        page.read_to_end(&mut Vec::new()).unwrap();
        let mut feed = BufReader::new(TcpStream::connect(&server.addr).unwrap());
        request(&mut feed, &server.addr, "/api/events", false);
        pages.push(feed);
    }
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = server.memory();
    println!(
        "{:<44} {rss:>7} KiB  (peak {hwm} KiB)",
        "idle, ten pages loaded and their streams open"
    );
    drop(pages);
}
