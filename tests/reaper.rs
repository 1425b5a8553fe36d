//! Liveness and reapers within one process: heartbeat leases of other
//! hosts, hung runs, clock jumps, custom reapers. Time moves with the
//! injected clock, never with sleeps.

mod common;

use std::time::Duration;

use common::{Fixture, Store, T0};
use runledger::{Error, Ledger, ReapError, ReapReport, Reaped, Reaper, RunSpec, RunStatus};

/// The report of the reaper named `name`.
fn report<'a>(reports: &'a [ReapReport], name: &str) -> &'a ReapReport {
    reports
        .iter()
        .find(|r| r.reaper == name)
        .unwrap_or_else(|| panic!("no report of {name}: {reports:?}"))
}

/// A ledger that plays another host on the fixture's file and clock, with
/// no keeper (the test heartbeats it by hand).
fn remote(f: &common::Fixture, host: &str) -> Ledger {
    f.builder()
        .clock(f.clock.clone())
        .host(host)
        .background(false)
        .open()
        .unwrap()
}

fn another_host_lives_while_its_heartbeat_is_fresh_and_is_reaped_after(store: Store) {
    let f = Fixture::new(store);
    let elsewhere = remote(&f, "elsewhere");
    let run = elsewhere.begin_run(RunSpec::new("remote-job")).unwrap();
    let guard = run.lock("shared-resource").unwrap();
    let waiter_keys = ["shared-resource"];

    // Within the lease (60 s by default), renewed once: alive.
    f.clock.advance(Duration::from_secs(59));
    let reports = f.ledger.reap().unwrap();
    assert!(report(&reports, "dead-owners").reaped.is_empty());
    elsewhere.heartbeat().unwrap();
    f.clock.advance(Duration::from_secs(59));
    f.ledger.reap().unwrap();
    assert_eq!(f.ledger.run(run.id()).unwrap().status, RunStatus::Running);
    assert!(f.ledger.try_lock(waiter_keys[0]).unwrap_err().is_conflict());

    // Silent past the lease: dead, with the staleness as the reason.
    f.clock.advance(Duration::from_secs(34));
    let reports = f.ledger.reap().unwrap();
    let dead = report(&reports, "dead-owners");
    assert!(dead.is_ok());
    let record = f.ledger.run(run.id()).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    let error = record.error.unwrap();
    assert!(
        error.contains("heartbeat stale for 93s") && error.contains("elsewhere"),
        "{error}"
    );
    assert!(dead.reaped.iter().any(|r| matches!(
        r,
        Reaped::Run { id, reason, .. } if *id == run.id() && reason.contains("stale")
    )));
    assert!(dead.reaped.iter().any(|r| matches!(
        r,
        Reaped::Instance { id, reason, .. }
            if *id == elsewhere.instance_id() && reason == "heartbeat stale for 93s"
    )));
    // Its lock is free, and the paused holder learns it lost it.
    let mine = f.ledger.try_lock("shared-resource").unwrap();
    assert!(mine.token() > guard.token());
    assert!(!guard.is_held().unwrap());
    assert!(guard.release().unwrap_err().is_lock_lost());
    assert!(run.succeed().unwrap_err().is_invalid_transition());

    // When it comes back, it registers again and its new work is kept.
    let old = elsewhere.instance_id();
    elsewhere.heartbeat().unwrap();
    assert_ne!(elsewhere.instance_id(), old);
    let again = elsewhere.begin_run(RunSpec::new("remote-job")).unwrap();
    f.ledger.reap().unwrap();
    assert_eq!(again.succeed().unwrap(), RunStatus::Succeeded);
}

fn work_begun_after_being_reaped_belongs_to_a_new_live_instance(store: Store) {
    let f = Fixture::new(store);
    let elsewhere = remote(&f, "elsewhere");
    let first = elsewhere.instance_id();
    f.clock.advance(Duration::from_secs(120));
    f.ledger.reap().unwrap();
    // Silent too long: reaped. Before its next heartbeat it goes on working:
    // a lock first, then a run, each must land on a live instance.
    let guard = elsewhere.lock("window").unwrap();
    let second = elsewhere.instance_id();
    assert_ne!(second, first);
    let run = elsewhere.begin_run(RunSpec::new("after")).unwrap();
    assert_eq!(f.ledger.run(run.id()).unwrap().instance, second);
    // Others see a live owner: its lock is held, its run is kept.
    assert!(f.ledger.try_lock("window").unwrap_err().is_conflict());
    f.ledger.reap().unwrap();
    assert!(guard.is_held().unwrap());
    assert_eq!(f.ledger.run(run.id()).unwrap().status, RunStatus::Running);
    // And once it is silent too long again, all of it goes.
    f.clock.advance(Duration::from_secs(61));
    f.ledger.reap().unwrap();
    assert_eq!(f.ledger.run(run.id()).unwrap().status, RunStatus::Failed);
    drop(f.ledger.try_lock("window").unwrap());
    // Reaped again, it begins a run first: that too lands on a live one.
    let third = elsewhere.begin_run(RunSpec::new("after-again")).unwrap();
    let owner = f.ledger.run(third.id()).unwrap().instance;
    assert_eq!(owner, elsewhere.instance_id());
    assert_ne!(owner, second);
    f.ledger.reap().unwrap();
    assert_eq!(third.succeed().unwrap(), RunStatus::Succeeded);
}

fn leftovers_of_a_closed_instance_are_reaped(store: Store) {
    let f = Fixture::new(store);
    let other = remote(&f, "elsewhere");
    let run = other.begin_run(RunSpec::new("left")).unwrap();
    let guard = other.lock("left-lock").unwrap();
    // A cleanup that failed halfway: the instance is closed, its work not.
    f.sql(&format!(
        "UPDATE instances SET closed_at = 1, closed_reason = 'cut off mid-close' WHERE id = {}",
        other.instance_id()
    ));
    let reports = f.ledger.reap().unwrap();
    assert_eq!(
        report(&reports, "dead-owners").reaped.len(),
        2,
        "{reports:?}"
    );
    let record = f.ledger.run(run.id()).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    assert!(
        record
            .error
            .unwrap()
            .starts_with("owner gone: cut off mid-close")
    );
    assert!(guard.release().unwrap_err().is_lock_lost());
}

fn hosts_judge_each_other_by_their_last_heartbeat(store: Store) {
    // Two hosts of their own: each judges the other by the lease only.
    let f = Fixture::new(store);
    let a = remote(&f, "host-a");
    let b = remote(&f, "host-b");
    let run = b.begin_run(RunSpec::new("b-job")).unwrap();
    let held = run.lock("b-key").unwrap();
    f.clock.advance(Duration::from_secs(120));
    b.heartbeat().unwrap();
    f.ledger.heartbeat().unwrap();
    // `a` reaps now: every heartbeat is fresh, nothing to do.
    let reports = a.reap().unwrap();
    assert!(report(&reports, "dead-owners").reaped.is_empty());
    assert_eq!(f.ledger.run(run.id()).unwrap().status, RunStatus::Running);
    // `b` stays silent, `a` does not: `b` is dead for `a`, and only `b`.
    f.clock.advance(Duration::from_secs(61));
    f.ledger.heartbeat().unwrap();
    let reports = a.reap().unwrap();
    let reaped = &report(&reports, "dead-owners").reaped;
    assert!(
        reaped
            .iter()
            .all(|r| !matches!(r, Reaped::Instance { id, .. } if *id != b.instance_id())),
        "{reaped:?}"
    );
    assert_eq!(f.ledger.run(run.id()).unwrap().status, RunStatus::Failed);
    // Its lock went with it: `a` takes the key with a higher token, and
    // `b`, should it wake up, finds it lost.
    let taken = a.try_lock("b-key").unwrap();
    assert!(taken.token() > held.token());
    assert!(held.release().unwrap_err().is_lock_lost());
    assert!(run.succeed().unwrap_err().is_invalid_transition());
}

fn a_wall_clock_jump_reaps_no_live_run_of_this_host(store: Store) {
    let f = Fixture::new(store);
    // A second instance of this very host (same process, its own instance
    // lock), judged by its process: the clock is never read for it.
    let other = f
        .builder()
        .clock(f.clock.clone())
        .background(false)
        .open()
        .unwrap();
    let run = other.begin_run(RunSpec::new("long")).unwrap();
    let guard = other.lock("held-across-the-jump").unwrap();
    for jump in [3600i64, -3600, 7 * 24 * 3600] {
        f.clock.set(runledger::Timestamp::from_millis(
            T0.as_millis() + jump * 1000,
        ));
        let reports = f.ledger.reap().unwrap();
        assert!(
            reports.iter().all(|r| r.reaped.is_empty() && r.is_ok()),
            "{reports:?}"
        );
        assert_eq!(f.ledger.run(run.id()).unwrap().status, RunStatus::Running);
        assert!(guard.is_held().unwrap());
    }
    guard.release().unwrap();
    assert_eq!(run.succeed().unwrap(), RunStatus::Succeeded);
}

fn a_run_that_stops_heartbeating_is_failed_as_hung(store: Store) {
    let f = Fixture::new(store);
    let spec = RunSpec::new("crawl").heartbeat_timeout(Duration::from_secs(60));
    let beating = f.ledger.begin_run(spec.clone()).unwrap();
    let silent = f.ledger.begin_run(spec.clone()).unwrap();
    let waiting = f.ledger.begin_run(spec.queued()).unwrap();
    let plain = f.ledger.begin_run(RunSpec::new("no-timeout")).unwrap();
    let lock = silent.lock("crawl-target").unwrap();

    f.clock.advance(Duration::from_secs(30));
    assert_eq!(beating.heartbeat().unwrap(), RunStatus::Running);
    f.clock.advance(Duration::from_secs(31)); // 61 s since start, 31 since the beat
    let reports = f.ledger.reap().unwrap();
    let hung = report(&reports, "hung-runs");
    assert_eq!(hung.reaped.len(), 1, "{hung:?}");
    let record = f.ledger.run(silent.id()).unwrap();
    assert_eq!(record.status, RunStatus::Failed);
    assert_eq!(
        record.error.as_deref(),
        Some("hung: no heartbeat since it started 61s ago (timeout 60s)")
    );
    // Its locks went with it; the guard learns it.
    assert!(!lock.is_held().unwrap());
    assert!(silent.succeed().unwrap_err().is_invalid_transition());

    f.clock.advance(Duration::from_secs(40)); // 71 s since the last beat
    let reports = f.ledger.reap().unwrap();
    assert_eq!(report(&reports, "hung-runs").reaped.len(), 1);
    let record = f.ledger.run(beating.id()).unwrap();
    assert_eq!(
        record.error.as_deref(),
        Some("hung: no heartbeat for 71s (timeout 60s)")
    );
    assert_eq!(beating.heartbeat().unwrap(), RunStatus::Failed);

    // A queued run is not judged until it starts; then from its start.
    assert_eq!(
        f.ledger.run(waiting.id()).unwrap().status,
        RunStatus::Queued
    );
    waiting.start().unwrap();
    f.clock.advance(Duration::from_secs(59));
    f.ledger.reap().unwrap();
    assert_eq!(waiting.succeed().unwrap(), RunStatus::Succeeded);
    // Without a timeout, a live run is never hung.
    f.clock.advance(Duration::from_secs(30 * 24 * 3600));
    f.ledger.reap().unwrap();
    assert_eq!(plain.succeed().unwrap(), RunStatus::Succeeded);
}

struct Panics;
impl Reaper for Panics {
    fn name(&self) -> &str {
        "panics"
    }
    fn reap(&self, _: &Ledger) -> Result<Vec<Reaped>, ReapError> {
        panic!("this reaper is broken");
    }
}

struct Fails;
impl Reaper for Fails {
    fn name(&self) -> &str {
        "fails"
    }
    fn reap(&self, ledger: &Ledger) -> Result<Vec<Reaped>, ReapError> {
        // A ledger error converts with `?`.
        ledger.run(runledger::RunId::from(999_999))?;
        Ok(Vec::new())
    }
}

/// Marks every failed run it sees: a host's own pass.
struct Archive;
impl Reaper for Archive {
    fn name(&self) -> &str {
        "archive"
    }
    fn reap(&self, ledger: &Ledger) -> Result<Vec<Reaped>, ReapError> {
        let failed = ledger.runs(runledger::RunFilter::default().status(RunStatus::Failed))?;
        Ok(failed
            .into_iter()
            .map(|r| Reaped::Other {
                what: format!("archived run {}", r.id),
                reason: "it failed".into(),
            })
            .collect())
    }
}

fn a_failing_or_panicking_reaper_does_not_stop_the_others(store: Store) {
    let f = Fixture::new(store);
    f.ledger.register_reaper(Panics);
    f.ledger.register_reaper(Fails);
    f.ledger.register_reaper(Archive);
    f.ledger
        .begin_run(RunSpec::new("doomed"))
        .unwrap()
        .fail("on purpose")
        .unwrap();
    let reports = f.ledger.reap().unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.reaper.as_str()).collect();
    assert_eq!(
        names,
        ["dead-owners", "hung-runs", "panics", "fails", "archive"]
    );
    assert_eq!(
        report(&reports, "panics").error.as_deref(),
        Some("panicked: this reaper is broken")
    );
    let fails = report(&reports, "fails");
    assert!(
        fails.error.as_deref().unwrap().contains("999999"),
        "{fails:?}"
    );
    let archive = report(&reports, "archive");
    assert!(archive.is_ok());
    assert_eq!(archive.reaped.len(), 1);
    assert!(archive.to_string().contains("archived run"), "{archive}");
    // Clones share the registered reapers.
    assert_eq!(f.ledger.clone().reap().unwrap().len(), 5);
}

fn retention_prunes_on_every_pass_only_when_configured(store: Store) {
    let f = Fixture::new(store);
    let clock = &f.clock;
    let ledger = f
        .builder()
        .retention(Duration::from_secs(7 * 24 * 3600))
        .open()
        .unwrap();
    let old = ledger.begin_run(RunSpec::new("old")).unwrap();
    let old_id = old.id();
    old.succeed().unwrap();
    let active = ledger.begin_run(RunSpec::new("active")).unwrap();
    clock.advance(Duration::from_secs(8 * 24 * 3600));
    let reports = ledger.reap().unwrap();
    assert_eq!(
        report(&reports, "retention").reaped,
        [Reaped::Pruned {
            runs: 1,
            reason: "finished more than 7d0h ago".into()
        }]
    );
    assert!(ledger.run(old_id).unwrap_err().is_not_found());
    assert_eq!(ledger.run(active.id()).unwrap().status, RunStatus::Running);
    active.succeed().unwrap();
    // The fixture's ledger has no retention: no such pass.
    assert!(
        f.ledger
            .reap()
            .unwrap()
            .iter()
            .all(|r| r.reaper != "retention")
    );
}

#[test]
fn lease_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let err = Ledger::builder(&path)
        .stale_after(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_secs(10))
        .open()
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidInput {
                what: "heartbeat interval",
                ..
            }
        ),
        "{err}"
    );
    let err = Ledger::builder(&path)
        .reap_interval(Duration::ZERO)
        .open()
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    let err = Ledger::builder(&path).host(" padded").open().unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    // A short lease with its default interval is fine, and so are
    // intervals too long for any clock.
    Ledger::builder(&path)
        .stale_after(Duration::from_secs(2))
        .open()
        .unwrap();
    Ledger::builder(&path)
        .stale_after(Duration::MAX)
        .reap_interval(Duration::MAX)
        .open()
        .unwrap();
}

on_both_stores!(
    hosts_judge_each_other_by_their_last_heartbeat,
    retention_prunes_on_every_pass_only_when_configured,
    another_host_lives_while_its_heartbeat_is_fresh_and_is_reaped_after,
    work_begun_after_being_reaped_belongs_to_a_new_live_instance,
    leftovers_of_a_closed_instance_are_reaped,
    a_wall_clock_jump_reaps_no_live_run_of_this_host,
    a_run_that_stops_heartbeating_is_failed_as_hung,
    a_failing_or_panicking_reaper_does_not_stop_the_others,
);
