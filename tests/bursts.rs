//! Bursts of processes at one instant on one file, and a holder paused past
//! its lease: counts exact, integrity intact, no error surfaced, and a
//! paused holder learns that it lost its lock.

mod common;

use std::time::Duration;

use common::{KillOnDrop, finish, instant_in, next_line, spawn_worker};
use runledger::{Ledger, RunFilter};

fn integrity(db: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn thirty_two_processes_begin_and_finish_200_runs_each_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::open(&db).unwrap());
    let at = instant_in(1500);
    let children: Vec<_> = (0..32)
        .map(|_| spawn_worker(&db, &["burst-runs", "200", "--at", &at]))
        .collect();
    for child in children {
        let lines = finish(child); // exits 0: no error reached the worker
        assert_eq!(lines, ["done 200"]);
    }
    let ledger = Ledger::open(&db).unwrap();
    let runs = ledger.runs(RunFilter::default().limit(10_000)).unwrap();
    assert_eq!(runs.len(), 32 * 200);
    assert!(
        runs.iter()
            .all(|r| r.status == runledger::RunStatus::Succeeded)
    );
    assert_eq!(integrity(&db), "ok");
}

#[test]
fn sixty_four_processes_lock_and_release_four_keys_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::open(&db).unwrap());
    let children: Vec<_> = (0..64)
        .map(|i| {
            let out = dir.path().join(format!("lat{i}"));
            spawn_worker(
                &db,
                &[
                    "load",
                    "--keys",
                    "4",
                    "--ops",
                    "50",
                    "--impl",
                    "ledger",
                    "--out",
                    out.to_str().unwrap(),
                ],
            )
        })
        .collect();
    for child in children {
        finish(child);
    }
    let mut grants = 0;
    for i in 0..64 {
        let text = std::fs::read_to_string(dir.path().join(format!("lat{i}"))).unwrap();
        grants += text.lines().count();
    }
    assert_eq!(grants, 64 * 50);
    let ledger = Ledger::open(&db).unwrap();
    assert!(ledger.locks().unwrap().is_empty());
    assert_eq!(integrity(&db), "ok");
}

/// A holder judged by its lease (a host of its own), paused with SIGSTOP
/// past the lease: the reaper frees its lock, another process takes it with
/// a higher token, and once resumed the holder finds its lock lost.
#[test]
fn a_holder_paused_past_its_lease_finds_its_lock_lost() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    // The test's clock starts at the real time, as the worker's does, and
    // moves past the holder's lease without sleeping.
    let clock = runledger::ManualClock::default();
    // No keeper of its own: its reaper could take the lock back between the
    // clock's move and the reap below, which must be the one to report it.
    let ledger = Ledger::builder(&db)
        .clock(clock.clone())
        .background(false)
        .open()
        .unwrap();
    let mut holder = KillOnDrop(spawn_worker(
        &db,
        &[
            "hold",
            "paused",
            "--host",
            "far-away",
            "--stale-ms",
            "400",
            "--hold-ms",
            "1500",
            "--report",
        ],
    ));
    let line = next_line(&mut holder);
    let old: u64 = line.strip_prefix("held ").unwrap().parse().unwrap();
    let pid = holder.id();
    common::signal(pid, "-STOP");
    clock.advance(Duration::from_secs(30)); // far past its 400 ms lease
    let reports = ledger.reap().unwrap();
    assert!(
        reports[0]
            .reaped
            .iter()
            .any(|r| r.to_string().contains("heartbeat stale")),
        "{reports:?}"
    );
    let mine = ledger.try_lock("paused").unwrap();
    assert!(mine.token() > old);
    common::signal(pid, "-CONT");
    let mut text = String::new();
    std::io::Read::read_to_string(holder.stdout.as_mut().unwrap(), &mut text).unwrap();
    assert!(holder.wait().unwrap().success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "still held false", "{text}");
    assert!(lines[1].starts_with("lost "), "{text}");
    assert!(mine.is_held().unwrap());
}

/// Regression: under a steady stream of commits a passive checkpoint never
/// catches up (new frames arrive while it copies), so the write-ahead log
/// grew for as long as the writers kept going (22 MB after 64,000 grants by
/// 32 processes), and every commit past 4,000 frames paid a checkpoint of
/// its own. Past 4,000 frames the checkpoint now makes the log start over.
#[test]
fn a_steady_stream_of_writers_keeps_the_log_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let wal = dir.path().join("ledger.db-wal");
    let ledger = Ledger::open(&db).unwrap();
    // Each grant and release writes about six 1 KiB frames.
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                for _ in 0..2_500 {
                    ledger.lock(format!("k{i}")).unwrap().release().unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let size = std::fs::metadata(&wal).unwrap().len();
    // 10,000 grants wrote some 60 MB of frames; restarts keep the file at a
    // few times the 4,000-frame (4 MB) threshold.
    assert!(size < 16 << 20, "the log grew to {size} bytes");
    drop(ledger);
    assert_eq!(integrity(&db), "ok");
}
