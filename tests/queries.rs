//! Listing and reading runs.

mod common;

use std::time::Duration;

use common::{Fixture, Store, T0};
use runledger::{RunFilter, RunId, RunSpec, RunStatus};

fn ids(runs: &[runledger::RunRecord]) -> Vec<i64> {
    runs.iter().map(|r| i64::from(r.id)).collect()
}

fn runs_are_listed_newest_first_with_every_filter(store: Store) {
    let f = Fixture::new(store);
    let all = common::seed_nine_runs(&f);
    let n = |i: usize| i64::from(all[i]);
    let list = |filter: RunFilter| ids(&f.ledger.runs(filter).unwrap());

    assert_eq!(
        list(RunFilter::default()),
        (0..9).rev().map(n).collect::<Vec<_>>()
    );
    assert_eq!(list(RunFilter::default().active()), vec![n(8), n(5), n(2)]);
    assert_eq!(
        list(RunFilter::default().status(RunStatus::Running)),
        vec![n(8), n(5), n(2)]
    );
    assert_eq!(
        list(RunFilter::default().status(RunStatus::Failed)),
        vec![n(7), n(4), n(1)]
    );
    assert_eq!(
        list(
            RunFilter::default()
                .statuses([RunStatus::Failed, RunStatus::Succeeded])
                .limit(4)
        ),
        vec![n(7), n(6), n(4), n(3)]
    );
    assert_eq!(
        list(RunFilter::default().name("job-0")),
        vec![n(6), n(3), n(0)]
    );
    assert_eq!(
        list(RunFilter::default().source("worker")),
        vec![n(7), n(5), n(3), n(1)]
    );
    assert_eq!(
        list(RunFilter::default().name("job-1").source("worker")),
        vec![n(7), n(1)]
    );
    let t = |s: u64| T0.saturating_add(Duration::from_secs(s));
    assert_eq!(
        list(RunFilter::default().since(t(6))),
        vec![n(8), n(7), n(6)]
    );
    assert_eq!(list(RunFilter::default().until(t(2))), vec![n(1), n(0)]);
    assert_eq!(
        list(RunFilter::default().since(t(2)).until(t(4))),
        vec![n(3), n(2)]
    );
    assert!(list(RunFilter::default().name("nope")).is_empty());
}

fn paging_walks_the_whole_history_once(store: Store) {
    let f = Fixture::new(store);
    let all = common::seed_nine_runs(&f);
    let mut seen = Vec::new();
    let mut filter = RunFilter::default().limit(4);
    loop {
        let page = f.ledger.runs(filter.clone()).unwrap();
        let Some(last) = page.last() else { break };
        filter = filter.before(last.id);
        seen.extend(ids(&page));
    }
    let mut expected: Vec<i64> = all.iter().map(|&id| i64::from(id)).collect();
    expected.reverse();
    assert_eq!(seen, expected);
}

fn the_default_limit_is_one_hundred(store: Store) {
    let f = Fixture::new(store);
    for _ in 0..(RunFilter::DEFAULT_LIMIT + 5) {
        f.ledger
            .begin_run(RunSpec::new("many"))
            .unwrap()
            .succeed()
            .unwrap();
    }
    assert_eq!(
        f.ledger.runs(RunFilter::default()).unwrap().len(),
        RunFilter::DEFAULT_LIMIT
    );
    assert_eq!(
        f.ledger
            .runs(RunFilter::default().limit(usize::MAX))
            .unwrap()
            .len(),
        105
    );
}

fn unknown_ids_are_not_found_everywhere(store: Store) {
    let f = Fixture::new(store);
    let missing = RunId::from(4242);
    for err in [
        f.ledger.run(missing).unwrap_err(),
        f.ledger.steps(missing).unwrap_err(),
        f.ledger.events(missing).unwrap_err(),
        f.ledger.cancel(missing).unwrap_err(),
        f.ledger
            .begin_run(RunSpec::new("child").parent(missing))
            .unwrap_err(),
    ] {
        assert!(err.is_not_found(), "{err:?}");
        assert!(err.to_string().contains("4242"), "{err}");
    }
}

fn every_timestamp_comes_from_the_injected_clock(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("timed")).unwrap();
    let id = run.id();
    f.clock.advance(Duration::from_millis(1500));
    let step = run.step("s").unwrap();
    f.clock.advance(Duration::from_millis(500));
    step.succeed().unwrap();
    f.clock.advance(Duration::from_secs(1));
    run.succeed().unwrap();
    let r = f.ledger.run(id).unwrap();
    assert_eq!(r.created_at, T0);
    assert_eq!(
        r.finished_at,
        Some(T0.saturating_add(Duration::from_secs(3)))
    );
    let s = &f.ledger.steps(id).unwrap()[0];
    assert_eq!(s.started_at, T0.saturating_add(Duration::from_millis(1500)));
    assert_eq!(
        s.finished_at,
        Some(T0.saturating_add(Duration::from_secs(2)))
    );
}

/// The id newtypes (`RunId`, `InstanceId`, `Ticket`, `EventId`) serialize
/// as the bare numbers they replaced: the JSON of records (and so of the
/// command line's `--json`) keeps its shape.
fn ids_are_plain_numbers_in_json(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("json")).unwrap();
    let _held = run.lock("k").unwrap();
    let me = i64::from(f.ledger.instance_id());

    let record = serde_json::to_value(f.ledger.run(run.id()).unwrap()).unwrap();
    assert_eq!(record["id"], serde_json::json!(i64::from(run.id())));
    assert_eq!(record["instance"], serde_json::json!(me));

    let locks = f.ledger.locks().unwrap();
    let lock = serde_json::to_value(&locks[0]).unwrap();
    assert_eq!(lock["instance"], serde_json::json!(me));
    assert_eq!(
        lock["ticket"],
        serde_json::json!(i64::from(locks[0].ticket))
    );
    assert!(lock["ticket"].is_i64());

    let events = f.ledger.events(run.id()).unwrap();
    let event = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(event["id"], serde_json::json!(i64::from(events[0].id)));
    assert!(event["id"].is_i64());
}

on_both_stores!(
    runs_are_listed_newest_first_with_every_filter,
    paging_walks_the_whole_history_once,
    the_default_limit_is_one_hundred,
    unknown_ids_are_not_found_everywhere,
    every_timestamp_comes_from_the_injected_clock,
    ids_are_plain_numbers_in_json,
);
