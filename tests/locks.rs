//! Lock semantics: modes, multi-key grants, conflicts, the queue, tokens,
//! runs that own locks, forced release. Two handles opened separately are two
//! instances, as two processes would be; tests/locks_processes.rs uses real
//! processes.

mod common;

use std::time::Duration;

use common::{Fixture, Store};
use runledger::{Error, Ledger, LockKey, LockMode, LockRequest, LockState, RunSpec, RunStatus};

fn second(f: &common::Fixture) -> Ledger {
    Ledger::builder(&f.location).open().unwrap()
}

/// Waits (at most 20 s) until `ledger.locks()` satisfies `ready`.
fn wait_until_locks(ledger: &Ledger, ready: impl Fn(&[runledger::LockRecord]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let locks = ledger.locks().unwrap();
        if ready(&locks) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {locks:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn an_exclusive_lock_refuses_others_and_names_the_holder(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let run = f.ledger.begin_run(RunSpec::new("build")).unwrap();
    let guard = run.lock("build:symbol=AAPL").unwrap();
    assert_eq!(guard.keys(), ["build:symbol=AAPL"]);
    assert_eq!(guard.mode(), LockMode::Exclusive);
    assert_eq!(guard.run(), Some(run.id()));
    let err = other.try_lock("build:symbol=AAPL").unwrap_err();
    let Error::Conflict {
        keys,
        holders,
        self_conflict,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(keys, &["build:symbol=AAPL"]);
    assert!(!self_conflict);
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].run, Some((run.id(), "build".to_owned())));
    assert_eq!(holders[0].pid, std::process::id());
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "lock \"build:symbol=AAPL\" is held by run {} (build, exclusive, pid {}",
            run.id(),
            std::process::id()
        )),
        "{message}"
    );
    guard.release().unwrap();
    other
        .try_lock("build:symbol=AAPL")
        .unwrap()
        .release()
        .unwrap();
    run.succeed().unwrap();
}

fn shared_holders_coexist_and_keep_exclusive_out(store: Store) {
    let f = Fixture::new(store);
    let (a, b, c) = (second(&f), second(&f), second(&f));
    let shared = LockRequest::new(["dataset"])
        .mode(LockMode::Shared)
        .no_wait();
    let g1 = a.acquire(shared.clone()).unwrap();
    let g2 = b.acquire(shared.clone()).unwrap();
    assert!(c.try_lock("dataset").unwrap_err().is_conflict());
    drop((g1, g2));
    let x = c.try_lock("dataset").unwrap();
    assert!(a.acquire(shared).unwrap_err().is_conflict());
    x.release().unwrap();
}

fn slots_admit_at_most_n_holders_and_must_agree_on_n(store: Store) {
    let f = Fixture::new(store);
    let ledgers: Vec<Ledger> = (0..3).map(|_| second(&f)).collect();
    let gpu = LockRequest::new(["gpu"]).mode(LockMode::Slots(2)).no_wait();
    let g0 = ledgers[0].acquire(gpu.clone()).unwrap();
    let g1 = ledgers[1].acquire(gpu.clone()).unwrap();
    assert!(ledgers[2].acquire(gpu.clone()).unwrap_err().is_conflict());
    let err = ledgers[2]
        .acquire(LockRequest::new(["gpu"]).mode(LockMode::Slots(3)).no_wait())
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(err.to_string().contains("used with 2 slots"), "{err}");
    assert!(
        ledgers[2]
            .acquire(LockRequest::new(["gpu"]).mode(LockMode::Shared).no_wait())
            .unwrap_err()
            .is_conflict()
    );
    drop(g0);
    let g2 = ledgers[2].acquire(gpu).unwrap();
    drop((g1, g2));
    // Idle again: another capacity is fine now.
    ledgers[0]
        .acquire(LockRequest::new(["gpu"]).mode(LockMode::Slots(3)).no_wait())
        .unwrap()
        .release()
        .unwrap();
}

fn several_keys_are_taken_all_or_nothing(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let b = other.try_lock("b").unwrap();
    let err = f
        .ledger
        .acquire(LockRequest::new(["a", "b", "c"]).no_wait())
        .unwrap_err();
    assert!(err.is_conflict());
    // Nothing of the request is held: "a" and "c" are free.
    assert!(f.ledger.locks().unwrap().iter().all(|l| l.key == "b"));
    other.try_lock("a").unwrap().release().unwrap();
    drop(b);
    let all = f
        .ledger
        .acquire(LockRequest::new(["c", "a", "b", "a"]).no_wait())
        .unwrap();
    assert_eq!(all.keys(), ["a", "b", "c"]);
    for key in ["a", "b", "c"] {
        assert!(other.try_lock(key).unwrap_err().is_conflict());
    }
}

fn asking_again_for_a_key_one_holds_fails_at_once(store: Store) {
    let f = Fixture::new(store);
    let _held = f.ledger.lock("mine").unwrap();
    let err = fails_at_once_as_a_self_conflict(&f.ledger);
    assert!(
        err.to_string()
            .contains("the calling thread (or task) itself; waiting for it would never end"),
        "{err}"
    );
    assert_eq!(
        f.ledger.locks().unwrap().len(),
        1,
        "no queue place was left behind"
    );
}

/// The same when the request could wait at the key's gate for long: the
/// gate is held by this very process, which only the database can tell.
fn a_self_conflict_fails_at_once_whatever_the_wait_at_the_gate(store: Store) {
    let f = Fixture::new(store);
    let ledger = f
        .builder()
        .queue_after(Duration::from_secs(60))
        .open()
        .unwrap();
    let _held = ledger.lock("mine").unwrap();
    fails_at_once_as_a_self_conflict(&ledger);
}

/// Asks for `mine` again, allowed to wait 30 s: the request must fail at
/// once as a self-conflict. Returns the error.
fn fails_at_once_as_a_self_conflict(ledger: &Ledger) -> Error {
    let started = std::time::Instant::now();
    let err = ledger
        .acquire(LockRequest::new(["mine"]).wait(Duration::from_secs(30)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                self_conflict: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    err
}

fn a_holder_without_a_run_is_named_by_its_process(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let _held = other.lock("plain").unwrap();
    let message = f.ledger.try_lock("plain").unwrap_err().to_string();
    let expected = format!("lock \"plain\" is held by pid {} on ", std::process::id());
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains("(exclusive, for "), "{message}");
}

fn a_wait_ends_in_a_timeout_and_leaves_the_queue(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let _held = other.lock("busy").unwrap();
    let err = f
        .ledger
        .acquire(LockRequest::new(["busy"]).wait(Duration::from_millis(150)))
        .unwrap_err();
    let Error::Timeout {
        keys,
        waited,
        holders,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(keys, &["busy"]);
    assert!(*waited >= Duration::from_millis(150));
    assert_eq!(holders.len(), 1);
    assert!(
        err.to_string().starts_with("gave up after waiting"),
        "{err}"
    );
    let locks = f.ledger.locks().unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].state, LockState::Held);
}

fn a_waiter_is_served_when_the_holder_releases(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let held = other.lock("k").unwrap();
    let ledger = f.ledger.clone();
    let waiter = std::thread::spawn(move || {
        ledger.acquire(LockRequest::new(["k"]).wait(Duration::from_secs(10)))
    });
    // The waiter shows in the queue.
    wait_until_locks(&f.ledger, |locks| {
        locks.iter().any(|l| l.state == LockState::Waiting)
    });
    let first_token = held.token();
    held.release().unwrap();
    // The release handed the key to the waiter in its own transaction: no
    // poll was needed for the grant.
    let locks = f.ledger.locks().unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].state, LockState::Held);
    let granted = waiter.join().unwrap().unwrap();
    assert!(granted.token() > first_token);
    assert_eq!(Some(granted.token()), locks[0].token);
}

/// A stream of shared requests must not overtake an exclusive request that
/// queued before them.
fn a_queued_exclusive_request_is_not_starved_by_shared_ones(store: Store) {
    let f = Fixture::new(store);
    let (reader, writer, late) = (second(&f), second(&f), second(&f));
    let shared = LockRequest::new(["table"]).mode(LockMode::Shared);
    let r = reader.acquire(shared.clone().no_wait()).unwrap();
    let w = std::thread::spawn(move || {
        writer
            .acquire(LockRequest::new(["table"]).wait(Duration::from_secs(10)))
            .map(|g| g.token())
    });
    wait_until_locks(&f.ledger, |locks| locks.len() >= 2);
    // A later shared request is compatible with the holder but not with the
    // exclusive waiter ahead of it: refused.
    let err = late.acquire(shared.clone().no_wait()).unwrap_err();
    let Error::Conflict { holders, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        holders
            .iter()
            .any(|h| h.state == LockState::Waiting && h.mode == LockMode::Exclusive),
        "{err}"
    );
    drop(r);
    let writer_token = w.join().unwrap().unwrap();
    let after = late.acquire(shared.no_wait()).unwrap();
    assert!(after.token() > writer_token);
}

fn tokens_grow_per_key_across_releases_and_handles(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let mut last = 0;
    for i in 0..10 {
        let ledger = if i % 2 == 0 { &f.ledger } else { &other };
        let g = ledger.try_lock("fenced").unwrap();
        assert!(g.token() > last);
        last = g.token();
    }
    // A multi-key grant is above every earlier grant of each of its keys.
    let g = f
        .ledger
        .acquire(LockRequest::new(["fenced", "fresh"]).no_wait())
        .unwrap();
    assert!(g.token() > last);
    drop(g);
    // ...and a reopened ledger continues from there.
    let again = Ledger::builder(&f.location)
        .open()
        .unwrap()
        .try_lock("fresh")
        .unwrap();
    assert!(again.token() > last + 1);
}

fn a_runs_locks_end_with_the_run(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let run = f.ledger.begin_run(RunSpec::new("job").queued()).unwrap();
    let guard = run.acquire(LockRequest::new(["x", "y"]).no_wait()).unwrap();
    run.start().unwrap();
    let id = run.id();
    assert_eq!(run.succeed().unwrap(), RunStatus::Succeeded);
    assert!(f.ledger.locks().unwrap().is_empty());
    assert!(!guard.is_held().unwrap());
    // Released with its run: not lost.
    guard.release().unwrap();
    other.try_lock("x").unwrap().release().unwrap();
    assert!(f.ledger.run(id).unwrap().status.is_terminal());
}

fn a_finished_run_cannot_take_locks(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("job").queued()).unwrap();
    f.ledger.cancel(run.id()).unwrap();
    let err = run.lock("late").unwrap_err();
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

fn a_forced_release_is_recorded_and_the_holder_finds_out(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let guard = other.lock("stuck").unwrap();
    assert!(guard.is_held().unwrap());
    assert_eq!(
        f.ledger
            .force_unlock("stuck", "operator: holder hung")
            .unwrap(),
        1
    );
    assert!(!guard.is_held().unwrap());
    let err = guard.release().unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    assert!(err.to_string().contains("taken away"), "{err}");
    // Someone else can take it now, with a higher token.
    f.ledger.try_lock("stuck").unwrap().release().unwrap();
    let row = common::raw_query_text(f.store, &f.location, "SELECT kind, reason FROM lock_events");
    assert_eq!(row, ["forced", "operator: holder hung"]);
    // A run's lock forced away is in the run's own history.
    let run = other.begin_run(RunSpec::new("held-by-a-run")).unwrap();
    let _kept = run.lock("run-held").unwrap();
    f.ledger
        .force_unlock("run-held", "stuck since the outage")
        .unwrap();
    let events = f.ledger.events(run.id()).unwrap();
    let forced = events.last().unwrap();
    assert_eq!(
        forced.kind,
        runledger::EventKind::LockForced {
            keys: vec!["run-held".into()]
        }
    );
    let message = forced.message.as_deref().unwrap();
    assert!(
        message.starts_with("stuck since the outage (by pid "),
        "{message}"
    );
    assert!(
        f.ledger
            .force_unlock("stuck", " ")
            .unwrap_err()
            .is_invalid_input()
    );
}

fn locks_lists_holders_and_waiters(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let run = other.begin_run(RunSpec::new("owner")).unwrap();
    let _held = run.acquire(LockRequest::new(["a", "b"]).no_wait()).unwrap();
    let ledger = f.ledger.clone();
    let waiter = std::thread::spawn(move || {
        ledger.acquire(LockRequest::new(["b"]).wait(Duration::from_millis(500)))
    });
    wait_until_locks(&f.ledger, |locks| locks.len() >= 3);
    let locks = f.ledger.locks().unwrap();
    let summary: Vec<_> = locks
        .iter()
        .map(|l| (l.key.as_str(), l.state, l.run_name.as_deref()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", LockState::Held, Some("owner")),
            ("b", LockState::Held, Some("owner")),
            ("b", LockState::Waiting, None)
        ]
    );
    assert_eq!(locks[0].keys, ["a", "b"]);
    assert!(locks[0].token.is_some() && locks[2].token.is_none());
    assert!(locks[1].ticket < locks[2].ticket);
    let json = serde_json::to_value(&locks[0]).unwrap();
    assert_eq!(json["state"], "held");
    assert_eq!(json["mode"], "exclusive");
    assert!(json.get("capacity").is_none());
    let mut slots = locks[0].clone();
    slots.mode = LockMode::Slots(2);
    let json = serde_json::to_value(&slots).unwrap();
    assert_eq!(
        (json["mode"].as_str(), json["capacity"].as_u64()),
        (Some("slots"), Some(2))
    );
    assert!(waiter.join().unwrap().unwrap_err().is_timeout());
    run.succeed().unwrap();
}

fn bad_keys_and_requests_are_refused(store: Store) {
    let f = Fixture::new(store);
    for bad in ["", " k", "k\n", &"k".repeat(257)] {
        let err = f.ledger.try_lock(bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "lock key",
                    ..
                }
            ),
            "{bad:?}: {err:?}"
        );
    }
    assert!(
        f.ledger
            .acquire(LockRequest::new(Vec::<String>::new()))
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        f.ledger
            .acquire(LockRequest::new(["k"]).mode(LockMode::Slots(0)))
            .unwrap_err()
            .is_invalid_input()
    );
    let key = LockKey::new("build")
        .part("symbol", "AAPL")
        .part("lake", "raw");
    f.ledger.try_lock(key).unwrap().release().unwrap();
}

/// Regression: lock ids were reused after deletion, so a stale guard could
/// "release" (delete) a later holder's lock of another key.
fn a_stale_guard_never_touches_a_later_lock(store: Store) {
    let f = Fixture::new(store);
    let (a, b, c) = (second(&f), second(&f), second(&f));
    let stale = a.lock("a").unwrap();
    f.ledger.force_unlock("a", "test").unwrap();
    let later = b.lock("b").unwrap();
    assert!(stale.release().unwrap_err().is_lock_lost());
    assert!(later.is_held().unwrap());
    assert!(c.try_lock("b").unwrap_err().is_conflict());
}

/// Regression: the guard of a run's lock, dropped after its run ended, used
/// to delete whatever lock had reused its id.
fn a_guard_outliving_its_run_never_touches_a_later_lock(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let run = f.ledger.begin_run(RunSpec::new("job")).unwrap();
    let guard = run.lock("a").unwrap();
    run.succeed().unwrap();
    let later = other.lock("b").unwrap();
    guard.release().unwrap(); // released with its run: not lost
    assert!(later.is_held().unwrap());
}

/// Regression: ending a run deleted its held rows one by one, handing a
/// freed key to the run's own queued request, which then stayed held.
fn a_run_that_ends_leaves_no_lock_behind_even_while_waiting(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let run = f.ledger.begin_run(RunSpec::new("job").queued()).unwrap();
    let shared = LockRequest::new(["a"]).mode(LockMode::Shared).no_wait();
    let _mine = run.acquire(shared.clone()).unwrap();
    let theirs = other.acquire(shared).unwrap();
    std::thread::scope(|s| {
        // The run also waits for "a" exclusively: behind the other holder.
        let waiting =
            s.spawn(|| run.acquire(LockRequest::new(["a"]).wait(Duration::from_secs(10))));
        wait_until_locks(&f.ledger, |locks| {
            locks.iter().any(|l| l.state == LockState::Waiting)
        });
        drop(theirs); // now only the run's own shared lock is in the way
        f.ledger.cancel(run.id()).unwrap();
        let err = waiting.join().unwrap().unwrap_err();
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
    });
    assert!(
        f.ledger.locks().unwrap().is_empty(),
        "{:?}",
        f.ledger.locks().unwrap()
    );
}

/// Regression: a request for a free key queued behind a waiter that this
/// very holder blocks, and both waited forever.
fn a_waiter_held_back_by_my_lock_does_not_block_me(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let mine = f.ledger.lock("a").unwrap();
    std::thread::scope(|s| {
        let theirs =
            s.spawn(|| other.acquire(LockRequest::new(["a", "b"]).wait(Duration::from_secs(10))));
        wait_until_locks(&f.ledger, |locks| {
            locks.iter().any(|l| l.state == LockState::Waiting)
        });
        // Before the fix this waited out its 5 s and failed with a timeout.
        let b = f
            .ledger
            .acquire(LockRequest::new(["b"]).wait(Duration::from_secs(5)))
            .unwrap();
        drop((mine, b));
        assert_eq!(theirs.join().unwrap().unwrap().keys(), ["a", "b"]);
    });
}

/// Regression: a release granted queued readers only up to the first one
/// that did not fit, leaving later ones that fit to the 100 ms poll.
fn a_release_grants_every_queued_reader_that_fits(store: Store) {
    let f = Fixture::new(store);
    let (holder, m_holder) = (second(&f), second(&f));
    let readers: Vec<Ledger> = (0..3).map(|_| second(&f)).collect();
    let k = holder.lock("k").unwrap();
    let _m = m_holder.lock("m").unwrap();
    std::thread::scope(|s| {
        let requests = [vec!["k"], vec!["k", "m"], vec!["k"]];
        let mut threads = Vec::new();
        for (i, keys) in requests.into_iter().enumerate() {
            let reader = &readers[i];
            threads.push(s.spawn(move || {
                reader.acquire(
                    LockRequest::new(keys)
                        .mode(LockMode::Shared)
                        .wait(Duration::from_millis(1500)),
                )
            }));
            wait_until_locks(&f.ledger, |locks| {
                locks
                    .iter()
                    .filter(|l| l.state == LockState::Waiting && l.key == "k")
                    .count()
                    == i + 1
            });
        }
        k.release().unwrap();
        // Granted by the release itself, not by a later poll.
        let held_on_k: Vec<_> = f
            .ledger
            .locks()
            .unwrap()
            .into_iter()
            .filter(|l| l.key == "k" && l.state == LockState::Held)
            .collect();
        assert_eq!(held_on_k.len(), 2, "{held_on_k:?}");
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(results[0].is_ok() && results[2].is_ok());
        assert!(results[1].as_ref().unwrap_err().is_timeout());
    });
}

/// Regression: a waiter of this same process ahead was reported as a
/// self-conflict ("waiting would never end") although it would end.
fn a_queued_request_of_this_process_is_not_a_self_conflict(store: Store) {
    let f = Fixture::new(store);
    let other = second(&f);
    let _theirs = other.lock("k").unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            f.ledger
                .acquire(LockRequest::new(["k"]).wait(Duration::from_millis(500)))
        });
        wait_until_locks(&f.ledger, |locks| {
            locks.iter().any(|l| l.state == LockState::Waiting)
        });
        let err = f.ledger.try_lock("k").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Conflict {
                    self_conflict: false,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(waiter.join().unwrap().unwrap_err().is_timeout());
    });
}

on_both_stores!(
    an_exclusive_lock_refuses_others_and_names_the_holder,
    shared_holders_coexist_and_keep_exclusive_out,
    slots_admit_at_most_n_holders_and_must_agree_on_n,
    several_keys_are_taken_all_or_nothing,
    asking_again_for_a_key_one_holds_fails_at_once,
    a_self_conflict_fails_at_once_whatever_the_wait_at_the_gate,
    a_holder_without_a_run_is_named_by_its_process,
    a_wait_ends_in_a_timeout_and_leaves_the_queue,
    a_waiter_is_served_when_the_holder_releases,
    a_queued_exclusive_request_is_not_starved_by_shared_ones,
    tokens_grow_per_key_across_releases_and_handles,
    a_runs_locks_end_with_the_run,
    a_finished_run_cannot_take_locks,
    a_forced_release_is_recorded_and_the_holder_finds_out,
    locks_lists_holders_and_waiters,
    bad_keys_and_requests_are_refused,
    a_stale_guard_never_touches_a_later_lock,
    a_guard_outliving_its_run_never_touches_a_later_lock,
    a_run_that_ends_leaves_no_lock_behind_even_while_waiting,
    a_waiter_held_back_by_my_lock_does_not_block_me,
    a_release_grants_every_queued_reader_that_fits,
    a_queued_request_of_this_process_is_not_a_self_conflict,
);
