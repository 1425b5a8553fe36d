//! Cancellation: requests, and the rule that a terminal run is never changed.

mod common;

use std::sync::{Arc, Barrier};

use common::{Fixture, Store, finish, instant_in, spawn_worker};
use runledger::{EventKind, RunSpec, RunStatus};

fn cancel_returns_the_true_status(store: Store) {
    let f = Fixture::new(store);
    let queued = f.ledger.begin_run(RunSpec::new("q").queued()).unwrap();
    assert_eq!(f.ledger.cancel(queued.id()).unwrap(), RunStatus::Cancelled);
    let r = f.ledger.run(queued.id()).unwrap();
    assert_eq!(r.error.as_deref(), Some("cancelled before it started"));
    assert!(r.finished_at.is_some());

    let running = f.ledger.begin_run(RunSpec::new("r")).unwrap();
    assert!(!running.is_cancel_requested().unwrap());
    assert_eq!(f.ledger.cancel(running.id()).unwrap(), RunStatus::Running);
    assert!(running.is_cancel_requested().unwrap());
    assert!(
        f.ledger
            .run(running.id())
            .unwrap()
            .cancel_requested_at
            .is_some()
    );
    // A second request changes nothing and records nothing.
    let events = f.ledger.events(running.id()).unwrap().len();
    assert_eq!(f.ledger.cancel(running.id()).unwrap(), RunStatus::Running);
    assert_eq!(f.ledger.events(running.id()).unwrap().len(), events);
    assert_eq!(running.cancelled().unwrap(), RunStatus::Cancelled);
}

fn cancel_after_success_changes_nothing(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("done")).unwrap();
    let id = run.id();
    run.succeed().unwrap();
    let before = f.ledger.run(id).unwrap();
    let events = f.ledger.events(id).unwrap();
    assert_eq!(f.ledger.cancel(id).unwrap(), RunStatus::Succeeded);
    assert_eq!(f.ledger.run(id).unwrap(), before);
    assert_eq!(f.ledger.events(id).unwrap(), events);
}

fn cancel_of_an_unknown_run_is_not_found(store: Store) {
    let f = Fixture::new(store);
    let err = f.ledger.cancel(runledger::RunId::from(999)).unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(err.to_string(), "run 999 not found");
}

/// The history of a run that raced a cancel against its success must end in
/// `succeeded`, with nothing after it.
fn assert_succeeded_and_final(f: &common::Fixture, id: runledger::RunId) {
    let r = f.ledger.run(id).unwrap();
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    let events = f.ledger.events(id).unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        last.kind,
        EventKind::Status {
            from: Some(RunStatus::Running),
            to: RunStatus::Succeeded
        },
        "{events:?}"
    );
}

fn a_cancel_racing_success_in_threads_never_downgrades_it(store: Store) {
    let f = Fixture::new(store);
    for _ in 0..50 {
        let run = f.ledger.begin_run(RunSpec::new("race")).unwrap();
        let id = run.id();
        let barrier = Arc::new(Barrier::new(2));
        let (b, ledger) = (barrier.clone(), f.ledger.clone());
        let canceller = std::thread::spawn(move || {
            b.wait();
            ledger.cancel(id).unwrap()
        });
        barrier.wait();
        assert_eq!(run.succeed().unwrap(), RunStatus::Succeeded);
        let seen = canceller.join().unwrap();
        assert!(
            matches!(seen, RunStatus::Running | RunStatus::Succeeded),
            "{seen}"
        );
        assert_succeeded_and_final(&f, id);
    }
}

fn a_cancel_racing_success_in_processes_never_downgrades_it(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    for _ in 0..6 {
        let at = instant_in(300);
        let mut owner = spawn_worker(db, &["race-succeed", "race", "--at", &at]);
        let first = {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(owner.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            line
        };
        let id = first.trim().strip_prefix("started ").unwrap().to_owned();
        let cancellers: Vec<_> = (0..2)
            .map(|_| spawn_worker(db, &["cancel", &id, "--at", &at]))
            .collect();
        for c in cancellers {
            let line = &finish(c)[0];
            assert!(
                line == "status running" || line == "status succeeded",
                "{line}"
            );
        }
        finish(owner);
        assert_succeeded_and_final(&f, id.parse().unwrap());
    }
}

on_both_stores!(
    cancel_returns_the_true_status,
    cancel_after_success_changes_nothing,
    cancel_of_an_unknown_run_is_not_found,
    a_cancel_racing_success_in_threads_never_downgrades_it,
    a_cancel_racing_success_in_processes_never_downgrades_it,
);
