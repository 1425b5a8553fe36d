//! Group commit: `begin_run` + `succeed` from 1, 4 and 16 threads of one
//! process, with `synchronous=NORMAL` and `FULL`, grouping off (every write a
//! transaction of its own thread, the baseline) and on, interleaved in the
//! same run: total runs/s and the p50/p99 latency of one call (a
//! `begin_run` or a `succeed`). Each cell runs on a fresh file, several
//! times; the figures are the medians.
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
                (runs, latencies)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut runs = 0;
    let mut latencies = Vec::new();
    for worker in workers {
        let (n, l) = worker.join().unwrap();
        runs += n;
        latencies.extend(l);
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
    }
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
            "synchronous={:<6} {:>7} | {:>10} {:>9} {:>9} | {:>10} {:>9} {:>9} | {:>7}",
            name.to_uppercase(),
            "threads",
            "off runs/s",
            "p50 µs",
            "p99 µs",
            "on runs/s",
            "p50 µs",
            "p99 µs",
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
                )
            };
            let (off, on) = (summary(&cells[0]), summary(&cells[1]));
            if threads == 1 {
                single_off = Some(off.0);
                single_on = Some(on.0);
            }
            println!(
                "{:<19} {:>7} | {:>10.0} {:>9.0} {:>9.0} | {:>10.0} {:>9.0} {:>9.0} | {:>6.2}×",
                "",
                threads,
                off.0,
                off.1,
                off.2,
                on.0,
                on.1,
                on.2,
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
    }
}
