//! The cost of one run: `begin_run` + `succeed`, single thread,
//! `synchronous=NORMAL`, against a bare rusqlite baseline measured in the same
//! process on a fresh file with the same settings: one immediate transaction
//! inserting a row, one updating it.
//!
//! The baseline runs twice: with SQLite's default 4 KiB pages (the issue's
//! baseline), and with the 1 KiB pages a ledger file uses, which make every
//! write cheaper (a transaction writes each page it touches whole to the WAL).
//!
//! ```text
//! cargo bench --bench runs
//! ```

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use runledger::{Ledger, RunSpec};
use rusqlite::{Connection, TransactionBehavior};

fn bare_connection(path: &std::path::Path, page_size: u32) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "page_size", page_size).unwrap();
    conn.pragma_update_and_check(None, "journal_mode", "wal", |_| Ok(()))
        .unwrap();
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL,
                            created_at INTEGER NOT NULL, finished_at INTEGER);",
    )
    .unwrap();
    conn
}

fn bare_pair(conn: &mut Connection, now: i64) {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.prepare_cached(
        "INSERT INTO runs (name, status, created_at) VALUES ('build', 'running', ?1)",
    )
    .unwrap()
    .execute([now])
    .unwrap();
    let id = tx.last_insert_rowid();
    tx.commit().unwrap();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.prepare_cached("UPDATE runs SET status = 'succeeded', finished_at = ?2 WHERE id = ?1")
        .unwrap()
        .execute([id, now])
        .unwrap();
    tx.commit().unwrap();
}

fn begin_succeed(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("run");
    group.measurement_time(Duration::from_secs(8));

    for page_size in [4096, 1024] {
        let mut conn = bare_connection(&dir.path().join(format!("bare{page_size}.db")), page_size);
        group.bench_function(format!("bare_sqlite_insert_update_page{page_size}"), |b| {
            b.iter(|| bare_pair(&mut conn, black_box(1_763_799_302_118)))
        });
    }

    let ledger = Ledger::open(dir.path().join("ledger.db")).unwrap();
    group.bench_function("begin_run_succeed", |b| {
        b.iter(|| {
            let run = ledger.begin_run(RunSpec::new("build")).unwrap();
            black_box(run.succeed().unwrap())
        })
    });

    let with_metadata = RunSpec::new("build")
        .source("terminal")
        .metadata(serde_json::json!({"symbol": "AAPL", "lake": "raw", "attempt": 1}));
    group.bench_function("begin_run_succeed_with_metadata", |b| {
        b.iter(|| {
            let run = ledger.begin_run(with_metadata.clone()).unwrap();
            black_box(run.succeed().unwrap())
        })
    });

    let run = ledger.begin_run(RunSpec::new("poll")).unwrap();
    group.bench_function("is_cancel_requested", |b| {
        b.iter(|| black_box(run.is_cancel_requested().unwrap()))
    });
    group.finish();
    run.succeed().unwrap();
}

criterion_group!(benches, begin_succeed);
criterion_main!(benches);
