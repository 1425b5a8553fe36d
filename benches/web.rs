//! The dashboard's runs page and `/api/runs` over a long history (issue
//! 18: goal p50 ≤ 20 ms of server time with a million runs, as for a
//! hundred), requests sent to the router in-process.
//!
//! `RUNLEDGER_BENCH_RUNS` sets the long history's size; it defaults to
//! 100 000 to stay quick to seed. The issue's figure is 1 000 000:
//!
//! ```text
//! RUNLEDGER_BENCH_RUNS=1000000 cargo bench --bench web --features web,cli
//! ```

#![allow(missing_docs)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt as _;
use runledger::{Ledger, RunSpec};
use tower::ServiceExt as _;

/// A SQLite ledger with `n` finished runs: one made by the library, the
/// rest copies of it in one transaction, with names `job-0` to `job-99`
/// and sources `cron`, `shell`, `ci`.
fn ledger_with(dir: &std::path::Path, n: u64) -> Ledger {
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
criterion_main!(benches);
