//! The event feed:
//!
//! - `feed/…` (criterion): `events_since` reading the 100 newest events of a
//!   ledger holding 1,000 and 1,000,000 events (its cost must not depend on
//!   the history: a range of the primary key);
//! - `feed/begin_succeed_…` (criterion): `begin_run` + `succeed` with no
//!   watcher and with one (what a watch costs writers);
//! - `watch`: the time from a commit in this process to its arrival through
//!   `Ledger::watch` in another process (p50/p99/max), events sent 2 ms
//!   apart.
//!
//! ```text
//! cargo bench --bench events            # everything
//! cargo bench --bench events -- feed/   # one part: feed/, watch
//! ```
//!
//! The watch experiment spawns the `worker` example, built here in release.

// criterion's group macros are not used: main picks the parts to run.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::Criterion;

mod common;
use common::{percentile, wanted_parts, worker};
use runledger::{EventCursor, Ledger, RunSpec};

/// A ledger whose history holds `events` events (one run, status events
/// written straight into the table: building a million through the API
/// would take minutes).
fn ledger_with_events(dir: &Path, events: u64) -> Ledger {
    let db = dir.join(format!("feed{events}.db"));
    let ledger = Ledger::open(&db).unwrap();
    let run = ledger.begin_run(RunSpec::new("history")).unwrap();
    let id = i64::from(run.id());
    run.succeed().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?2)
         INSERT INTO events (run_id, at, kind, from_status, to_status)
         SELECT ?1, x, 'status', 'running', 'succeeded' FROM n",
        (id, events as i64),
    )
    .unwrap();
    ledger
}

fn feed(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("feed");
    for events in [1_000, 1_000_000] {
        let ledger = ledger_with_events(dir.path(), events);
        let end = ledger.events_cursor().unwrap();
        let cursor = EventCursor::after(i64::from(end) - 100);
        assert_eq!(ledger.events_since(cursor, 1000).unwrap().events.len(), 100);
        group.bench_function(format!("events_since_100_new_of_{events}"), |b| {
            b.iter(|| black_box(ledger.events_since(cursor, 1000).unwrap()))
        });
    }
    for watchers in [0, 1] {
        let ledger = Ledger::open(dir.path().join(format!("writes{watchers}.db"))).unwrap();
        let _watch = (watchers == 1).then(|| ledger.watch(EventCursor::START).unwrap());
        group.bench_function(format!("begin_succeed_{watchers}_watchers"), |b| {
            b.iter(|| {
                let run = ledger.begin_run(RunSpec::new("build")).unwrap();
                black_box(run.succeed().unwrap());
            })
        });
    }
    group.finish();
}

fn watch(worker: &Path) {
    const EVENTS: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("watch.db");
    let ledger = Ledger::open(&db).unwrap();
    let mut child = Command::new(worker)
        .arg(&db)
        .args(["watch-latency", "--count", &EVENTS.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "watching");
    let run = ledger.begin_run(RunSpec::new("emitter")).unwrap();
    for i in 0..EVENTS {
        let sent = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        run.event("tick", serde_json::json!({"i": i, "sent_ns": sent}))
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    run.succeed().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let mut micros: Vec<u64> = rest
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().parse::<u64>().unwrap() / 1000)
        .collect();
    assert_eq!(micros.len() as u64, EVENTS);
    micros.sort_unstable();
    println!(
        "commit to watch in another process: p50 {} µs  p99 {} µs  max {} µs  (n={})",
        percentile(&micros, 0.5),
        percentile(&micros, 0.99),
        micros[micros.len() - 1],
        micros.len()
    );
}

fn main() {
    let wants = wanted_parts();
    if wants("feed/") {
        let mut c = Criterion::default().configure_from_args();
        feed(&mut c);
        c.final_summary();
    }
    if wants("watch") {
        watch(&worker());
    }
}
