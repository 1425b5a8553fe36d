//! Ledgers made before CHECK constraints were written as OR chains (their
//! IN lists built a temporary b-tree on every run write) are rewritten in
//! place at open: with data, in WAL mode, with other connections and
//! processes around, and under `kill -9`, the file stays whole and keeps
//! its version.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{KillOnDrop, spawn_worker};
use runledger::{Ledger, LockMode, LockRequest, RunSpec, SCHEMA_VERSION};
use rusqlite::Connection;

/// (table, the CHECK as ledgers of earlier releases have it, as rewritten).
const CHECKS: [(&str, &str, &str); 3] = [
    (
        "runs",
        "CHECK (status IN
                               ('queued','running','succeeded','partial','failed','cancelled'))",
        "CHECK (status = 'queued' OR status = 'running' OR status = 'succeeded'
                               OR status = 'partial' OR status = 'failed'
                               OR status = 'cancelled')",
    ),
    (
        "steps",
        "CHECK (status IN ('running','succeeded','failed'))",
        "CHECK (status = 'running' OR status = 'succeeded' OR status = 'failed')",
    ),
    (
        "locks",
        "CHECK (mode IN ('exclusive','shared','slots'))",
        "CHECK (mode = 'exclusive' OR mode = 'shared' OR mode = 'slots')",
    ),
];

fn raw(db: &Path) -> Connection {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(20)).unwrap();
    c
}

fn integrity(c: &Connection) -> Vec<String> {
    let mut s = c.prepare("PRAGMA integrity_check").unwrap();
    s.query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn table_sql(c: &Connection, table: &str) -> String {
    c.query_row(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get(0),
    )
    .unwrap()
}

fn user_version(c: &Connection) -> u32 {
    c.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// The CHECKs as ledgers of earlier releases have them.
const OLD: bool = false;
/// The CHECKs as rewritten.
const NEW: bool = true;

/// Whether every table has exactly one of its CHECKs, the old or the new
/// one as `new` says, and not the other.
fn checks_are(c: &Connection, new: bool) -> bool {
    CHECKS.iter().all(|&(table, old_check, new_check)| {
        let sql = table_sql(c, table);
        let (is, is_not) = if new {
            (new_check, old_check)
        } else {
            (old_check, new_check)
        };
        sql.matches(is).count() == 1 && !sql.contains(is_not)
    })
}

/// Puts back the CHECKs as ledgers of earlier releases have them, as
/// `rewrite` undone (the version, which the rewrite never changes, stays).
fn back_to_old_checks(db: &Path) {
    let c = raw(db);
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    let cookie: i64 = c
        .pragma_query_value(None, "schema_version", |r| r.get(0))
        .unwrap();
    c.pragma_update(None, "writable_schema", true).unwrap();
    for (table, old, new) in CHECKS {
        let sql = table_sql(&c, table);
        assert_eq!(sql.matches(new).count(), 1, "{table}: {sql}");
        c.execute(
            "UPDATE sqlite_schema SET sql = ?2 WHERE type = 'table' AND name = ?1",
            (table, sql.replace(new, old)),
        )
        .unwrap();
    }
    c.pragma_update(None, "schema_version", cookie + 1).unwrap();
    c.pragma_update(None, "writable_schema", false).unwrap();
    c.execute_batch("COMMIT").unwrap();
    assert_eq!(integrity(&c), ["ok"]);
    assert!(checks_are(&c, OLD));
}

/// A ledger with many runs (every status), steps, events and locks (every
/// mode), in WAL mode, with the CHECKs of earlier releases.
fn populated_old_ledger(dir: &Path) -> PathBuf {
    let db = dir.join("ledger.db");
    {
        let ledger = Ledger::open(&db).unwrap();
        for i in 0..400 {
            let run = ledger.begin_run(RunSpec::new(format!("r{i}"))).unwrap();
            run.step("a").unwrap().succeed().unwrap();
            run.step("b").unwrap().fail("no").unwrap();
            run.event("e", serde_json::json!({"i": i})).unwrap();
            match i % 4 {
                0 => drop(run.succeed().unwrap()),
                1 => drop(run.fail("x").unwrap()),
                2 => drop(run.cancelled().unwrap()),
                _ => drop(run),
            }
        }
        for i in 0..50 {
            ledger.create_run(RunSpec::new(format!("q{i}"))).unwrap();
        }
        // Locks of every mode, left held in the file.
        std::mem::forget((
            ledger.lock("ex").unwrap(),
            ledger
                .acquire(LockRequest::new(["sh"]).mode(LockMode::Shared))
                .unwrap(),
            ledger
                .acquire(LockRequest::new(["gpu"]).mode(LockMode::Slots(2)))
                .unwrap(),
        ));
    }
    back_to_old_checks(&db);
    let mode: String = raw(&db)
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    db
}

fn assert_rewritten(db: &Path) {
    let c = raw(db);
    assert_eq!(user_version(&c), SCHEMA_VERSION);
    assert_eq!(integrity(&c), ["ok"]);
    assert!(checks_are(&c, NEW));
}

#[test]
fn a_ledger_with_the_old_checks_is_rewritten_at_open_with_a_reader_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_old_ledger(dir.path());
    let reader = raw(&db);
    let runs_before: i64 = reader
        .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
        .unwrap();
    let ledger = Ledger::open(&db).unwrap();
    assert_rewritten(&db);
    // The reader, open meanwhile, reads the new definitions and every row.
    assert!(checks_are(&reader, NEW));
    let runs: i64 = reader
        .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(runs, runs_before);
    let run = ledger.begin_run(RunSpec::new("after")).unwrap();
    run.step("s").unwrap().succeed().unwrap();
    run.succeed().unwrap();
    drop(ledger);
    assert_rewritten(&db);
}

/// A process of an earlier release keeps its prepared statements: they are
/// prepared again under the new definitions, which accept and refuse the
/// same values.
#[test]
fn statements_prepared_before_the_rewrite_follow_the_new_checks() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_old_ledger(dir.path());
    let earlier = raw(&db);
    earlier.execute_batch("PRAGMA foreign_keys = ON").unwrap();
    let mut insert_run = earlier
        .prepare(
            "INSERT INTO runs (name, source, status, instance_id, pid, host, created_at)
             VALUES ('old', '', ?1, 0, 1, 'h', 1)",
        )
        .unwrap();
    let mut update_run = earlier
        .prepare("UPDATE runs SET status = ?1 WHERE id = 1")
        .unwrap();
    let mut insert_step = earlier
        .prepare("INSERT INTO steps (run_id, name, status, started_at) VALUES (1, ?2, ?1, 1)")
        .unwrap();
    let mut insert_lock = earlier
        .prepare(
            "INSERT INTO locks (state, mode, keys, instance_id, pid, host, requested_at)
             VALUES ('waiting', ?1, '[]', 0, 1, 'h', 1)",
        )
        .unwrap();
    insert_run.execute(["running"]).unwrap();

    let ledger = Ledger::open(&db).unwrap();
    assert_rewritten(&db);

    for status in [
        "queued",
        "running",
        "succeeded",
        "partial",
        "failed",
        "cancelled",
    ] {
        insert_run.execute([status]).unwrap();
        update_run.execute([status]).unwrap();
    }
    for (i, status) in ["running", "succeeded", "failed"].iter().enumerate() {
        insert_step.execute([*status, &format!("s{i}")]).unwrap();
    }
    for mode in ["exclusive", "shared", "slots"] {
        insert_lock.execute([mode]).unwrap();
    }
    for bad in ["done", "Running", "RUNNING", "running ", "", "queued'"] {
        for e in [
            insert_run.execute([bad]).unwrap_err(),
            update_run.execute([bad]).unwrap_err(),
            insert_step.execute([bad, "x"]).unwrap_err(),
            insert_lock.execute([bad]).unwrap_err(),
        ] {
            assert!(
                e.to_string().contains("CHECK constraint failed"),
                "{bad}: {e}"
            );
        }
    }
    drop((insert_run, update_run, insert_step, insert_lock));
    drop(earlier);
    drop(ledger);
    assert_rewritten(&db);
}

/// A process killed (SIGKILL) at any moment of opening such a ledger leaves
/// the old definitions or the new ones, whole.
#[test]
fn a_kill_while_opening_leaves_the_old_checks_or_the_new_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_old_ledger(dir.path());
    let (mut olds, mut news) = (0, 0);
    for i in 0..30u64 {
        let child = spawn_worker(&db, &["open"]);
        std::thread::sleep(Duration::from_micros(500 * (i % 20)));
        let mut child = KillOnDrop(child);
        let _ = child.0.kill();
        let _ = child.0.wait();
        let c = raw(&db);
        assert_eq!(integrity(&c), ["ok"], "after kill {i}");
        assert_eq!(user_version(&c), SCHEMA_VERSION);
        if checks_are(&c, OLD) {
            olds += 1;
        } else {
            assert!(checks_are(&c, NEW), "after kill {i}: neither old nor new");
            news += 1;
            drop(c);
            back_to_old_checks(&db);
        }
    }
    eprintln!("left with the old checks: {olds}, with the new: {news}");
}

/// Six processes open such a ledger at once: all open it, and it ends up
/// rewritten and whole.
#[test]
fn six_processes_opening_it_at_once_all_open_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_old_ledger(dir.path());
    let at = common::instant_in(400);
    let children: Vec<_> = (0..6)
        .map(|_| spawn_worker(&db, &["open", "--at", &at]))
        .collect();
    for child in children {
        let lines = common::finish(child);
        assert!(lines[0].starts_with("opened "), "{lines:?}");
    }
    assert_rewritten(&db);
}
