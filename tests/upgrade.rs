//! Upgrades: a ledger written by the previous schema is migrated in place,
//! its history intact (issue 17).

mod common;

use std::time::Duration;

use common::{Fixture, Store};
use runledger::{Error, Ledger, RunFilter, RunSpec, SCHEMA_VERSION};

/// Schemas 6 to 8 only add indexes (`runs_by_idempotency_key_created`,
/// `runs_by_name`, `runs_by_source`; 7 is a no-op on SQLite): a ledger of
/// schema 5 is a current one without them, recorded as version 5.
fn downgrade_to_5(f: &Fixture) {
    f.sql(
        "DROP INDEX runs_by_idempotency_key_created; DROP INDEX runs_by_name; \
         DROP INDEX runs_by_source; DELETE FROM schema_migrations WHERE version >= 6;",
    );
    if f.store == Store::Sqlite {
        f.sql("PRAGMA user_version = 5;");
    }
}

fn a_populated_ledger_of_the_previous_schema_is_migrated_in_place(store: Store) {
    assert_eq!(
        SCHEMA_VERSION, 8,
        "this test knows what schemas 6 to 8 added"
    );
    let f = Fixture::new(store);
    let mut ids = Vec::new();
    for i in 0..20 {
        let run = f
            .ledger
            .begin_run(RunSpec::new("old").idempotency_key(format!("old:{i}")))
            .unwrap();
        run.step("s").unwrap().succeed().unwrap();
        ids.push(run.id());
        run.succeed().unwrap();
    }
    let token = f.ledger.try_lock("k").unwrap().token();
    let events = f.ledger.events(ids[0]).unwrap().len();
    let location = f.location.clone();
    let clock = f.clock.clone();
    downgrade_to_5(&f);
    assert_eq!(
        f.query_i64("SELECT CAST(max(version) AS BIGINT) FROM schema_migrations"),
        5
    );
    // Opened by this version: migrated, nothing lost.
    let ledger = Ledger::builder(&location).clock(clock).open().unwrap();
    assert_eq!(
        f.query_i64("SELECT CAST(max(version) AS BIGINT) FROM schema_migrations"),
        i64::from(SCHEMA_VERSION)
    );
    assert_eq!(
        f.query_i64("SELECT count(*) FROM runs WHERE name = 'old'"),
        20
    );
    assert_eq!(
        ledger.runs(RunFilter::default().name("old")).unwrap().len(),
        20
    );
    assert_eq!(ledger.events(ids[0]).unwrap().len(), events);
    assert_eq!(ledger.steps(ids[19]).unwrap().len(), 1);
    // Tokens go on growing from where they were.
    assert!(ledger.try_lock("k").unwrap().token() > token);
    // And what schema 5 is for works on the old history.
    let again = ledger.begin_run(
        RunSpec::new("old")
            .idempotency_key("old:3")
            .idempotency_window(Duration::from_secs(3600)),
    );
    match again {
        Err(Error::Duplicate { existing, .. }) => assert_eq!(existing, ids[3]),
        other => panic!("{:?}", other.map(|r| r.id())),
    }
}

on_both_stores!(a_populated_ledger_of_the_previous_schema_is_migrated_in_place);
