//! Group commit: `begin_run` + `succeed` from 1, 4 and 16 threads of one
//! process, with `synchronous=NORMAL` and `FULL`, grouping off (every write a
//! transaction of its own thread, the baseline) and on, interleaved in the
//! same run: total runs/s, the p50/p99 latency of one call (a `begin_run`
//! or a `succeed`), and the CPU time the calling threads used per run
//! (steadier than runs/s on a machine shared with other work). Each cell
//! runs on a fresh file, several times; the figures are the medians.
//!
//! Then the floor under any group commit on this machine: the statements
//! of `begin_run` and `succeed` (copied from the store) run from one
//! thread, 1, 8 or 16 writes per transaction, with no queue and no
//! wake-up (`RUNLEDGER_BENCH_NO_FLOOR` skips it). At 16 threads a group
//! holds at most 16 writes, so the 16-write ratio bounds what grouping can
//! reach at 16 threads, whatever its coordination costs.
//!
//! ```text
//! cargo bench --bench group
//! RUNLEDGER_BENCH_SECS=3 RUNLEDGER_BENCH_REPS=5 cargo bench --bench group
//! RUNLEDGER_BENCH_THREADS=16 RUNLEDGER_BENCH_GROUPING=on cargo bench --bench group -- full
//! ```
//!
//! `RUNLEDGER_BENCH_GROUPING=on` (or `off`) measures one side only, for a
//! profiler; the other side's columns then repeat it.

#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use runledger::{Ledger, RunSpec, Synchronous};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One measurement: runs/s, and call latencies p50/p99 in µs.
#[derive(Clone, Copy, Debug)]
struct Figures {
    runs_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU time the calling threads used per run, in µs (NaN where
    /// `/proc/thread-self/schedstat` cannot be read). Steadier than runs/s
    /// on a machine shared with other work.
    cpu_us_per_run: f64,
}

/// The CPU time this thread has used so far, in ns (Linux).
fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

fn measure(sync: Synchronous, group: bool, threads: usize, secs: f64) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::builder(dir.path().join("ledger.db"))
        .synchronous(sync)
        .group_commit(group)
        .background(false)
        .pool_size(threads as u32 + 2)
        .open()
        .unwrap();
    // Warm up: statements cached, pages in place.
    for _ in 0..50 {
        ledger
            .begin_run(RunSpec::new("warm"))
            .unwrap()
            .succeed()
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (ledger, stop, barrier) = (ledger.clone(), stop.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(100_000);
                let mut runs = 0u64;
                barrier.wait();
                let cpu_before = thread_cpu_ns();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let run = ledger.begin_run(RunSpec::new("bench")).unwrap();
                    let t2 = Instant::now();
                    run.succeed().unwrap();
                    let t3 = Instant::now();
                    latencies.push((t2 - t).as_nanos() as u64);
                    latencies.push((t3 - t2).as_nanos() as u64);
                    runs += 1;
                }
                let cpu = cpu_before
                    .zip(thread_cpu_ns())
                    .map(|(a, b)| b.saturating_sub(a));
                (runs, latencies, cpu)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut runs = 0;
    let mut latencies = Vec::new();
    let mut cpu_ns = Some(0u64);
    for worker in workers {
        let (n, l, cpu) = worker.join().unwrap();
        runs += n;
        latencies.extend(l);
        cpu_ns = cpu_ns.zip(cpu).map(|(a, b)| a + b);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1000.0
    };
    Figures {
        runs_per_sec: runs as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_us_per_run: cpu_ns.map_or(f64::NAN, |ns| ns as f64 / 1000.0 / runs.max(1) as f64),
    }
}

/// The statements `begin_run` runs in its transaction, copied from the
/// SQLite store (`src/store/sqlite/runs.rs`, `instances.rs`): the instance
/// is open, the run row, its first event, the run's event head.
const BEGIN_SQL: [&str; 4] = [
    "SELECT 1 FROM instances WHERE id = ?1 AND closed_at IS NULL",
    "INSERT INTO runs (name, source, status, parent_id, idempotency_key,
         instance_id, pid, host, metadata, log_path, created_at, started_at,
         heartbeat_timeout, hung_at, adopt_by)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
             CASE WHEN ?13 > 9223372036854775807 - max(?12, 0)
                  THEN 9223372036854775807 ELSE ?12 + ?13 END,
             CASE WHEN ?14 > 9223372036854775807 - max(?11, 0)
                  THEN 9223372036854775807 ELSE ?11 + ?14 END)",
    "INSERT INTO events (run_id, prev_id, at, kind, step, from_status, to_status, message)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    "UPDATE runs SET last_event_id = ?2 WHERE id = ?1",
];

/// The statements `succeed` runs in its transaction, copied the same way:
/// the run's state, its last event, the status change, its locks.
const SUCCEED_SQL: [&str; 3] = [
    "SELECT status, steps_total, steps_succeeded, steps_failed,
            cancel_requested_at IS NOT NULL, last_event_id
     FROM runs WHERE id = ?1",
    "UPDATE runs SET status = ?3, exit_code = ?4, error = ?5,
         started_at = coalesce(started_at, ?6), finished_at = ?7,
         steps_failed = steps_failed + ?8, last_event_id = ?9,
         hung_at = CASE WHEN ?3 <> 'running' THEN NULL
                        WHEN heartbeat_timeout > 9223372036854775807 - max(?10, 0)
                        THEN 9223372036854775807
                        ELSE ?10 + heartbeat_timeout END,
         adopt_by = CASE WHEN ?7 IS NULL THEN adopt_by END
     WHERE id = ?1 AND status = ?2",
    "SELECT id, token FROM locks WHERE run_id = ?1",
];

/// The floor under any group commit: the SQL of `begin_run` and `succeed`
/// from one thread, `writes` of them per transaction (half of them begin
/// runs, half end the runs the previous transaction began; each in a
/// savepoint unless alone, as in a group), on a ledger file of its own,
/// with no queue, no hand-off and no wake-up. Runs/s.
///
/// With 16 threads, each with one call in flight, a group holds at most 16
/// writes; `writes = 16` bounds what grouping could reach at 16 threads,
/// whatever its coordination costs.
fn floor(sync: Synchronous, writes: usize, secs: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledger = Ledger::builder(&path)
        .synchronous(sync)
        .background(false)
        .open()
        .unwrap();
    ledger
        .begin_run(RunSpec::new("warm"))
        .unwrap()
        .succeed()
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let sync_name = match sync {
        Synchronous::Full => "FULL",
        _ => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync_name}; PRAGMA foreign_keys = ON;"
    ))
    .unwrap();
    let instance: i64 = conn
        .query_row(
            "SELECT max(id) FROM instances WHERE closed_at IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let execute = |sql: &str, params: &[&dyn rusqlite::ToSql]| {
        conn.prepare_cached(sql).unwrap().execute(params).unwrap();
    };
    let begin = |at: i64| -> i64 {
        conn.prepare_cached(BEGIN_SQL[0])
            .unwrap()
            .query_row([instance], |_| Ok(()))
            .unwrap();
        let none: Option<i64> = None;
        let text: Option<&str> = None;
        execute(
            BEGIN_SQL[1],
            rusqlite::params![
                "bench", "", "running", none, text, instance, 1, "host", text, text, at, at, none,
                none
            ],
        );
        let run = conn.last_insert_rowid();
        execute(
            BEGIN_SQL[2],
            rusqlite::params![run, none, at, "status", text, text, "running", text],
        );
        execute(
            BEGIN_SQL[3],
            rusqlite::params![run, conn.last_insert_rowid()],
        );
        run
    };
    let succeed = |run: i64, at: i64| {
        let last: i64 = conn
            .prepare_cached(SUCCEED_SQL[0])
            .unwrap()
            .query_row([run], |r| r.get(5))
            .unwrap();
        let text: Option<&str> = None;
        execute(
            BEGIN_SQL[2],
            rusqlite::params![run, last, at, "status", text, "running", "succeeded", text],
        );
        execute(
            SUCCEED_SQL[1],
            rusqlite::params![
                run,
                "running",
                "succeeded",
                None::<i64>,
                text,
                None::<i64>,
                at,
                0,
                conn.last_insert_rowid(),
                at
            ],
        );
        let locks = conn
            .prepare_cached(SUCCEED_SQL[2])
            .unwrap()
            .query_map([run], |r| r.get::<_, i64>(0))
            .unwrap()
            .count();
        assert_eq!(locks, 0);
    };
    let mut begun: Vec<i64> = Vec::new();
    let mut runs = 0u64;
    let started = Instant::now();
    let mut at = 0;
    while started.elapsed().as_secs_f64() < secs {
        execute("BEGIN IMMEDIATE", &[]);
        let ending = std::mem::take(&mut begun);
        let beginning = if writes == 1 && !ending.is_empty() {
            0
        } else {
            writes - ending.len()
        };
        let each = |write: &dyn Fn()| {
            if writes > 1 {
                execute("SAVEPOINT runledger_write", &[]);
            }
            write();
            if writes > 1 {
                execute("RELEASE runledger_write", &[]);
            }
        };
        for &run in &ending {
            each(&|| succeed(run, at));
        }
        runs += ending.len() as u64;
        for _ in 0..beginning {
            let run = std::cell::Cell::new(0);
            each(&|| run.set(begin(at)));
            begun.push(run.get());
        }
        // The next transaction ends as many runs as it begins.
        begun.truncate((writes / 2).max(1));
        execute("COMMIT", &[]);
        at += 1;
    }
    drop(ledger);
    runs as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks the
    // synchronous setting ("normal" or "full").
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let secs = env_number("RUNLEDGER_BENCH_SECS", 2) as f64;
    let only = std::env::var("RUNLEDGER_BENCH_GROUPING").ok();
    let reps = env_number("RUNLEDGER_BENCH_REPS", 3).max(1) as usize;
    let thread_counts: Vec<usize> = std::env::var("RUNLEDGER_BENCH_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16]);
    println!(
        "group commit: begin_run + succeed, {secs} s per cell, median of {reps} (grouping off and on interleaved)"
    );
    for (name, sync) in [("normal", Synchronous::Normal), ("full", Synchronous::Full)] {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        println!();
        println!(
            "synchronous={:<6} {:>7} | {:>10} {:>9} {:>9} {:>9} | {:>10} {:>9} {:>9} {:>9} | {:>7}",
            name.to_uppercase(),
            "threads",
            "off runs/s",
            "p50 µs",
            "p99 µs",
            "CPU µs",
            "on runs/s",
            "p50 µs",
            "p99 µs",
            "CPU µs",
            "on/off"
        );
        let mut single_on = None;
        let mut single_off = None;
        for &threads in &thread_counts {
            let mut cells: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
            for rep in 0..reps {
                // Alternate which goes first, so that drift hits both.
                let order = if rep % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                };
                for group in order {
                    match only.as_deref() {
                        Some(side @ ("on" | "off")) => {
                            if (side == "on") == group {
                                let figures = measure(sync, group, threads, secs);
                                cells[0].push(figures);
                                cells[1].push(figures);
                            }
                        }
                        _ => cells[usize::from(group)].push(measure(sync, group, threads, secs)),
                    }
                }
            }
            let summary = |c: &[Figures]| {
                (
                    median(c.iter().map(|f| f.runs_per_sec).collect()),
                    median(c.iter().map(|f| f.p50_us).collect()),
                    median(c.iter().map(|f| f.p99_us).collect()),
                    median(c.iter().map(|f| f.cpu_us_per_run).collect()),
                )
            };
            let (off, on) = (summary(&cells[0]), summary(&cells[1]));
            if threads == 1 {
                single_off = Some(off.0);
                single_on = Some(on.0);
            }
            println!(
                "{:<19} {:>7} | {:>10.0} {:>9.0} {:>9.0} {:>9.1} | {:>10.0} {:>9.0} {:>9.0} {:>9.1} | {:>6.2}×",
                "",
                threads,
                off.0,
                off.1,
                off.2,
                off.3,
                on.0,
                on.1,
                on.2,
                on.3,
                on.0 / off.0
            );
            if threads > 1
                && let (Some(single_off), Some(single_on)) = (single_off, single_on)
            {
                println!(
                    "{:<19} {:>7} | {:>8.2}× of 1 thread off          | {:>8.2}× of 1 thread off ({:.2}× of 1 thread on)",
                    "",
                    "",
                    off.0 / single_off,
                    on.0 / single_off,
                    on.0 / single_on,
                );
            }
        }
        if std::env::var_os("RUNLEDGER_BENCH_NO_FLOOR").is_none() {
            // The same SQL from one thread, no coordination at all.
            let one = median((0..reps).map(|_| floor(sync, 1, secs)).collect());
            for writes in [8, 16] {
                let grouped = median((0..reps).map(|_| floor(sync, writes, secs)).collect());
                println!(
                    "{:<19} floor: the same SQL from one thread, {writes:>2} writes per transaction: {grouped:.0} runs/s, {:.2}× of 1 per transaction ({one:.0} runs/s)",
                    "",
                    grouped / one,
                );
            }
        }
    }
}
