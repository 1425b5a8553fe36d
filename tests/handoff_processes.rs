//! Runs handed from one real OS process to another (the `worker` example):
//! the creator exits or is killed with SIGKILL right after starting the
//! worker, or the worker is killed; and the event feed followed live from
//! another process.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{KillOnDrop, Place, Store, next_line, spawn_worker};
use runledger::{EventKind, Ledger, RunId, RunStatus};

/// A process that is not our child (the worker a dispatcher started),
/// killed with SIGKILL when dropped so that a failing test leaves nothing
/// running.
struct KillPidOnDrop(u32);

impl Drop for KillPidOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Starts `dispatch` with the worker's flags; returns the dispatcher, the
/// run and the worker's pid.
fn dispatch(db: &str, flags: &[&str]) -> (KillOnDrop, RunId, KillPidOnDrop) {
    let mut args = vec!["dispatch", "report"];
    args.extend_from_slice(flags);
    let mut dispatcher = KillOnDrop(spawn_worker(db, &args));
    // The worker writes to the same pipe: its lines may come first.
    let mut lines = BufReader::new(dispatcher.stdout.take().unwrap()).lines();
    let (mut run, mut pid) = (None, None);
    while run.is_none() || pid.is_none() {
        let line = lines.next().expect("the dispatcher speaks").unwrap();
        if let Some(id) = line.strip_prefix("created ") {
            run = Some(id.parse::<RunId>().unwrap());
        } else if let Some(p) = line.strip_prefix("spawned ") {
            pid = Some(p.parse::<u32>().unwrap());
        } else {
            assert!(line.starts_with("adopted "), "{line}");
        }
    }
    let (run, pid) = (run.unwrap(), pid.unwrap());
    (dispatcher, run, KillPidOnDrop(pid))
}

/// Waits until the run has ended.
fn ended(ledger: &Ledger, run: RunId) -> runledger::RunRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let record = ledger.run(run).unwrap();
        if record.status.is_terminal() {
            return record;
        }
        assert!(Instant::now() < deadline, "run never ended: {record:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn adopter(ledger: &Ledger, run: RunId) -> Option<u32> {
    ledger
        .events(run)
        .unwrap()
        .iter()
        .find_map(|e| match e.kind {
            EventKind::Adopted { pid, .. } => Some(pid),
            _ => None,
        })
}

fn the_worker_ends_the_run_after_its_creator_exited(store: Store) {
    let place = Place::new(store);
    let db = &place.location;
    let ledger = place.open();
    let (mut creator, run, worker) = dispatch(db, &["--hold-ms", "1000", "--exit", "3"]);
    // The creator is gone before the worker has finished.
    assert!(creator.wait().unwrap().success());
    assert!(ledger.run(run).unwrap().status.is_active());
    ledger.reap().unwrap();
    let record = ended(&ledger, run);
    assert_eq!(record.status, RunStatus::Failed);
    assert_eq!(record.exit_code, Some(3), "the worker's code");
    assert_eq!(record.error.as_deref(), Some("exited with code 3"));
    assert_eq!(record.pid, worker.0, "owned by the worker");
    assert_eq!(adopter(&ledger, run), Some(worker.0));
}

fn the_worker_ends_the_run_after_its_creator_was_killed(store: Store) {
    let place = Place::new(store);
    let db = &place.location;
    let ledger = place.open();
    let (mut creator, run, worker) = dispatch(db, &["--linger", "--hold-ms", "300", "--exit", "0"]);
    creator.kill().unwrap(); // SIGKILL, right after it started the worker
    creator.wait().unwrap();
    // A reaper pass meanwhile closes the creator's instance, not the run.
    ledger.reap().unwrap();
    let record = ended(&ledger, run);
    assert_eq!(record.status, RunStatus::Succeeded);
    assert_eq!(record.exit_code, Some(0));
    assert_eq!(record.pid, worker.0);
}

fn a_killed_worker_s_run_is_failed_by_the_reaper(store: Store) {
    let place = Place::new(store);
    let db = &place.location;
    let ledger = place.open();
    let (mut creator, run, worker) = dispatch(db, &["--forever"]);
    assert!(creator.wait().unwrap().success());
    // Adopted and running, then killed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger.run(run).unwrap().status != RunStatus::Running {
        assert!(Instant::now() < deadline, "never adopted");
        std::thread::sleep(Duration::from_millis(10));
    }
    common::signal(worker.0, "-KILL");
    // The worker is not our child, so there is no wait(): the kernel lets go
    // of its files (its instance lock) only once its last thread has exited,
    // which may come after its main thread shows as a zombie. Until then it
    // is rightly judged alive; each reap pass looks again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reports = ledger.reap().unwrap();
        let dead = reports.iter().find(|r| r.reaper == "dead-owners").unwrap();
        assert!(dead.is_ok(), "{dead}");
        if ledger.run(run).unwrap().status.is_terminal() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed worker was never reaped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let record = ledger.run(run).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    let error = record.error.unwrap();
    assert!(
        error.starts_with("owner gone: process exited")
            && error.contains(&format!("pid {}", worker.0)),
        "{error}"
    );
}

fn a_watch_in_another_process_sees_each_event_once_in_order(store: Store) {
    let place = Place::new(store);
    let db = &place.location;
    let ledger = place.open();
    let mut watcher = spawn_worker(db, &["watch-latency", "--count", "50"]);
    assert_eq!(next_line(&mut watcher), "watching");
    let run = ledger
        .begin_run(runledger::RunSpec::new("emitter"))
        .unwrap();
    for i in 0..50u64 {
        let sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        run.event("tick", serde_json::json!({"i": i, "sent_ns": sent}))
            .unwrap();
    }
    run.succeed().unwrap();
    // Each event once, in commit order.
    let seen: Vec<u64> = common::finish(watcher)
        .iter()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
}

on_both_stores!(
    the_worker_ends_the_run_after_its_creator_exited,
    the_worker_ends_the_run_after_its_creator_was_killed,
    a_killed_worker_s_run_is_failed_by_the_reaper,
    a_watch_in_another_process_sees_each_event_once_in_order,
);
