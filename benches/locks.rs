//! Lock benchmarks, each beside its baseline, measured in the same run:
//!
//! - `lock/…` (criterion): an uncontended acquire + release of one key, against
//!   a bare rusqlite pair of immediate transactions (insert a row, delete it;
//!   WAL, synchronous=NORMAL) at SQLite's default page size and at the ledger's,
//!   and against an fs4 lock/unlock pair on an open file;
//! - `handoff`: one process releases a key, a waiting process acquires it
//!   (p50/p99/max), and the CPU an idle waiter costs;
//! - `contention`: 8 and 32 processes looping acquire/release on 4 keys,
//!   with the ledger and with a bare SQLite row lock relying on
//!   `busy_timeout` alone: grants/s and acquire latency (p50/p99/max);
//! - with the `tokio` feature, `lock/lock_async_release` (an uncontended
//!   `lock_async` + release on a current-thread runtime) and
//!   `lock/spawn_blocking_try_lock_release` beside the sync pair;
//!   `in_process`: a key handed between two tasks of one runtime and
//!   between two threads of one ledger (p50/p99/max); `blocking`: how long
//!   one uncontended `lock_async` + release holds the runtime's thread
//!   while 8 processes write the same file.
//!
//! ```text
//! cargo bench --bench locks --features tokio   # everything (about three minutes)
//! cargo bench --bench locks -- lock/           # one part: lock/, handoff, contention,
//!                                              # in_process, blocking
//! ```
//!
//! The process experiments spawn the `worker` example, built here in release.

// criterion's group macros are not used: main picks the parts to run.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;

mod common;
use common::{percentile, wanted_parts, worker};
use runledger::Ledger;
use rusqlite::Connection;

fn bare_connection(path: &Path, page_size: u32) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "page_size", page_size).unwrap();
    conn.pragma_update_and_check(None, "journal_mode", "wal", |_| Ok(()))
        .unwrap();
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS bare_locks (key TEXT PRIMARY KEY);",
    )
    .unwrap();
    conn
}

fn bare_pair(conn: &Connection) {
    conn.prepare_cached("BEGIN IMMEDIATE")
        .unwrap()
        .execute([])
        .unwrap();
    conn.prepare_cached("INSERT INTO bare_locks (key) VALUES ('build:symbol=AAPL')")
        .unwrap()
        .execute([])
        .unwrap();
    conn.prepare_cached("COMMIT").unwrap().execute([]).unwrap();
    conn.prepare_cached("BEGIN IMMEDIATE")
        .unwrap()
        .execute([])
        .unwrap();
    conn.prepare_cached("DELETE FROM bare_locks WHERE key = 'build:symbol=AAPL'")
        .unwrap()
        .execute([])
        .unwrap();
    conn.prepare_cached("COMMIT").unwrap().execute([]).unwrap();
}

fn uncontended(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("lock");
    group.measurement_time(Duration::from_secs(8));
    for page_size in [4096, 1024] {
        let conn = bare_connection(&dir.path().join(format!("bare{page_size}.db")), page_size);
        group.bench_function(format!("bare_sqlite_insert_delete_page{page_size}"), |b| {
            b.iter(|| bare_pair(&conn))
        });
    }
    let file = std::fs::File::create(dir.path().join("fs4.lock")).unwrap();
    group.bench_function("fs4_lock_unlock", |b| {
        b.iter(|| {
            fs4::FileExt::lock(&file).unwrap();
            fs4::FileExt::unlock(&file).unwrap();
        })
    });
    let ledger = Ledger::open(dir.path().join("ledger.db")).unwrap();
    group.bench_function("try_lock_release", |b| {
        b.iter(|| {
            let guard = ledger.try_lock("build:symbol=AAPL").unwrap();
            black_box(guard.token());
            guard.release().unwrap();
        })
    });
    #[cfg(feature = "tokio")]
    {
        let rt = current_thread();
        group.bench_function("lock_async_release", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let guard = ledger.lock_async("build:symbol=AAPL").await.unwrap();
                    black_box(guard.token());
                    guard.release().unwrap();
                })
            })
        });
        // The alternative to short synchronous writes on the runtime thread:
        // every call handed to tokio's blocking pool.
        group.bench_function("spawn_blocking_try_lock_release", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let theirs = ledger.clone();
                    let guard =
                        tokio::task::spawn_blocking(move || theirs.try_lock("build:symbol=AAPL"))
                            .await
                            .unwrap()
                            .unwrap();
                    black_box(guard.token());
                    tokio::task::spawn_blocking(move || guard.release())
                        .await
                        .unwrap()
                        .unwrap();
                })
            })
        });
    }
    group.finish();
}

#[cfg(feature = "tokio")]
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The hand-offs in a log of `(ns, acquired?, who)`: from one holder's
/// release to the other's grant, in µs.
fn handoffs(mut events: Vec<(u128, bool, usize)>) -> Vec<u64> {
    events.sort();
    events
        .windows(2)
        .filter(|w| !w[0].1 && w[1].1 && w[0].2 != w[1].2)
        .map(|w| ((w[1].0 - w[0].0) / 1000) as u64)
        .collect()
}

fn now_ns(epoch: Instant) -> u128 {
    epoch.elapsed().as_nanos()
}

/// A key handed back and forth between two threads sharing one ledger,
/// and (with `tokio`) between two tasks of one current-thread runtime.
fn in_process() {
    const TIMES: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path().join("ledger.db")).unwrap();
    let epoch = Instant::now();
    // With the default gate phase (the kernel picks among those waiting
    // less than `queue_after`), and strictly first come, first served.
    let fifo = Ledger::builder(dir.path().join("ledger.db"))
        .queue_after(Duration::ZERO)
        .open()
        .unwrap();
    for (what, ledger) in [("gates", &ledger), ("queue only", &fifo)] {
        let log = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for who in 0..2 {
                let log = &log;
                s.spawn(move || {
                    let mut mine = Vec::with_capacity(2 * TIMES);
                    for _ in 0..TIMES {
                        let guard = ledger.lock("ball").unwrap();
                        mine.push((now_ns(epoch), true, who));
                        std::thread::sleep(Duration::from_micros(300));
                        guard.release().unwrap();
                        mine.push((now_ns(epoch), false, who));
                    }
                    log.lock().unwrap().extend(mine);
                });
            }
        });
        println!(
            "handoff between two threads of one ledger ({what}): {}",
            summary(handoffs(log.into_inner().unwrap()))
        );
    }
    #[cfg(feature = "tokio")]
    {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        current_thread().block_on(async {
            let tasks: Vec<_> = (0..2)
                .map(|who| {
                    let (ledger, log) = (ledger.clone(), log.clone());
                    tokio::spawn(async move {
                        let mut mine = Vec::with_capacity(2 * TIMES);
                        for _ in 0..TIMES {
                            let guard = ledger.lock_async("ball").await.unwrap();
                            mine.push((now_ns(epoch), true, who));
                            // tokio's timer has 1 ms steps.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            guard.release().unwrap();
                            mine.push((now_ns(epoch), false, who));
                        }
                        log.lock().unwrap().extend(mine);
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        let events = std::mem::take(&mut *log.lock().unwrap());
        println!(
            "handoff between two tasks of one runtime: {}",
            summary(handoffs(events))
        );
    }
}

/// How long one `lock_async` + release of a free key holds the runtime's
/// thread while 8 processes loop acquire/release on other keys of the same
/// file: the cost of keeping the short writes synchronous.
#[cfg(feature = "tokio")]
fn blocking(worker: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("load.db");
    let ledger = Ledger::open(&db).unwrap();
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(worker)
                .arg(&db)
                .args(["load", "--keys", "4", "--ops", "3000", "--impl", "ledger"])
                .arg("--out")
                .arg(dir.path().join(format!("lat{i}")))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let rt = current_thread();
    let mut calls = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let call = Instant::now();
        rt.block_on(async {
            let guard = ledger.lock_async("mine").await.unwrap();
            guard.release().unwrap();
        });
        calls.push(call.elapsed().as_micros() as u64);
    }
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!(
        "lock_async + release on the runtime thread, 8 writing processes: {}",
        summary(calls)
    );
}

fn summary(mut values: Vec<u64>) -> String {
    values.sort_unstable();
    format!(
        "p50 {:>6} µs  p99 {:>7} µs  max {:>7} µs  (n={})",
        percentile(&values, 0.5),
        percentile(&values, 0.99),
        values[values.len() - 1],
        values.len()
    )
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn handoff(worker: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let ledger = Ledger::open(&db).unwrap();

    // Two processes hand one key back and forth.
    let spawn = || {
        Command::new(worker)
            .arg(&db)
            .args(["pingpong", "ball", "--times", "1000", "--hold-us", "300"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let mut events: Vec<(u128, bool, usize)> = Vec::new(); // (ns, acquired?, process)
    for (i, child) in [a, b].into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let (what, ns) = line.split_once(' ').unwrap();
            events.push((ns.parse().unwrap(), what == "acquired", i));
        }
    }
    println!(
        "handoff between two processes: {}",
        summary(handoffs(events))
    );

    // An idle waiter's CPU.
    let held = ledger.lock("idle").unwrap();
    let waiter = Command::new(worker)
        .arg(&db)
        .args(["hold", "idle", "--wait-ms", "60000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (before, started) = (cpu_ticks(waiter.id()), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let ticks = cpu_ticks(waiter.id()) - before;
    let percent = ticks as f64 / 100.0 / started.elapsed().as_secs_f64() * 100.0;
    println!("idle waiter: {percent:.2}% of a core ({ticks} ticks of 10 ms in 5 s)");
    held.release().unwrap();
    waiter.wait_with_output().unwrap();
}

fn contention(worker: &Path) {
    const OPS: u64 = 2000;
    for processes in [8, 32] {
        for implementation in ["bare", "ledger"] {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("load.db");
            if implementation == "bare" {
                drop(bare_connection(&db, 4096));
            } else {
                drop(Ledger::open(&db).unwrap());
            }
            let started = Instant::now();
            let children: Vec<_> = (0..processes)
                .map(|i| {
                    let out = dir.path().join(format!("lat{i}"));
                    let child = Command::new(worker)
                        .arg(&db)
                        .args([
                            "load",
                            "--keys",
                            "4",
                            "--ops",
                            &OPS.to_string(),
                            "--impl",
                            implementation,
                        ])
                        .arg("--out")
                        .arg(&out)
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap();
                    (child, out)
                })
                .collect();
            let mut latencies = Vec::new();
            for (mut child, out) in children {
                assert!(
                    child.wait().unwrap().success(),
                    "a {implementation} worker failed"
                );
                let text = std::fs::read_to_string(out).unwrap();
                latencies.extend(text.lines().map(|l| l.parse::<u64>().unwrap()));
            }
            let elapsed = started.elapsed().as_secs_f64();
            let grants = processes as f64 * OPS as f64 / elapsed;
            println!(
                "contention {processes:>2} processes, {implementation:<6}: {grants:>7.0} grants/s  {}",
                summary(latencies)
            );
        }
    }
}

fn main() {
    let wants = wanted_parts();
    if wants("lock/") {
        let mut c = Criterion::default().configure_from_args();
        uncontended(&mut c);
        c.final_summary();
    }
    if wants("in_process") {
        in_process();
    }
    if wants("handoff") || wants("contention") || wants("blocking") {
        let worker = worker();
        if wants("handoff") {
            handoff(&worker);
        }
        if wants("contention") {
            contention(&worker);
        }
        #[cfg(feature = "tokio")]
        if wants("blocking") {
            blocking(&worker);
        }
    }
}
