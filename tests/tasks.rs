//! Async tasks sharing one `Ledger` (feature `tokio`), on a current-thread
//! runtime, where a wait that blocked the thread would freeze every task:
//! the holder could never release, and each of these tests would end in a
//! timeout.
#![cfg(feature = "tokio")]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use common::{Fixture, Store, finish, spawn_worker};
use runledger::{EventKind, Ledger, LockRequest, LockState, RunSpec};

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits, yielding to the runtime, until the ledger shows `n` waiters.
async fn waiters(ledger: &Ledger, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let locks = ledger.locks().unwrap();
        if locks
            .iter()
            .filter(|l| l.state == LockState::Waiting)
            .count()
            >= n
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never queued: {locks:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn a_task_waits_while_another_task_of_the_runtime_holds(store: Store) {
    let f = Fixture::new(store);
    current_thread().block_on(async {
        let held = f.ledger.lock_async("k").await.unwrap();
        let before = held.token();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let holder = tokio::spawn(async move {
            released.await.unwrap();
            held.release().unwrap();
        });
        let ledger = f.ledger.clone();
        let waiter = tokio::spawn(async move {
            ledger
                .acquire_async(LockRequest::new(["k"]).wait(Duration::from_secs(20)))
                .await
        });
        waiters(&f.ledger, 1).await;
        release.send(()).unwrap();
        let guard = waiter.await.unwrap().unwrap();
        assert!(guard.token() > before);
        holder.await.unwrap();
        guard.release().unwrap();
    });
    assert!(f.ledger.locks().unwrap().is_empty());
}

/// `tasks` tasks of the current runtime, `turns` turns each on one key of
/// `ledger`, each turn yielding to the others while it holds; fails if two
/// are ever inside. Returns how many turns were taken.
async fn take_turns(ledger: &Ledger, tasks: usize, turns: usize) -> usize {
    let inside = Arc::new(AtomicBool::new(false));
    let entries = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..tasks)
        .map(|_| {
            let (ledger, inside, entries) = (ledger.clone(), inside.clone(), entries.clone());
            tokio::spawn(async move {
                for _ in 0..turns {
                    let guard = ledger
                        .acquire_async(LockRequest::new(["turns"]).wait(Duration::from_secs(60)))
                        .await
                        .unwrap();
                    assert!(!inside.swap(true, Ordering::SeqCst), "two tasks inside");
                    entries.fetch_add(1, Ordering::SeqCst);
                    // Let the others run (and ask) while this one holds.
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    inside.store(false, Ordering::SeqCst);
                    guard.release().unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    entries.load(Ordering::SeqCst)
}

fn six_tasks_sharing_one_ledger_take_turns(store: Store) {
    let f = Fixture::new(store);
    let taken = current_thread().block_on(take_turns(&f.ledger, 6, 15));
    assert_eq!(taken, 90);
    assert!(f.ledger.locks().unwrap().is_empty());
}

fn a_runs_async_locks_wait_for_each_other(store: Store) {
    let f = Fixture::new(store);
    let run = Arc::new(f.ledger.begin_run(RunSpec::new("async")).unwrap());
    current_thread().block_on(async {
        let first = run.lock_async("k").await.unwrap();
        assert_eq!(first.run(), Some(run.id()));
        let theirs = run.clone();
        let second = tokio::spawn(async move {
            theirs
                .acquire_async(LockRequest::new(["k"]).wait(Duration::from_secs(20)))
                .await
        });
        waiters(&f.ledger, 1).await;
        let token = first.token();
        first.release().unwrap();
        assert!(second.await.unwrap().unwrap().token() > token);
    });
    Arc::into_inner(run).unwrap().succeed().unwrap();
}

fn an_abandoned_wait_leaves_the_key_free_for_the_next_process(store: Store) {
    let f = Fixture::new(store);
    let other = Ledger::builder(&f.location).open().unwrap();
    let held = other.lock("k").unwrap();
    current_thread().block_on(async {
        let wait = f
            .ledger
            .acquire_async(LockRequest::new(["k"]).wait(Duration::from_secs(60)));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), wait)
                .await
                .is_err()
        );
    });
    // The dropped future took its queue place with it.
    let locks = f.ledger.locks().unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].instance, other.instance_id());
    held.release().unwrap();
    let next = spawn_worker(&f.location, &["hold", "k", "--wait-ms", "0"]);
    let said = finish(next);
    assert!(said[0].starts_with("held "), "{said:?}");
}

/// A holder in another process releases: the task waiting for the key is
/// woken and granted (on a current-thread runtime, whose thread the wait
/// never blocks).
fn a_release_in_another_process_wakes_a_waiting_task(store: Store) {
    let f = Fixture::new(store);
    let mut holder = spawn_worker(&f.location, &["hold", "k", "--hold-ms", "300"]);
    let held = common::next_line(&mut holder);
    assert!(held.starts_with("held "), "{held}");
    let token: u64 = held["held ".len()..].parse().unwrap();
    current_thread().block_on(async {
        let ticks = Arc::new(AtomicUsize::new(0));
        // Another task keeps running while this one waits.
        let ticking = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticking.fetch_add(1, Ordering::SeqCst);
            }
        });
        let guard = f
            .ledger
            .acquire_async(LockRequest::new(["k"]).wait(Duration::from_secs(20)))
            .await
            .unwrap();
        assert!(guard.token() > token);
        assert!(ticks.load(Ordering::SeqCst) > 0, "the runtime froze");
        ticker.abort();
        guard.release().unwrap();
    });
    assert_eq!(finish(holder), ["released"]);
}

/// The release hands the key to the queued future, which is dropped before
/// it polls again: the grant is released at once.
fn a_grant_that_raced_with_the_drop_is_released_at_once(store: Store) {
    let f = Fixture::new(store);
    let other = Ledger::builder(&f.location).open().unwrap();
    let held = other.lock("k").unwrap();
    current_thread().block_on(async {
        let mut wait = Box::pin(
            f.ledger
                .acquire_async(LockRequest::new(["k"]).wait(Duration::from_secs(60))),
        );
        // One poll: it takes its place in the queue, and waits.
        std::future::poll_fn(|cx| {
            assert!(wait.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        held.release().unwrap();
        // Handed over by the release itself: held by the waiting future.
        let locks = f.ledger.locks().unwrap();
        assert_eq!(locks.len(), 1, "{locks:?}");
        assert_eq!(locks[0].state, LockState::Held);
        assert_eq!(locks[0].instance, f.ledger.instance_id());
        drop(wait);
    });
    assert!(f.ledger.locks().unwrap().is_empty());
    other.try_lock("k").unwrap().release().unwrap();
}

fn a_watch_waits_for_events_of_another_task_and_another_process(store: Store) {
    let f = Fixture::new(store);
    let mut watch = f.ledger.watch(f.ledger.events_cursor().unwrap()).unwrap();
    current_thread().block_on(async {
        let ledger = f.ledger.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let run = ledger.begin_run(RunSpec::new("from-a-task")).unwrap();
            let id = run.id();
            run.succeed().unwrap();
            id
        });
        let event = tokio::time::timeout(Duration::from_secs(20), watch.next_async())
            .await
            .expect("an event within 20 s")
            .unwrap()
            .unwrap();
        assert_eq!(event.run, Some(writer.await.unwrap()));
        assert!(matches!(event.kind, EventKind::Status { .. }));
        // The rest of that run's events, then one of another process, read
        // through the watch as a Stream.
        let worker = spawn_worker(&f.location, &["begin", "from-a-process"]);
        let said = finish(worker);
        let id: i64 = said[0].strip_prefix("started ").unwrap().parse().unwrap();
        let from_process = async {
            loop {
                let next = std::future::poll_fn(|cx| {
                    futures_core::Stream::poll_next(Pin::new(&mut watch), cx)
                })
                .await;
                let event = next.expect("the feed never ends").unwrap();
                if event.run.map(i64::from) == Some(id) {
                    return event;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), from_process)
            .await
            .expect("the other process's event within 20 s");
    });
}

/// Futures joined in one task are one caller, but an async request is never
/// refused for the caller's own locks: the sibling that holds the key
/// releases it, and the other gets it.
fn two_futures_of_one_task_take_turns(store: Store) {
    let f = Fixture::new(store);
    current_thread().block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let holder = async {
            let guard = f.ledger.lock_async("k").await.unwrap();
            tx.send(()).unwrap();
            waiters(&f.ledger, 1).await;
            guard.release().unwrap();
        };
        let waiter = async {
            rx.await.unwrap();
            f.ledger
                .acquire_async(LockRequest::new(["k"]).wait(Duration::from_secs(20)))
                .await
        };
        let ((), got) = tokio::join!(holder, waiter);
        got.unwrap().release().unwrap();
    });
}

/// The last clone of a ledger dropped inside a task: the PostgreSQL client's
/// connections close off the runtime (they used to panic: "Cannot start a
/// runtime from within a runtime").
fn the_last_clone_dropped_inside_a_task_closes_cleanly(store: Store) {
    let f = Fixture::new(store);
    let other = f.builder().open().unwrap();
    current_thread().block_on(async move {
        other.lock_async("k").await.unwrap().release().unwrap();
        drop(other);
    });
    let locks = f.ledger.locks().unwrap();
    assert!(locks.is_empty(), "{locks:?}");
}

/// A blocking wait on a watch, then async ones: the async wait must not
/// block the runtime's thread (the blocking wait left the shared socket
/// blocking, with a receive timeout).
fn a_watch_waited_on_blocking_then_async_never_blocks_the_runtime(store: Store) {
    let f = Fixture::new(store);
    let mut watch = f.ledger.watch(f.ledger.events_cursor().unwrap()).unwrap();
    let runtime = current_thread();
    runtime.block_on(async {
        let quiet = tokio::time::timeout(Duration::from_millis(20), watch.next_async()).await;
        assert!(quiet.is_err());
    });
    assert!(
        watch
            .next_timeout(Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    let run = f.ledger.begin_run(RunSpec::new("one")).unwrap();
    runtime.block_on(async {
        let event = watch.next_async().await.unwrap().unwrap();
        assert_eq!(event.run, Some(run.id()));
        // Drain this run's events, then nothing: a 100 ms timeout ends in
        // about 100 ms, not after the blocking wait's 1 s receive timeout.
        let started = std::time::Instant::now();
        while tokio::time::timeout(Duration::from_millis(100), watch.next_async())
            .await
            .is_ok()
        {}
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "the runtime's thread was blocked for {:?}",
            started.elapsed()
        );
    });
    run.succeed().unwrap();
}

/// A watch polled in one runtime, then in another, while the first is idle
/// or gone: the later one is woken by the commit.
fn a_watch_moves_between_runtimes(store: Store) {
    let f = Fixture::new(store);
    let mut watch = f.ledger.watch(f.ledger.events_cursor().unwrap()).unwrap();
    let first = current_thread();
    first.block_on(async {
        let quiet = tokio::time::timeout(Duration::from_millis(20), watch.next_async()).await;
        assert!(quiet.is_err());
    });
    let mut in_a_new_runtime = |when: &str| {
        let ledger = f.ledger.clone();
        let got = current_thread().block_on(async {
            let writer = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let run = ledger.begin_run(RunSpec::new("moved")).unwrap();
                run.succeed().unwrap();
            });
            // Within the fallback's second: the wake-up, not a re-read.
            let got = tokio::time::timeout(Duration::from_millis(900), watch.next_async()).await;
            writer.await.unwrap();
            got
        });
        assert!(got.is_ok(), "{when}: no event");
        // The rest of that run's events.
        while watch
            .next_timeout(Duration::from_millis(50))
            .unwrap()
            .is_some()
        {}
    };
    in_a_new_runtime("the first runtime idle");
    drop(first);
    in_a_new_runtime("the first runtime gone");
}

/// The futures can go to a multi-threaded runtime's other threads.
#[test]
fn the_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let f = Fixture::new(Store::Sqlite);
    let run = f.ledger.begin_run(RunSpec::new("send")).unwrap();
    send(&f.ledger.lock_async("k"));
    send(&f.ledger.acquire_async(LockRequest::new(["k"])));
    send(&run.lock_async("k"));
    send(&run.acquire_async(LockRequest::new(["k"])));
    let mut watch = f.ledger.watch(runledger::EventCursor::START).unwrap();
    send(&watch.next_async());
}

/// On a multi-threaded runtime, tasks move between threads: each is still
/// the one caller it was, and they take turns.
fn tasks_of_a_multi_threaded_runtime_take_turns(store: Store) {
    let f = Fixture::new(store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(runtime.block_on(take_turns(&f.ledger, 4, 10)), 40);
}

on_both_stores!(
    a_task_waits_while_another_task_of_the_runtime_holds,
    six_tasks_sharing_one_ledger_take_turns,
    a_runs_async_locks_wait_for_each_other,
    an_abandoned_wait_leaves_the_key_free_for_the_next_process,
    a_grant_that_raced_with_the_drop_is_released_at_once,
    a_watch_waits_for_events_of_another_task_and_another_process,
    tasks_of_a_multi_threaded_runtime_take_turns,
    two_futures_of_one_task_take_turns,
    the_last_clone_dropped_inside_a_task_closes_cleanly,
    a_watch_waited_on_blocking_then_async_never_blocks_the_runtime,
    a_watch_moves_between_runtimes,
    a_release_in_another_process_wakes_a_waiting_task,
);
