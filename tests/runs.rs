//! The run lifecycle: outcomes, guards, steps, the state machine and the
//! history of transitions.

mod common;

use std::time::Duration;

use common::{Fixture, Store, T0, finish, spawn_worker};
use runledger::{Error, EventKind, RunSpec, RunStatus, StepStatus};

fn a_run_records_what_its_spec_says(store: Store) {
    let f = Fixture::new(store);
    let parent = f.ledger.begin_run(RunSpec::new("nightly")).unwrap();
    let run = f
        .ledger
        .begin_run(
            RunSpec::new("build")
                .source("terminal")
                .metadata(serde_json::json!({"symbol": "AAPL"}))
                .log_path("logs/build.log")
                .idempotency_key("build:AAPL")
                .parent(parent.id()),
        )
        .unwrap();
    let r = f.ledger.run(run.id()).unwrap();
    assert_eq!(r.id, run.id());
    assert_eq!((r.name.as_str(), r.source.as_str()), ("build", "terminal"));
    assert_eq!(r.status, RunStatus::Running);
    assert_eq!(r.metadata, serde_json::json!({"symbol": "AAPL"}));
    assert_eq!(
        r.log_path.as_deref(),
        Some(std::path::Path::new("logs/build.log"))
    );
    assert_eq!(r.idempotency_key.as_deref(), Some("build:AAPL"));
    assert_eq!(r.parent, Some(parent.id()));
    assert_eq!(r.pid, std::process::id());
    assert_eq!(r.instance, f.ledger.instance_id());
    assert!(!r.host.is_empty());
    assert_eq!((r.created_at, r.started_at), (T0, Some(T0)));
    assert_eq!(
        (r.finished_at, r.exit_code, r.error.as_deref()),
        (None, None, None)
    );
    run.succeed().unwrap();
    parent.succeed().unwrap();
}

fn the_default_source_is_library_and_metadata_null(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    let r = f.ledger.run(run.id()).unwrap();
    assert_eq!(r.source, "library");
    assert_eq!(r.metadata, serde_json::Value::Null);
    run.succeed().unwrap();
}

fn each_outcome_ends_the_run_with_its_status(store: Store) {
    let f = Fixture::new(store);
    type End = Box<dyn Fn(runledger::Run) -> runledger::Result<RunStatus>>;
    let cases: Vec<(End, RunStatus, Option<i32>, Option<&str>)> = vec![
        (Box::new(|r| r.succeed()), RunStatus::Succeeded, None, None),
        (
            Box::new(|r| r.fail("disk full")),
            RunStatus::Failed,
            None,
            Some("disk full"),
        ),
        (Box::new(|r| r.exit(0)), RunStatus::Succeeded, Some(0), None),
        (
            Box::new(|r| r.exit(3)),
            RunStatus::Failed,
            Some(3),
            Some("exited with code 3"),
        ),
        (
            Box::new(|r| r.cancelled()),
            RunStatus::Cancelled,
            None,
            None,
        ),
    ];
    for (end, status, code, error) in cases {
        let run = f.ledger.begin_run(RunSpec::new("job")).unwrap();
        let id = run.id();
        f.clock.advance(Duration::from_secs(5));
        assert_eq!(end(run).unwrap(), status);
        let r = f.ledger.run(id).unwrap();
        assert_eq!(
            (r.status, r.exit_code, r.error.as_deref()),
            (status, code, error)
        );
        assert_eq!(r.finished_at, Some(f.ledger.now()));
    }
}

fn a_dropped_guard_fails_the_run_with_the_reason(store: Store) {
    let f = Fixture::new(store);
    let id = {
        let run = f.ledger.begin_run(RunSpec::new("early-return")).unwrap();
        run.id()
    };
    let r = f.ledger.run(id).unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.error.as_deref(), Some("dropped without outcome"));
}

fn a_panic_fails_the_run_as_panicked(store: Store) {
    let f = Fixture::new(store);
    let ledger = f.ledger.clone();
    let id = std::thread::spawn(move || {
        let run = ledger.begin_run(RunSpec::new("boom")).unwrap();
        let id = run.id();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _run = run;
            panic!("work failed");
        }));
        assert!(result.is_err());
        id
    })
    .join()
    .unwrap();
    let r = f.ledger.run(id).unwrap();
    assert_eq!(
        (r.status, r.error.as_deref()),
        (RunStatus::Failed, Some("panicked"))
    );
}

/// A real process that panics with a run open: unwinding closes the run.
fn a_panicking_process_leaves_its_run_failed(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let out = spawn_worker(db, &["panic", "crashy"])
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id: runledger::RunId = stdout
        .trim()
        .strip_prefix("started ")
        .unwrap()
        .parse()
        .unwrap();
    let r = f.ledger.run(id).unwrap();
    assert_eq!(
        (r.status, r.error.as_deref()),
        (RunStatus::Failed, Some("panicked"))
    );
}

fn a_run_that_ended_cannot_end_again_and_stays_as_it_was(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("job")).unwrap();
    let id = run.id();
    f.ledger.cancel(id).unwrap();
    run.cancelled().unwrap();
    let before = f.ledger.run(id).unwrap();
    let events_before = f.ledger.events(id).unwrap();

    // A second guard cannot exist for the same run, but a queued run that was
    // cancelled can still be told to start by its owner:
    let queued = f.ledger.begin_run(RunSpec::new("queued").queued()).unwrap();
    assert_eq!(f.ledger.cancel(queued.id()).unwrap(), RunStatus::Cancelled);
    let err = queued.start().unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidTransition {
                from: RunStatus::Cancelled,
                to: RunStatus::Running,
                ..
            }
        ),
        "{err:?}"
    );
    let err = queued.succeed().unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidTransition {
            from: RunStatus::Cancelled,
            to: RunStatus::Succeeded,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!(
            "run {} cannot go from cancelled to succeeded",
            f.ledger.runs(Default::default()).unwrap()[0].id
        )
    );

    assert_eq!(f.ledger.run(id).unwrap(), before);
    assert_eq!(f.ledger.events(id).unwrap(), events_before);
}

fn a_queued_run_starts_then_finishes(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("waits").queued()).unwrap();
    let r = f.ledger.run(run.id()).unwrap();
    assert_eq!((r.status, r.started_at), (RunStatus::Queued, None));
    f.clock.advance(Duration::from_secs(2));
    run.start().unwrap();
    let r = f.ledger.run(run.id()).unwrap();
    assert_eq!(
        (r.status, r.started_at),
        (RunStatus::Running, Some(f.ledger.now()))
    );
    assert!(run.start().unwrap_err().is_invalid_transition());
    run.succeed().unwrap();
}

/// The status moves in a run's history, in order.
fn status_moves(f: &Fixture, id: runledger::RunId) -> Vec<(Option<RunStatus>, RunStatus)> {
    f.ledger
        .events(id)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Status { from, to } => Some((from, to)),
            _ => None,
        })
        .collect()
}

/// Regression (issue 19): a run begun `.queued()`, given a lock and a step
/// that succeeded, then ended with `succeed()` without `start()`, got
/// `InvalidTransition { from: Queued, to: Succeeded }` and was stored as
/// `failed`, "dropped without outcome". A success is never recorded as a
/// failure: the run is recorded as started, then ended.
fn a_queued_run_ended_without_start_is_recorded_as_started_then_ended(store: Store) {
    use RunStatus::*;
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("waits").queued()).unwrap();
    let id = run.id();
    let lock = run.lock("deploy").unwrap();
    run.step("push").unwrap().succeed().unwrap();
    f.clock.advance(Duration::from_secs(2));
    assert_eq!(run.succeed().unwrap(), Succeeded);
    let r = f.ledger.run(id).unwrap();
    assert_eq!((r.status, r.error), (Succeeded, None));
    assert_eq!(r.started_at, Some(f.ledger.now()));
    assert_eq!(r.finished_at, Some(f.ledger.now()));
    assert_eq!(
        status_moves(&f, id),
        [
            (None, Queued),
            (Some(Queued), Running),
            (Some(Running), Succeeded)
        ]
    );
    assert!(!lock.is_held().unwrap(), "the lock ended with the run");
    assert!(f.ledger.locks().unwrap().is_empty());

    // fail and exit do the same; a cancel or a drop ends the run as it is.
    type End = fn(runledger::Run) -> runledger::Result<RunStatus>;
    /// How the run ends; its status, exit code and error; whether it started.
    type Case = (End, RunStatus, Option<i32>, Option<&'static str>, bool);
    let cases: [Case; 5] = [
        (
            |r| r.fail("bad input"),
            Failed,
            None,
            Some("bad input"),
            true,
        ),
        (|r| r.exit(0), Succeeded, Some(0), None, true),
        (
            |r| r.exit(3),
            Failed,
            Some(3),
            Some("exited with code 3"),
            true,
        ),
        (|r| r.cancelled(), Cancelled, None, None, false),
        (
            |r| {
                drop(r);
                Ok(Failed)
            },
            Failed,
            None,
            Some("dropped without outcome"),
            false,
        ),
    ];
    for (end, status, exit_code, error, started) in cases {
        let run = f.ledger.begin_run(RunSpec::new("waits").queued()).unwrap();
        let id = run.id();
        assert_eq!(end(run).unwrap(), status);
        let r = f.ledger.run(id).unwrap();
        assert_eq!(
            (r.status, r.exit_code, r.error.as_deref()),
            (status, exit_code, error)
        );
        let expected: Vec<_> = if started {
            vec![
                (None, Queued),
                (Some(Queued), Running),
                (Some(Running), status),
            ]
        } else {
            vec![(None, Queued), (Some(Queued), status)]
        };
        assert_eq!(status_moves(&f, id), expected, "{status} {error:?}");
        assert_eq!(r.started_at.is_some(), started);
    }
}

fn steps_aggregate_into_the_final_status(store: Store) {
    let f = Fixture::new(store);
    let cases = [
        (&[true, true, true][..], RunStatus::Succeeded, None),
        (
            &[true, false, true][..],
            RunStatus::Partial,
            Some("1 of 3 steps failed"),
        ),
        (
            &[false, false][..],
            RunStatus::Failed,
            Some("all 2 steps failed"),
        ),
    ];
    for (outcomes, expected, error) in cases {
        let run = f.ledger.begin_run(RunSpec::new("per-day")).unwrap();
        for (i, ok) in outcomes.iter().enumerate() {
            let step = run.step(format!("day-{i}")).unwrap();
            if *ok {
                step.succeed().unwrap();
            } else {
                step.fail("no data").unwrap();
            }
        }
        let id = run.id();
        assert_eq!(run.succeed().unwrap(), expected);
        let r = f.ledger.run(id).unwrap();
        assert_eq!((r.status, r.error.as_deref()), (expected, error));
        let ok = outcomes.iter().filter(|o| **o).count() as u32;
        assert_eq!(
            (r.progress.total, r.progress.succeeded, r.progress.failed),
            (outcomes.len() as u32, ok, outcomes.len() as u32 - ok)
        );
    }
}

fn progress_shows_the_running_step(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("scan")).unwrap();
    run.step("a").unwrap().succeed().unwrap();
    let b = run.step("b").unwrap();
    let p = f.ledger.run(run.id()).unwrap().progress;
    assert_eq!(
        (p.total, p.succeeded, p.failed, p.running, p.done()),
        (2, 1, 0, 1, 1)
    );
    assert_eq!(p.current.as_deref(), Some("b"));
    b.succeed().unwrap();
    let p = f.ledger.run(run.id()).unwrap().progress;
    assert_eq!((p.running, p.current), (0, None));
    run.succeed().unwrap();
}

fn step_names_are_unique_per_run(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    run.step("s").unwrap().succeed().unwrap();
    let err = run.step("s").unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(err.to_string().contains("already has a step"), "{err}");
    // Another run may use the name.
    let other = f.ledger.begin_run(RunSpec::new("y")).unwrap();
    other.step("s").unwrap().succeed().unwrap();
    assert_eq!(f.ledger.run(run.id()).unwrap().progress.total, 1);
    run.succeed().unwrap();
    other.succeed().unwrap();
}

fn a_dropped_step_is_failed_and_counts_against_the_run(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    run.step("ok").unwrap().succeed().unwrap();
    drop(run.step("forgotten").unwrap());
    let steps = f.ledger.steps(run.id()).unwrap();
    assert_eq!(steps[1].status, StepStatus::Failed);
    assert_eq!(steps[1].error.as_deref(), Some("dropped without outcome"));
    assert_eq!(run.succeed().unwrap(), RunStatus::Partial);
}

fn a_step_left_running_fails_when_its_run_ends(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    run.step("done").unwrap().succeed().unwrap();
    std::mem::forget(run.step("leaked").unwrap());
    let id = run.id();
    assert_eq!(run.succeed().unwrap(), RunStatus::Partial);
    let steps = f.ledger.steps(id).unwrap();
    assert_eq!(steps[1].status, StepStatus::Failed);
    assert!(steps[1].error.as_deref().unwrap().contains("run ended"));
    assert_eq!(f.ledger.run(id).unwrap().progress.running, 0);
}

fn a_step_of_a_finished_run_is_refused(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x").queued()).unwrap();
    f.ledger.cancel(run.id()).unwrap();
    let err = run.step("late").unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunFinished {
                status: RunStatus::Cancelled,
                ..
            }
        ),
        "{err:?}"
    );
}

fn every_transition_is_in_the_history_in_order(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x").queued()).unwrap();
    let id = run.id();
    f.clock.advance(Duration::from_secs(1));
    run.start().unwrap();
    run.step("s1").unwrap().fail("bad row").unwrap();
    f.ledger.cancel(id).unwrap();
    run.fail("gave up").unwrap();
    let events = f.ledger.events(id).unwrap();
    let kinds: Vec<_> = events
        .iter()
        .map(|e| (e.kind.clone(), e.message.clone()))
        .collect();
    use RunStatus::*;
    assert_eq!(
        kinds,
        vec![
            (
                EventKind::Status {
                    from: None,
                    to: Queued
                },
                None
            ),
            (
                EventKind::Status {
                    from: Some(Queued),
                    to: Running
                },
                None
            ),
            (
                EventKind::Step {
                    step: "s1".into(),
                    from: None,
                    to: StepStatus::Running
                },
                None
            ),
            (
                EventKind::Step {
                    step: "s1".into(),
                    from: Some(StepStatus::Running),
                    to: StepStatus::Failed
                },
                Some("bad row".into())
            ),
            (EventKind::CancelRequested, None),
            (
                EventKind::Status {
                    from: Some(Running),
                    to: Failed
                },
                Some("gave up".into())
            ),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(events[0].at, T0);
    assert_eq!(events[1].at, T0.saturating_add(Duration::from_secs(1)));
    // Events of other runs are not mixed in.
    let other = f.ledger.begin_run(RunSpec::new("y")).unwrap();
    assert_eq!(f.ledger.events(id).unwrap().len(), events.len());
    other.succeed().unwrap();
}

fn records_serialize_to_json(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    let id = run.id();
    run.succeed().unwrap();
    let json = serde_json::to_value(f.ledger.run(id).unwrap()).unwrap();
    assert_eq!(json["status"], "succeeded");
    assert_eq!(json["id"], i64::from(id));
    assert_eq!(json["created_at"], T0.to_string());
    let events = serde_json::to_value(f.ledger.events(id).unwrap()).unwrap();
    assert_eq!(events[1]["kind"], "status");
    assert_eq!(events[1]["from"], "running");
    assert_eq!(events[1]["to"], "succeeded");
}

fn work_across_processes_is_visible_to_all(store: Store) {
    let f = Fixture::new(store);
    let db = &f.location;
    let lines = finish(spawn_worker(db, &["begin", "from-another-process"]));
    let id: runledger::RunId = lines[0].strip_prefix("started ").unwrap().parse().unwrap();
    let r = f.ledger.run(id).unwrap();
    assert_eq!(
        (r.name.as_str(), r.source.as_str(), r.status),
        ("from-another-process", "worker", RunStatus::Succeeded)
    );
    assert_ne!(r.pid, std::process::id());
    assert_ne!(r.instance, f.ledger.instance_id());
}

/// A ledger in a fresh folder that waits at most `busy_timeout` for the
/// write lock.
fn impatient_ledger(
    busy_timeout: Duration,
) -> (tempfile::TempDir, std::path::PathBuf, runledger::Ledger) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let ledger = runledger::Ledger::builder(&db)
        .busy_timeout(busy_timeout)
        .open()
        .unwrap();
    (dir, db, ledger)
}

/// Holds SQLite's write lock from another connection for `hold`, like a
/// stuck writer in another process.
fn hold_write_lock(db: &std::path::Path, hold: Duration) -> std::thread::JoinHandle<()> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(hold);
        conn.execute_batch("COMMIT").unwrap();
    })
}

/// Regression: an outcome that could not be written used to consume the
/// guard and leave the run `running` with no one to end it.
#[test]
fn an_outcome_that_cannot_be_written_still_closes_the_run() {
    let (_dir, db, ledger) = impatient_ledger(Duration::from_millis(400));
    let run = ledger.begin_run(RunSpec::new("unlucky")).unwrap();
    let id = run.id();
    // The lock outlives the outcome's wait (400 ms) but not the guard's
    // second try (400 to 800 ms).
    let holder = hold_write_lock(&db, Duration::from_millis(600));
    let err = run.succeed().unwrap_err();
    assert!(err.is_busy(), "{err:?}");
    holder.join().unwrap();
    let r = ledger.run(id).unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    let reason = r.error.unwrap();
    assert!(
        reason.starts_with("its outcome could not be recorded"),
        "{reason}"
    );
}

#[test]
fn a_step_outcome_that_cannot_be_written_still_closes_the_step() {
    let (_dir, db, ledger) = impatient_ledger(Duration::from_millis(400));
    let run = ledger.begin_run(RunSpec::new("unlucky")).unwrap();
    let step = run.step("s").unwrap();
    let holder = hold_write_lock(&db, Duration::from_millis(600));
    assert!(step.succeed().unwrap_err().is_busy());
    holder.join().unwrap();
    let steps = ledger.steps(run.id()).unwrap();
    assert_eq!(steps[0].status, StepStatus::Failed);
    assert!(
        steps[0]
            .error
            .as_deref()
            .unwrap()
            .starts_with("its outcome could not be recorded")
    );
    assert_eq!(run.succeed().unwrap(), RunStatus::Failed);
}

#[test]
fn a_busy_ledger_is_reported_as_busy_with_its_path() {
    let (_dir, db, ledger) = impatient_ledger(Duration::from_millis(100));
    let holder = hold_write_lock(&db, Duration::from_millis(400));
    let err = ledger.begin_run(RunSpec::new("blocked")).unwrap_err();
    holder.join().unwrap();
    assert!(err.is_busy(), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&*ledger.path().to_string_lossy()),
        "{message}"
    );
    assert!(std::error::Error::source(&err).is_some());
    // Nothing was written, and the ledger works again once the lock is gone.
    assert!(ledger.runs(Default::default()).unwrap().is_empty());
    ledger
        .begin_run(RunSpec::new("later"))
        .unwrap()
        .succeed()
        .unwrap();
}

on_both_stores!(
    a_run_records_what_its_spec_says,
    the_default_source_is_library_and_metadata_null,
    each_outcome_ends_the_run_with_its_status,
    a_dropped_guard_fails_the_run_with_the_reason,
    a_panic_fails_the_run_as_panicked,
    a_panicking_process_leaves_its_run_failed,
    a_run_that_ended_cannot_end_again_and_stays_as_it_was,
    a_queued_run_starts_then_finishes,
    a_queued_run_ended_without_start_is_recorded_as_started_then_ended,
    steps_aggregate_into_the_final_status,
    progress_shows_the_running_step,
    step_names_are_unique_per_run,
    a_dropped_step_is_failed_and_counts_against_the_run,
    a_step_left_running_fails_when_its_run_ends,
    a_step_of_a_finished_run_is_refused,
    every_transition_is_in_the_history_in_order,
    records_serialize_to_json,
    work_across_processes_is_visible_to_all,
);
