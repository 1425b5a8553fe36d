//! Liveness benchmarks:
//!
//! - `reap/heartbeat_runs_N`: one heartbeat of an instance that owns 1 and
//!   10,000 running runs (one write either way);
//! - `reap/pass_1m_finished_*`: one `reap()` pass over a ledger holding
//!   1,000,000 finished runs, with 100 runs of a dead owner to close each
//!   time, and with none (the steady state).
//!
//! ```text
//! cargo bench --bench reap
//! cargo bench --bench reap -- heartbeat
//! ```

// criterion's group macros are not used: main picks the parts to run.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{BatchSize, Criterion};
use runledger::{Ledger, RunSpec};

fn ledger(path: &std::path::Path) -> Ledger {
    Ledger::builder(path).background(false).open().unwrap()
}

fn heartbeat(c: &mut Criterion) {
    let mut group = c.benchmark_group("reap");
    for runs in [1usize, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger(&dir.path().join("ledger.db"));
        let held: Vec<_> = (0..runs)
            .map(|i| ledger.begin_run(RunSpec::new(format!("run-{i}"))).unwrap())
            .collect();
        group.bench_function(format!("heartbeat_runs_{runs}"), |b| {
            b.iter(|| ledger.heartbeat().unwrap())
        });
        for run in held {
            run.succeed().unwrap();
        }
    }
    group.finish();
}

/// Fills the ledger with a million finished runs, in one transaction.
fn fill(path: &std::path::Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "BEGIN;
         WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1000000)
         INSERT INTO runs (name, source, status, instance_id, pid, host, created_at,
                           started_at, finished_at)
         SELECT 'history-' || (x % 100), 'bench', 'succeeded', 1, 1, 'bench-host',
                x, x, x + 1
         FROM n;
         COMMIT;",
    )
    .unwrap();
}

/// Adds an instance of another host whose heartbeat stopped long ago, with
/// 100 running runs: work for one dead-owners pass.
fn add_dead_owner(conn: &rusqlite::Connection) {
    conn.execute_batch(
        "BEGIN;
         INSERT INTO instances (host, pid, started_at, heartbeat_at)
             VALUES ('gone-host', 4242, 0, 0);
         WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 100)
         INSERT INTO runs (name, source, status, instance_id, pid, host, created_at, started_at)
         SELECT 'stale-' || x, 'bench', 'running', (SELECT max(id) FROM instances), 4242,
                'gone-host', 0, 0
         FROM n;
         COMMIT;",
    )
    .unwrap();
}

fn pass(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    drop(ledger(&path));
    fill(&path);
    let ledger = ledger(&path);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let mut group = c.benchmark_group("reap");
    group.sample_size(30);
    group.bench_function("pass_1m_finished_0_stale", |b| {
        b.iter(|| {
            let reports = ledger.reap().unwrap();
            assert!(reports.iter().all(|r| r.reaped.is_empty()));
        })
    });
    group.bench_function("pass_1m_finished_100_stale", |b| {
        b.iter_batched(
            || add_dead_owner(&conn),
            |()| {
                let reports = ledger.reap().unwrap();
                // 100 runs and the instance.
                assert_eq!(reports[0].reaped.len(), 101, "{:?}", reports[0]);
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    heartbeat(&mut c);
    pass(&mut c);
    c.final_summary();
}
