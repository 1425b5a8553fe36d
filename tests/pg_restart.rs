//! A restart of the PostgreSQL server under running workers (issue 20): no
//! caller sees it. Workers in processes of their own, which treat any error
//! as fatal, take turns on one key through runs (holding it, waiting for it
//! in the queue) while the server restarts under them.
//!
//! It restarts the machine's shared server, so the suite leaves it out
//! (`#[ignore]`) and `.ci/run` runs it alone, after the suite:
//! `cargo test --all-features --test pg_restart -- --ignored`.
//! `RUNLEDGER_RESTARTS=N` restarts the server N times (1 by default).
#![cfg(feature = "postgres")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Place, Store, check_witness, finish, spawn_worker};
use runledger::{RunFilter, RunStatus};

fn restart_server() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("the server's configuration in /etc/postgresql")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a PostgreSQL version");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .expect("pg_ctlcluster runs");
    assert!(status.success(), "the server did not restart");
}

#[test]
#[ignore = "restarts the machine's PostgreSQL server: .ci/run runs it alone, after the suite"]
fn a_server_restart_reaches_no_caller() {
    let restarts: u32 = std::env::var("RUNLEDGER_RESTARTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let place = Place::new(Store::Postgres);
    let dir = place.dir.path();
    let (counter, witness) = (dir.join("counter"), dir.join("witness"));
    std::fs::write(&counter, "0\n").unwrap();
    let turns = 30 * (restarts as usize + 1);
    let times = turns.to_string();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            spawn_worker(
                &place.location,
                &[
                    "critical",
                    "k",
                    "--times",
                    &times,
                    "--threads",
                    "2",
                    "--run",
                    "through-restart",
                    "--witness",
                    witness.to_str().unwrap(),
                    "--counter",
                    counter.to_str().unwrap(),
                    "--flock-witness",
                    dir.join("flock").to_str().unwrap(),
                ],
            )
        })
        .collect();
    let count = || -> usize {
        std::fs::read_to_string(&counter)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0)
    };
    for round in 1..=restarts as usize {
        // Restart in the middle of the work: holders hold, waiters wait.
        let deadline = Instant::now() + Duration::from_secs(120);
        while count() < round * 6 * turns / (restarts as usize + 1) / 2 {
            assert!(Instant::now() < deadline, "the workers made no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        restart_server();
    }
    for worker in workers {
        assert_eq!(finish(worker), ["done"], "a worker saw the restart");
    }
    let total = 6 * turns;
    assert_eq!(count(), total);
    assert_eq!(check_witness(&witness), total);
    let ledger = place.open();
    let runs = ledger
        .runs(RunFilter::default().name("through-restart").limit(100_000))
        .unwrap();
    assert_eq!(runs.len(), total, "a run was lost or made twice");
    assert!(runs.iter().all(|r| r.status == RunStatus::Succeeded));
    assert!(ledger.locks().unwrap().is_empty());
}
