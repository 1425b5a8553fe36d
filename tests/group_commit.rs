//! Group commit through the public API: many threads of one process write at
//! once, some with bad input, and each call gets its own answer, only once
//! its write committed; a process killed in the middle of groups loses only
//! writes whose calls had not returned.
//!
//! The mechanism itself (savepoint isolation, the answer after the commit, a
//! failed commit, a panicking write) is pinned by the unit tests of
//! `src/store/group.rs`, which can hold a group open.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{KillOnDrop, spawn_worker};
use runledger::{Error, Ledger, RunFilter, RunId, RunSpec, RunStatus};

/// What one thread saw: its good runs (with the status each ended in) and
/// how many bad calls were refused as they should be.
#[derive(Default)]
struct Seen {
    runs: Vec<(RunId, RunStatus)>,
    refused: usize,
}

/// One thread's work: good runs with steps, and after each a handful of
/// calls that must fail, each with its own error, checked as soon as every
/// call returns.
fn hammer(ledger: &Ledger, thread: usize, rounds: usize) -> Seen {
    let mut seen = Seen::default();
    let unknown = RunId::from(i64::MAX - thread as i64);
    for round in 0..rounds {
        let key = format!("key-{thread}");
        let run = ledger
            .begin_run(
                RunSpec::new("hammer")
                    .idempotency_key(&key)
                    .metadata(serde_json::json!({ "thread": thread, "round": round })),
            )
            .unwrap();
        let id = run.id();
        // Visible to every reader as soon as the call returned.
        assert_eq!(ledger.run(id).unwrap().status, RunStatus::Running);

        // An active run already holds the key.
        match ledger.begin_run(RunSpec::new("hammer").idempotency_key(&key)) {
            Err(Error::Duplicate { existing, .. }) => assert_eq!(existing, id),
            other => panic!("thread {thread}: expected a duplicate, got {other:?}"),
        }
        // Metadata over the limit.
        let big = "x".repeat(2048);
        match ledger.begin_run(RunSpec::new("hammer").metadata(serde_json::json!({ "big": big }))) {
            Err(e) => assert!(e.is_invalid_input(), "{e:?}"),
            Ok(run) => panic!("thread {thread}: oversized metadata began run {}", run.id()),
        }
        // An unknown run.
        match ledger.cancel(unknown) {
            Err(Error::NotFound { id, .. }) => assert_eq!(id, unknown.to_string()),
            other => panic!("thread {thread}: expected not found, got {other:?}"),
        }

        let step = run.step("work").unwrap();
        // A step name the run already used.
        let again = run.step("work").unwrap_err();
        assert!(again.is_invalid_input(), "{again:?}");
        step.succeed().unwrap();
        assert_eq!(ledger.run(id).unwrap().progress.succeeded, 1);

        // A transition from a terminal state: a queued run cancelled, then
        // started.
        let queued = ledger.begin_run(RunSpec::new("hammer").queued()).unwrap();
        assert_eq!(ledger.cancel(queued.id()).unwrap(), RunStatus::Cancelled);
        match queued.start() {
            Err(Error::InvalidTransition { run, from, to }) => {
                assert_eq!(
                    (run, from, to),
                    (queued.id(), RunStatus::Cancelled, RunStatus::Running)
                );
            }
            other => panic!("thread {thread}: expected an invalid transition, got {other:?}"),
        }
        drop(queued); // already terminal: nothing to write
        seen.refused += 5;

        let status = if round % 3 == 2 {
            run.fail("failed on purpose").unwrap()
        } else {
            run.succeed().unwrap()
        };
        assert_eq!(ledger.run(id).unwrap().status, status);
        seen.runs.push((id, status));
    }
    seen
}

/// Runs `hammer` on `threads` threads at once, each with the ledger `pick`
/// gives it, and checks the ledger against what they saw.
fn many_threads(threads: usize, rounds: usize, pick: impl Fn(usize) -> Ledger) {
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (ledger, barrier) = (pick(t), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                hammer(&ledger, t, rounds)
            })
        })
        .collect();
    let seen: Vec<Seen> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let ledger = pick(0);
    let all = ledger.runs(RunFilter::default().limit(1_000_000)).unwrap();
    let by_id: HashMap<RunId, RunStatus> = all.iter().map(|r| (r.id, r.status)).collect();
    for (id, status) in seen.iter().flat_map(|s| &s.runs) {
        assert_eq!(by_id.get(id), Some(status), "run {id}");
    }
    assert_eq!(
        seen.iter().map(|s| s.refused).sum::<usize>(),
        threads * rounds * 5
    );
    // Nothing else was written: one hammer run and one cancelled queued
    // run per round, nothing left active, no step but the good ones.
    assert_eq!(all.len(), threads * rounds * 2);
    assert!(all.iter().all(|r| !r.status.is_active()));
    let cancelled = all
        .iter()
        .filter(|r| r.status == RunStatus::Cancelled)
        .count();
    assert_eq!(cancelled, threads * rounds);
    assert!(
        all.iter()
            .filter(|r| r.status != RunStatus::Cancelled)
            .all(|r| r.progress.total == 1 && r.progress.succeeded == 1)
    );
}

fn builder(path: &std::path::Path) -> runledger::Builder {
    Ledger::builder(path)
        .max_metadata_bytes(1024)
        .background(false)
}

#[test]
fn many_threads_sharing_a_ledger_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = builder(&dir.path().join("ledger.db")).open().unwrap();
    many_threads(16, 20, |_| ledger.clone());
}

#[test]
fn threads_with_a_ledger_each_share_transactions_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledgers: Vec<Ledger> = (0..8).map(|_| builder(&path).open().unwrap()).collect();
    many_threads(8, 20, |t| ledgers[t].clone());
}

#[test]
fn grouping_off_gives_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = builder(&dir.path().join("ledger.db"))
        .group_commit(false)
        .open()
        .unwrap();
    many_threads(8, 10, |_| ledger.clone());
}

/// Kills a process whose threads write at once, several times, mid-stream:
/// every run whose call returned (the process printed it, line by line,
/// after the call) is in the ledger with the status the call reported.
#[test]
fn a_process_killed_mid_group_loses_only_unanswered_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::open(&db).unwrap());
    let mut reported: HashMap<RunId, RunStatus> = HashMap::new();
    let mut lines_seen = 0;
    for round in 0..4 {
        let mut child = KillOnDrop(spawn_worker(&db, &["writers", "--threads", "12"]));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.clone()).is_err() {
                    break;
                }
            }
        });
        // Let it write for a while (a varying number of lines per round),
        // then kill it in the middle of whatever it was doing.
        let target = 300 + round * 250;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = Vec::new();
        while lines.len() < target {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => lines.push(line),
                Err(_) => assert!(Instant::now() < deadline, "worker stalled: {lines:?}"),
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        lines_seen += lines.len();
        for line in lines {
            let (word, id) = line.split_once(' ').expect("a word and a run id");
            let id: RunId = id.parse().unwrap();
            let status = match word {
                "begun" => RunStatus::Running,
                "succeeded" => RunStatus::Succeeded,
                "failed" => RunStatus::Failed,
                other => panic!("unexpected line {other:?}: {line:?}"),
            };
            // A run's later report wins over its "begun".
            if status != RunStatus::Running || !reported.contains_key(&id) {
                reported.insert(id, status);
            }
        }
    }
    // Read the file as the killed processes left it: no reaping.
    let ledger = Ledger::builder(&db)
        .reap_on_open(false)
        .background(false)
        .open()
        .unwrap();
    let mut ended = 0;
    for (id, status) in &reported {
        let record = ledger
            .run(*id)
            .unwrap_or_else(|e| panic!("run {id} was reported but is missing: {e}"));
        if *status == RunStatus::Running {
            // A begun run may have ended later, its report cut off by the
            // kill, or still be running.
            assert!(
                matches!(
                    record.status,
                    RunStatus::Running | RunStatus::Succeeded | RunStatus::Failed
                ),
                "run {id}: {record:?}"
            );
        } else {
            assert_eq!(record.status, *status, "run {id}");
            assert_eq!(record.progress.succeeded, 1, "run {id}");
            ended += 1;
        }
    }
    assert!(ended > 100, "too few ended runs to prove anything: {ended}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    println!(
        "killed 4 writers: {lines_seen} lines, {} runs reported, {ended} ended",
        reported.len()
    );
}

/// Review: two ledgers of one file in one process share group commit, each
/// with its own busy timeout. While another process holds SQLite's write
/// lock for 1.5 s, a lock request of the ledger with a 10 s busy timeout
/// leads a group that also carries a run write of the ledger with a 700 ms
/// timeout: the request must wait and be granted, but it gets
/// `database is locked` when the other ledger's timeout runs out.
#[test]
fn a_lock_request_waits_its_own_busy_timeout_beside_a_hastier_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let open = |timeout| {
        Ledger::builder(&path)
            .busy_timeout(timeout)
            .background(false)
            .open()
            .unwrap()
    };
    let quick = open(Duration::from_millis(300));
    let hasty = open(Duration::from_millis(700));
    let patient = open(Duration::from_secs(10));
    let hasty_run = hasty.begin_run(RunSpec::new("hasty")).unwrap();
    // Another process's writer.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let first = std::thread::spawn(move || quick.begin_run(RunSpec::new("quick")).map(|r| r.id()));
    std::thread::sleep(Duration::from_millis(60));
    let lock = std::thread::spawn(move || {
        let result = patient.try_lock("k").map(|g| g.token());
        (result, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(60));
    let shared = std::thread::spawn(move || hasty_run.succeed());
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed()));
    other.execute_batch("COMMIT").unwrap();
    assert!(first.join().unwrap().unwrap_err().is_busy());
    let _ = shared.join().unwrap(); // its own 700 ms ran out: fair
    let (result, after) = lock.join().unwrap();
    assert!(
        result.is_ok(),
        "a lock request with a 10 s busy timeout failed after {after:?} \
         (the database was free again after 1.5 s): {result:?}"
    );
}
