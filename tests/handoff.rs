//! Runs handed from the process that creates them to the one that adopts
//! them, within one process (two ledgers play the two sides; time moves
//! with the injected clock). The same with real processes and `kill -9` is
//! in `handoff_processes.rs`.

mod common;

use std::time::Duration;

use common::{Fixture, Store};
use runledger::{
    DEFAULT_ADOPT_WITHIN, Error, EventKind, Ledger, LockRequest, RunFilter, RunSpec, RunStatus,
};

/// A second ledger on the fixture's file and clock: another process.
fn other(f: &common::Fixture, label: &str) -> Ledger {
    f.builder()
        .clock(f.clock.clone())
        .label(label)
        .background(false)
        .open()
        .unwrap()
}

fn a_created_run_is_owned_by_nobody_until_adopted_then_by_the_adopter(store: Store) {
    let f = Fixture::new(store);
    let worker = other(&f, "worker");
    let id = f
        .ledger
        .create_run(RunSpec::new("backtest").source("dashboard"))
        .unwrap();
    let record = f.ledger.run(id).unwrap();
    assert_eq!(record.status, RunStatus::Queued);
    assert_eq!(i64::from(record.instance), 0, "owned by nobody");
    assert_eq!(
        record.pid,
        std::process::id(),
        "names its creator meanwhile"
    );

    let run = worker.adopt_run(id).unwrap();
    let record = f.ledger.run(id).unwrap();
    assert_eq!(record.status, RunStatus::Running);
    assert_eq!(record.instance, worker.instance_id());
    assert_eq!(run.id(), id);
    let kinds: Vec<EventKind> = f
        .ledger
        .events(id)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        matches!(
            &kinds[..],
            [
                EventKind::Status { from: None, to: RunStatus::Queued },
                EventKind::Adopted { instance, pid, .. },
                EventKind::Status { from: Some(RunStatus::Queued), to: RunStatus::Running },
            ] if *instance == worker.instance_id() && *pid == std::process::id()
        ),
        "{kinds:?}"
    );

    // The creator closing changes nothing: the run is the worker's now.
    drop(f.ledger);
    let step = run.step("day-1").unwrap();
    step.succeed().unwrap();
    assert_eq!(run.exit(0).unwrap(), RunStatus::Succeeded);
    let record = worker.run(id).unwrap();
    assert_eq!(
        (record.status, record.exit_code),
        (RunStatus::Succeeded, Some(0))
    );
}

fn a_second_adopter_is_refused_with_the_first_named(store: Store) {
    let f = Fixture::new(store);
    let first = other(&f, "first");
    let second = other(&f, "second");
    let id = f.ledger.create_run(RunSpec::new("job")).unwrap();
    let run = first.adopt_run(id).unwrap();
    match second.adopt_run(id) {
        Err(Error::AlreadyOwned { run: r, pid, host }) => {
            assert_eq!(r, id);
            assert_eq!(pid, std::process::id());
            assert!(!host.is_empty());
        }
        other => panic!("expected AlreadyOwned, got {other:?}"),
    }
    let message = second.adopt_run(id).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("run {id} is already owned by pid ")),
        "{message}"
    );
    // The refusal changed nothing.
    assert_eq!(
        f.ledger.run(id).unwrap().instance,
        first.instance_id(),
        "still the first adopter's"
    );
    run.succeed().unwrap();
    // A finished run cannot be adopted either.
    assert!(matches!(
        second.adopt_run(id),
        Err(Error::RunFinished {
            status: RunStatus::Succeeded,
            ..
        })
    ));
}

fn only_created_runs_can_be_adopted(store: Store) {
    let f = Fixture::new(store);
    let thief = other(&f, "thief");
    let run = f.ledger.begin_run(RunSpec::new("mine").queued()).unwrap();
    assert!(matches!(
        thief.adopt_run(run.id()),
        Err(Error::AlreadyOwned { .. })
    ));
    assert_eq!(
        f.ledger.run(run.id()).unwrap().instance,
        f.ledger.instance_id()
    );
    assert!(
        thief
            .adopt_run(runledger::RunId::from(999))
            .unwrap_err()
            .is_not_found()
    );
    run.start().unwrap();
    run.succeed().unwrap();
}

fn an_unadopted_run_fails_after_its_deadline_and_not_before(store: Store) {
    let f = Fixture::new(store);
    let worker = other(&f, "worker");
    let id = f
        .ledger
        .create_run(RunSpec::new("default-deadline"))
        .unwrap();
    let short = f
        .ledger
        .create_run(RunSpec::new("short").adopt_within(Duration::from_secs(30)))
        .unwrap();

    // The creator's death is not a reason: the run is nobody's.
    let creator_pid = f.ledger.run(id).unwrap().pid;
    f.clock.advance(Duration::from_secs(29));
    let reports = worker.reap().unwrap();
    assert!(reports.iter().all(|r| r.reaped.is_empty()), "{reports:?}");

    f.clock.advance(Duration::from_secs(1));
    let reports = worker.reap().unwrap();
    let dead = reports.iter().find(|r| r.reaper == "dead-owners").unwrap();
    assert_eq!(dead.reaped.len(), 1, "{dead:?}");
    let record = f.ledger.run(short).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    assert_eq!(
        record.error.as_deref(),
        Some(&*format!(
            "not adopted within 30s (created by pid {creator_pid} on {})",
            record.host
        ))
    );
    assert!(matches!(
        worker.adopt_run(short),
        Err(Error::RunFinished {
            status: RunStatus::Failed,
            ..
        })
    ));

    // The default deadline: five minutes.
    assert_eq!(DEFAULT_ADOPT_WITHIN, Duration::from_secs(300));
    f.clock
        .advance(DEFAULT_ADOPT_WITHIN - Duration::from_secs(31));
    worker.reap().unwrap();
    assert_eq!(f.ledger.run(id).unwrap().status, RunStatus::Queued);
    f.clock.advance(Duration::from_secs(1));
    worker.reap().unwrap();
    assert_eq!(f.ledger.run(id).unwrap().status, RunStatus::Failed);
}

fn a_late_adopter_fails_the_run_itself_even_before_a_reaper_pass(store: Store) {
    let f = Fixture::new(store);
    let worker = other(&f, "worker");
    let id = f
        .ledger
        .create_run(RunSpec::new("late").adopt_within(Duration::from_secs(10)))
        .unwrap();
    f.clock.advance(Duration::from_secs(10));
    assert!(matches!(
        worker.adopt_run(id),
        Err(Error::RunFinished {
            status: RunStatus::Failed,
            ..
        })
    ));
    let record = f.ledger.run(id).unwrap();
    assert!(record.error.unwrap().starts_with("not adopted within 10s"));
}

fn an_adopted_run_is_reaped_with_its_adopter(store: Store) {
    let f = Fixture::new(store);
    // A worker on another host, so that its lease judges it and one
    // process can play both (real processes and kill -9:
    // handoff_processes.rs).
    let worker = f
        .builder()
        .clock(f.clock.clone())
        .host("elsewhere")
        .background(false)
        .open()
        .unwrap();
    let id = f.ledger.create_run(RunSpec::new("job")).unwrap();
    let run = worker.adopt_run(id).unwrap();
    let _lock = run.lock("resource").unwrap();
    // The worker falls silent past its lease.
    f.clock.advance(Duration::from_secs(61));
    f.ledger.reap().unwrap();
    let record = f.ledger.run(id).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    let error = record.error.unwrap();
    assert!(
        error.starts_with("owner gone") && error.contains("elsewhere"),
        "{error}"
    );
    f.ledger.try_lock("resource").unwrap().release().unwrap();
}

fn a_queued_adoption_takes_its_locks_before_it_starts(store: Store) {
    let f = Fixture::new(store);
    let worker = other(&f, "worker");
    let id = f.ledger.create_run(RunSpec::new("exec-like")).unwrap();
    let held = f.ledger.lock("gpu").unwrap();
    let run = worker.adopt_run_queued(id).unwrap();
    assert_eq!(f.ledger.run(id).unwrap().status, RunStatus::Queued);
    assert!(
        run.acquire(LockRequest::new(["gpu"]).no_wait())
            .unwrap_err()
            .is_conflict()
    );
    held.release().unwrap();
    let guard = run.lock("gpu").unwrap();
    run.start().unwrap();
    assert_eq!(f.ledger.run(id).unwrap().status, RunStatus::Running);
    let locks = f.ledger.locks().unwrap();
    assert_eq!((locks.len(), locks[0].run), (1, Some(id)));
    drop(guard);
    run.succeed().unwrap();
}

fn an_unadopted_run_can_be_cancelled_and_is_listed_as_queued(store: Store) {
    let f = Fixture::new(store);
    let id = f.ledger.create_run(RunSpec::new("maybe")).unwrap();
    let queued = f.ledger.runs(RunFilter::default().active()).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, id);
    assert!(f.ledger.run(id).unwrap().adopt_by.is_some());
    assert_eq!(f.ledger.cancel(id).unwrap(), RunStatus::Cancelled);
    assert_eq!(
        f.ledger.run(id).unwrap().adopt_by,
        None,
        "no longer awaited"
    );
    let worker = other(&f, "worker");
    assert!(matches!(
        worker.adopt_run(id),
        Err(Error::RunFinished {
            status: RunStatus::Cancelled,
            ..
        })
    ));
    // Cancelled, it is out of the adoption index: no reaper pass fails it.
    f.clock.advance(DEFAULT_ADOPT_WITHIN * 2);
    worker.reap().unwrap();
    assert_eq!(f.ledger.run(id).unwrap().status, RunStatus::Cancelled);
}

fn a_created_run_is_checked_like_a_begun_one(store: Store) {
    let f = Fixture::new(store);
    assert!(
        f.ledger
            .create_run(RunSpec::new(""))
            .unwrap_err()
            .is_invalid_input()
    );
    let key = RunSpec::new("once").idempotency_key("k");
    let id = f.ledger.create_run(key.clone()).unwrap();
    match f.ledger.create_run(key) {
        Err(Error::Duplicate { existing, .. }) => assert_eq!(existing, id),
        other => panic!("expected a duplicate, got {other:?}"),
    }
}

fn an_adoption_deadline_of_zero_is_refused_and_a_huge_one_is_a_century(store: Store) {
    let f = Fixture::new(store);
    let e = f
        .ledger
        .create_run(RunSpec::new("never").adopt_within(Duration::ZERO))
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    assert!(
        e.to_string().starts_with("invalid adoption deadline"),
        "{e}"
    );
    // Duration::MAX: stored as a century from now, readable, adoptable,
    // and the listings still read (an overflow in SQL once made the column
    // a REAL that nothing could read back).
    let id = f
        .ledger
        .create_run(
            RunSpec::new("forever")
                .adopt_within(Duration::MAX)
                .heartbeat_timeout(Duration::MAX),
        )
        .unwrap();
    let record = f.ledger.run(id).unwrap();
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    assert_eq!(
        record
            .adopt_by
            .unwrap()
            .saturating_duration_since(record.created_at),
        century
    );
    f.ledger.runs(RunFilter::default()).unwrap();
    let worker = other(&f, "worker");
    let run = worker.adopt_run(id).unwrap();
    run.heartbeat().unwrap();
    f.ledger.runs(RunFilter::default().active()).unwrap();
    run.succeed().unwrap();
}

on_both_stores!(
    a_created_run_is_owned_by_nobody_until_adopted_then_by_the_adopter,
    a_second_adopter_is_refused_with_the_first_named,
    only_created_runs_can_be_adopted,
    an_unadopted_run_fails_after_its_deadline_and_not_before,
    a_late_adopter_fails_the_run_itself_even_before_a_reaper_pass,
    an_adopted_run_is_reaped_with_its_adopter,
    a_queued_adoption_takes_its_locks_before_it_starts,
    an_unadopted_run_can_be_cancelled_and_is_listed_as_queued,
    a_created_run_is_checked_like_a_begun_one,
    an_adoption_deadline_of_zero_is_refused_and_a_huge_one_is_a_century,
);
