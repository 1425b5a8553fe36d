//! Opening a ledger: creation, concurrent first opens, migrations, and the
//! files it refuses.

mod common;

use std::path::Path;

use common::{bytes, finish, immutable, instant_in, spawn_worker};
use runledger::{Error, InstanceId, Ledger, Location, SCHEMA_VERSION};

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
    assert_eq!(
        ledger.location(),
        &Location::Sqlite(db.canonicalize().unwrap())
    );
    assert_eq!(ledger.location().as_path(), Some(ledger.path()));
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
    // Every process registered its instance (instance 0 is nobody's: the
    // owner of runs awaiting adoption).
    let conn = rusqlite::Connection::open(&db).unwrap();
    let instances: i64 = conn
        .query_row("SELECT count(*) FROM instances WHERE id > 0", [], |r| {
            r.get(0)
        })
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
    // Nothing was left beside it: no sidecar folder, no WAL.
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["app.db"], "{beside:?}");
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

#[cfg(target_os = "linux")]
#[test]
fn a_read_only_ledger_file_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::open(&db).unwrap());
    let Some(_undo) = immutable(&db) else {
        eprintln!("skipped: chattr +i is not available here");
        return;
    };
    // In another process: within one process SQLite may reuse a descriptor
    // opened read-write before the file became immutable.
    let out = spawn_worker(&db, &["open"]).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("cannot open ledger"), "{stdout}");
    assert!(
        stdout.contains(&*db.to_string_lossy()) && stdout.contains("read-only"),
        "{stdout}"
    );
}

/// Copies `db` and its `-wal` while `conn` is open, as a crash leaves them:
/// the copy's WAL still holds transactions not yet folded into the file.
fn snapshot_with_wal(conn: &rusqlite::Connection, db: &Path, to: &Path) {
    let wal =
        |p: &Path| p.with_file_name(format!("{}-wal", p.file_name().unwrap().to_string_lossy()));
    conn.pragma_query_value(None, "user_version", |_| Ok(()))
        .unwrap();
    std::fs::copy(db, to).unwrap();
    std::fs::copy(wal(db), wal(to)).unwrap();
    assert!(
        bytes(&wal(to)).len() > 32,
        "the snapshot's WAL holds frames"
    );
}

/// Regression: closing the inspecting connection used to checkpoint the WAL
/// of a file it then refused, rewriting the file.
#[test]
fn a_newer_schema_with_a_pending_wal_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(Ledger::open(&db).unwrap());
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let copy = dir.path().join("copy.db");
    snapshot_with_wal(&conn, &db, &copy);
    drop(conn);
    let copy_wal = dir.path().join("copy.db-wal");
    let (before, wal_before) = (bytes(&copy), bytes(&copy_wal));
    let err = Ledger::open(&copy).unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found, .. } if found == SCHEMA_VERSION + 1),
        "{err:?}"
    );
    assert_eq!(bytes(&copy), before, "the database file was modified");
    assert_eq!(bytes(&copy_wal), wal_before, "the WAL was modified");
}

#[test]
fn another_applications_wal_database_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.execute_batch(
        "CREATE TABLE users (id INTEGER PRIMARY KEY); INSERT INTO users VALUES (1);",
    )
    .unwrap();
    let copy = dir.path().join("copy.db");
    snapshot_with_wal(&conn, &db, &copy);
    drop(conn);
    let (before, wal_before) = (bytes(&copy), bytes(&dir.path().join("copy.db-wal")));
    assert!(matches!(
        Ledger::open(&copy).unwrap_err(),
        Error::NotALedger { .. }
    ));
    assert_eq!(bytes(&copy), before);
    assert_eq!(bytes(&dir.path().join("copy.db-wal")), wal_before);
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

#[test]
fn a_url_of_another_kind_is_refused_and_makes_no_file() {
    // Taken as a path, `sqlite:///tmp/x.db` would be a file `x.db` in a
    // folder `sqlite:/tmp` of the working folder.
    for location in [
        "sqlite:///tmp/runledger-x.db",
        "file://ledger.db",
        "MySQL://db/app",
    ] {
        let err = Ledger::open(location).unwrap_err();
        assert!(err.is_invalid_input(), "{location}: {err:?}");
        let text = err.to_string();
        assert!(
            text.contains("postgres:// URL") && text.contains("file path"),
            "{text}"
        );
        let scheme = location.split_once("://").unwrap().0;
        assert!(
            !std::path::Path::new(&format!("{scheme}:")).exists(),
            "{location}"
        );
    }
    // A path that merely holds `://` further on is a path.
    let dir = tempfile::tempdir().unwrap();
    let odd = format!("{}/a://ledger.db", dir.path().display());
    Ledger::open(&odd).unwrap();
    assert!(dir.path().join("a:").join("ledger.db").exists());
}

#[test]
fn the_instance_is_closed_when_the_last_handle_drops() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let closed_at = |id: InstanceId| -> Option<i64> {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(
            "SELECT closed_at FROM instances WHERE id = ?1",
            [i64::from(id)],
            |r| r.get(0),
        )
        .unwrap()
    };
    let ledger = Ledger::builder(&db).label("api-server").open().unwrap();
    let id = ledger.instance_id();
    let clone = ledger.clone();
    let run = ledger
        .begin_run(runledger::RunSpec::new("holds-a-handle"))
        .unwrap();
    drop(ledger);
    drop(clone);
    assert_eq!(closed_at(id), None, "a run guard keeps the ledger open");
    run.succeed().unwrap();
    assert!(closed_at(id).is_some());
}
