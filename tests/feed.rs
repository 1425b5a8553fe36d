//! The event feed within one process: custom events, `events_since` and its
//! cursor, and `watch`. Across processes: `handoff_processes.rs`.

mod common;

use std::time::Duration;

use common::{Fixture, Store};
use runledger::{EventCursor, EventId, EventKind, RunSpec};

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
            (i64::from(e.run), what)
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
    assert_eq!(first.run, run.id());
    assert_eq!(watch.cursor(), EventCursor::after(first.id));
    // A new watch from the first one's cursor continues exactly there.
    let mut resumed = f.ledger.watch(watch.cursor()).unwrap();
    let second = watch.next().unwrap().unwrap();
    assert_eq!(resumed.next().unwrap().unwrap(), second);
    assert!(matches!(second.kind, EventKind::Custom { .. }));
    let before_id = before.id();
    before.succeed().unwrap();
    let third = watch.next().unwrap().unwrap();
    assert_eq!(third.run, before_id);
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
    assert_eq!(end, EventCursor::after(2));
    // At the end: an empty page, the same cursor.
    let page = f.ledger.events_since(end, 10).unwrap();
    assert!(page.events.is_empty() && page.next == end);
    // Past it (saved from another ledger, say): every event up to it would
    // be skipped without a word, so it is refused.
    let past = EventCursor::after(1000);
    for e in [
        f.ledger.events_since(past, 10).unwrap_err(),
        f.ledger.watch(past).unwrap_err(),
    ] {
        assert!(e.is_invalid_input(), "{e}");
        assert!(
            e.to_string()
                .starts_with("invalid event cursor \"1000\": is past the end"),
            "{e}"
        );
    }
}

on_both_stores!(
    the_feed_returns_every_event_of_every_run_once_in_commit_order,
    a_custom_event_is_recorded_with_its_data_and_checked,
    a_finished_run_takes_no_more_events,
    a_watch_yields_new_events_in_order_and_resumes_from_its_cursor,
    a_dropped_watch_unregisters_and_a_dead_ones_registration_is_reaped,
    a_cursor_past_the_end_of_the_feed_is_refused,
);
