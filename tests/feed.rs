//! The event feed within one process: custom events, `events_since` and its
//! cursor, and `watch`. Across processes: `handoff_processes.rs`.

mod common;

use std::time::Duration;

use common::wait_for_waiters;
use common::{Fixture, Store};
use runledger::{
    EventCursor, EventId, EventKind, EventRecord, LockMode, LockRequest, RunId, RunSpec,
};

fn the_feed_returns_every_event_of_every_run_once_in_commit_order(store: Store) {
    let f = Fixture::new(store);
    let a = f.ledger.begin_run(RunSpec::new("a")).unwrap();
    let b = f.ledger.begin_run(RunSpec::new("b")).unwrap();
    a.event("progress", serde_json::json!({"done": 1})).unwrap();
    let step = b.step("s").unwrap();
    step.succeed().unwrap();
    let (a_id, b_id) = (a.id(), b.id());
    a.succeed().unwrap();
    f.ledger.cancel(b_id).unwrap();
    b.cancelled().unwrap();

    // Read in pages of two: the pages join up exactly.
    let mut cursor = EventCursor::START;
    let mut seen = Vec::new();
    loop {
        let page = f.ledger.events_since(cursor, 2).unwrap();
        assert!(page.events.len() <= 2);
        if page.events.is_empty() {
            assert_eq!(page.next, cursor, "an empty page keeps the cursor");
            break;
        }
        assert_eq!(
            page.next,
            EventCursor::after(page.events.last().unwrap().id)
        );
        cursor = page.next;
        seen.extend(page.events);
    }
    let ids: Vec<EventId> = seen.iter().map(|e| e.id).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ids, sorted, "strictly increasing, no repeats");
    // Everything the per-run histories hold, and nothing else.
    let mut per_run = f.ledger.events(a_id).unwrap();
    per_run.extend(f.ledger.events(b_id).unwrap());
    per_run.sort_by_key(|e| e.id);
    assert_eq!(seen, per_run);
    let summary: Vec<(i64, &str)> = seen
        .iter()
        .map(|e| {
            let what = match &e.kind {
                EventKind::Status { to, .. } => to.as_str(),
                EventKind::Step { .. } => "step",
                EventKind::CancelRequested => "cancel",
                EventKind::Custom { .. } => "custom",
                other => panic!("unexpected {other:?}"),
            };
            (i64::from(e.run.unwrap()), what)
        })
        .collect();
    let (a, b) = (i64::from(a_id), i64::from(b_id));
    assert_eq!(
        summary,
        [
            (a, "running"),
            (b, "running"),
            (a, "custom"),
            (b, "step"),
            (b, "step"),
            (a, "succeeded"),
            (b, "cancel"),
            (b, "cancelled"),
        ]
    );
    assert_eq!(f.ledger.events_cursor().unwrap(), cursor);
}

fn a_custom_event_is_recorded_with_its_data_and_checked(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("train")).unwrap();
    run.event(
        "checkpoint",
        serde_json::json!({"epoch": 3, "path": "ckpt/3"}),
    )
    .unwrap();
    run.event("tick", serde_json::Value::Null).unwrap();
    let events = f.ledger.events(run.id()).unwrap();
    assert_eq!(
        events[1].kind,
        EventKind::Custom {
            name: "checkpoint".into(),
            data: serde_json::json!({"epoch": 3, "path": "ckpt/3"}),
        }
    );
    assert_eq!(
        events[2].kind,
        EventKind::Custom {
            name: "tick".into(),
            data: serde_json::Value::Null,
        }
    );
    let json = serde_json::to_value(&events[1]).unwrap();
    assert_eq!(json["kind"], "custom");
    assert_eq!(json["name"], "checkpoint");
    assert_eq!(json["data"]["epoch"], 3);

    // Names follow the run-name rules; data the metadata limits.
    for bad in ["", " padded", "bell\u{7}"] {
        let e = run.event(bad, serde_json::Value::Null).unwrap_err();
        assert!(e.is_invalid_input(), "{bad:?}: {e}");
        assert!(e.to_string().starts_with("invalid event name"), "{e}");
    }
    let big = serde_json::json!("x".repeat(70 * 1024));
    let e = run.event("big", big).unwrap_err();
    assert!(e.to_string().starts_with("invalid event data of "), "{e}");
    let mut deep = serde_json::json!(1);
    for _ in 0..200 {
        deep = serde_json::json!([deep]);
    }
    assert!(run.event("deep", deep).unwrap_err().is_invalid_input());
    assert_eq!(f.ledger.events(run.id()).unwrap().len(), 3, "none recorded");

    run.succeed().unwrap();
}

fn a_finished_run_takes_no_more_events(store: Store) {
    let f = Fixture::new(store);
    // Ended by another path while its guard lives: a queued run cancelled.
    let run = f.ledger.begin_run(RunSpec::new("queued").queued()).unwrap();
    f.ledger.cancel(run.id()).unwrap();
    let e = run
        .event("late", serde_json::json!(1))
        .expect_err("the run was cancelled");
    assert!(e.is_invalid_transition(), "{e}");
    assert_eq!(f.ledger.events(run.id()).unwrap().len(), 2, "nothing added");
}

#[test]
fn a_cursor_reads_and_prints_as_its_number_and_refuses_garbage() {
    let cursor: EventCursor = "42".parse().unwrap();
    assert_eq!(cursor, EventCursor::after(42));
    assert_eq!(cursor.to_string(), "42");
    assert_eq!(i64::from(cursor), 42);
    assert_eq!(serde_json::to_string(&cursor).unwrap(), "42");
    for bad in ["", "-1", "x", "1.5"] {
        let e = bad.parse::<EventCursor>().unwrap_err();
        assert!(e.is_invalid_input(), "{bad:?}");
        assert!(e.to_string().starts_with("invalid event cursor"), "{e}");
    }
    assert_eq!(EventCursor::after(-5), EventCursor::START);
}

fn a_watch_yields_new_events_in_order_and_resumes_from_its_cursor(store: Store) {
    let f = Fixture::new(store);
    let before = f.ledger.begin_run(RunSpec::new("before")).unwrap();
    let mut watch = f.ledger.watch(f.ledger.events_cursor().unwrap()).unwrap();
    assert!(
        watch
            .next_timeout(Duration::from_millis(10))
            .unwrap()
            .is_none(),
        "nothing new yet"
    );
    let writer = f.builder().clock(f.clock.clone()).open().unwrap();
    let run = writer.begin_run(RunSpec::new("after")).unwrap();
    run.event("hello", serde_json::json!("world")).unwrap();
    let first = watch
        .next_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(first.run, Some(run.id()));
    assert_eq!(watch.cursor(), EventCursor::after(first.id));
    // A new watch from the first one's cursor continues exactly there.
    let mut resumed = f.ledger.watch(watch.cursor()).unwrap();
    let second = watch.next().unwrap().unwrap();
    assert_eq!(resumed.next().unwrap().unwrap(), second);
    assert!(matches!(second.kind, EventKind::Custom { .. }));
    let before_id = before.id();
    before.succeed().unwrap();
    let third = watch.next().unwrap().unwrap();
    assert_eq!(third.run, Some(before_id));
    run.succeed().unwrap();
}

fn a_dropped_watch_unregisters_and_a_dead_ones_registration_is_reaped(store: Store) {
    let f = Fixture::new(store);
    let watch = f.ledger.watch(EventCursor::START).unwrap();
    assert_eq!(watchers(&f), 1);
    drop(watch);
    assert_eq!(watchers(&f), 0);

    // A watch of an instance that dies is removed with the instance.
    let elsewhere = f
        .builder()
        .clock(f.clock.clone())
        .host("elsewhere")
        .background(false)
        .open()
        .unwrap();
    let watch = elsewhere.watch(EventCursor::START).unwrap();
    std::mem::forget(watch);
    assert_eq!(watchers(&f), 1);
    f.clock.advance(Duration::from_secs(61));
    f.ledger.reap().unwrap();
    assert_eq!(watchers(&f), 0);
}

fn watchers(f: &common::Fixture) -> i64 {
    f.query_i64("SELECT count(*) FROM watchers")
}

fn a_cursor_past_the_end_of_the_feed_is_refused(store: Store) {
    let f = Fixture::new(store);
    f.ledger
        .begin_run(RunSpec::new("a"))
        .unwrap()
        .succeed()
        .unwrap();
    let end = f.ledger.events_cursor().unwrap();
    let all = f.ledger.events_since(EventCursor::START, 10).unwrap();
    assert_eq!(all.events.len(), 2);
    assert_eq!(end, all.next);
    // At the end: an empty page, the same cursor.
    let page = f.ledger.events_since(end, 10).unwrap();
    assert!(page.events.is_empty() && page.next == end);
    // Past it (saved from another ledger, say): every event up to it would
    // be skipped without a word, so it is refused.
    let past = EventCursor::after(i64::from(end.last_event_id()) + 1000);
    for e in [
        f.ledger.events_since(past, 10).unwrap_err(),
        f.ledger.watch(past).unwrap_err(),
    ] {
        assert!(e.is_invalid_input(), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("invalid event cursor \"{past}\": is past the end")),
            "{e}"
        );
    }
}

/// A lock event summed up: its kind, keys, run and token.
type LockLine = (&'static str, String, Option<RunId>, u64);

/// The lock events after `cursor`, and each summed up.
fn lock_events(f: &Fixture, cursor: EventCursor) -> (Vec<EventRecord>, Vec<LockLine>) {
    let events = f.ledger.events_since(cursor, 1000).unwrap().events;
    let lock_events: Vec<EventRecord> = events.into_iter().filter(|e| e.kind.is_lock()).collect();
    let summary = lock_events
        .iter()
        .map(|e| {
            let kind = match &e.kind {
                EventKind::LockGranted(_) => "granted",
                EventKind::LockReleased(_) => "released",
                EventKind::LockReclaimed(_) => "reclaimed",
                EventKind::LockForceReleased(_) => "forced",
                other => panic!("not a lock event: {other:?}"),
            };
            let lock = e.kind.lock().unwrap();
            (kind, lock.keys.join(","), e.run, lock.token)
        })
        .collect();
    (lock_events, summary)
}

/// Every grant and every release of a lock is an event of the feed, in
/// commit order with the runs' events: a lock of no run has no run, a
/// run's lock names it; a release that hands the key to a waiter comes
/// just before that grant; a run's end releases its locks; a forced
/// release says why and who.
fn every_grant_and_release_of_a_lock_is_an_event_in_commit_order(store: Store) {
    let f = Fixture::new(store);
    let cursor = f.ledger.events_cursor().unwrap();
    let solo = f.ledger.try_lock("solo").unwrap();
    let run = f.ledger.begin_run(RunSpec::new("r")).unwrap();
    let held = run.lock("k").unwrap();
    let kept = run
        .acquire(LockRequest::new(["gpu"]).mode(LockMode::Slots(2)))
        .unwrap();
    let waiter = {
        let ledger = f.ledger.clone();
        std::thread::spawn(move || {
            ledger
                .acquire(LockRequest::new(["k"]).wait(Duration::from_secs(60)))
                .unwrap()
        })
    };
    wait_for_waiters(&f.ledger, 1);
    let (held_token, solo_token, kept_token) = (held.token(), solo.token(), kept.token());
    held.release().unwrap();
    let handed = waiter.join().unwrap();
    solo.release().unwrap();
    let id = run.id();
    run.succeed().unwrap();
    assert_eq!(f.ledger.force_unlock("k", "stuck for a day").unwrap(), 1);
    assert!(handed.release().unwrap_err().is_lock_lost());

    let (events, summary) = lock_events(&f, cursor);
    let handed_token = held_token + 1;
    assert_eq!(
        summary,
        [
            ("granted", "solo".to_owned(), None, solo_token),
            ("granted", "k".to_owned(), Some(id), held_token),
            ("granted", "gpu".to_owned(), Some(id), kept_token),
            ("released", "k".to_owned(), Some(id), held_token),
            ("granted", "k".to_owned(), None, handed_token),
            ("released", "solo".to_owned(), None, solo_token),
            ("released", "gpu".to_owned(), Some(id), kept_token),
            ("forced", "k".to_owned(), None, handed_token),
        ]
    );
    // The hand-off is one transaction: the release and the grant are
    // neighbours in the feed.
    assert_eq!(i64::from(events[4].id), i64::from(events[3].id) + 1);
    // The run's own events are where they were, and the run's history
    // holds none of the lock events.
    assert!(
        f.ledger
            .events(id)
            .unwrap()
            .iter()
            .all(|e| !e.kind.is_lock())
    );
    let all = f.ledger.events_since(cursor, 1000).unwrap().events;
    let ids: Vec<EventId> = all.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in commit order");
    let position = |pred: &dyn Fn(&EventRecord) -> bool| all.iter().position(pred).unwrap();
    assert_eq!(
        position(&|e| matches!(e.kind, EventKind::LockReleased(ref l) if l.keys == ["gpu"])),
        position(&|e| matches!(e.kind, EventKind::Status { to, .. } if to.is_terminal())) + 1,
        "a run's locks are released in the transaction that ends it, right after its last status"
    );
    // Each names its request, mode, holder and token.
    let gpu = events[2].kind.lock().unwrap();
    assert_eq!(gpu.mode, LockMode::Slots(2));
    assert_eq!(gpu.pid, std::process::id());
    assert_eq!(gpu.ticket, events[6].kind.lock().unwrap().ticket);
    assert_eq!(events[0].message, None);
    let why = events[7].message.as_deref().unwrap();
    assert!(
        why.contains("stuck for a day") && why.contains(&format!("by pid {}", std::process::id())),
        "{why}"
    );
}

/// A dead holder's lock taken back is an event of its own, with the
/// verdict as its message.
fn a_dead_holders_lock_reclaimed_is_an_event(store: Store) {
    let f = Fixture::new(store);
    let elsewhere = f
        .builder()
        .clock(f.clock.clone())
        .host("elsewhere")
        .background(false)
        .open()
        .unwrap();
    let guard = elsewhere.try_lock("remote-key").unwrap();
    let cursor = f.ledger.events_cursor().unwrap();
    f.clock.advance(Duration::from_secs(93));
    f.ledger.reap().unwrap();
    let (events, summary) = lock_events(&f, cursor);
    assert_eq!(
        summary,
        [("reclaimed", "remote-key".to_owned(), None, guard.token())]
    );
    let lock = events[0].kind.lock().unwrap();
    assert_eq!(lock.host, "elsewhere");
    let why = events[0].message.as_deref().unwrap();
    assert!(why.contains("heartbeat stale"), "{why}");
    assert!(guard.release().unwrap_err().is_lock_lost());
}

/// A lock event reads as JSON like every other event, its lock flattened
/// beside its kind; the events of runs keep their shape.
fn lock_events_serialize_flat_and_run_events_keep_their_shape(store: Store) {
    let f = Fixture::new(store);
    let cursor = f.ledger.events_cursor().unwrap();
    let run = f.ledger.begin_run(RunSpec::new("shape")).unwrap();
    let guard = f
        .ledger
        .acquire(LockRequest::new(["b", "a"]).mode(LockMode::Slots(3)))
        .unwrap();
    let events = f.ledger.events_since(cursor, 10).unwrap().events;
    let status = serde_json::to_value(&events[0]).unwrap();
    let mut fields: Vec<&str> = status
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["at", "from", "id", "kind", "message", "run", "to"]);
    assert_eq!(status["run"], i64::from(run.id()));
    let granted = serde_json::to_value(&events[1]).unwrap();
    assert_eq!(
        granted,
        serde_json::json!({
            "id": i64::from(events[1].id),
            "run": null,
            "at": granted["at"],
            "kind": "lock_granted",
            "ticket": granted["ticket"],
            "keys": ["a", "b"],
            "mode": "slots",
            "capacity": 3,
            "token": guard.token(),
            "pid": std::process::id(),
            "host": granted["host"],
            "message": null,
        })
    );
    assert!(granted["ticket"].is_i64() && granted["host"].is_string());
    run.succeed().unwrap();
}

/// Lock events belong to no run, so retention deletes them by their age.
fn lock_events_older_than_the_cutoff_are_pruned(store: Store) {
    let f = Fixture::new(store);
    f.ledger.try_lock("old").unwrap().release().unwrap();
    f.clock.advance(Duration::from_secs(3 * 24 * 3600));
    let cursor = f.ledger.events_cursor().unwrap();
    f.ledger.try_lock("new").unwrap().release().unwrap();
    f.ledger.prune(Duration::from_secs(24 * 3600)).unwrap();
    let (_, summary) = lock_events(&f, EventCursor::START);
    let keys: Vec<(&str, String)> = summary.into_iter().map(|(k, key, _, _)| (k, key)).collect();
    assert_eq!(
        keys,
        [
            ("granted", "new".to_owned()),
            ("released", "new".to_owned())
        ]
    );
    assert_eq!(lock_events(&f, cursor).1.len(), 2);
}

/// Each key's history: its lock events newest first, a request of two keys
/// in both, and every key's together.
fn a_keys_lock_history_is_its_lock_events_newest_first(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("noise")).unwrap();
    let a = f.ledger.try_lock("a").unwrap();
    let a_token = a.token();
    a.release().unwrap();
    let both = f.ledger.acquire(LockRequest::new(["a", "b"])).unwrap();
    f.ledger.force_unlock("b", "testing").unwrap();
    assert!(both.release().unwrap_err().is_lock_lost());
    run.succeed().unwrap();

    let words = |events: &[EventRecord]| -> Vec<(&'static str, u64)> {
        events
            .iter()
            .map(|e| {
                let word = match &e.kind {
                    EventKind::LockGranted(_) => "granted",
                    EventKind::LockReleased(_) => "released",
                    EventKind::LockForceReleased(_) => "forced",
                    other => panic!("not in a lock history: {other:?}"),
                };
                (word, e.kind.lock().unwrap().token)
            })
            .collect()
    };
    let t = a_token + 1;
    let history = f.ledger.lock_history(Some("a"), 10).unwrap();
    assert_eq!(
        words(&history),
        [
            ("forced", t),
            ("granted", t),
            ("released", a_token),
            ("granted", a_token)
        ]
    );
    assert_eq!(
        history[3].kind.lock().unwrap().ticket,
        history[2].kind.lock().unwrap().ticket
    );
    assert_eq!(
        words(&f.ledger.lock_history(Some("b"), 10).unwrap()),
        [("forced", t), ("granted", t)]
    );
    assert_eq!(
        words(&f.ledger.lock_history(Some("a"), 1).unwrap()),
        [("forced", t)]
    );
    assert!(f.ledger.lock_history(Some("never"), 10).unwrap().is_empty());
    let all = f.ledger.lock_history(None, 10).unwrap();
    assert_eq!(
        words(&all),
        [
            ("forced", t),
            ("granted", t),
            ("released", a_token),
            ("granted", a_token)
        ]
    );
    assert!(
        f.ledger
            .lock_history(Some(""), 10)
            .unwrap_err()
            .is_invalid_input()
    );
}

on_both_stores!(
    the_feed_returns_every_event_of_every_run_once_in_commit_order,
    a_custom_event_is_recorded_with_its_data_and_checked,
    a_finished_run_takes_no_more_events,
    a_watch_yields_new_events_in_order_and_resumes_from_its_cursor,
    a_dropped_watch_unregisters_and_a_dead_ones_registration_is_reaped,
    a_cursor_past_the_end_of_the_feed_is_refused,
    every_grant_and_release_of_a_lock_is_an_event_in_commit_order,
    a_dead_holders_lock_reclaimed_is_an_event,
    lock_events_serialize_flat_and_run_events_keep_their_shape,
    lock_events_older_than_the_cutoff_are_pruned,
    a_keys_lock_history_is_its_lock_events_newest_first,
);
