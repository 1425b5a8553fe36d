//! Locks across real OS processes (the `worker` example): mutual exclusion,
//! FIFO order, timeouts, SIGKILLed holders, limits under contention.

mod common;

use std::time::{Duration, Instant};

use common::{
    Fixture, KillOnDrop, Store, check_witness, finish, next_line, spawn_worker, wait_for_waiters,
};
use runledger::RunSpec;

/// Four processes increment a counter kept in a plain file, 40 times each,
/// under an exclusive lock: the count is exact and no critical sections
/// overlap.
fn an_exclusive_lock_serializes_processes(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let counter = f.dir.path().join("counter");
    let witness = f.dir.path().join("witness");
    std::fs::write(&counter, "0\n").unwrap();
    let (counter_s, witness_s) = (counter.to_str().unwrap(), witness.to_str().unwrap());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            spawn_worker(
                db,
                &[
                    "critical",
                    "counter",
                    "--times",
                    "40",
                    "--witness",
                    witness_s,
                    "--counter",
                    counter_s,
                ],
            )
        })
        .collect();
    for w in workers {
        assert_eq!(finish(w), ["done"]);
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "160");
    assert_eq!(check_witness(&witness), 160);
    assert!(f.ledger.locks().unwrap().is_empty());
}

/// Threads sharing one ledger in one process, mixed with two other
/// processes on the same key: every critical section is alone, whichever
/// thread or process it belongs to (issue 16).
fn threads_of_one_ledger_and_other_processes_take_turns(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let counter = f.dir.path().join("counter");
    let witness = f.dir.path().join("witness");
    std::fs::write(&counter, "0\n").unwrap();
    let (counter_s, witness_s) = (counter.to_str().unwrap(), witness.to_str().unwrap());
    let critical = |threads: &str| {
        spawn_worker(
            db,
            &[
                "critical",
                "counter",
                "--times",
                "25",
                "--threads",
                threads,
                "--witness",
                witness_s,
                "--counter",
                counter_s,
            ],
        )
    };
    let workers = [critical("4"), critical("1"), critical("1")];
    for w in workers {
        assert_eq!(finish(w), ["done"]);
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "150");
    assert_eq!(check_witness(&witness), 150);
    assert!(f.ledger.locks().unwrap().is_empty());
}

/// Gate files of idle keys removed in a loop (issue 20) beside processes and
/// threads that lock and release the same two keys: every section is alone
/// (the witness file, an independent flock, an exact counter), and no
/// request is stuck on a removed file.
#[test]
fn removing_idle_gates_beside_lockers_never_lets_two_in() {
    let f = Fixture::new(Store::Sqlite);
    let db = &f.location;
    let dir = f.dir.path();
    let mut workers = Vec::new();
    for key in ["ka", "kb"] {
        let counter = dir.join(format!("counter-{key}"));
        std::fs::write(&counter, "0\n").unwrap();
        for threads in ["1", "1", "2"] {
            workers.push(spawn_worker(
                db,
                &[
                    "critical",
                    key,
                    "--times",
                    "30",
                    "--threads",
                    threads,
                    "--witness",
                    dir.join("witness").to_str().unwrap(),
                    "--counter",
                    counter.to_str().unwrap(),
                    "--flock-witness",
                    dir.join(format!("flock-{key}")).to_str().unwrap(),
                ],
            ));
        }
    }
    let stop = dir.join("stop");
    let sweeper = spawn_worker(db, &["sweep-gates", "--until", stop.to_str().unwrap()]);
    for w in workers {
        assert_eq!(finish(w), ["done"]);
    }
    std::fs::write(&stop, "").unwrap();
    let said = finish(sweeper);
    let shrank: u32 = said[0].strip_prefix("done ").unwrap().parse().unwrap();
    assert!(shrank > 0, "no pass removed a gate file: {said:?}");
    for key in ["ka", "kb"] {
        let counter = dir.join(format!("counter-{key}"));
        assert_eq!(std::fs::read_to_string(counter).unwrap().trim(), "120");
    }
    assert_eq!(check_witness(&dir.join("witness")), 240);
    assert!(f.ledger.locks().unwrap().is_empty());
}

fn slots_and_shared_limits_hold_under_contention(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let witness = f.dir.path().join("witness");
    let critical = |key: &str, mode: &str| {
        let w = witness.to_str().unwrap();
        spawn_worker(
            db,
            &[
                "critical",
                key,
                "--mode",
                mode,
                "--times",
                "25",
                "--witness",
                w,
            ],
        )
    };
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(critical("gpu", "slots:2"));
        workers.push(critical("table", "shared"));
    }
    workers.push(critical("table", "exclusive"));
    for worker in workers {
        assert_eq!(finish(worker), ["done"]);
    }
    assert_eq!(check_witness(&witness), 175);
}

fn waiters_in_other_processes_are_served_first_come_first_served(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let held = f.ledger.lock("fifo").unwrap();
    let mut waiters = Vec::new();
    for i in 0..3 {
        waiters.push(spawn_worker(
            db,
            &["hold", "fifo", "--hold-ms", "20", "--wait-ms", "20000"],
        ));
        wait_for_waiters(&f.ledger, i + 1);
    }
    held.release().unwrap();
    let tokens: Vec<u64> = waiters
        .iter_mut()
        .map(|w| next_line(w).strip_prefix("held ").unwrap().parse().unwrap())
        .collect();
    for w in waiters {
        finish(w);
    }
    assert!(
        tokens.windows(2).all(|t| t[0] < t[1]),
        "served out of queue order: {tokens:?}"
    );
}

fn a_waiting_process_times_out_and_leaves_the_queue(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let _held = f.ledger.lock("slow").unwrap();
    let line = finish(spawn_worker(db, &["hold", "slow", "--wait-ms", "200"])).remove(0);
    assert!(line.starts_with("timeout gave up after waiting"), "{line}");
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "{line}"
    );
    assert_eq!(f.ledger.locks().unwrap().len(), 1);
}

/// A holder killed with SIGKILL never releases: a process waiting for its
/// key gets it anyway, without any sweep, and the reclaim is recorded.
fn the_lock_of_a_killed_holder_passes_to_a_waiting_process(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let mut holder = KillOnDrop(spawn_worker(db, &["hold", "victim", "--forever"]));
    let first: u64 = next_line(&mut holder)
        .strip_prefix("held ")
        .unwrap()
        .parse()
        .unwrap();
    let mut waiter = spawn_worker(db, &["hold", "victim", "--wait-ms", "20000"]);
    wait_for_waiters(&f.ledger, 1);
    holder.kill().unwrap(); // SIGKILL
    let started = Instant::now();
    let line = next_line(&mut waiter);
    let second: u64 = line
        .strip_prefix("held ")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    assert!(second > first);
    assert!(started.elapsed() < Duration::from_secs(10));
    finish(waiter);
    holder.wait().unwrap();
    let row = common::raw_query_text(
        f.store,
        db,
        "SELECT kind, reason, CAST(holder_pid AS TEXT) FROM lock_events",
    );
    let (kind, reason) = (&row[0], &row[1]);
    assert_eq!(
        (kind.as_str(), row[2].as_str()),
        ("reclaimed", holder.id().to_string().as_str())
    );
    assert!(
        reason.starts_with("owner gone: process exited (pid "),
        "{reason}"
    );
}

/// The same: the next acquirer in this process finds the dead holder and
/// takes the key at once.
fn a_killed_holders_lock_is_reclaimed_by_the_next_acquirer(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let run = f.ledger.begin_run(RunSpec::new("next")).unwrap();
    let mut holder = KillOnDrop(spawn_worker(db, &["hold", "k", "--forever"]));
    assert!(next_line(&mut holder).starts_with("held "));
    let err = run
        .acquire(runledger::LockRequest::new(["k"]).no_wait())
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let guard = f.ledger.try_lock("k").unwrap();
    assert!(guard.is_held().unwrap());
    run.succeed().unwrap();
}

#[cfg(unix)]
#[test]
fn a_symlinked_path_shares_the_locks() {
    // The path of a SQLite file: SQLite only.
    let f = Fixture::new(Store::Sqlite);
    let link = f.dir.path().join("link.db");
    std::os::unix::fs::symlink(f.dir.path().join("ledger.db"), &link).unwrap();
    let mut holder = KillOnDrop(spawn_worker(&link, &["hold", "shared-file", "--forever"]));
    assert!(next_line(&mut holder).starts_with("held "));
    let err = f.ledger.try_lock("shared-file").unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

/// A holder in another pid namespace (a container sharing the host name and
/// the file) cannot be judged by its pid: it must not be reclaimed.
#[cfg(target_os = "linux")]
fn a_holder_in_another_pid_namespace_is_not_reclaimed(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let unshare = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(common::worker())
        .arg(db)
        .args(["hold", "contained", "--forever"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(holder) = unshare else {
        eprintln!("skipped: unshare is not available");
        return;
    };
    let mut holder = KillOnDrop(holder);
    let line = next_line(&mut holder);
    if !line.starts_with("held ") {
        eprintln!("skipped: unshare --pid is not allowed here ({line:?})");
        return;
    }
    let err = f.ledger.try_lock("contained").unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

/// The number of requests waiting in the queue.
fn queued(ledger: &runledger::Ledger) -> usize {
    ledger
        .locks()
        .unwrap()
        .iter()
        .filter(|l| l.state == runledger::LockState::Waiting)
        .count()
}

fn token_of(line: &str) -> u64 {
    line.strip_prefix("held ")
        .unwrap_or_else(|| panic!("not a grant: {line:?}"))
        .parse()
        .unwrap()
}

/// An exclusive request that finds its key held waits at the key's gate,
/// out of the queue, for `queue_after`; only then does it take a visible
/// place in the queue. It is served once the holder lets go either way.
#[test]
fn a_request_waits_at_the_gate_then_takes_a_place_in_the_queue() {
    // Files beside a SQLite ledger (see `runledger::gate`): SQLite only.
    let f = Fixture::new(Store::Sqlite);
    let db = &f.location;
    let held = f.ledger.lock("gated").unwrap();
    let spawned = Instant::now();
    let mut waiter = spawn_worker(
        db,
        &[
            "hold",
            "gated",
            "--wait-ms",
            "20000",
            "--queue-after-ms",
            "1500",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(queued(&f.ledger), 0, "{:?}", f.ledger.locks().unwrap());
    wait_for_waiters(&f.ledger, 1);
    assert!(
        spawned.elapsed() >= Duration::from_millis(1500),
        "queued after {:?}",
        spawned.elapsed()
    );
    let first = held.token();
    held.release().unwrap();
    assert!(token_of(&next_line(&mut waiter)) > first);
    finish(waiter);
}

/// A holder killed with SIGKILL lets go of its gate at once (the kernel
/// drops its file lock): a request waiting at the gate takes the key, and
/// reclaims the dead holder's row in its grant, without any sweep and
/// without waiting for its turn in the queue.
#[test]
fn a_request_at_the_gate_of_a_killed_holder_takes_its_lock() {
    // Files beside a SQLite ledger (see `runledger::gate`): SQLite only.
    let f = Fixture::new(Store::Sqlite);
    let db = &f.location;
    let mut holder = KillOnDrop(spawn_worker(db, &["hold", "victim", "--forever"]));
    let first = token_of(&next_line(&mut holder));
    let mut waiter = spawn_worker(
        db,
        &[
            "hold",
            "victim",
            "--wait-ms",
            "60000",
            "--queue-after-ms",
            "60000",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(queued(&f.ledger), 0, "{:?}", f.ledger.locks().unwrap());
    holder.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    assert!(token_of(&next_line(&mut waiter)) > first);
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "served {:?} after the kill",
        killed.elapsed()
    );
    finish(waiter);
    holder.wait().unwrap();
    let row = common::raw_query_text(
        f.store,
        db,
        "SELECT kind, CAST(holder_pid AS TEXT) FROM lock_events",
    );
    assert_eq!(row, ["reclaimed".to_owned(), holder.id().to_string()]);
}

/// The short-wait relaxation never reorders the queue: a request that
/// waits at a key's gate, and gets it when the key is free again, does not
/// take the key from a request queued for it before (here one that also
/// waits for a second key, so that the releaser could not hand it over).
#[test]
fn a_request_at_the_gate_never_overtakes_a_queued_one() {
    // Files beside a SQLite ledger (see `runledger::gate`): SQLite only.
    let f = Fixture::new(Store::Sqlite);
    let db = &f.location;
    let (k, l) = (f.ledger.lock("k").unwrap(), f.ledger.lock("l").unwrap());
    let first = k.token();
    let mut queued_first = spawn_worker(
        db,
        &[
            "hold",
            "k",
            "--also",
            "l",
            "--wait-ms",
            "60000",
            "--queue-after-ms",
            "0",
            "--hold-ms",
            "300",
        ],
    );
    wait_for_waiters(&f.ledger, 2); // one record per key
    let mut at_gate = spawn_worker(
        db,
        &[
            "hold",
            "k",
            "--wait-ms",
            "60000",
            "--queue-after-ms",
            "60000",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(queued(&f.ledger), 2, "{:?}", f.ledger.locks().unwrap());
    // "k" is free, but the request queued for it still waits for "l": the
    // one at the gate gets the gate, and must queue behind it.
    k.release().unwrap();
    wait_for_waiters(&f.ledger, 3);
    l.release().unwrap();
    let queued_token = token_of(&next_line(&mut queued_first));
    let gate_token = token_of(&next_line(&mut at_gate));
    assert!(
        first < queued_token && queued_token < gate_token,
        "served out of order: first {first}, queued {queued_token}, at the gate {gate_token}"
    );
    finish(queued_first);
    finish(at_gate);
}

on_both_stores!(
    an_exclusive_lock_serializes_processes,
    threads_of_one_ledger_and_other_processes_take_turns,
    slots_and_shared_limits_hold_under_contention,
    waiters_in_other_processes_are_served_first_come_first_served,
    a_waiting_process_times_out_and_leaves_the_queue,
    the_lock_of_a_killed_holder_passes_to_a_waiting_process,
    a_killed_holders_lock_is_reclaimed_by_the_next_acquirer,
    #[cfg(target_os = "linux")]
    a_holder_in_another_pid_namespace_is_not_reclaimed,
);
