//! One `Ledger` for a whole process: threads that share one ledger (clones
//! of it) take turns on a key as processes do, in the same queue, with the
//! same tokens; only a thread asking again for what it holds is refused.
//! tests/locks_processes.rs mixes such threads with other processes.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Fixture, Store, wait_for_waiters};
use runledger::{Error, Ledger, LockMode, LockRequest, LockState, RunSpec};

/// A critical section that fails if two are inside at once.
#[derive(Default)]
struct Witness {
    inside: AtomicBool,
    entries: AtomicUsize,
}

impl Witness {
    fn enter(&self) {
        assert!(
            !self.inside.swap(true, Ordering::SeqCst),
            "two holders inside at once"
        );
        self.entries.fetch_add(1, Ordering::SeqCst);
    }

    fn exit(&self) {
        assert!(self.inside.swap(false, Ordering::SeqCst));
    }
}

fn eight_threads_take_forty_turns_each_through_one_ledger(store: Store) {
    let f = Fixture::new(store);
    let witness = Witness::default();
    let tokens = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..8 {
            let ledger = f.ledger.clone();
            let (witness, tokens) = (&witness, &tokens);
            s.spawn(move || {
                for _ in 0..40 {
                    let guard = ledger
                        .acquire(LockRequest::new(["turns"]).wait(Duration::from_secs(60)))
                        .unwrap();
                    witness.enter();
                    tokens.lock().unwrap().push(guard.token());
                    std::thread::yield_now();
                    witness.exit();
                    guard.release().unwrap();
                }
            });
        }
    });
    assert_eq!(witness.entries.load(Ordering::SeqCst), 320);
    // One grant after another: the tokens were taken in strictly growing
    // order, in the order the holders entered.
    let tokens = tokens.into_inner().unwrap();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert!(f.ledger.locks().unwrap().is_empty());
}

fn a_thread_waits_in_the_queue_for_another_threads_lock(store: Store) {
    let f = Fixture::new(store);
    // Strictly first come, first served: no wait at the key's gate.
    let ledger = f.builder().queue_after(Duration::ZERO).open().unwrap();
    let held = ledger.lock("k").unwrap();
    std::thread::scope(|s| {
        let first =
            s.spawn(|| ledger.acquire(LockRequest::new(["k"]).wait(Duration::from_secs(30))));
        wait_for_waiters(&ledger, 1);
        let second =
            s.spawn(|| ledger.acquire(LockRequest::new(["k"]).wait(Duration::from_secs(30))));
        wait_for_waiters(&ledger, 2);
        // The queue is visible, with both waiters owned by this instance.
        let locks = ledger.locks().unwrap();
        let waiting: Vec<_> = locks
            .iter()
            .filter(|l| l.state == LockState::Waiting)
            .collect();
        assert_eq!(waiting.len(), 2, "{locks:?}");
        assert!(waiting.iter().all(|l| l.instance == ledger.instance_id()));
        assert!(waiting[0].ticket < waiting[1].ticket);
        let before = held.token();
        held.release().unwrap();
        let first = first.join().unwrap().unwrap();
        // The first waiter holds; the second still waits behind it.
        assert!(first.token() > before);
        assert!(first.is_held().unwrap());
        let locks = ledger.locks().unwrap();
        assert_eq!(
            locks.iter().map(|l| l.state).collect::<Vec<_>>(),
            [LockState::Held, LockState::Waiting],
            "{locks:?}"
        );
        let token = first.token();
        first.release().unwrap();
        assert!(second.join().unwrap().unwrap().token() > token);
    });
}

fn asking_again_for_a_key_the_thread_holds_is_refused_at_once(store: Store) {
    let f = Fixture::new(store);
    let ledger = f
        .builder()
        .queue_after(Duration::from_secs(60))
        .open()
        .unwrap();
    let _held = ledger.lock("mine").unwrap();
    let started = Instant::now();
    let err = ledger
        .acquire(LockRequest::new(["other", "mine"]).wait(Duration::from_secs(30)))
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let Error::Conflict {
        ref holders,
        self_conflict: true,
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(holders.iter().any(|h| h.key == "mine" && h.by_caller));
    let message = err.to_string();
    assert!(message.contains("lock \"mine\" is held by"), "{message}");
    assert!(
        message.contains(": the calling thread (or task) itself"),
        "{message}"
    );
    // Nothing was left in the queue, and the free key was not taken.
    assert_eq!(ledger.locks().unwrap().len(), 1);
    // Another thread of the same ledger is not refused: it waits, and
    // gives up at its deadline.
    std::thread::scope(|s| {
        let waited = s
            .spawn(|| ledger.acquire(LockRequest::new(["mine"]).wait(Duration::from_millis(200))))
            .join()
            .unwrap();
        assert!(waited.unwrap_err().is_timeout());
    });
}

fn a_thread_killed_by_a_panic_releases_its_lock_on_unwind(store: Store) {
    let f = Fixture::new(store);
    let ledger = f.ledger.clone();
    let died = std::thread::spawn(move || {
        let _guard = ledger.lock("k").unwrap();
        panic!("the holder dies");
    })
    .join();
    assert!(died.is_err());
    assert!(f.ledger.locks().unwrap().is_empty());
    f.ledger.try_lock("k").unwrap().release().unwrap();
}

fn releasing_one_guard_never_releases_another_threads(store: Store) {
    let f = Fixture::new(store);
    let read = || {
        f.ledger
            .acquire(LockRequest::new(["table"]).mode(LockMode::Shared))
            .unwrap()
    };
    let (mine, theirs) = std::thread::scope(|s| {
        let theirs = s.spawn(read);
        (read(), theirs.join().unwrap())
    });
    assert_ne!(mine.token(), theirs.token());
    mine.release().unwrap();
    assert!(theirs.is_held().unwrap());
    // A writer of another thread is still kept out by the other reader.
    std::thread::scope(|s| {
        let err = s
            .spawn(|| f.ledger.try_lock("table").unwrap_err())
            .join()
            .unwrap();
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
    });
    theirs.release().unwrap();
    assert!(f.ledger.locks().unwrap().is_empty());
}

fn slots_count_the_guards_of_one_instance(store: Store) {
    let f = Fixture::new(store);
    let slot = |wait: bool| {
        let request = LockRequest::new(["gpu"]).mode(LockMode::Slots(2));
        f.ledger.acquire(if wait {
            request.wait(Duration::from_secs(30))
        } else {
            request.no_wait()
        })
    };
    let first = slot(true).unwrap();
    std::thread::scope(|s| {
        let second = s.spawn(|| slot(true)).join().unwrap().unwrap();
        // Two guards of one instance fill both slots.
        let third = s.spawn(|| slot(false)).join().unwrap().unwrap_err();
        assert!(
            matches!(
                third,
                Error::Conflict {
                    self_conflict: false,
                    ..
                }
            ),
            "{third:?}"
        );
        // A waiting thread gets the slot that another thread frees.
        let waiter = s.spawn(|| slot(true));
        wait_for_waiters(&f.ledger, 1);
        second.release().unwrap();
        assert!(waiter.join().unwrap().unwrap().token() > first.token());
    });
}

fn a_thread_holding_every_slot_is_refused_at_once(store: Store) {
    let f = Fixture::new(store);
    let request = || {
        LockRequest::new(["gpu"])
            .mode(LockMode::Slots(2))
            .wait(Duration::from_secs(30))
    };
    let _one = f.ledger.acquire(request()).unwrap();
    let _two = f.ledger.acquire(request()).unwrap();
    let started = Instant::now();
    let err = f.ledger.acquire(request()).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
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
}

fn a_runs_locks_taken_from_other_threads_take_turns(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("fan-out")).unwrap();
    let witness = Witness::default();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (run, witness) = (&run, &witness);
            s.spawn(move || {
                for _ in 0..10 {
                    let guard = run
                        .acquire(LockRequest::new(["shard"]).wait(Duration::from_secs(60)))
                        .unwrap();
                    assert_eq!(guard.run(), Some(run.id()));
                    witness.enter();
                    std::thread::yield_now();
                    witness.exit();
                    guard.release().unwrap();
                }
            });
        }
    });
    assert_eq!(witness.entries.load(Ordering::SeqCst), 40);
    run.succeed().unwrap();
}

/// Regression (issue 16): a waiter that only *another* thread's lock holds
/// back is a real waiter, served first come, first served; before, any lock
/// of the instance made it not count, and this request overtook it.
fn a_waiter_held_back_by_another_threads_lock_is_not_overtaken(store: Store) {
    let f = Fixture::new(store);
    let ledger = f.builder().queue_after(Duration::ZERO).open().unwrap();
    let other = Ledger::builder(&f.location).open().unwrap();
    let a = Arc::new(Mutex::new(Some(ledger.lock("a").unwrap())));
    std::thread::scope(|s| {
        // Another process's request for a and b waits for this thread's a.
        let theirs =
            s.spawn(|| other.acquire(LockRequest::new(["a", "b"]).wait(Duration::from_secs(30))));
        wait_for_waiters(&ledger, 1);
        // A second thread asks for b: it holds nothing, so it waits behind
        // the earlier request.
        let b = s.spawn(|| ledger.acquire(LockRequest::new(["b"]).wait(Duration::from_secs(30))));
        // One record per key: two for the first request, one for this.
        wait_for_waiters(&ledger, 3);
        drop(a.lock().unwrap().take());
        let theirs = theirs.join().unwrap().unwrap();
        let token = theirs.token();
        theirs.release().unwrap();
        assert!(b.join().unwrap().unwrap().token() > token);
    });
}

/// Regression (issue 16 review): this thread holds a; a waiter for a and b
/// is queued, and a waiter for b behind it. This thread's request for the
/// free b must not wait for the second waiter, which (first come, first
/// served) waits for the first, which waits for this thread.
fn a_chain_of_waiters_held_back_by_my_lock_does_not_block_me(store: Store) {
    let f = Fixture::new(store);
    let ledger = f.builder().queue_after(Duration::ZERO).open().unwrap();
    let a = ledger.lock("a").unwrap();
    std::thread::scope(|s| {
        let both =
            s.spawn(|| ledger.acquire(LockRequest::new(["a", "b"]).wait(Duration::from_secs(30))));
        wait_for_waiters(&ledger, 1);
        let b_only =
            s.spawn(|| ledger.acquire(LockRequest::new(["b"]).wait(Duration::from_secs(30))));
        // One record per key: two for the first request, one for this.
        wait_for_waiters(&ledger, 3);
        let started = Instant::now();
        let mine = ledger
            .acquire(LockRequest::new(["b"]).wait(Duration::from_secs(10)))
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        drop((mine, a));
        drop(both.join().unwrap().unwrap());
        b_only.join().unwrap().unwrap().release().unwrap();
    });
}

fn a_guard_moved_to_another_thread_is_released_by_it(store: Store) {
    let f = Fixture::new(store);
    let guard = f.ledger.lock("moved").unwrap();
    std::thread::scope(|s| {
        s.spawn(move || guard.release().unwrap());
    });
    f.ledger.try_lock("moved").unwrap().release().unwrap();
}

on_both_stores!(
    eight_threads_take_forty_turns_each_through_one_ledger,
    a_thread_waits_in_the_queue_for_another_threads_lock,
    asking_again_for_a_key_the_thread_holds_is_refused_at_once,
    a_thread_killed_by_a_panic_releases_its_lock_on_unwind,
    releasing_one_guard_never_releases_another_threads,
    slots_count_the_guards_of_one_instance,
    a_thread_holding_every_slot_is_refused_at_once,
    a_runs_locks_taken_from_other_threads_take_turns,
    a_waiter_held_back_by_another_threads_lock_is_not_overtaken,
    a_chain_of_waiters_held_back_by_my_lock_does_not_block_me,
    a_guard_moved_to_another_thread_is_released_by_it,
);
