//! Opening a ledger: creation, concurrent first opens, migrations, and the
//! files it refuses.

mod common;

use std::path::Path;

use common::{bytes, finish, instant_in, spawn_worker};
use runledger::{Error, Ledger, SCHEMA_VERSION};

fn schema_rows(db: &Path) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT version, applied_by FROM schema_migrations ORDER BY version")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn open_creates_missing_folders_and_sets_wal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("runs/control/ledger.db");
    let ledger = Ledger::open(&db).unwrap();
    assert!(db.exists());
    assert_eq!(ledger.path(), db.canonicalize().unwrap());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn reopening_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::open(&db).unwrap());
    drop(Ledger::open(&db).unwrap());
    assert_eq!(schema_rows(&db).len(), SCHEMA_VERSION as usize);
}

/// Eight processes open the same fresh path at the same instant: all succeed
/// and the schema is applied once, by one of them.
#[test]
fn eight_processes_opening_a_fresh_file_at_once_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh/ledger.db");
    let at = instant_in(400);
    let children: Vec<_> = (0..8)
        .map(|_| spawn_worker(&db, &["open", "--at", &at]))
        .collect();
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    for child in children {
        let lines = finish(child);
        assert!(lines[0].starts_with("opened "), "{lines:?}");
    }
    let rows = schema_rows(&db);
    assert_eq!(rows.len(), SCHEMA_VERSION as usize, "{rows:?}");
    assert!(
        pids.contains(&(rows[0].1 as u32)),
        "applied by one of the eight"
    );
    // Every process registered its instance.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let instances: i64 = conn
        .query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
        .unwrap();
    assert_eq!(instances, 8);
}

#[test]
fn a_newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::open(&db).unwrap());
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 7)
            .unwrap();
        // Fold the WAL into the file so that the bytes below are the whole
        // database.
        conn.pragma_update(None, "journal_mode", "delete").unwrap();
    }
    let before = bytes(&db);
    let err = Ledger::open(&db).unwrap_err();
    match &err {
        Error::SchemaTooNew {
            found, supported, ..
        } => {
            assert_eq!(*found, SCHEMA_VERSION + 7);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert!(err.to_string().contains("upgrade runledger"), "{err}");
    assert_eq!(bytes(&db), before, "the file was modified");
    assert!(!dir.path().join("ledger.db-wal").exists());
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notes.txt");
    std::fs::write(&db, "these are my notes, not a database\n".repeat(100)).unwrap();
    let before = bytes(&db);
    let err = Ledger::open(&db).unwrap_err();
    assert!(matches!(err, Error::NotALedger { .. }), "{err:?}");
    assert!(err.to_string().contains("not a SQLite database"), "{err}");
    assert!(err.to_string().contains("notes.txt"), "{err}");
    assert_eq!(bytes(&db), before);
    // Nothing was created beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn another_applications_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'ada');")
            .unwrap();
    }
    let before = bytes(&db);
    let err = Ledger::open(&db).unwrap_err();
    assert!(matches!(err, Error::NotALedger { .. }), "{err:?}");
    assert!(err.to_string().contains("another application"), "{err}");
    assert_eq!(bytes(&db), before);
}

#[test]
fn an_unwritable_location_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where a folder should be: no one, root included, can
    // create a folder there.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let db = blocker.join("runs/ledger.db");
    let err = Ledger::open(&db).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&*db.to_string_lossy()), "{message}");
    assert!(std::error::Error::source(&err).is_some());
}

#[cfg(unix)]
#[test]
fn a_read_only_folder_is_reported_when_permissions_apply() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let db = ro.join("ledger.db");
    let result = Ledger::open(&db);
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Root ignores folder permissions; anyone else must get a clear error.
    if std::fs::File::create(ro.join("probe")).is_err() || result.is_err() {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("ledger.db"), "{err}");
    }
}

#[test]
fn a_folder_is_not_a_ledger_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("is a folder"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_symlinked_path_is_the_same_ledger_and_the_same_lock() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let db = real.join("ledger.db");
    let first = Ledger::open(&db).unwrap();
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    let second = Ledger::open(&link).unwrap();
    assert_eq!(first.path(), second.path());
    // The sidecar lock lives beside the real file, not beside the link.
    assert!(real.join("ledger.db-runledger/init.lock").exists());
    assert!(!dir.path().join("link.db-runledger").exists());
    let run = second
        .begin_run(runledger::RunSpec::new("via-link"))
        .unwrap();
    assert_eq!(first.run(run.id()).unwrap().name, "via-link");
    run.succeed().unwrap();
}
