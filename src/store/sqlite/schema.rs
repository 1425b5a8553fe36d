//! The schema: an ordered list of migrations, appended to only.
//!
//! The version of a database is its `PRAGMA user_version`: the number of
//! migrations applied. `application_id` marks the file as a runledger ledger,
//! so that another application's SQLite file is refused instead of altered.
//!
//! The PostgreSQL store's migrations (`postgres::schema`) have the same
//! shape, one for one, in that server's own DDL: two lists, as a migration
//! once released is never edited.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::error::Result;

/// `PRAGMA application_id` of a ledger: "RLDG" in ASCII.
///
/// (Set by the first migration, with `user_version`.)
pub(crate) const APPLICATION_ID: i32 = 0x524C_4447;

/// Every migration, in order. Migration `i` (from 0) brings a database from
/// version `i` to `i + 1`. Never edit or reorder an entry: append.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: instances, runs, steps, events.
    r#"
    CREATE TABLE schema_migrations (
        version     INTEGER PRIMARY KEY,
        applied_at  INTEGER NOT NULL,
        applied_by  INTEGER NOT NULL   -- pid of the process that applied it
    );

    -- One row per process that opened the ledger.
    CREATE TABLE instances (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        host          TEXT NOT NULL,
        boot_id       TEXT,
        pid           INTEGER NOT NULL,
        pid_ns        TEXT,             -- pid namespace (containers), if known
        start_time    INTEGER,          -- process start, platform units
        label         TEXT,
        started_at    INTEGER NOT NULL, -- ms since the epoch, like every *_at
        heartbeat_at  INTEGER NOT NULL,
        closed_at     INTEGER
    );

    -- Rows are small and transactions many: every b-tree page a transaction
    -- touches is written whole to the WAL, so this schema keeps each write
    -- to three pages (the run, the active-run index, the event) and the file
    -- uses 1 KiB pages (set before this migration runs).
    CREATE TABLE runs (
        id                   INTEGER PRIMARY KEY,  -- never reused: see prune
        name                 TEXT NOT NULL,
        source               TEXT NOT NULL,
        status               TEXT NOT NULL CHECK (status IN
                               ('queued','running','succeeded','partial','failed','cancelled')),
        parent_id            INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        idempotency_key      TEXT,
        instance_id          INTEGER NOT NULL,
        pid                  INTEGER NOT NULL,
        host                 TEXT NOT NULL,
        exit_code            INTEGER,
        error                TEXT,
        metadata             TEXT,
        log_path             TEXT,
        created_at           INTEGER NOT NULL,
        started_at           INTEGER,
        heartbeat_at         INTEGER,
        finished_at          INTEGER,
        cancel_requested_at  INTEGER,
        steps_total          INTEGER NOT NULL DEFAULT 0,
        steps_succeeded      INTEGER NOT NULL DEFAULT 0,
        steps_failed         INTEGER NOT NULL DEFAULT 0,
        last_event_id        INTEGER               -- head of the run's event chain
    );
    -- The active runs, so that listing them (and, later, the reaper) never
    -- scans the history. Queries must repeat this WHERE clause verbatim.
    CREATE INDEX runs_active ON runs(id) WHERE status IN ('queued','running');
    -- At most one active run per idempotency key, enforced by SQLite itself.
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs(idempotency_key)
        WHERE idempotency_key IS NOT NULL AND status IN ('queued','running');
    CREATE INDEX runs_by_parent ON runs(parent_id) WHERE parent_id IS NOT NULL;

    CREATE TABLE steps (
        id           INTEGER PRIMARY KEY,
        run_id       INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        name         TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('running','succeeded','failed')),
        error        TEXT,
        started_at   INTEGER NOT NULL,
        finished_at  INTEGER,
        UNIQUE (run_id, name)
    );
    CREATE INDEX steps_running ON steps(run_id, id) WHERE status = 'running';

    -- The history of every run. id is the global commit order (never
    -- reused); each run's events form a chain through prev_id from
    -- runs.last_event_id, which replaces an index on run_id (one page less
    -- per write).
    CREATE TABLE events (
        id           INTEGER PRIMARY KEY,
        run_id       INTEGER NOT NULL,
        prev_id      INTEGER,          -- the run's previous event
        at           INTEGER NOT NULL,
        kind         TEXT NOT NULL,    -- status | step | cancel_requested
        step         TEXT,
        from_status  TEXT,
        to_status    TEXT,
        message      TEXT
    );
    "#,
    // 2: locks.
    r#"
    -- One row per key ever locked: the fencing counter. Kept after release,
    -- so tokens only grow, across restarts and pruning.
    CREATE TABLE lock_keys (
        key         TEXT PRIMARY KEY,
        last_token  INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- One row per lock request, granted or queued. Its id is the queue
    -- ticket: among waiters, lower ids are served first. Never reused, so
    -- that a stale guard or queue place can never match another request.
    CREATE TABLE locks (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        state         TEXT NOT NULL CHECK (state IN ('held','waiting')),
        mode          TEXT NOT NULL CHECK (mode IN ('exclusive','shared','slots')),
        capacity      INTEGER,
        token         INTEGER,          -- set when granted
        keys          TEXT NOT NULL,    -- JSON array of the request's keys
        instance_id   INTEGER NOT NULL,
        run_id        INTEGER,          -- the owning run, if any
        pid           INTEGER NOT NULL,
        host          TEXT NOT NULL,
        wake          TEXT,             -- a waiter's wake-up address
        requested_at  INTEGER NOT NULL,
        granted_at    INTEGER
    );
    CREATE INDEX locks_by_run ON locks(run_id) WHERE run_id IS NOT NULL;

    -- The keys of each request: per key, its holders and waiters in ticket
    -- order.
    CREATE TABLE lock_entries (
        key      TEXT NOT NULL,
        lock_id  INTEGER NOT NULL,
        PRIMARY KEY (key, lock_id)
    ) WITHOUT ROWID;

    -- Locks taken away from their holders: reclaimed from a dead owner, or
    -- released by force.
    CREATE TABLE lock_events (
        id           INTEGER PRIMARY KEY,
        at           INTEGER NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('reclaimed','forced')),
        lock_id      INTEGER NOT NULL,
        keys         TEXT NOT NULL,
        token        INTEGER,
        run_id       INTEGER,
        holder_pid   INTEGER NOT NULL,
        holder_host  TEXT NOT NULL,
        reason       TEXT NOT NULL,
        by_pid       INTEGER NOT NULL,
        by_host      TEXT NOT NULL
    );
    "#,
    // 3: liveness: instance locks and closing reasons, run heartbeats.
    r#"
    -- The file (in the sidecar folder's instances/) that the instance's
    -- process holds an OS lock on for its whole life: a failed try-lock by
    -- another process on the same kernel proves it alive.
    ALTER TABLE instances ADD COLUMN lock_file TEXT;
    -- Why the instance was closed: it closed the ledger, or a reaper judged
    -- it dead (the reason of its verdict).
    ALTER TABLE instances ADD COLUMN closed_reason TEXT;
    -- The heartbeat lease the instance promised to renew (ms): others judge
    -- it by its own lease, not theirs.
    ALTER TABLE instances ADD COLUMN stale_after INTEGER;
    -- The instances still open: what the dead-owner reaper judges.
    CREATE INDEX instances_open ON instances(id) WHERE closed_at IS NULL;

    -- Opt-in progress heartbeats: a running run with a timeout is hung once
    -- hung_at (its last heartbeat, or its start, plus the timeout) passes.
    -- NULL for every other run, so that they stay out of the index.
    ALTER TABLE runs ADD COLUMN heartbeat_timeout INTEGER;  -- ms
    ALTER TABLE runs ADD COLUMN hung_at INTEGER;
    CREATE INDEX runs_hung ON runs(hung_at) WHERE hung_at IS NOT NULL;

    -- From this version on, events.kind may also be 'lock_forced' (a lock of
    -- the run released by force), with the lock's keys as JSON in
    -- events.step and the reason in events.message.
    "#,
    // 4: runs handed from one process to another, custom events, watchers.
    r#"
    -- A run created for another process to adopt (Ledger::create_run) is
    -- owned by nobody (instance_id 0; pid and host name its creator) until
    -- adopted, and fails once adopt_by (ms) passes. NULL for every other run,
    -- so that they stay out of the index.
    ALTER TABLE runs ADD COLUMN adopt_by INTEGER;
    CREATE INDEX runs_unadopted ON runs(adopt_by) WHERE adopt_by IS NOT NULL;
    -- Instance 0, the owner of those runs: an open row that no process
    -- heartbeats, on no boot, with a heartbeat far in the future. This
    -- version never judges it; a process of an earlier version, still
    -- running while this one migrated the file, judges it alive by its lease
    -- and leaves its runs alone (without the row it would take them for the
    -- runs of a closed instance and fail them).
    INSERT INTO instances (id, host, boot_id, pid, label, started_at, heartbeat_at)
        VALUES (0, 'nobody', NULL, 0, 'owner of runs awaiting adoption', 0,
                9007199254740991);

    -- Processes watching the event feed (Ledger::watch): a writer that
    -- appends events wakes each address after its commit.
    CREATE TABLE watchers (
        id           INTEGER PRIMARY KEY,
        instance_id  INTEGER NOT NULL,
        address      TEXT NOT NULL
    );

    -- From this version on, events.kind may also be 'adopted' (JSON of the
    -- adopter's instance, pid and host in events.step) and 'custom' (the
    -- event's name in events.step, its JSON data in events.message).
    "#,
    // 5: locks in the event feed.
    r#"
    -- From this version on, every grant of a lock, and every end of one
    -- (released, reclaimed from a dead holder, released by force), is an
    -- event of the feed: events.kind is 'lock_granted', 'lock_released',
    -- 'lock_reclaimed' or 'lock_force_released', run_id the lock's run or 0
    -- (a lock without a run), prev_id NULL (a lock event is in no run's
    -- chain), the lock (ticket, keys, mode, token, holder) as JSON in
    -- events.step, and why and by whom, if taken away, in events.message.

    -- The lock events of each key: its history. A table of its own, written
    -- by lock writes only, rather than an index on events that every run
    -- write would pay for.
    CREATE TABLE lock_history (
        key       TEXT NOT NULL,
        event_id  INTEGER NOT NULL,
        PRIMARY KEY (key, event_id)
    ) WITHOUT ROWID;
    -- Retention walks the lock events oldest first.
    CREATE INDEX lock_history_by_event ON lock_history(event_id);
    "#,
    // 6: idempotency windows (RunSpec::idempotency_window).
    r#"
    -- The latest run of a key, in any status, found without a scan.
    CREATE INDEX runs_by_idempotency_key_created ON runs(idempotency_key, created_at)
        WHERE idempotency_key IS NOT NULL;
    "#,
    // 7: nothing changes on SQLite. PostgreSQL's migration 7 gives up the
    // schema-wide writer lock and renumbers the event feed; both stores
    // keep one version number.
    r#"
    SELECT 1;
    "#,
    // 8: the runs list filtered by name or by source, newest first.
    r#"
    -- `WHERE name = ? ... ORDER BY id DESC LIMIT ?` walks one of these
    -- backwards and stops at the page's end, instead of scanning the
    -- whole history (issue 18: a million runs).
    CREATE INDEX runs_by_name ON runs(name, id);
    CREATE INDEX runs_by_source ON runs(source, id);
    "#,
    // 9: the runs list filtered by status, newest first.
    r#"
    -- `WHERE status IN (...) ... ORDER BY id DESC LIMIT ?`: the recent
    -- failures of the dashboard's overview, a status filter of its runs
    -- page. Past runs of one status (few failures among a million
    -- successes) were found by walking the whole history backwards.
    -- Finished runs only: active ones have `runs_active`, which SQLite
    -- would otherwise pass over for this index and a sort. A query of
    -- finished statuses says this condition verbatim to use it.
    CREATE INDEX runs_by_status ON runs(status, id) WHERE status NOT IN ('queued','running');
    "#,
    // 10: nothing on SQLite. On PostgreSQL, the writes of a run's calls
    // as server-side functions (see that store's migration 10); the
    // domain is the same.
    "",
    // 11: nothing on SQLite. On PostgreSQL, a lock call of one batch as
    // one function (see that store's migration 11).
    "",
];

/// The CHECK constraints that [`rewrite_checks`] rewrites: (table, as
/// migrations 1 and 2 wrote it, as it is once rewritten).
///
/// SQLite evaluates `x IN (a, b, c)` with three or more constants by
/// building a temporary b-tree of the list, each time. Written so, these
/// constraints made every insert of a run, a step or a lock request, and
/// every change of a run's or step's status, build one: about 40% of the
/// instructions of `begin_run` + `succeed` (counted with callgrind). As OR
/// chains they cost a few comparisons.
const REWRITTEN_CHECKS: [(&str, &str, &str); 3] = [
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

/// Rewrites [`REWRITTEN_CHECKS`] in the stored table definitions, if they
/// are still as migrations 1 and 2 wrote them; returns how many tables it
/// rewrote. Run at every open, after the migrations, under the init lock:
/// a read of three rows of `sqlite_schema` once the ledger is rewritten.
///
/// Not a migration: each new constraint accepts exactly the values the old
/// one did, so no stored row changes, and the schema's version stays. A
/// process of an earlier release keeps opening and writing the ledger (its
/// connections read the new definitions when the schema cookie moves).
/// The definitions are edited in place, under `writable_schema`, as SQLite
/// documents for changing CHECK constraints, instead of copying every row
/// into rebuilt tables: instant on any ledger, and one transaction, so a
/// process killed meanwhile leaves the old definitions or the new ones. A
/// table whose definition is not the one runledger made is left as it is.
pub(crate) fn rewrite_checks(conn: &mut Connection) -> Result<usize> {
    let pending = |conn: &Connection| -> Result<Vec<(&str, String)>> {
        let mut pending = Vec::new();
        for (table, old, new) in REWRITTEN_CHECKS {
            let sql: Option<String> = conn
                .query_row(
                    "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                    [table],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(sql) = sql.filter(|sql| sql.matches(old).count() == 1) {
                pending.push((table, sql.replace(old, new)));
            }
        }
        Ok(pending)
    };
    if pending(conn)?.is_empty() {
        return Ok(0);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rewritten = pending(&tx)?;
    let cookie: i64 = tx.pragma_query_value(None, "schema_version", |row| row.get(0))?;
    tx.pragma_update(None, "writable_schema", true)?;
    let updated = rewritten.iter().try_for_each(|(table, sql)| {
        tx.execute(
            "UPDATE sqlite_schema SET sql = ?2 WHERE type = 'table' AND name = ?1",
            (table, sql),
        )
        .map(drop)
    });
    tx.pragma_update(None, "writable_schema", false)?;
    updated?;
    tx.pragma_update(None, "schema_version", cookie + 1)?;
    tx.commit()?;
    Ok(rewritten.len())
}

/// The schema version this build writes and understands.
pub(crate) const LATEST: u32 = MIGRATIONS.len() as u32;

/// The page size of a new ledger file. Each transaction writes every page it
/// touches whole to the WAL; with small rows, 1 KiB pages make a write
/// cheaper than SQLite's default 4 KiB (`benches/runs.rs` measures both;
/// figures in `BENCHMARKS.md`).
pub(crate) const PAGE_SIZE: u32 = 1024;

/// What [`inspect`] found in a database file.
pub(crate) enum Found {
    /// A runledger ledger (or an empty file) at this version.
    Ledger(u32),
    /// A SQLite database with tables of another application.
    Foreign(String),
}

/// Reads the version of a database without writing anything.
pub(crate) fn inspect(conn: &Connection) -> Result<Found> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let app_id: i32 = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
    if app_id == APPLICATION_ID {
        return Ok(Found::Ledger(version));
    }
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
    if tables == 0 && version == 0 && app_id == 0 {
        Ok(Found::Ledger(0))
    } else if app_id != 0 {
        Ok(Found::Foreign(format!(
            "a SQLite database of another application (application_id {app_id:#x})"
        )))
    } else {
        Ok(Found::Foreign(format!(
            "a SQLite database of another application ({tables} schema {}, no runledger schema)",
            if tables == 1 { "object" } else { "objects" }
        )))
    }
}

/// Applies every pending migration in one immediate transaction. Returns how
/// many were applied (0 if another process got there first).
pub(crate) fn migrate(conn: &mut Connection, now_ms: i64) -> Result<u32> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: u32 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version >= LATEST {
        return Ok(0);
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at, applied_by) VALUES (?1, ?2, ?3)",
            (i as i64 + 1, now_ms, std::process::id()),
        )?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", LATEST)?;
    tx.commit()?;
    Ok(LATEST - version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_to_an_empty_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        assert!(matches!(inspect(&conn).unwrap(), Found::Ledger(0)));
        assert_eq!(migrate(&mut conn, 1).unwrap(), LATEST);
        assert!(matches!(inspect(&conn).unwrap(), Found::Ledger(v) if v == LATEST));
        // Applying again is a no-op.
        assert_eq!(migrate(&mut conn, 2).unwrap(), 0);
        let applied: i64 = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(applied, i64::from(LATEST));
        let check: String = conn
            .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
            .unwrap_or_else(|_| "ok".into());
        assert_eq!(check, "ok");
    }

    /// The plan SQLite picks for the runs list under `filter`.
    fn runs_plan(conn: &Connection, filter: &crate::RunFilter) -> String {
        let (sql, params) = super::super::runs::runs_query(filter);
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params.iter()), |row| {
                row.get::<_, String>(3)
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>();
        rows.join("; ")
    }

    /// Filtered by name or by source, the runs list walks that column's
    /// index newest first: no scan of the history, no sort.
    #[test]
    fn the_runs_list_filtered_by_name_source_or_status_walks_an_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, 1).unwrap();
        let name = runs_plan(&conn, &crate::RunFilter::default().name("build"));
        assert!(name.contains("USING INDEX runs_by_name (name=?"), "{name}");
        assert!(!name.contains("TEMP B-TREE"), "{name}");
        let source = runs_plan(&conn, &crate::RunFilter::default().source("cron"));
        assert!(
            source.contains("USING INDEX runs_by_source (source=?"),
            "{source}"
        );
        assert!(!source.contains("TEMP B-TREE"), "{source}");
        let since = runs_plan(
            &conn,
            &crate::RunFilter::default()
                .name("build")
                .since(crate::Timestamp::EPOCH),
        );
        assert!(since.contains("runs_by_name"), "{since}");
        let failed = runs_plan(
            &conn,
            &crate::RunFilter::default().status(crate::RunStatus::Failed),
        );
        assert!(
            failed.contains("USING INDEX runs_by_status (status=?"),
            "{failed}"
        );
        assert!(!failed.contains("TEMP B-TREE"), "{failed}");
    }

    /// A ledger as version `v` of this crate made it.
    fn ledger_at(v: usize) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        for sql in &MIGRATIONS[..v] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        conn.pragma_update(None, "user_version", v as i64).unwrap();
        conn
    }

    /// Whether running `sql` builds a temporary b-tree (as an IN list of
    /// three or more constants in a CHECK does).
    fn builds_a_temporary_btree(conn: &Connection, sql: &str) -> bool {
        let mut stmt = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
        let n = stmt.parameter_count();
        stmt.query_map(
            rusqlite::params_from_iter(vec![rusqlite::types::Null; n]),
            |row| row.get::<_, String>(1),
        )
        .unwrap()
        .any(|op| op.unwrap() == "OpenEphemeral")
    }

    /// The writes of every run, step and lock request.
    const HOT_WRITES: [&str; 5] = [
        "INSERT INTO runs (name, source, status, instance_id, pid, host, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        "UPDATE runs SET status = ?2 WHERE id = ?1",
        "INSERT INTO steps (run_id, name, status, started_at) VALUES (?1, ?2, ?3, ?4)",
        "UPDATE steps SET status = ?2 WHERE id = ?1",
        "INSERT INTO locks (state, mode, keys, instance_id, pid, host, requested_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    ];

    #[test]
    fn the_rewritten_checks_are_those_migrations_1_and_2_wrote() {
        for (table, old, _) in REWRITTEN_CHECKS {
            assert_eq!(
                MIGRATIONS[..2]
                    .iter()
                    .map(|m| m.matches(old).count())
                    .sum::<usize>(),
                1,
                "{table}"
            );
        }
    }

    fn user_version(conn: &Connection) -> u32 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    /// Rewriting the checks takes the temporary b-trees out of the hot
    /// writes, keeps the rows and the version, and the constraints still
    /// refuse what they refused.
    #[test]
    fn once_the_checks_are_rewritten_no_hot_write_builds_a_temporary_btree() {
        let mut old = ledger_at(LATEST as usize);
        assert!(
            HOT_WRITES
                .iter()
                .all(|sql| builds_a_temporary_btree(&old, sql))
        );
        old.execute_batch(
            "INSERT INTO runs (name, source, status, instance_id, pid, host, created_at)
             VALUES ('old', '', 'running', 0, 1, 'h', 1);
             INSERT INTO steps (run_id, name, status, started_at) VALUES (1, 's', 'failed', 1);",
        )
        .unwrap();
        assert_eq!(rewrite_checks(&mut old).unwrap(), 3);
        assert_eq!(rewrite_checks(&mut old).unwrap(), 0, "done once");
        assert_eq!(user_version(&old), LATEST);
        for sql in HOT_WRITES {
            assert!(!builds_a_temporary_btree(&old, sql), "{sql}");
        }
        let check: String = old
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let rows: i64 = old
            .query_row(
                "SELECT count(*) FROM runs JOIN steps ON steps.run_id = runs.id",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 1);
        for (sql, bad) in [
            (HOT_WRITES[0], "done"),
            (HOT_WRITES[2], "queued"),
            (HOT_WRITES[4], "slot"),
        ] {
            let n = old.prepare(sql).unwrap().parameter_count();
            let mut values: Vec<rusqlite::types::Value> = (0..n as i64).map(Into::into).collect();
            values[2] = bad.to_owned().into();
            if sql.contains("locks") {
                values[1] = bad.to_owned().into();
                values[0] = "held".to_owned().into();
            }
            let e = old
                .execute(sql, rusqlite::params_from_iter(values))
                .unwrap_err();
            assert!(
                e.to_string().contains("CHECK constraint failed"),
                "{sql}: {e}"
            );
        }
    }

    /// A table whose definition someone changed keeps it; the others are
    /// rewritten.
    #[test]
    fn a_table_runledger_did_not_define_so_keeps_its_checks() {
        let mut old = ledger_at(LATEST as usize);
        old.execute_batch(
            "PRAGMA writable_schema = ON;
             UPDATE sqlite_schema SET sql = replace(sql, '''slots''', '''slots'',''other''')
             WHERE name = 'locks';
             PRAGMA writable_schema = OFF;",
        )
        .unwrap();
        let locks = |c: &Connection| -> String {
            c.query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'locks'",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        let before = locks(&old);
        assert!(before.contains("'other'"));
        assert_eq!(rewrite_checks(&mut old).unwrap(), 2);
        assert_eq!(locks(&old), before);
    }

    #[test]
    fn a_foreign_database_is_recognised() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE users (id INTEGER)")
            .unwrap();
        assert!(matches!(inspect(&conn).unwrap(), Found::Foreign(_)));
    }
}
