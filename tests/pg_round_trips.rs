//! Round trips to the PostgreSQL server per public call (issue 17): a call
//! that does not wait costs at most two, its transaction's start with its
//! work, and its commit.
//!
//! Counted by a TCP proxy of the test's own between the ledger and the
//! server: a round trip is a turn of the conversation, the client speaking
//! again after the server answered, however many messages (or TCP
//! segments) each turn holds. The ledger has one pooled connection and no
//! background thread, so every turn counted is the call's own. Each call
//! is counted in steady use (its statements prepared by an earlier call of
//! the same kind), and at best of three, so that a pooled connection's
//! check after an idle second on a busy machine is not counted against it.
//!
//! Needs `RUNLEDGER_PG_URL` when the tests are built; without it the test is
//! listed as ignored, with a message saying so.
#![cfg(feature = "postgres")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::proxy::{Counter, best_of_three};
use common::{Place, Store};
use runledger::{Ledger, LockMode, LockRequest, RunSpec};

/// `location` (`postgres://user@host:port/db…#schema`) with its host and
/// port replaced by `addr`, and the host and port it had.
fn through(location: &str, addr: SocketAddr) -> (String, String) {
    let at = location.find('@').expect("a URL with a user") + 1;
    let end = at + location[at..].find('/').expect("a URL with a database");
    (
        format!("{}{addr}{}", &location[..at], &location[end..]),
        location[at..end].to_owned(),
    )
}

/// A ledger of `place` through a [`Counter`] of its own: one pooled
/// connection, no background thread.
fn counted(place: &Place) -> (Counter, Ledger) {
    counted_with(place, "")
}

/// [`counted`], with `query` (`name=value&…`) added to its URL.
fn counted_with(place: &Place, query: &str) -> (Counter, Ledger) {
    counted_with_timeout(place, query, Duration::from_secs(30))
}

/// [`counted_with`], with a busy timeout of `busy`.
fn counted_with_timeout(place: &Place, query: &str, busy: Duration) -> (Counter, Ledger) {
    drop(place.open());
    let location = match (query, place.location.split_once('#')) {
        ("", _) | (_, None) => place.location.clone(),
        (query, Some((url, schema))) => {
            let and = if url.contains('?') { '&' } else { '?' };
            format!("{url}{and}{query}#{schema}")
        }
    };
    let (url, upstream) = through(&location, "127.0.0.1:1".parse().unwrap());
    let counter = Counter::start(upstream);
    let (url, _) = through(&url, counter.addr);
    let ledger = Ledger::builder(url)
        .background(false)
        .pool_size(1)
        .busy_timeout(busy)
        .open()
        .unwrap();
    (counter, ledger)
}

/// Each call that does not wait, in steady use, at best of three tries. A
/// grant of free keys and a release nobody waits for are one round trip
/// each.
fn every_call_that_does_not_wait_takes_at_most_two_round_trips() {
    let place = Place::new(Store::Postgres);
    let (counter, ledger) = counted(&place);

    let mut worst = Vec::new();
    let mut note = |what: &str, turns: &mut dyn FnMut() -> u64| {
        // The first of each kind prepares its statements.
        turns();
        let best = (0..3).map(|_| turns()).min().unwrap();
        worst.push((what.to_owned(), best));
    };
    let ledger = &ledger;
    let c = &counter;
    note("begin_run", &mut || {
        let (n, run) = c.count(|| ledger.begin_run(RunSpec::new("counted")).unwrap());
        run.succeed().unwrap();
        n
    });
    note("create_run (queued)", &mut || {
        c.count(|| ledger.create_run(RunSpec::new("counted").queued()).unwrap())
            .0
    });
    note("Run::start", &mut || {
        let run = ledger
            .adopt_run_queued(ledger.create_run(RunSpec::new("q").queued()).unwrap())
            .unwrap();
        let (n, ()) = c.count(|| run.start().unwrap());
        run.succeed().unwrap();
        n
    });
    let run = ledger.begin_run(RunSpec::new("steps")).unwrap();
    let mut i = 0;
    note("Run::step", &mut || {
        i += 1;
        let (n, step) = c.count(|| run.step(format!("s{i}")).unwrap());
        step.succeed().unwrap();
        n
    });
    note("Step::succeed", &mut || {
        i += 1;
        let step = run.step(format!("s{i}")).unwrap();
        c.count(|| step.succeed().unwrap()).0
    });
    note("Step::fail", &mut || {
        i += 1;
        let step = run.step(format!("s{i}")).unwrap();
        c.count(|| step.fail("no").unwrap()).0
    });
    note("Run::event", &mut || {
        c.count(|| run.event("e", serde_json::json!({"n": 1})).unwrap())
            .0
    });
    note("Run::heartbeat", &mut || {
        c.count(|| run.heartbeat().unwrap()).0
    });
    note("Run::set_log_path", &mut || {
        c.count(|| run.set_log_path("/tmp/counted.log").unwrap()).0
    });
    note("Run::is_cancel_requested", &mut || {
        c.count(|| run.is_cancel_requested().unwrap()).0
    });
    drop(run);
    note("Run::succeed", &mut || {
        let run = ledger.begin_run(RunSpec::new("ends")).unwrap();
        c.count(|| run.succeed().unwrap()).0
    });
    note("Run::fail", &mut || {
        let run = ledger.begin_run(RunSpec::new("ends")).unwrap();
        c.count(|| run.fail("no").unwrap()).0
    });
    note("Ledger::cancel", &mut || {
        let run = ledger.begin_run(RunSpec::new("cancelled")).unwrap();
        let (n, _) = c.count(|| ledger.cancel(run.id()).unwrap());
        run.cancelled().unwrap();
        n
    });
    note("Ledger::try_lock", &mut || {
        let (n, guard) = c.count(|| ledger.try_lock("counted").unwrap());
        guard.release().unwrap();
        n
    });
    note("LockGuard::release", &mut || {
        let guard = ledger.try_lock("counted").unwrap();
        c.count(|| guard.release().unwrap()).0
    });
    note("Ledger::acquire (two keys, shared)", &mut || {
        let request = LockRequest::new(["a", "b"])
            .mode(LockMode::Shared)
            .no_wait();
        let (n, guard) = c.count(|| ledger.acquire(request).unwrap());
        guard.release().unwrap();
        n
    });
    note("LockGuard::is_held", &mut || {
        let guard = ledger.try_lock("counted").unwrap();
        let (n, _) = c.count(|| guard.is_held().unwrap());
        guard.release().unwrap();
        n
    });
    note("Run::lock + release", &mut || {
        let run = ledger.begin_run(RunSpec::new("locks")).unwrap();
        let (n, guard) = c.count(|| run.lock("run-key").unwrap());
        guard.release().unwrap();
        run.succeed().unwrap();
        n
    });
    note("Ledger::heartbeat", &mut || {
        c.count(|| ledger.heartbeat().unwrap()).0
    });

    // Each went through the proxy (else it would count nothing).
    let uncounted: Vec<_> = worst.iter().filter(|(_, n)| *n == 0).collect();
    assert!(
        uncounted.is_empty(),
        "calls of no round trip: {uncounted:?} (all: {worst:?})"
    );
    let over: Vec<_> = worst.iter().filter(|(_, n)| *n > 2).collect();
    assert!(
        over.is_empty(),
        "calls over two round trips: {over:?} (all: {worst:?})"
    );
    for call in [
        "Ledger::try_lock",
        "LockGuard::release",
        "Ledger::acquire (two keys, shared)",
        "Run::lock + release",
    ] {
        let turns = worst.iter().find(|(what, _)| what == call).unwrap().1;
        assert_eq!(turns, 1, "{call}: {worst:?}");
    }
}

/// A lock call of one round trip is a transaction of one statement, which
/// takes its session's default isolation. Where the server, the database or
/// the role default to another level than read committed (here
/// `serializable`, given as the connection's startup option, the way a
/// role's setting comes), the ledger's connections set theirs back to read
/// committed as they open: a grant of a free key and a release nobody waits
/// for stay one round trip each, and are granted and released all the same.
fn a_lock_call_under_another_default_isolation_still_takes_one_round_trip() {
    let place = Place::new(Store::Postgres);
    let (counter, ledger) = counted_with(
        &place,
        "options=-c%20default_transaction_isolation%3Dserializable",
    );
    let grant = best_of_three(&mut || {
        let (n, guard) = counter.count(|| ledger.try_lock("k").unwrap());
        guard.release().unwrap();
        n
    });
    let release = best_of_three(&mut || {
        let guard = ledger.try_lock("k").unwrap();
        counter.count(|| guard.release().unwrap()).0
    });
    assert_eq!((grant, release), (1, 1));
    let kinds = ledger.lock_history(Some("k"), 100).unwrap();
    assert_eq!(kinds.len(), 16, "{kinds:?}");
}

/// A grant and a release in one round trip whose answers are lost, after
/// the server had the batch: each is found committed by its effect, and
/// neither is applied twice (sent again, the grant would find its key
/// taken, by itself, and fail).
fn a_grant_and_a_release_whose_answers_are_lost_are_each_applied_once() {
    let place = Place::new(Store::Postgres);
    let (counter, ledger) = counted(&place);
    ledger.try_lock("k").unwrap().release().unwrap();

    counter.sever_next();
    let guard = ledger.try_lock("k").unwrap();
    assert_eq!(counter.severed.load(Ordering::SeqCst), 1);
    assert!(guard.is_held().unwrap());
    let locks = ledger.locks().unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].token, Some(guard.token()), "{locks:?}");

    counter.sever_next();
    guard.release().expect("released once, not lost");
    assert_eq!(counter.severed.load(Ordering::SeqCst), 2);
    assert!(ledger.locks().unwrap().is_empty());
    // Two grants and two releases, none twice.
    let kinds: Vec<String> = ledger
        .lock_history(Some("k"), 10)
        .unwrap()
        .iter()
        .map(|e| e.kind.to_string())
        .collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
}

/// A grant in one round trip whose answer is lost while the server then
/// stays out of reach: the call fails (its outcome could not be settled),
/// and the lock it left, held by this process with no guard, is released
/// once the server is back, by the ledger's next lock call or its next
/// heartbeat: its key is free for others, never left held until the
/// process exits.
fn a_grant_whose_answer_is_lost_and_not_settled_leaves_no_lock_behind() {
    let place = Place::new(Store::Postgres);
    let (counter, ledger) = counted_with_timeout(&place, "", Duration::from_millis(500));
    let other = place.open();
    let settlers: [(&str, &dyn Fn()); 2] = [
        ("a lock call", &|| {
            ledger.try_lock("j").unwrap().release().unwrap()
        }),
        ("a heartbeat", &|| ledger.heartbeat().unwrap()),
    ];
    for (key, (how, settle)) in ["k1", "k2"].into_iter().zip(settlers) {
        ledger.try_lock(key).unwrap().release().unwrap();
        let severed = counter.severed.load(Ordering::SeqCst);
        counter.sever_next_and_go_down();
        let err = ledger
            .try_lock(key)
            .expect_err("its outcome could not be settled");
        assert_eq!(counter.severed.load(Ordering::SeqCst), severed + 1);
        // The grant committed: the key is held, by the ledger's process.
        let held = other.locks().unwrap();
        assert_eq!(held.len(), 1, "{err}: {held:?}");
        assert!(other.try_lock(key).is_err());

        counter.up();
        settle();
        assert!(
            other.try_lock(key).is_ok(),
            "{key} is free again after {how}: {:?}",
            other.locks()
        );
        let kinds: Vec<String> = other
            .lock_history(Some(key), 10)
            .unwrap()
            .iter()
            .map(|e| e.kind.to_string())
            .collect();
        // The first pair, the lost grant and its release, the other's pair.
        assert_eq!(kinds.len(), 6, "{how}: {kinds:?}");
    }
}

pg_tests!(
    every_call_that_does_not_wait_takes_at_most_two_round_trips,
    a_lock_call_under_another_default_isolation_still_takes_one_round_trip,
    a_grant_and_a_release_whose_answers_are_lost_are_each_applied_once,
    a_grant_whose_answer_is_lost_and_not_settled_leaves_no_lock_behind
);
