//! Bad input gets a typed error naming the value; nothing panics.

mod common;

use common::{Fixture, Store};
use runledger::{Error, Ledger, RunSpec};

fn bad_names_sources_and_keys_are_refused(store: Store) {
    let f = Fixture::new(store);
    let long = "n".repeat(257);
    let cases = [
        (RunSpec::new(""), "run name", "must not be empty"),
        (RunSpec::new(long.clone()), "run name", "257 bytes"),
        (RunSpec::new("a\nb"), "run name", "control character"),
        (RunSpec::new(" padded"), "run name", "whitespace"),
        (
            RunSpec::new("ok").source(""),
            "run source",
            "must not be empty",
        ),
        (RunSpec::new("ok").source("t\u{0}"), "run source", "U+0000"),
        (
            RunSpec::new("ok").idempotency_key(long),
            "idempotency key",
            "257 bytes",
        ),
    ];
    for (spec, what, why) in cases {
        let err = f.ledger.begin_run(spec).unwrap_err();
        match &err {
            Error::InvalidInput { what: w, .. } => assert_eq!(*w, what),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains(why), "{err}");
    }
    assert!(
        f.ledger.runs(Default::default()).unwrap().is_empty(),
        "nothing was written"
    );
}

fn metadata_over_the_limit_is_refused_and_the_limit_is_configurable(store: Store) {
    let f = Fixture::new(store);
    let big = serde_json::json!({"blob": "x".repeat(70_000)});
    let err = f
        .ledger
        .begin_run(RunSpec::new("x").metadata(big.clone()))
        .unwrap_err();
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("65536-byte limit"), "{err}");

    let roomy = f.builder().max_metadata_bytes(1 << 20).open().unwrap();
    let run = roomy
        .begin_run(RunSpec::new("x").metadata(big.clone()))
        .unwrap();
    assert_eq!(roomy.run(run.id()).unwrap().metadata, big);
    run.succeed().unwrap();
}

fn deeply_nested_and_unicode_metadata_round_trips(store: Store) {
    let f = Fixture::new(store);
    let mut value = serde_json::json!("leaf ✓ \u{0}\n");
    for _ in 0..100 {
        value = serde_json::json!({ "n": value });
    }
    let run = f
        .ledger
        .begin_run(RunSpec::new("nested").metadata(value.clone()))
        .unwrap();
    assert_eq!(f.ledger.run(run.id()).unwrap().metadata, value);
    run.succeed().unwrap();
}

fn bad_step_names_are_refused(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    for bad in ["", "tab\there", &"s".repeat(300)] {
        let err = run.step(bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "step name",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(f.ledger.run(run.id()).unwrap().progress.total, 0);
    run.succeed().unwrap();
}

/// Unix only: elsewhere paths need not be bytes.
fn a_non_utf8_log_path_is_refused(store: Store) {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let f = Fixture::new(store);
        let path = std::ffi::OsStr::from_bytes(b"logs/\xff.log");
        let err = f
            .ledger
            .begin_run(RunSpec::new("x").log_path(path))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "log path",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    #[cfg(not(unix))]
    let _ = store;
}

fn huge_failure_reasons_are_truncated_not_refused(store: Store) {
    let f = Fixture::new(store);
    let run = f.ledger.begin_run(RunSpec::new("x")).unwrap();
    let id = run.id();
    run.fail("e".repeat(1_000_000)).unwrap();
    let error = f.ledger.run(id).unwrap().error.unwrap();
    assert!(
        error.len() <= 4096 && error.ends_with('…'),
        "{}",
        error.len()
    );
}

#[test]
fn a_bad_instance_label_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ledger::builder(dir.path().join("l.db"))
        .label("")
        .open()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                what: "instance label",
                ..
            }
        ),
        "{err:?}"
    );
}

/// `create(false)`: a ledger that does not exist is refused, and nothing is
/// created; one that does opens as usual.
fn a_builder_told_not_to_create_refuses_a_missing_ledger(store: Store) {
    let place = common::Place::new(store);
    let err = place.builder().create(false).open().unwrap_err();
    assert!(
        matches!(&err, Error::Open { reason, .. } if reason.contains("no ledger")),
        "{err:?}"
    );
    match store {
        Store::Sqlite => {
            assert!(!std::path::Path::new(&place.location).exists());
            // An empty file is no ledger either, and stays empty.
            std::fs::write(&place.location, b"").unwrap();
            let err = place.builder().create(false).open().unwrap_err();
            assert!(matches!(err, Error::Open { .. }), "{err:?}");
            assert_eq!(std::fs::metadata(&place.location).unwrap().len(), 0);
        }
        Store::Postgres => {
            let schema = place.schema.as_ref().unwrap();
            let mut client = ::postgres::Client::connect(&schema.url, ::postgres::NoTls).unwrap();
            let found: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                    &[&schema.name],
                )
                .unwrap()
                .get(0);
            assert_eq!(found, 0, "the schema was created");
        }
    }
    drop(place.open());
    place.builder().create(false).open().unwrap();
}

on_both_stores!(
    a_builder_told_not_to_create_refuses_a_missing_ledger,
    a_non_utf8_log_path_is_refused,
    bad_names_sources_and_keys_are_refused,
    metadata_over_the_limit_is_refused_and_the_limit_is_configurable,
    deeply_nested_and_unicode_metadata_round_trips,
    bad_step_names_are_refused,
    huge_failure_reasons_are_truncated_not_refused,
);
