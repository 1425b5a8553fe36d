//! Bad input and bad environments: whatever a caller, a file or the
//! operating system hands the ledger, every call returns a value or a typed
//! [`Error`], and nothing panics.
//!
//! - property tests over names, sources, idempotency keys, step names, log
//!   paths, metadata, durations, ids and lock keys, through the public API;
//! - what parses outside input: [`LockKey::parse`], the rows the ledger reads
//!   back (corrupted with rusqlite), and, with the `cli` feature, the
//!   command line of the real binary;
//! - database files overwritten with random bytes, a read-only folder, and
//!   the file size limit (RLIMIT_FSIZE) reached in the middle of writes.
//!
//! Covered elsewhere: a newer schema is refused and left untouched
//! (`tests/open.rs`, `a_newer_schema_is_refused_and_left_untouched` and
//! `a_newer_schema_with_a_pending_wal_is_left_untouched`); a read-only ledger
//! file (`tests/open.rs`, `a_read_only_ledger_file_is_refused_with_its_path`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use common::{Fixture, Store, T0, bytes, immutable};
use runledger::{
    Error, Ledger, LockKey, LockMode, LockRequest, ManualClock, RunFilter, RunId, RunSpec,
    Timestamp,
};

/// Cases per property: enough to reach the odd corners, few enough that the
/// file runs in seconds.
const CASES: u32 = 64;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Shrinking a failure found against a shared ledger is of little
        // use and slow; the failing input is printed either way.
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

/// The documented rule for names, sources, step names, idempotency keys and
/// lock keys: 1 to 256 bytes, no control characters, no leading or trailing
/// whitespace.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control) && s.trim() == s
}

/// The documented rule for log paths: not empty, at most 4 KiB, no NUL.
fn valid_log_path(s: &str) -> bool {
    !s.is_empty() && s.len() <= 4096 && !s.contains('\0')
}

/// Text of every kind a caller may pass: arbitrary Unicode, random bytes made
/// into a string, control characters, whitespace at the edges, and lengths
/// around the 256-byte limit (in one- and two-byte characters).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        2 => "[a-z0-9:=,.\\\\-]{1,12}",
        2 => vec(any::<u8>(), 0..400).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        1 => "[\\x00-\\x1f\\x7f\\u{85}\\u{2028} a]{0,6}",
        1 => "[ \\t\\u{a0}\\u{3000}]{0,2}[a-z]{0,4}[ \\u{a0}]{0,2}",
        1 => (250usize..262).prop_map(|n| "x".repeat(n)),
        1 => (125usize..131).prop_map(|n| "é".repeat(n)),
        1 => Just(String::new()),
    ]
}

/// Durations from zero to `Duration::MAX`, with the edges made likely.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_secs(u64::MAX)),
        (0u64..10_000).prop_map(Duration::from_millis),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        any::<u64>().prop_map(Duration::from_nanos),
    ]
}

fn fail(message: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(message.to_string())
}

/// An error message stays short whatever the input (values are quoted and
/// shortened), so that a megabyte of input is not a megabyte of message.
fn assert_short(e: &Error) -> Result<(), TestCaseError> {
    let message = e.to_string();
    prop_assert!(message.len() < 1024, "{} bytes: {message}", message.len());
    Ok(())
}

fn invalid_input_of(e: &Error, what: &str) -> bool {
    matches!(e, Error::InvalidInput { what: w, .. } if *w == what)
}

// ---------------------------------------------------------------------------
// Names, sources, idempotency keys, step names, log paths
// ---------------------------------------------------------------------------

fn any_run_name_source_key_or_log_path_is_stored_exactly_or_refused_as_invalid(store: Store) {
    let f = Fixture::new(store);
    proptest!(config(), |(
        name in text(),
        source in text(),
        key in proptest::option::of(text()),
        log in proptest::option::of(text()),
        step in text(),
    )| {
        let mut spec = RunSpec::new(name.clone()).source(source.clone());
        if let Some(key) = &key {
            spec = spec.idempotency_key(key.clone());
        }
        if let Some(log) = &log {
            spec = spec.log_path(log);
        }
        let valid = valid_name(&name)
            && valid_name(&source)
            && key.as_deref().is_none_or(valid_name)
            && log.as_deref().is_none_or(valid_log_path);
        match f.ledger.begin_run(spec) {
            Ok(run) => {
                prop_assert!(valid, "accepted {name:?} {source:?} {key:?} {log:?}");
                let id = run.id();
                let record = f.ledger.run(id).map_err(fail)?;
                prop_assert_eq!(&record.name, &name);
                prop_assert_eq!(&record.source, &source);
                prop_assert_eq!(&record.idempotency_key, &key);
                prop_assert_eq!(record.log_path, log.as_ref().map(PathBuf::from));
                // Filtering by what was stored finds the run.
                let found = f
                    .ledger
                    .runs(RunFilter::default().name(name.clone()).source(source.clone()).limit(3))
                    .map_err(fail)?;
                prop_assert!(found.iter().any(|r| r.id == id), "{found:?}");
                match run.step(step.clone()) {
                    Ok(s) => {
                        prop_assert!(valid_name(&step), "step {step:?} accepted");
                        prop_assert_eq!(s.name(), step.as_str());
                        s.fail(&step).map_err(fail)?;
                        let steps = f.ledger.steps(id).map_err(fail)?;
                        prop_assert_eq!(&steps[0].name, &step);
                    }
                    Err(e) => {
                        prop_assert!(!valid_name(&step), "step {step:?} refused: {e}");
                        prop_assert!(invalid_input_of(&e, "step name"), "{e:?}");
                        assert_short(&e)?;
                    }
                }
                run.fail(&name).map_err(fail)?;
            }
            Err(e) => {
                prop_assert!(!valid, "refused {name:?} {source:?} {key:?} {log:?}: {e}");
                prop_assert!(e.is_invalid_input(), "{e:?}");
                assert_short(&e)?;
                // Filters with the same values read, or refuse as invalid.
                match f.ledger.runs(RunFilter::default().name(name).source(source)) {
                    Ok(_) => {}
                    Err(e) => prop_assert!(e.is_invalid_input(), "{e:?}"),
                }
            }
        }
    });
    // Nothing refused left a trace: every run in the ledger was accepted
    // and ended.
    let active = f.ledger.runs(RunFilter::default().active()).unwrap();
    assert!(active.is_empty(), "{active:?}");
}

fn any_failure_reason_exit_code_or_unlock_reason_is_accepted_or_refused_as_invalid(store: Store) {
    let f = Fixture::new(store);
    proptest!(config(), |(reason in text(), code in any::<i32>(), key in text(), why in text())| {
        let run = f.ledger.begin_run(RunSpec::new("r")).map_err(fail)?;
        let id = run.id();
        if code % 2 == 0 {
            run.exit(code).map_err(fail)?;
            prop_assert_eq!(f.ledger.run(id).map_err(fail)?.exit_code, Some(code));
        } else {
            run.fail(&reason).map_err(fail)?;
            let stored = f.ledger.run(id).map_err(fail)?.error.unwrap_or_default();
            prop_assert!(stored.len() <= 4096, "{} bytes kept", stored.len());
        }
        match f.ledger.force_unlock(&key, &why) {
            Ok(released) => {
                prop_assert!(valid_name(&key) && !why.trim().is_empty());
                prop_assert_eq!(released, 0);
            }
            Err(e) => {
                prop_assert!(e.is_invalid_input(), "{e:?}");
                prop_assert!(!valid_name(&key) || why.trim().is_empty(), "{e}");
                assert_short(&e)?;
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------

const METADATA_LIMIT: usize = 2048;

/// JSON values with random strings (random bytes included) as keys and
/// leaves. Floats are limited to values that survive a text round trip
/// exactly.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![0.5, -1.25e10, 1e300, f64::MIN_POSITIVE]).prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(text(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn any_metadata_under_the_limit_round_trips_and_any_over_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::builder(dir.path().join("ledger.db"))
        .max_metadata_bytes(METADATA_LIMIT)
        .background(false)
        .open()
        .unwrap();
    proptest!(config(), |(value in json())| {
        let size = serde_json::to_string(&value).unwrap().len();
        match ledger.begin_run(RunSpec::new("m").metadata(value.clone())) {
            Ok(run) => {
                prop_assert!(value.is_null() || size <= METADATA_LIMIT, "{size} bytes accepted");
                let stored = ledger.run(run.id()).map_err(fail)?.metadata;
                prop_assert_eq!(stored, value);
                run.succeed().map_err(fail)?;
            }
            Err(e) => {
                prop_assert!(size > METADATA_LIMIT, "{size} bytes refused: {e}");
                prop_assert!(invalid_input_of(&e, "metadata"), "{e:?}");
                prop_assert!(e.to_string().contains(&format!("of {size} bytes")), "{e}");
                assert_short(&e)?;
            }
        }
    });
    // Every accepted value still reads back in a listing.
    ledger.runs(RunFilter::default().limit(usize::MAX)).unwrap();
}

fn metadata_at_the_default_limit_is_kept_and_a_byte_more_or_megabytes_are_refused(store: Store) {
    let f = Fixture::new(store);
    // {"b":"…"} is 8 bytes around the string.
    let exact = serde_json::json!({ "b": "y".repeat(65_536 - 8) });
    assert_eq!(serde_json::to_string(&exact).unwrap().len(), 65_536);
    let run = f
        .ledger
        .begin_run(RunSpec::new("exact").metadata(exact.clone()))
        .unwrap();
    assert_eq!(f.ledger.run(run.id()).unwrap().metadata, exact);
    run.succeed().unwrap();

    for size in [65_537, 10 << 20] {
        let value = serde_json::json!({ "b": "y".repeat(size - 8) });
        let started = Instant::now();
        let e = f
            .ledger
            .begin_run(RunSpec::new("big").metadata(value))
            .unwrap_err();
        assert!(invalid_input_of(&e, "metadata"), "{e:?}");
        assert!(e.to_string().len() < 300, "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // A string made of every byte value (as a lossy string) and lone
    // surrogate-free escapes round-trips.
    let all_bytes: Vec<u8> = (0..=255).collect();
    let odd = Value::from(String::from_utf8_lossy(&all_bytes).into_owned());
    let run = f
        .ledger
        .begin_run(RunSpec::new("bytes").metadata(odd.clone()))
        .unwrap();
    assert_eq!(f.ledger.run(run.id()).unwrap().metadata, odd);
    run.succeed().unwrap();
}

/// Nested arrays or objects, `depth` levels deep, built in Rust (no parser
/// limit applies on the way in).
fn nested(depth: usize, objects: bool) -> Value {
    let mut value = Value::from("leaf");
    for _ in 0..depth {
        value = if objects {
            serde_json::json!({ "n": value })
        } else {
            Value::Array(vec![value])
        };
    }
    value
}

/// Metadata nested deeper than serde_json parses back (128 levels) must be
/// refused up front: accepted, it made the run, and every listing that
/// includes it, unreadable.
fn deeply_nested_metadata_is_read_back_or_refused_up_front(store: Store) {
    let f = Fixture::new(store);
    for objects in [false, true] {
        for depth in [1, 100, 126, 127, 128, 129, 200, 500] {
            let value = nested(depth, objects);
            match f
                .ledger
                .begin_run(RunSpec::new("deep").metadata(value.clone()))
            {
                Ok(run) => {
                    let id = run.id();
                    run.succeed().unwrap();
                    match f.ledger.run(id) {
                        Ok(record) => assert_eq!(record.metadata, value, "depth {depth}"),
                        Err(e) => panic!("depth {depth} accepted but unreadable: {e:?}"),
                    }
                    f.ledger
                        .runs(RunFilter::default())
                        .unwrap_or_else(|e| panic!("depth {depth}: listing broken: {e:?}"));
                }
                Err(e) => {
                    assert!(invalid_input_of(&e, "metadata"), "depth {depth}: {e:?}");
                    assert!(depth > 100, "depth {depth} refused: {e}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Durations: Builder settings, heartbeat timeouts, lock waits, prune ages
// ---------------------------------------------------------------------------

#[test]
fn any_builder_durations_open_or_are_refused_as_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let clock = ManualClock::new(T0);
    proptest!(config(), |(
        stale in duration(),
        heartbeat in proptest::option::of(duration()),
        reap in duration(),
        retention in proptest::option::of(duration()),
        lock_wait in duration(),
        busy in duration(),
        background in any::<bool>(),
        pool in any::<u32>(),
        limit in any::<usize>(),
    )| {
        let mut builder = Ledger::builder(&db)
            .clock(clock.clone())
            .stale_after(stale)
            .reap_interval(reap)
            .lock_wait(lock_wait)
            .busy_timeout(busy)
            .background(background)
            .pool_size(pool % 16)
            .max_metadata_bytes(limit);
        if let Some(h) = heartbeat {
            builder = builder.heartbeat_interval(h);
        }
        if let Some(r) = retention {
            builder = builder.retention(r);
        }
        let every = heartbeat.unwrap_or(stale / 4);
        let valid = !every.is_zero() && every < stale && !reap.is_zero();
        match builder.open() {
            Ok(ledger) => {
                prop_assert!(valid, "opened with heartbeat {every:?}, stale {stale:?}, reap {reap:?}");
                // Tiny intervals keep the keeper writing, and a zero busy
                // timeout may then refuse a write as busy: a typed error too.
                let ok_or_busy = |r: Result<(), Error>| match r {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_busy() && busy < Duration::from_secs(1) => Ok(()),
                    Err(e) => Err(fail(format!("{e:?}"))),
                };
                ok_or_busy(ledger.begin_run(RunSpec::new("d")).and_then(|r| r.succeed().map(drop)))?;
                ok_or_busy(ledger.try_lock("d").and_then(|g| g.release()))?;
                ok_or_busy(ledger.heartbeat())?;
                ok_or_busy(ledger.reap().map(drop))?;
                ok_or_busy(ledger.prune(retention.unwrap_or(stale)).map(drop))?;
            }
            // A keeper of an earlier case may still be writing: with a
            // zero busy timeout, opening may be refused as busy (typed).
            Err(e) if valid && e.is_busy() && busy < Duration::from_secs(1) => {}
            Err(e) => {
                prop_assert!(!valid, "refused: {e:?}");
                prop_assert!(e.is_invalid_input(), "{e:?}");
            }
        }
    });
}

fn any_heartbeat_timeout_clock_jump_or_prune_age_leaves_every_call_typed(store: Store) {
    let f = Fixture::new(store);
    proptest!(config(), |(timeout in duration(), jump in duration(), age in duration(), back in any::<bool>())| {
        let run = f
            .ledger
            .begin_run(RunSpec::new("hb").heartbeat_timeout(timeout))
            .map_err(fail)?;
        let id = run.id();
        if back {
            f.clock.set(Timestamp::from_millis(T0.as_millis().saturating_sub(
                i64::try_from(jump.as_millis()).unwrap_or(i64::MAX),
            )));
        } else {
            f.clock.advance(jump);
        }
        run.heartbeat().map_err(fail)?;
        f.ledger.reap().map_err(fail)?;
        let record = f.ledger.run(id).map_err(fail)?;
        // The times read back, print and serialize, whatever they are.
        let _ = (record.created_at.to_string(), serde_json::to_string(&record).map_err(fail)?);
        match run.succeed() {
            Ok(_) => {}
            Err(e) => prop_assert!(e.is_invalid_transition(), "{e:?}"),
        }
        f.ledger.prune(age).map_err(fail)?;
        f.clock.set(T0);
    });
}

fn any_lock_wait_and_mode_is_granted_refused_or_timed_out_promptly(store: Store) {
    let f = Fixture::new(store);
    let other = Ledger::builder(f.ledger.path())
        .clock(f.clock.clone())
        .background(false)
        .open()
        .unwrap();
    let mine = f.ledger.lock("held-here").unwrap();
    let theirs = other.lock("held-there").unwrap();
    let n = std::cell::Cell::new(0u32);
    proptest!(config(), |(
        wait in duration(),
        short in 0u64..30,
        mode in prop_oneof![
            Just(LockMode::Exclusive),
            Just(LockMode::Shared),
            any::<u32>().prop_map(LockMode::Slots),
            Just(LockMode::Slots(0)),
        ],
        target in 0..3,
        no_wait in any::<bool>(),
    )| {
        n.set(n.get() + 1);
        let key = match target {
            0 => format!("free-{}", n.get()),
            1 => "held-here".to_owned(),
            _ => "held-there".to_owned(),
        };
        // Only the other instance's key can make a request wait: there the
        // wait is kept short.
        let wait = if target == 2 { Duration::from_millis(short) } else { wait };
        let mut request = LockRequest::new([key.clone()]).mode(mode);
        request = if no_wait { request.no_wait() } else { request.wait(wait) };
        let started = Instant::now();
        let outcome = f.ledger.acquire(request);
        prop_assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        match (outcome, target) {
            (Err(e), _) if mode == LockMode::Slots(0) => {
                prop_assert!(invalid_input_of(&e, "lock mode"), "{e:?}");
            }
            (Ok(guard), 0) => {
                prop_assert_eq!(guard.keys(), std::slice::from_ref(&key));
                prop_assert!(guard.token() >= 1);
                guard.release().map_err(fail)?;
            }
            (Err(Error::Conflict { self_conflict, .. }), 1) => prop_assert!(self_conflict),
            (Err(e), 2) if no_wait => prop_assert!(e.is_conflict(), "{e:?}"),
            (Err(e), 2) => prop_assert!(e.is_timeout(), "{e:?}"),
            (outcome, target) => {
                return Err(fail(format!("{key} ({target}) {mode:?} wait {wait:?}: {:?}", outcome.map(|g| g.token()))));
            }
        }
    });
    assert!(mine.is_held().unwrap() && theirs.is_held().unwrap());
    mine.release().unwrap();
    theirs.release().unwrap();
    // No request left a place in a queue behind.
    assert!(f.ledger.locks().unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// Ids and times
// ---------------------------------------------------------------------------

fn any_run_id_is_found_or_not_found(store: Store) {
    let f = Fixture::new(store);
    let runs: Vec<_> = (0..3)
        .map(|_| f.ledger.begin_run(RunSpec::new("known")).unwrap())
        .collect();
    // The runs that exist: these three, and the children made below.
    let known = std::cell::RefCell::new(runs.iter().map(|r| r.id()).collect::<Vec<RunId>>());
    proptest!(config(), |(raw in prop_oneof![any::<i64>(), -3i64..6], limit in any::<usize>(), since in any::<i64>(), until in any::<i64>())| {
        let id = RunId::from(raw);
        prop_assert_eq!(i64::from(id), raw);
        let exists = known.borrow().contains(&id);
        let checks: [(&str, Result<(), Error>); 4] = [
            ("run", f.ledger.run(id).map(drop)),
            ("steps", f.ledger.steps(id).map(drop)),
            ("events", f.ledger.events(id).map(drop)),
            ("child", f.ledger.begin_run(RunSpec::new("child").parent(id)).and_then(|r| {
                known.borrow_mut().push(r.id());
                r.succeed().map(drop)
            })),
        ];
        for (call, result) in checks {
            match result {
                Ok(()) => prop_assert!(exists, "{call}({raw}) found"),
                Err(e) => {
                    prop_assert!(!exists, "{call}({raw}): {e:?}");
                    prop_assert!(e.is_not_found(), "{call}({raw}): {e:?}");
                    prop_assert!(e.to_string().contains(&raw.to_string()), "{e}");
                }
            }
        }
        if !exists {
            prop_assert!(f.ledger.cancel(id).unwrap_err().is_not_found());
        }
        let filter = RunFilter::default()
            .before(id)
            .limit(limit)
            .since(Timestamp::from_millis(since))
            .until(Timestamp::from_millis(until));
        f.ledger.runs(filter).map_err(fail)?;
    });
    for run in runs {
        run.succeed().unwrap();
    }
}

#[test]
fn any_text_parses_to_a_positive_run_id_or_an_invalid_input() {
    proptest!(config(), |(s in prop_oneof![
        text(),
        any::<i64>().prop_map(|n| n.to_string()),
        (any::<i64>(), "[ \\t\\n]{0,2}", "[ \\t\\n]{0,2}").prop_map(|(n, a, b)| format!("{a}{n}{b}")),
        "[+-]?0*[0-9]{1,22}",
    ])| {
        match s.parse::<RunId>() {
            Ok(id) => {
                prop_assert!(i64::from(id) > 0, "{s:?} -> {id}");
                prop_assert_eq!(id.to_string().parse::<RunId>().map_err(fail)?, id);
                prop_assert_eq!(s.trim().parse::<i64>().ok(), Some(i64::from(id)));
            }
            Err(e) => {
                prop_assert!(invalid_input_of(&e, "run id"), "{e:?}");
                prop_assert!(!matches!(s.trim().parse::<i64>(), Ok(n) if n > 0), "{s:?} refused");
                assert_short(&e)?;
            }
        }
    });
}

fn any_clock_reading_is_stored_printed_and_serialized(store: Store) {
    let f = Fixture::new(store);
    proptest!(config(), |(ms in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(0)])| {
        f.clock.set(Timestamp::from_millis(ms));
        let run = f.ledger.begin_run(RunSpec::new("t")).map_err(fail)?;
        let step = run.step("s").map_err(fail)?;
        step.succeed().map_err(fail)?;
        let id = run.id();
        run.succeed().map_err(fail)?;
        let record = f.ledger.run(id).map_err(fail)?;
        prop_assert_eq!(record.created_at, Timestamp::from_millis(ms));
        let _ = serde_json::to_string(&record).map_err(fail)?;
        let _ = serde_json::to_string(&f.ledger.events(id).map_err(fail)?).map_err(fail)?;
        let _ = serde_json::to_string(&f.ledger.steps(id).map_err(fail)?).map_err(fail)?;
        let _ = record.created_at.to_string();
        let _ = std::time::SystemTime::from(record.created_at);
    });
    f.clock.set(T0);
}

// ---------------------------------------------------------------------------
// Lock keys: raw keys, the builder, and its parser
// ---------------------------------------------------------------------------

fn any_raw_lock_keys_are_granted_together_or_refused_as_invalid(store: Store) {
    let f = Fixture::new(store);
    proptest!(config(), |(keys in vec(text(), 0..4))| {
        let valid = !keys.is_empty() && keys.iter().all(|k| valid_name(k));
        match f.ledger.try_lock_all(&keys) {
            Ok(guard) => {
                prop_assert!(valid, "{keys:?} granted");
                let mut expected = keys.clone();
                expected.sort();
                expected.dedup();
                prop_assert_eq!(guard.keys(), &expected[..]);
                let listed = f.ledger.locks().map_err(fail)?;
                for key in &expected {
                    prop_assert!(listed.iter().any(|l| &l.key == key), "{key:?} not listed");
                }
                guard.release().map_err(fail)?;
            }
            Err(e) => {
                prop_assert!(!valid, "{keys:?} refused: {e:?}");
                prop_assert!(e.is_invalid_input(), "{e:?}");
                assert_short(&e)?;
            }
        }
        prop_assert!(f.ledger.locks().map_err(fail)?.is_empty());
    });
}

trait TryLockAll {
    fn try_lock_all(&self, keys: &[String]) -> Result<runledger::LockGuard, Error>;
}

impl TryLockAll for Ledger {
    fn try_lock_all(&self, keys: &[String]) -> Result<runledger::LockGuard, Error> {
        self.acquire(LockRequest::new(keys.iter().cloned()).no_wait())
    }
}

/// Parts from a tiny alphabet of separators and escapes, so that different
/// keys that could print alike are common.
fn tricky() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a\\\\:,=]{0,3}", 1 => text()]
}

fn lock_key() -> impl Strategy<Value = LockKey> {
    (tricky(), vec((tricky(), tricky()), 0..4)).prop_map(|(kind, parts)| {
        parts
            .into_iter()
            .fold(LockKey::new(kind), |key, (name, value)| {
                key.part(name, value)
            })
    })
}

fn built_keys_parse_back_never_collide_and_lock_or_are_refused(store: Store) {
    let f = Fixture::new(store);
    proptest!(config(), |(a in lock_key(), b in lock_key())| {
        let text = a.to_string();
        prop_assert_eq!(LockKey::parse(&text), Some(a.clone()));
        if a != b {
            prop_assert_ne!(&text, &b.to_string(), "{:?} and {:?} collide", a, b);
        }
        match f.ledger.try_lock(&a) {
            Ok(guard) => {
                prop_assert!(valid_name(&text));
                let listed = f.ledger.locks().map_err(fail)?;
                prop_assert_eq!(listed.len(), 1);
                prop_assert_eq!(LockKey::parse(&listed[0].key), Some(a));
                guard.release().map_err(fail)?;
            }
            Err(e) => {
                prop_assert!(!valid_name(&text), "{text:?}: {e:?}");
                prop_assert!(invalid_input_of(&e, "lock key"), "{e:?}");
            }
        }
    });
}

#[test]
fn any_text_parses_as_a_key_only_in_the_builders_own_form() {
    proptest!(ProptestConfig::with_cases(512), |(s in prop_oneof![text(), "[ab\\\\:,=]{0,8}"])| {
        if let Some(key) = LockKey::parse(&s) {
            // Whatever parses is exactly what the builder prints for it.
            prop_assert_eq!(key.to_string(), s);
        }
    });
}

// ---------------------------------------------------------------------------
// Persisted rows read back: corrupted with rusqlite behind the ledger's back
// ---------------------------------------------------------------------------

/// A ledger with a finished run (steps, metadata), an active run holding a
/// lock, and a process lock; the guards stay alive in the returned value.
struct Populated {
    dir: tempfile::TempDir,
    ledger: Ledger,
    active: Option<runledger::Run>,
    guards: Vec<runledger::LockGuard>,
    ids: Vec<RunId>,
}

fn populated() -> Populated {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::builder(dir.path().join("ledger.db"))
        .background(false)
        .open()
        .unwrap();
    let done = ledger
        .begin_run(
            RunSpec::new("done")
                .metadata(serde_json::json!({"symbol": "AAPL", "n": [1, 2]}))
                .log_path("done.log")
                .idempotency_key("once"),
        )
        .unwrap();
    let first = done.id();
    done.step("a").unwrap().succeed().unwrap();
    done.step("b").unwrap().fail("no").unwrap();
    done.succeed().unwrap();
    let active = ledger
        .begin_run(
            RunSpec::new("active")
                .parent(first)
                .heartbeat_timeout(Duration::from_secs(60)),
        )
        .unwrap();
    let step = active.step("open").unwrap();
    std::mem::forget(step); // a step left running
    let guards = vec![
        active.lock("build:symbol=AAPL").unwrap(),
        ledger
            .acquire(LockRequest::new(["gpu"]).mode(LockMode::Slots(2)))
            .unwrap(),
    ];
    ledger.cancel(active.id()).unwrap();
    let ids = vec![first, active.id()];
    Populated {
        dir,
        ledger,
        active: Some(active),
        guards,
        ids,
    }
}

/// Every column the ledger reads back, as `(table, column)`.
const COLUMNS: &[(&str, &str)] = &[
    ("runs", "metadata"),
    ("runs", "status"),
    ("runs", "name"),
    ("runs", "pid"),
    ("runs", "instance_id"),
    ("runs", "parent_id"),
    ("runs", "exit_code"),
    ("runs", "log_path"),
    ("runs", "created_at"),
    ("runs", "started_at"),
    ("runs", "finished_at"),
    ("runs", "heartbeat_at"),
    ("runs", "hung_at"),
    ("runs", "heartbeat_timeout"),
    ("runs", "cancel_requested_at"),
    ("runs", "steps_total"),
    ("runs", "steps_succeeded"),
    ("runs", "steps_failed"),
    ("runs", "last_event_id"),
    ("steps", "status"),
    ("steps", "name"),
    ("steps", "started_at"),
    ("events", "kind"),
    ("events", "from_status"),
    ("events", "to_status"),
    ("events", "at"),
    ("events", "prev_id"),
    ("locks", "keys"),
    ("locks", "mode"),
    ("locks", "capacity"),
    ("locks", "state"),
    ("locks", "token"),
    ("locks", "instance_id"),
    ("locks", "run_id"),
    ("locks", "pid"),
    ("locks", "wake"),
    ("locks", "granted_at"),
    ("lock_entries", "key"),
    ("lock_entries", "lock_id"),
    ("lock_keys", "last_token"),
    ("instances", "pid"),
    ("instances", "host"),
    ("instances", "boot_id"),
    ("instances", "start_time"),
    ("instances", "pid_ns"),
    ("instances", "heartbeat_at"),
    ("instances", "closed_at"),
];

/// A value SQLite will store in any column (type checks and CHECK
/// constraints off): text that is not what the column means, broken JSON,
/// blobs, extreme integers, reals, NULL.
fn sql_value() -> impl Strategy<Value = rusqlite::types::Value> {
    use rusqlite::types::Value as V;
    prop_oneof![
        text().prop_map(V::Text),
        prop::sample::select(vec![
            "{", "[1,", "\"unterminated", "[\"a\",1]", "{\"a\":1}", "null", "[]", "slots",
            "held", "bogus", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]",
        ])
        .prop_map(|s| V::Text(s.to_owned())),
        (1usize..200).prop_map(|n| V::Text(format!("{}1{}", "[".repeat(n), "]".repeat(n)))),
        vec(any::<u8>(), 0..64).prop_map(V::Blob),
        prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(-1), Just(0)].prop_map(V::Integer),
        prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY)].prop_map(V::Real),
        Just(V::Null),
    ]
}

/// Writes `value` into `table.column` of every row, bypassing every check.
fn corrupt(db: &Path, table: &str, column: &str, value: &rusqlite::types::Value) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("PRAGMA ignore_check_constraints = ON; PRAGMA foreign_keys = OFF;")
        .unwrap();
    // NOT NULL is not among what ignore_check_constraints lifts: a NULL that
    // the column refuses is simply not written.
    let _ = conn.execute(&format!("UPDATE {table} SET {column} = ?1"), [value]);
}

/// Calls every reading and writing method; each returns a value or an
/// error, and nothing panics (a panic fails the calling test).
fn exercise(ledger: &Ledger, ids: &[RunId]) {
    let _ = ledger.runs(RunFilter::default());
    let _ = ledger.runs(RunFilter::default().active());
    let _ = ledger.runs(RunFilter::default().name("done").source("library"));
    for &id in ids.iter().chain(&[RunId::from(99)]) {
        let _ = ledger.run(id).map(|r| serde_json::to_string(&r));
        let _ = ledger.steps(id).map(|s| serde_json::to_string(&s));
        let _ = ledger.events(id).map(|e| serde_json::to_string(&e));
        let _ = ledger.cancel(id);
        let _ = ledger
            .begin_run(RunSpec::new("child").parent(id))
            .map(|r| r.succeed());
    }
    let _ = ledger.locks().map(|l| serde_json::to_string(&l));
    let _ = ledger
        .reap()
        .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>());
    let _ = ledger.heartbeat();
    for key in ["build:symbol=AAPL", "gpu", "fresh"] {
        let _ = ledger.try_lock(key).map(|g| g.release());
        let _ = ledger
            .acquire(LockRequest::new([key]).mode(LockMode::Slots(2)).no_wait())
            .map(|g| g.release());
        let _ = ledger.force_unlock(key, "test");
    }
    let _ = ledger
        .begin_run(RunSpec::new("new").idempotency_key("once"))
        .map(|r| {
            let _ = r.step("s").map(|s| s.succeed());
            r.succeed()
        });
    let _ = ledger.prune(Duration::ZERO);
    let _ = ledger.runs(RunFilter::default());
}

#[test]
fn corrupted_rows_read_back_as_typed_errors() {
    proptest!(ProptestConfig::with_cases(96), |(column in prop::sample::select(COLUMNS), value in sql_value())| {
        let (table, column) = column;
        let mut p = populated();
        let db = p.ledger.path().to_owned();
        corrupt(&db, table, column, &value);
        exercise(&p.ledger, &p.ids);
        // The guards made before the corruption end without a panic.
        if let Some(active) = p.active.take() {
            let _ = active.is_cancel_requested();
            let _ = active.heartbeat();
            let _ = active.step("late").map(|s| s.fail("x"));
            let _ = active.succeed();
        }
        for guard in p.guards.drain(..) {
            let _ = guard.is_held();
            let _ = guard.release();
        }
        drop(p.ledger);
        // A later process opens the file (recovery reads the rows again).
        let reopened = Ledger::builder(&db).background(false).open();
        if let Ok(ledger) = reopened {
            exercise(&ledger, &p.ids);
        }
        drop(p.dir);
    });
}

/// The corruptions that must be reported as such: a row that cannot be read
/// makes the call that reads it fail with a storage error naming the ledger.
#[test]
fn unreadable_metadata_or_lock_keys_are_storage_errors_naming_the_ledger() {
    use rusqlite::types::Value as V;
    let cases = [
        ("runs", "metadata", V::Text("{\"a\":".into())),
        ("runs", "status", V::Text("exploded".into())),
        ("runs", "created_at", V::Text("yesterday".into())),
        ("locks", "keys", V::Text("not json".into())),
        ("locks", "mode", V::Text("sideways".into())),
    ];
    for (table, column, value) in cases {
        let p = populated();
        let db = p.ledger.path().to_owned();
        corrupt(&db, table, column, &value);
        let outcome = if table == "runs" {
            p.ledger
                .run(p.ids[0])
                .map(drop)
                .and(p.ledger.runs(RunFilter::default()).map(drop))
        } else {
            p.ledger.locks().map(drop)
        };
        let e = outcome.expect_err(&format!("{table}.{column} = {value:?} read back"));
        assert!(
            matches!(e, Error::Storage { .. }),
            "{table}.{column}: {e:?}"
        );
        assert!(e.to_string().contains(&*db.to_string_lossy()), "{e}");
    }
}

// ---------------------------------------------------------------------------
// Database files overwritten with random bytes
// ---------------------------------------------------------------------------

/// A ledger with a few hundred runs and some locks, folded into one file
/// (no WAL beside it), as bytes.
fn ledger_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    {
        let ledger = Ledger::builder(&db).background(false).open().unwrap();
        for i in 0..200 {
            let run = ledger
                .begin_run(RunSpec::new(format!("run-{i}")).metadata(serde_json::json!({"i": i})))
                .unwrap();
            run.step("only").unwrap().succeed().unwrap();
            let guard = ledger.lock(format!("key-{}", i % 7)).unwrap();
            guard.release().unwrap();
            run.succeed().unwrap();
        }
    }
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    let _ = std::fs::remove_file(dir.path().join("ledger.db-wal"));
    let _ = std::fs::remove_file(dir.path().join("ledger.db-shm"));
    bytes(&db)
}

#[derive(Clone, Debug)]
enum Damage {
    /// The 100-byte header, overwritten from `at` on (0 erases the magic).
    Header { at: usize, noise: Vec<u8> },
    /// One whole page, from the second on.
    Page { page: usize, noise: Vec<u8> },
    /// Scattered bytes anywhere.
    Bytes { at: Vec<(usize, u8)> },
    /// The file cut short, in the middle of a page.
    Truncated { at: usize },
}

fn damage(len: usize) -> impl Strategy<Value = Damage> {
    const PAGE: usize = 1024;
    let pages = len / PAGE;
    prop_oneof![
        (0usize..100, vec(any::<u8>(), 100)).prop_map(|(at, noise)| Damage::Header { at, noise }),
        (1..pages, vec(any::<u8>(), PAGE)).prop_map(|(page, noise)| Damage::Page { page, noise }),
        vec((0..len, any::<u8>()), 1..32).prop_map(|at| Damage::Bytes { at }),
        (1..len)
            .prop_filter("mid-page", |at| at % PAGE != 0)
            .prop_map(|at| Damage::Truncated { at }),
    ]
}

fn apply(file: &[u8], damage: &Damage) -> Vec<u8> {
    let mut out = file.to_vec();
    match damage {
        Damage::Header { at, noise } => out[*at..100].copy_from_slice(&noise[..100 - at]),
        Damage::Page { page, noise } => {
            out[page * 1024..(page + 1) * 1024].copy_from_slice(noise);
        }
        Damage::Bytes { at } => {
            for &(i, b) in at {
                out[i] = b;
            }
        }
        Damage::Truncated { at } => out.truncate(*at),
    }
    out
}

#[test]
fn a_file_overwritten_with_random_bytes_is_refused_untouched_or_fails_call_by_call() {
    let file = ledger_file();
    assert_eq!(file.len() % 1024, 0);
    let dir = tempfile::tempdir().unwrap();
    let n = std::cell::Cell::new(0);
    let (refused, opened) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    proptest!(ProptestConfig::with_cases(64), |(damage in damage(file.len()))| {
        n.set(n.get() + 1);
        let name = format!("damaged-{}.db", n.get());
        let db = dir.path().join(&name);
        let damaged = apply(&file, &damage);
        std::fs::write(&db, &damaged).unwrap();
        match Ledger::builder(&db).background(false).open() {
            Err(e) => {
                refused.set(refused.get() + 1);
                prop_assert!(
                    matches!(e, Error::NotALedger { .. } | Error::SchemaTooNew { .. } | Error::Open { .. } | Error::Storage { .. }),
                    "{damage:?}: {e:?}"
                );
                prop_assert!(e.to_string().contains(&name), "{e}");
                // Refused: the file is exactly as it was.
                prop_assert!(bytes(&db) == damaged, "{damage:?}: the refused file was modified ({e})");
            }
            Ok(ledger) => {
                opened.set(opened.get() + 1);
                let ids: Vec<RunId> = [1, 2, 100, 200].into_iter().map(RunId::from).collect();
                exercise(&ledger, &ids);
            }
        }
    });
    let (refused, opened) = (refused.get(), opened.get());
    eprintln!("damaged files: {refused} refused, {opened} opened");
    assert!(
        refused > 0,
        "no damage was ever refused: the test does not bite"
    );
}

// ---------------------------------------------------------------------------
// A read-only folder
// ---------------------------------------------------------------------------

#[test]
fn a_read_only_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("locked");
    std::fs::create_dir(&folder).unwrap();
    let Some(_undo) = immutable(&folder) else {
        eprintln!("skipped: chattr +i is not available here");
        return;
    };
    // A new ledger in a folder no one may write to.
    let db = folder.join("ledger.db");
    let e = Ledger::open(&db).unwrap_err();
    assert!(matches!(e, Error::Open { .. }), "{e:?}");
    let message = e.to_string();
    assert!(message.contains(&*db.to_string_lossy()), "{message}");
    assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);
}

#[test]
fn an_existing_ledger_in_a_folder_made_read_only_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::builder(&db).background(false).open().unwrap());
    // Fold the log into the file and remove it: SQLite must create it anew.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    for side in ["ledger.db-wal", "ledger.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(side));
    }
    let before = bytes(&db);
    let Some(_undo) = immutable(dir.path()) else {
        eprintln!("skipped: chattr +i is not available here");
        return;
    };
    // In another process, so that no descriptor this one opened earlier is
    // reused.
    let out = common::spawn_worker(&db, &["begin", "after"])
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("cannot open ledger"), "{stdout}");
    assert!(stdout.contains(&*db.to_string_lossy()), "{stdout}");
    assert_eq!(bytes(&db), before, "the refused file was modified");
}

// ---------------------------------------------------------------------------
// The file size limit reached in the middle of writes
// ---------------------------------------------------------------------------

#[cfg(unix)]
#[test]
fn the_file_size_limit_fails_the_write_and_leaves_the_ledger_intact() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::builder(&db).background(false).open().unwrap());
    let size_before = std::fs::metadata(&db).unwrap().len();
    // `ulimit -f` counts 512- or 1024-byte blocks depending on the shell:
    // 600 blocks is 300 to 600 KiB, a few dozen runs of 8 KiB metadata.
    let script = "trap '' XFSZ; ulimit -f 600 && exec \"$0\" \"$@\"";
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(common::worker())
        .arg(&db)
        .args(["fill", "filler", "--bytes", "8000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A clean exit with the error, not a signal (SIGXFSZ), a panic or an
    // abort.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let failure = stdout
        .lines()
        .find(|l| l.starts_with("failed "))
        .unwrap_or_else(|| panic!("no failure reported:\n{stdout}\n{stderr}"));
    assert!(failure.starts_with("failed Storage {"), "{failure}");
    let begun = stdout.lines().filter(|l| l.starts_with("begun ")).count();
    assert!(begun > 3, "the limit was hit too early to tell: {stdout}");
    eprintln!("{begun} runs begun before: {failure}");

    // Without a limit, the ledger opens, checks out and takes more writes.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    let ledger = Ledger::builder(&db).background(false).open().unwrap();
    let runs = ledger
        .runs(RunFilter::default().name("filler").limit(10_000))
        .unwrap();
    assert_eq!(
        runs.len(),
        begun,
        "every run reported as begun, and only those"
    );
    assert!(runs.iter().all(|r| r.status.is_terminal()), "{runs:?}");
    let run = ledger.begin_run(RunSpec::new("after")).unwrap();
    let id = run.id();
    assert_eq!(run.succeed().unwrap(), runledger::RunStatus::Succeeded);
    assert!(ledger.run(id).is_ok());
    assert!(std::fs::metadata(&db).unwrap().len() >= size_before);
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use std::process::{Command, Output, Stdio};

    /// Runs the real binary in `cwd` (relative paths land there), with a
    /// ledger in the environment, and kills it if it runs for 20 s.
    fn runledger(cwd: &Path, db: &Path, args: &[String]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(args)
            .current_dir(cwd)
            .env("RUNLEDGER_DB", db)
            .env("HOME", cwd)
            .env("XDG_DATA_HOME", cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "runledger {args:?} still running after 20 s\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.wait_with_output().unwrap()
    }

    fn assert_no_panic(args: &[String], out: &Output) -> Result<(), TestCaseError> {
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let code = out.status.code();
        prop_assert!(
            matches!(code, Some(0 | 1 | 2 | 75)),
            "{args:?}: exit {:?}\n{stderr}",
            out.status
        );
        Ok(())
    }

    /// A free-form token that never starts a path outside the working folder
    /// (no `/`, no `.`) and never ends the options (`--`).
    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => "[a-z0-9=:,_ \\-]{0,10}",
            1 => any::<String>().prop_map(|s| s.replace(['/', '.'], "_")),
            1 => Just(String::new()),
        ]
        .prop_filter("not --", |s| s != "--")
    }

    /// A value that is sometimes what the option wants, sometimes not.
    fn value(likely: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(likely).prop_map(str::to_owned),
            1 => token(),
        ]
    }

    const IDS: &[&str] = &[
        "1",
        "2",
        "0",
        "-1",
        "99999999999999999999",
        "9223372036854775807",
    ];
    const DURATIONS: &[&str] = &["1d", "0s", "10ms", "99999999999y", "1h30m", "5", "1e3s"];
    const KEYS: &[&str] = &[
        "k",
        "build:symbol=AAPL",
        "gpu",
        " k",
        "k\\",
        "gpu=2",
        "gpu=0",
    ];

    /// One option or argument, with a value where it takes one.
    fn option() -> impl Strategy<Value = Vec<String>> {
        let pair = |flag: &'static str, likely: &'static [&'static str]| {
            value(likely).prop_map(move |v| vec![flag.to_owned(), v])
        };
        let flag = |flag: &'static str| Just(vec![flag.to_owned()]);
        prop_oneof![
            pair("--status", &["failed", "running", "queued", "nope"]),
            pair("--name", &["seed", "x"]),
            pair("--source", &["terminal", "library"]),
            pair("--since", DURATIONS),
            pair("--limit", IDS),
            pair("--older-than", DURATIONS),
            pair("--lock", KEYS),
            pair("--shared", KEYS),
            pair("--slots", KEYS),
            pair("--wait", DURATIONS),
            pair("--meta", &["a=b", "=", "a", "a=b=c"]),
            pair("--reason", &["stuck", "", " "]),
            pair("--log-dir", &["logs", ""]),
            pair("--db", &["ledger.db", "other.db", ""]),
            flag("--no-wait"),
            flag("--force"),
            flag("--json"),
            flag("-f"),
            flag("--help"),
            value(IDS).prop_map(|v| vec![v]),
            value(KEYS).prop_map(|v| vec![v]),
            token().prop_map(|v| vec![v]),
        ]
    }

    /// A subcommand (usually), a few options, and for `exec` sometimes a
    /// harmless command.
    fn argv() -> impl Strategy<Value = Vec<String>> {
        let commands = &[
            "ps",
            "runs",
            "show",
            "logs",
            "locks",
            "cancel",
            "reap",
            "prune",
            "unlock",
            "exec",
            "help",
            "--version",
        ];
        (
            prop::option::weighted(0.9, prop::sample::select(commands)),
            vec(option(), 0..5),
            prop::option::weighted(0.7, prop::sample::select(vec!["true", "false"])),
        )
            .prop_map(|(command, options, program)| {
                let mut args: Vec<String> = command.map(str::to_owned).into_iter().collect();
                args.extend(options.into_iter().flatten());
                if let Some(program) = program.filter(|_| command == Some("exec")) {
                    args.push("--".to_owned());
                    args.push(program.to_owned());
                }
                args
            })
    }

    #[test]
    fn random_command_lines_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        {
            let ledger = Ledger::open(&db).unwrap();
            let run = ledger.begin_run(RunSpec::new("seed")).unwrap();
            run.succeed().unwrap();
        }
        let codes = std::cell::RefCell::new(std::collections::BTreeMap::new());
        // Twice the usual cases: most random vectors stop at the parser, and
        // a process takes only milliseconds.
        let config = ProptestConfig {
            cases: 2 * CASES,
            ..config()
        };
        proptest!(config, |(args in argv())| {
            let out = runledger(dir.path(), &db, &args);
            assert_no_panic(&args, &out)?;
            *codes.borrow_mut().entry(out.status.code()).or_insert(0) += 1;
        });
        // The vectors got past the parser as well as into it.
        let codes = codes.into_inner();
        eprintln!("exit codes: {codes:?}");
        assert!(codes.get(&Some(0)) >= Some(&8), "{codes:?}");
        assert!(codes.contains_key(&Some(2)), "{codes:?}");
        // The ledger the commands shared is still sound.
        let ledger = Ledger::open(&db).unwrap();
        assert!(
            ledger
                .runs(RunFilter::default().active())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn reading_commands_report_corrupted_rows_without_panicking() {
        use rusqlite::types::Value as V;
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("runs", "metadata", V::Text("{".into())),
            ("runs", "created_at", V::Integer(i64::MAX)),
            ("runs", "created_at", V::Integer(i64::MIN)),
            ("runs", "finished_at", V::Integer(i64::MIN)),
            ("runs", "status", V::Text("exploded".into())),
            ("runs", "pid", V::Integer(-1)),
            ("runs", "steps_total", V::Integer(-5)),
            ("runs", "log_path", V::Text("\u{0}".into())),
            ("steps", "started_at", V::Integer(i64::MAX)),
            ("events", "kind", V::Text("weird".into())),
            ("events", "at", V::Integer(i64::MIN)),
            ("locks", "keys", V::Text("[1]".into())),
            ("locks", "granted_at", V::Integer(i64::MAX)),
            ("locks", "capacity", V::Integer(-3)),
            ("instances", "heartbeat_at", V::Integer(i64::MIN)),
        ];
        let commands: &[&[&str]] = &[
            &["ps"],
            &["runs"],
            &["runs", "--json"],
            &["show", "2"],
            &["show", "2", "--json"],
            &["logs", "1"],
            &["locks"],
            &["locks", "--json"],
            &["reap", "--json"],
        ];
        for (table, column, value) in cases {
            let p = populated();
            let db = p.ledger.path().to_owned();
            corrupt(&db, table, column, &value);
            for args in commands {
                let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
                let out = runledger(dir.path(), &db, &args);
                if let Err(e) = assert_no_panic(&args, &out) {
                    panic!("{table}.{column} = {value:?}: {e}");
                }
            }
            drop(p);
        }
    }
}

/// Deadlines are the clock plus a timeout: at the end of time they saturate
/// instead of overflowing (bigint on PostgreSQL, a REAL on SQLite).
fn the_longest_timeouts_at_the_end_of_time_saturate(store: Store) {
    let f = Fixture::new(store);
    f.clock.set(Timestamp::from_millis(i64::MAX - 1000));
    let run = f
        .ledger
        .begin_run(RunSpec::new("late").heartbeat_timeout(Duration::MAX))
        .unwrap();
    run.heartbeat().unwrap();
    let created = f
        .ledger
        .create_run(RunSpec::new("handed").adopt_within(Duration::MAX))
        .unwrap();
    let record = f.ledger.run(created).unwrap();
    assert_eq!(record.adopt_by, Some(Timestamp::from_millis(i64::MAX)));
    assert_eq!(run.succeed().unwrap(), runledger::RunStatus::Succeeded);
    f.ledger.cancel(created).unwrap();
}

on_both_stores!(
    the_longest_timeouts_at_the_end_of_time_saturate,
    any_run_name_source_key_or_log_path_is_stored_exactly_or_refused_as_invalid,
    any_failure_reason_exit_code_or_unlock_reason_is_accepted_or_refused_as_invalid,
    metadata_at_the_default_limit_is_kept_and_a_byte_more_or_megabytes_are_refused,
    deeply_nested_metadata_is_read_back_or_refused_up_front,
    any_heartbeat_timeout_clock_jump_or_prune_age_leaves_every_call_typed,
    any_lock_wait_and_mode_is_granted_refused_or_timed_out_promptly,
    any_run_id_is_found_or_not_found,
    any_clock_reading_is_stored_printed_and_serialized,
    any_raw_lock_keys_are_granted_together_or_refused_as_invalid,
    built_keys_parse_back_never_collide_and_lock_or_are_refused,
);
