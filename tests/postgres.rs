//! What only the PostgreSQL store has: schemas, migrations under an
//! advisory lock, the server's clock, URLs. (Everything both stores do is
//! in the conformance suites, `on_both_stores!`.)
//!
//! Needs `RUNLEDGER_PG_URL` when the tests are built; without it every test
//! here is listed as ignored, with a message saying so.
#![cfg(feature = "postgres")]

mod common;

use common::{Place, SchemaGuard, Store, finish, instant_in, spawn_worker};
use runledger::{Error, Ledger, RunSpec, SCHEMA_VERSION};

/// A test of this file: ignored without a server to test against.
macro_rules! pg_tests {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[test]
                #[cfg_attr(
                    not(runledger_pg),
                    ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
                )]
                fn $name() {
                    super::$name()
                }
            )+
        }
    };
}

fn client(url: &str) -> ::postgres::Client {
    ::postgres::Client::connect(url, ::postgres::NoTls).unwrap()
}

fn eight_processes_opening_a_fresh_schema_at_once_all_succeed() {
    let place = Place::new(Store::Postgres);
    let at = instant_in(300);
    let workers: Vec<_> = (0..8)
        .map(|_| spawn_worker(&place.location, &["open", "--at", &at]))
        .collect();
    for worker in workers {
        let lines = finish(worker);
        assert!(lines[0].starts_with("opened "), "{lines:?}");
    }
    let schema = place.schema.as_ref().unwrap();
    let mut client = client(&schema.url);
    let applied: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {}.schema_migrations", schema.name),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(applied, i64::from(SCHEMA_VERSION));
}

fn a_newer_schema_is_refused_and_left_untouched() {
    let place = Place::new(Store::Postgres);
    drop(place.open());
    let schema = place.schema.as_ref().unwrap();
    let mut client = client(&schema.url);
    client
        .batch_execute(&format!(
            "INSERT INTO {}.schema_migrations VALUES (99, 0, 0)",
            schema.name
        ))
        .unwrap();
    let err = place.builder().open().unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 99, supported, .. } if supported == SCHEMA_VERSION),
        "{err:?}"
    );
    assert!(err.to_string().contains(&schema.name), "{err}");
    let versions: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {}.schema_migrations", schema.name),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(versions, i64::from(SCHEMA_VERSION) + 1);
}

fn another_applications_schema_is_refused_and_left_untouched() {
    let guard = SchemaGuard::new();
    let mut client = client(&guard.url);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {0}; CREATE TABLE {0}.users (id bigint)",
            guard.name
        ))
        .unwrap();
    let err = Ledger::builder_postgres(&guard.url)
        .schema(&guard.name)
        .open()
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotALedger { reason, .. } if reason.contains("another application")),
        "{err:?}"
    );
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
            &[&guard.name],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "only the application's own table");
}

fn two_schemas_of_one_database_are_two_ledgers() {
    let (a, b) = (Place::new(Store::Postgres), Place::new(Store::Postgres));
    let (a, b) = (a.open(), b.open());
    let guard = a.lock("shared-name").unwrap();
    let other = b.try_lock("shared-name").unwrap();
    assert_eq!((guard.token(), other.token()), (1, 1));
    let run = a.begin_run(RunSpec::new("only-in-a")).unwrap();
    assert!(b.run(run.id()).unwrap_err().is_not_found());
    run.succeed().unwrap();
}

fn bad_schema_names_are_refused() {
    let url = common::pg_url().unwrap();
    for bad in ["", "Upper", "has-dash", "1st", "pg_catalog", "x\"; DROP"] {
        let err = Ledger::builder_postgres(&url)
            .schema(bad)
            .open()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "schema name",
                    ..
                }
            ),
            "{bad:?}: {err:?}"
        );
    }
    // A schema is for PostgreSQL; a SQLite file refuses it.
    let dir = tempfile::tempdir().unwrap();
    let err = Ledger::builder(dir.path().join("ledger.db"))
        .schema("runs")
        .open()
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(!dir.path().join("ledger.db").exists());
}

fn an_unreachable_server_is_an_open_error_that_hides_the_password() {
    let err = Ledger::builder_postgres("postgres://someone:hunter2@127.0.0.1:1/nowhere")
        .open()
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(text.contains("cannot connect"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let err = Ledger::builder_postgres("postgres://someone:hunter2@[bad")
        .open()
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
}

fn the_path_names_the_ledger_without_its_password_and_opens_it_again() {
    let place = Place::new(Store::Postgres);
    let ledger = place.open();
    let path = ledger.path().to_str().unwrap().to_owned();
    let schema = &place.schema.as_ref().unwrap().name;
    assert!(path.starts_with("postgres://"), "{path}");
    assert!(path.ends_with(&format!("#{schema}")), "{path}");
    let run = ledger.begin_run(RunSpec::new("seen")).unwrap();
    let again = Ledger::builder(&path).open().unwrap();
    assert_eq!(again.run(run.id()).unwrap().name, "seen");
    run.succeed().unwrap();
}

/// Without a clock of its own, a ledger stamps with the server's time (each
/// host's offset to it measured at open and at every heartbeat; the unit
/// tests of the store move a host's clock hours off).
fn a_ledger_stamps_with_the_servers_clock() {
    let place = Place::new(Store::Postgres);
    let ledger = place.open();
    let run = ledger.begin_run(RunSpec::new("stamped")).unwrap();
    let started = ledger.run(run.id()).unwrap().started_at.unwrap();
    let schema = place.schema.as_ref().unwrap();
    let server: i64 = client(&schema.url)
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        (server - started.as_millis()).abs() < 5_000,
        "{server} against {started:?}"
    );
    assert!((server - ledger.now().as_millis()).abs() < 5_000);
    run.succeed().unwrap();
}

pg_tests!(
    eight_processes_opening_a_fresh_schema_at_once_all_succeed,
    a_newer_schema_is_refused_and_left_untouched,
    another_applications_schema_is_refused_and_left_untouched,
    two_schemas_of_one_database_are_two_ledgers,
    bad_schema_names_are_refused,
    an_unreachable_server_is_an_open_error_that_hides_the_password,
    the_path_names_the_ledger_without_its_password_and_opens_it_again,
    a_ledger_stamps_with_the_servers_clock,
);
