//! Pruning finished runs by age, with the injected clock.

mod common;

use std::time::Duration;

use common::{Fixture, Store};
use runledger::{RunFilter, RunSpec, RunStatus};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn prune_deletes_old_finished_runs_with_their_steps_and_events(store: Store) {
    let f = Fixture::new(store);
    let old = f.ledger.begin_run(RunSpec::new("old")).unwrap();
    old.step("s").unwrap().succeed().unwrap();
    let old_id = old.id();
    old.succeed().unwrap();
    let still_running = f.ledger.begin_run(RunSpec::new("long")).unwrap();
    f.clock.advance(10 * DAY);
    let recent = f.ledger.begin_run(RunSpec::new("recent")).unwrap();
    let recent_id = recent.id();
    recent.succeed().unwrap();

    assert_eq!(f.ledger.prune(7 * DAY).unwrap(), 1);
    assert!(f.ledger.run(old_id).unwrap_err().is_not_found());
    assert!(f.ledger.events(old_id).unwrap_err().is_not_found());
    // No orphaned steps or events remain.
    let orphans = f.query_i64(&format!(
        "SELECT (SELECT count(*) FROM steps WHERE run_id = {old_id}) \
         + (SELECT count(*) FROM events WHERE run_id = {old_id})"
    ));
    assert_eq!(orphans, 0);
    // Active and recent runs stay, with their whole history.
    assert_eq!(
        f.ledger.run(still_running.id()).unwrap().status,
        RunStatus::Running
    );
    assert_eq!(f.ledger.events(recent_id).unwrap().len(), 2);
    // Nothing more to prune.
    assert_eq!(f.ledger.prune(7 * DAY).unwrap(), 0);
    still_running.succeed().unwrap();
}

fn a_run_that_ended_recently_is_kept_however_old_its_start(store: Store) {
    let f = Fixture::new(store);
    let long = f.ledger.begin_run(RunSpec::new("long")).unwrap();
    let id = long.id();
    f.clock.advance(30 * DAY);
    long.succeed().unwrap();
    f.ledger
        .begin_run(RunSpec::new("newest"))
        .unwrap()
        .succeed()
        .unwrap();
    assert_eq!(f.ledger.prune(7 * DAY).unwrap(), 0);
    f.clock.advance(8 * DAY);
    assert_eq!(f.ledger.prune(7 * DAY).unwrap(), 1);
    assert!(f.ledger.run(id).unwrap_err().is_not_found());
}

fn prune_works_in_batches_and_never_reuses_ids(store: Store) {
    let f = Fixture::new(store);
    for _ in 0..1_203 {
        f.ledger
            .begin_run(RunSpec::new("bulk"))
            .unwrap()
            .succeed()
            .unwrap();
    }
    let newest = f.ledger.runs(RunFilter::default().limit(1)).unwrap()[0].id;
    f.clock.advance(2 * DAY);
    // Everything is old; the newest run is kept so that its id stays taken.
    assert_eq!(f.ledger.prune(DAY).unwrap(), 1_202);
    let left = f.ledger.runs(RunFilter::default()).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, newest);
    let next = f.ledger.begin_run(RunSpec::new("after")).unwrap();
    assert!(next.id() > newest, "{} after {newest}", next.id());
    // Event ids keep growing too.
    let last_event = f.ledger.events(newest).unwrap().last().unwrap().id;
    assert!(f.ledger.events(next.id()).unwrap()[0].id > last_event);
    next.succeed().unwrap();
}

fn prune_forgets_processes_that_closed_long_ago(store: Store) {
    let f = Fixture::new(store);
    let count = |f: &common::Fixture| f.query_i64("SELECT count(*) FROM instances WHERE id > 0");
    for _ in 0..3 {
        drop(f.builder().open().unwrap());
    }
    assert_eq!(count(&f), 4);
    f.clock.advance(2 * DAY);
    assert_eq!(f.ledger.prune(DAY).unwrap(), 0);
    assert_eq!(count(&f), 1, "only the open instance is left");
}

on_both_stores!(
    prune_deletes_old_finished_runs_with_their_steps_and_events,
    a_run_that_ended_recently_is_kept_however_old_its_start,
    prune_works_in_batches_and_never_reuses_ids,
    prune_forgets_processes_that_closed_long_ago,
);

/// Issue 20: one key per job, every job's key used once. The gate files of
/// those keys (SQLite's sidecar `keys/` folder) stay bounded by the reap
/// pass, and `prune` removes the idle ones. `RUNLEDGER_GATE_KEYS` raises
/// the number of keys (a million by hand; a few thousand in CI).
#[test]
fn a_key_per_job_leaves_a_bounded_folder_of_gates() {
    let f = Fixture::new(Store::Sqlite);
    let keys: usize = std::env::var("RUNLEDGER_GATE_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000);
    let folder = std::path::PathBuf::from(format!("{}-runledger/keys", f.location));
    let files = || std::fs::read_dir(&folder).map_or(0, |entries| entries.count());
    let mut most = 0;
    for job in 0..keys {
        f.ledger
            .try_lock(format!("job:id={job}"))
            .unwrap()
            .release()
            .unwrap();
        if job % 500 == 499 {
            most = most.max(files());
            f.ledger.reap().unwrap();
        }
    }
    // Never more than the reap pass's bound plus one stretch between passes.
    assert!(most <= 1024 + 500, "{most} gate files for {keys} keys");
    assert!(most >= 500, "the keys made no gate files ({most})");
    // A key in use keeps its file; prune removes every idle one.
    let held = f.ledger.try_lock("job:id=held").unwrap();
    f.ledger.prune(Duration::from_secs(3600)).unwrap();
    assert_eq!(files(), 1);
    held.release().unwrap();
    f.ledger.prune(Duration::from_secs(3600)).unwrap();
    assert_eq!(files(), 0);
}
