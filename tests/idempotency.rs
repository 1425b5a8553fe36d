//! Idempotency keys: at most one active run per key, across processes.

mod common;

use std::time::Duration;

use common::{Fixture, Store, finish, instant_in, spawn_worker};
use runledger::{Error, RunFilter, RunSpec, RunStatus};

fn a_second_active_run_with_the_key_is_refused(store: Store) {
    let f = Fixture::new(store);
    let spec = RunSpec::new("sync").idempotency_key("sync:2026-11-22");
    let first = f.ledger.begin_run(spec.clone()).unwrap();
    let first_id = first.id();
    let err = f.ledger.begin_run(spec.clone()).unwrap_err();
    match &err {
        Error::Duplicate { key, existing } => {
            assert_eq!((key.as_str(), *existing), ("sync:2026-11-22", first.id()));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_duplicate());
    assert_eq!(
        err.to_string(),
        format!(
            "run {} already holds idempotency key \"sync:2026-11-22\"",
            first.id()
        )
    );
    // Nothing was inserted for the refused call.
    assert_eq!(f.ledger.runs(RunFilter::default()).unwrap().len(), 1);
    // A queued run holds the key too.
    first.succeed().unwrap();
    let queued = f.ledger.begin_run(spec.clone().queued()).unwrap();
    assert!(f.ledger.begin_run(spec.clone()).unwrap_err().is_duplicate());
    f.ledger.cancel(queued.id()).unwrap();
    // Once the holder ended, the key is free again.
    let again = f.ledger.begin_run(spec).unwrap();
    assert_ne!(again.id(), first_id);
    again.succeed().unwrap();
}

fn different_keys_do_not_collide(store: Store) {
    let f = Fixture::new(store);
    let a = f
        .ledger
        .begin_run(RunSpec::new("x").idempotency_key("a"))
        .unwrap();
    let b = f
        .ledger
        .begin_run(RunSpec::new("x").idempotency_key("b"))
        .unwrap();
    let c = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    let d = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    for run in [a, b, c, d] {
        run.succeed().unwrap();
    }
}

/// Six processes begin a run with one key at the same instant: exactly one
/// starts, and the others are told which run it is.
fn racing_processes_start_exactly_one_run(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let at = instant_in(400);
    let children: Vec<_> = (0..6)
        .map(|_| {
            spawn_worker(
                db,
                &[
                    "begin",
                    "import",
                    "--key",
                    "import:batch-7",
                    "--at",
                    &at,
                    "--hold-ms",
                    "600",
                ],
            )
        })
        .collect();
    let lines: Vec<String> = children.into_iter().map(|c| finish(c).remove(0)).collect();
    let started: Vec<&String> = lines.iter().filter(|l| l.starts_with("started ")).collect();
    assert_eq!(started.len(), 1, "{lines:?}");
    let id = started[0].strip_prefix("started ").unwrap();
    for line in lines.iter().filter(|l| !l.starts_with("started ")) {
        assert_eq!(line, &format!("duplicate {id}"), "{lines:?}");
    }
    let runs = f.ledger.runs(RunFilter::default().name("import")).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Succeeded);
}

/// Issue 20: within its window, a key returns the run that holds it, active
/// or finished; past the window (on the injected clock), a new run starts.
fn within_its_window_a_key_returns_the_run_even_finished(store: Store) {
    let f = Fixture::new(store);
    let hour = Duration::from_secs(3600);
    let nightly = || {
        RunSpec::new("nightly")
            .idempotency_key("nightly:2026-12-02")
            .idempotency_window(24 * hour)
    };
    let first = f.ledger.begin_run(nightly()).unwrap();
    let id = first.id();
    // Active: a duplicate, as without a window.
    assert_duplicate_of(f.ledger.begin_run(nightly()).map(|r| r.id()), id);
    first.fail("it broke").unwrap();
    // Finished, 23 hours later: still the same run, whatever its outcome;
    // create_run says the same.
    f.clock.advance(23 * hour);
    assert_duplicate_of(f.ledger.begin_run(nightly()).map(|r| r.id()), id);
    assert_duplicate_of(f.ledger.create_run(nightly()), id);
    // Without the window, a finished run does not hold the key.
    let plain = f
        .ledger
        .begin_run(RunSpec::new("nightly").idempotency_key("nightly:2026-12-02"))
        .unwrap();
    let plain_id = plain.id();
    plain.succeed().unwrap();
    // The latest run of the key is what the window measures from: an hour
    // later the first is 24 h old, but the plain one is not.
    f.clock.advance(hour);
    assert_duplicate_of(f.ledger.begin_run(nightly()).map(|r| r.id()), plain_id);
    // Past the window of every run of the key: a new run starts.
    f.clock.advance(23 * hour);
    let next = f.ledger.begin_run(nightly()).unwrap();
    assert!(next.id() != id && next.id() != plain_id);
    next.succeed().unwrap();
    // Other keys are not affected.
    let other = f
        .ledger
        .begin_run(
            RunSpec::new("nightly")
                .idempotency_key("nightly:2026-12-03")
                .idempotency_window(24 * hour),
        )
        .unwrap();
    other.succeed().unwrap();
}

fn assert_duplicate_of(outcome: runledger::Result<runledger::RunId>, id: runledger::RunId) {
    match outcome {
        Err(Error::Duplicate { existing, .. }) => assert_eq!(existing, id),
        other => panic!("expected a duplicate of run {id}: {other:?}"),
    }
}

/// Six processes begin a short run with one key and a window, at the same
/// instant: exactly one starts, though it may finish before the others ask.
fn racing_processes_with_a_window_start_exactly_one_run(store: Store) {
    let f = Fixture::new(store);
    let at = instant_in(400);
    let children: Vec<_> = (0..6)
        .map(|_| {
            spawn_worker(
                &f.location,
                &[
                    "begin",
                    "import",
                    "--key",
                    "import:batch-8",
                    "--window-ms",
                    "3600000",
                    "--at",
                    &at,
                ],
            )
        })
        .collect();
    let lines: Vec<String> = children.into_iter().map(|c| finish(c).remove(0)).collect();
    let started: Vec<&String> = lines.iter().filter(|l| l.starts_with("started ")).collect();
    assert_eq!(started.len(), 1, "{lines:?}");
    let id = started[0].strip_prefix("started ").unwrap();
    for line in lines.iter().filter(|l| !l.starts_with("started ")) {
        assert_eq!(line, &format!("duplicate {id}"), "{lines:?}");
    }
    assert_eq!(
        f.ledger
            .runs(RunFilter::default().name("import"))
            .unwrap()
            .len(),
        1
    );
}

on_both_stores!(
    within_its_window_a_key_returns_the_run_even_finished,
    racing_processes_with_a_window_start_exactly_one_run,
    a_second_active_run_with_the_key_is_refused,
    different_keys_do_not_collide,
    racing_processes_start_exactly_one_run,
);
