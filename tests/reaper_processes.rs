//! Liveness across real OS processes (the `worker` example): processes
//! killed with SIGKILL while owning runs, steps, locks and queue places;
//! restart recovery; a paused process is never reaped.

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, KillOnDrop, Place, Store, next_line, spawn_worker, wait_for_waiters};
use runledger::{LockState, Reaped, RunId, RunStatus, StepStatus};

/// Starts `occupy`: a run with a step left running, a lock held for the run
/// (`owned`) and a queue place on `wanted`. Returns the worker, its run and
/// its token.
fn occupier(db: &str, owned: &str, wanted: &str) -> (KillOnDrop, RunId, u64) {
    let mut worker = KillOnDrop(spawn_worker(
        db,
        &["occupy", "victim", "--lock", owned, "--wait-for", wanted],
    ));
    let line = next_line(&mut worker);
    let mut parts = line
        .strip_prefix("occupying ")
        .unwrap_or_else(|| panic!("{line}"))
        .split(' ');
    let run: RunId = parts.next().unwrap().parse().unwrap();
    let token = parts.next().unwrap().parse().unwrap();
    (worker, run, token)
}

/// The instance lock files beside a SQLite ledger (none on PostgreSQL,
/// where the ledger is judged by pid and lease).
fn lock_files(f: &Fixture) -> Option<usize> {
    (f.store == Store::Sqlite).then(|| {
        let dir = f.dir.path().join("ledger.db-runledger").join("instances");
        std::fs::read_dir(dir).unwrap().count()
    })
}

fn one_reap_leaves_nothing_of_a_killed_process_active(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let wanted = f.ledger.lock("wanted").unwrap();
    let (mut victim, run, token) = occupier(db, "owned", "wanted");
    wait_for_waiters(&f.ledger, 1);
    assert!(matches!(lock_files(&f), Some(2) | None));
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();

    let reports = f.ledger.reap().unwrap();
    let dead = reports.iter().find(|r| r.reaper == "dead-owners").unwrap();
    assert!(dead.is_ok(), "{dead}");
    let record = f.ledger.run(run).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    let error = record.error.unwrap();
    assert!(
        error.starts_with("owner gone: process exited")
            && error.contains(&format!("pid {}", victim.id())),
        "{error}"
    );
    let steps = f.ledger.steps(run).unwrap();
    assert_eq!(steps[0].status, StepStatus::Failed);
    // Its held lock and its queue place are gone; only ours is left.
    let locks = f.ledger.locks().unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].key, "wanted");
    assert!(dead.reaped.iter().any(|r| matches!(
        r,
        Reaped::Lock { keys, state: LockState::Held, token: Some(t), .. }
            if keys == &["owned"] && *t == token
    )));
    assert!(dead.reaped.iter().any(|r| matches!(
        r,
        Reaped::Lock { keys, state: LockState::Waiting, .. } if keys == &["wanted"]
    )));
    let owned = f.ledger.try_lock("owned").unwrap();
    assert!(owned.token() > token);
    // Its lock file went with it; a second pass finds nothing to do.
    assert!(matches!(lock_files(&f), Some(1) | None));
    let again = f.ledger.reap().unwrap();
    assert!(again.iter().all(|r| r.reaped.is_empty()), "{again:?}");
    drop((owned, wanted));
}

fn opening_a_ledger_reaps_the_dead_of_this_host_at_once(store: Store) {
    let place = Place::new(store);
    let db = &place.location;
    let first = place.builder().background(false).open().unwrap();
    let wanted = first.lock("wanted").unwrap();
    let (mut victim, run, _) = occupier(db, "owned", "wanted");
    wait_for_waiters(&first, 1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    drop((wanted, first));
    // The restarted service opens the ledger: no reap() call, no keeper
    // pass, and the dead one's run is already closed.
    let ledger = place.builder().background(false).open().unwrap();
    let record = ledger.run(run).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    assert!(record.error.unwrap().contains("process exited"));
    assert!(ledger.locks().unwrap().is_empty());
}

fn a_paused_process_is_never_reaped_whatever_the_clock(store: Store) {
    // The clock starts at the real time, as the worker's does: hours later
    // its lease alone would call it dead.
    let f = Fixture::with_clock(store, runledger::ManualClock::default());
    let db = &f.location;
    let wanted = f.ledger.lock("paused-wanted").unwrap();
    let (mut paused, run, _) = occupier(db, "paused-owned", "paused-wanted");
    wait_for_waiters(&f.ledger, 1);
    let pid = paused.id();
    common::signal(pid, "-STOP");
    // Hours pass by the ledger's clock; the process is frozen, not dead.
    f.clock.advance(Duration::from_secs(6 * 3600));
    let reports = f.ledger.reap().unwrap();
    assert!(reports.iter().all(|r| r.reaped.is_empty()), "{reports:?}");
    assert_eq!(f.ledger.run(run).unwrap().status, RunStatus::Running);
    assert!(f.ledger.try_lock("paused-owned").unwrap_err().is_conflict());
    common::signal(pid, "-CONT");
    // And once it is really gone, the next acquirer reclaims at once.
    paused.kill().unwrap();
    paused.wait().unwrap();
    let started = Instant::now();
    let guard = f.ledger.try_lock("paused-owned").unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(f.ledger.run(run).unwrap().status, RunStatus::Failed);
    drop((guard, wanted));
}

/// A process of another host killed while it held a lock and waited in a
/// queue: nothing here can check its pid, so its lease decides; once it ran
/// out, one reap frees the lock, removes the queue place and fails the run.
fn a_process_of_another_host_killed_while_waiting_is_reaped_after_its_lease(store: Store) {
    // The clock starts at the real time, as the worker's does.
    let f = Fixture::with_clock(store, runledger::ManualClock::default());
    let wanted = f.ledger.lock("far-wanted").unwrap();
    let mut worker = KillOnDrop(spawn_worker(
        &f.location,
        &[
            "occupy",
            "far",
            "--lock",
            "far-owned",
            "--wait-for",
            "far-wanted",
            "--host",
            "far-away",
        ],
    ));
    let line = next_line(&mut worker);
    let run: RunId = line
        .strip_prefix("occupying ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    wait_for_waiters(&f.ledger, 1);
    worker.kill().unwrap(); // SIGKILL
    worker.wait().unwrap();
    // Within its lease it is alive for all this host can tell.
    let reports = f.ledger.reap().unwrap();
    assert!(reports.iter().all(|r| r.reaped.is_empty()), "{reports:?}");
    assert_eq!(f.ledger.run(run).unwrap().status, RunStatus::Running);
    assert_eq!(f.ledger.locks().unwrap().len(), 3);
    // Past it, one pass takes everything back.
    f.clock.advance(Duration::from_secs(61));
    f.ledger.heartbeat().unwrap();
    let reports = f.ledger.reap().unwrap();
    let dead = reports.iter().find(|r| r.reaper == "dead-owners").unwrap();
    assert!(dead.is_ok(), "{dead}");
    let record = f.ledger.run(run).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    assert!(
        record.error.as_deref().unwrap().contains("heartbeat stale"),
        "{record:?}"
    );
    let locks = f.ledger.locks().unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].key, "far-wanted");
    assert!(f.ledger.try_lock("far-owned").is_ok());
    drop(wanted);
}

on_both_stores!(
    a_process_of_another_host_killed_while_waiting_is_reaped_after_its_lease,
    one_reap_leaves_nothing_of_a_killed_process_active,
    opening_a_ledger_reaps_the_dead_of_this_host_at_once,
    a_paused_process_is_never_reaped_whatever_the_clock,
);
