//! SQL for instances: registering, heartbeating, closing, and reaping the
//! dead ones.

use rusqlite::{Connection, OptionalExtension, params};

use super::Store;
use super::locks::{Reads, parse_keys};
use super::runs::apply_change;
use crate::clock::Timestamp;
use crate::error::Result;
use crate::liveness::InstanceRecord;
use crate::run::RunId;
use crate::store::shared::{self, OwnedLock, ReapRows, RunChanged};
use crate::store::{InstanceReaped, NewInstance, ORPHANED_OWNERS, Reap, lease_of, state_of};

/// The columns [`instance_record`] reads, as a `SELECT … FROM instances`.
macro_rules! instance_select {
    () => {
        "SELECT id, host, boot_id, pid, pid_ns, start_time, lock_file, heartbeat_at,
                closed_at IS NOT NULL, closed_reason, stale_after
         FROM instances"
    };
}

const INSTANCE_SELECT: &str = instance_select!();

fn instance_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceRecord> {
    Ok(InstanceRecord {
        id: row.get(0)?,
        host: row.get(1)?,
        boot_id: row.get(2)?,
        pid: row.get(3)?,
        pid_ns: row.get(4)?,
        start_time: row.get::<_, Option<i64>>(5)?.map(|t| t as u64),
        lock_file: row.get(6)?,
        heartbeat_at: row.get(7)?,
        closed: row.get(8)?,
        closed_reason: row.get(9)?,
        lease: lease_of(row.get(10)?),
    })
}

/// The statement that lists the open instances (the `instances_open`
/// index serves it), but for instance 0 (the owner of runs awaiting
/// adoption, which no process is).
pub(super) const OPEN_INSTANCES: &str =
    concat!(instance_select!(), " WHERE closed_at IS NULL AND id <> 0");

/// The active runs of one instance, from the active-runs index (its WHERE
/// clause repeats the index's condition verbatim).
pub(super) const INSTANCE_RUNS: &str = "
    SELECT id, name FROM runs
    WHERE status IN ('queued','running') AND instance_id = ?1";

/// Whether an instance is open, read inside the caller's write
/// transaction: rows are only ever written for an open instance, so a
/// reaped one never gains new work.
pub(super) fn is_open(tx: &Connection, instance: i64) -> Result<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM instances WHERE id = ?1 AND closed_at IS NULL")?
        .query_row([instance], |_| Ok(()))
        .optional()?
        .is_some())
}

impl Store {
    /// Records a new instance (this process's open ledger); returns its id.
    pub(crate) fn insert_instance(&self, new: &NewInstance<'_>) -> Result<i64> {
        let identity = new.identity;
        self.write(|tx, now| {
            tx.prepare_cached(
                "INSERT INTO instances (host, boot_id, pid, pid_ns, start_time, label, started_at,
                                        heartbeat_at, lock_file, stale_after)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9)",
            )?
            .execute(params![
                &identity.host,
                &identity.boot_id,
                identity.pid,
                &identity.pid_ns,
                identity.start_time.map(|t| t as i64),
                new.label,
                now,
                new.lock_file,
                i64::try_from(new.lease.as_millis()).unwrap_or(i64::MAX),
            ])?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Renews an instance's heartbeat lease: one write, however many runs
    /// and locks it owns. False if the instance is closed (a reaper judged
    /// it dead).
    pub(crate) fn heartbeat_instance(&self, id: i64) -> Result<bool> {
        self.write(|tx, now| {
            Ok(tx
                .prepare_cached(
                    "UPDATE instances SET heartbeat_at = ?2 WHERE id = ?1 AND closed_at IS NULL",
                )?
                .execute(params![id, now])?
                == 1)
        })
    }

    /// Every instance not closed yet.
    pub(crate) fn open_instances(&self) -> Result<Vec<InstanceRecord>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(OPEN_INSTANCES)?
                .query_map([], instance_record)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// The instances of [`ORPHANED_OWNERS`].
    pub(crate) fn orphaned_owner_ids(&self) -> Result<Vec<i64>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(ORPHANED_OWNERS)?
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// One instance, if it exists.
    pub(crate) fn instance(&self, id: i64) -> Result<Option<InstanceRecord>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(&format!("{INSTANCE_SELECT} WHERE id = ?1"))?
                .query_row([id], instance_record)
                .optional()?)
        })
    }

    /// Deletes the instances that closed before `cutoff`, in bounded
    /// transactions. Runs keep their owner's pid and host in their own row.
    pub(crate) fn prune_instances(&self, cutoff: Timestamp) -> Result<()> {
        const BATCH: i64 = 1000;
        loop {
            let deleted = self.write(|tx, _| {
                Ok(tx
                    .prepare_cached(
                        "DELETE FROM instances WHERE id IN (
                             SELECT id FROM instances WHERE closed_at < ?1 LIMIT ?2)",
                    )?
                    .execute((cutoff, BATCH))?)
            })?;
            if (deleted as i64) < BATCH {
                return Ok(());
            }
        }
    }

    /// Closes an instance judged dead, in one transaction: its lock requests
    /// go (held ones are recorded as reclaimed, so that their guards report
    /// `LockLost`), its active runs fail with `run_reason` (their running
    /// steps too), the keys it held pass to their waiters, and the instance
    /// is closed with `reason`.
    ///
    /// When only the heartbeat lease judged it (`stale_heartbeat`), nothing
    /// is written if the instance heartbeated since or is closed already: a
    /// verdict is only acted on in the state it was made in. A run that
    /// ended meanwhile stays ended: only active runs are failed.
    pub(crate) fn reap_instance(&self, reap: &Reap<'_>) -> Result<InstanceReaped> {
        self.write(|tx, now| shared::reap(&mut Reads(tx), now, reap))
    }
}

impl ReapRows for Reads<'_> {
    fn instance_beat(&mut self, id: i64) -> Result<Option<(Timestamp, bool)>> {
        Ok(self
            .0
            .prepare_cached(
                "SELECT heartbeat_at, closed_at IS NOT NULL FROM instances WHERE id = ?1",
            )?
            .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?)
    }

    fn instance_locks(&mut self, id: i64) -> Result<Vec<OwnedLock>> {
        // The locks table holds only live requests, never history.
        Ok(self
            .0
            .prepare_cached(
                "SELECT id, token, state, run_id, pid, host, keys FROM locks WHERE instance_id = ?1",
            )?
            .query_map([id], |row| {
                Ok(OwnedLock {
                    id: row.get(0)?,
                    token: row.get(1)?,
                    state: state_of(&row.get::<_, String>(2)?),
                    run: row.get(3)?,
                    pid: row.get(4)?,
                    host: row.get(5)?,
                    keys: parse_keys(&row.get::<_, String>(6)?)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn instance_runs(&mut self, id: i64) -> Result<Vec<(RunId, String)>> {
        Ok(self
            .0
            .prepare_cached(INSTANCE_RUNS)?
            .query_map([id], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn fail_active(&mut self, run: RunId, now: Timestamp, reason: &str) -> RunChanged {
        apply_change(self.0, run, now, |state| {
            crate::store::fail_if_active(state, reason)
        })
    }

    fn close_instance(&mut self, id: i64, now: Timestamp, reason: &str) -> Result<bool> {
        let tx = self.0;
        tx.prepare_cached("DELETE FROM watchers WHERE instance_id = ?1")?
            .execute([id])?;
        let closed = tx
            .prepare_cached(
                "UPDATE instances SET closed_at = ?2, closed_reason = ?3
                 WHERE id = ?1 AND closed_at IS NULL",
            )?
            .execute(params![id, now, reason])?;
        Ok(closed == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::runs::HUNG_RUNS;

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let params = stmt.parameter_count();
        stmt.query_map(
            rusqlite::params_from_iter(std::iter::repeat_n(1, params)),
            |r| r.get::<_, String>(3),
        )
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
        .join("; ")
    }

    /// Every query a reap pass makes is an index lookup: the pass costs the
    /// same over a million finished runs as over none.
    #[test]
    fn reaper_queries_use_indexes_not_the_history() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn, 0).unwrap();
        for (sql, index) in [
            (OPEN_INSTANCES, "USING INDEX instances_open"),
            (ORPHANED_OWNERS, "USING INDEX runs_active"),
            (HUNG_RUNS, "SEARCH runs USING INDEX runs_hung"),
            (INSTANCE_RUNS, "USING INDEX runs_active"),
            (
                super::super::runs::UNADOPTED_RUNS,
                "SEARCH runs USING COVERING INDEX runs_unadopted",
            ),
        ] {
            let plan = plan(&conn, sql);
            assert!(plan.contains(index), "{sql}: {plan}");
            // A full scan reads "SCAN runs" with no index named after it.
            assert!(plan.split("; ").all(|step| step != "SCAN runs"), "{plan}");
        }
    }

    /// A process of the previous release (schema 3) that still runs after
    /// this one migrated the file reaps with its own queries: instance 0
    /// must look like a live instance to them, or they would fail every run
    /// awaiting adoption as a closed instance's.
    #[test]
    fn runs_awaiting_adoption_are_safe_from_the_previous_releases_reaper() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn, 0).unwrap();
        conn.execute(
            "INSERT INTO runs (name, source, status, instance_id, pid, host, created_at, adopt_by)
             VALUES ('handed', 'dashboard', 'queued', 0, 42, 'h', 1, 300001)",
            [],
        )
        .unwrap();
        // Schema 3's query for the leftovers of closed instances, verbatim.
        const V3_ORPHANED_OWNERS: &str = "
            SELECT DISTINCT r.instance_id FROM runs r
            WHERE r.status IN ('queued','running')
              AND NOT EXISTS (SELECT 1 FROM instances i
                              WHERE i.id = r.instance_id AND i.closed_at IS NULL)";
        let ids = |sql: &str| -> Vec<i64> {
            conn.prepare(sql)
                .unwrap()
                .query_map([], |row| row.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let orphans = ids(V3_ORPHANED_OWNERS);
        assert!(orphans.is_empty(), "{orphans:?}");
        // Its judge of open instances (the same as this one's) finds
        // instance 0 alive, whatever the time: no boot, a heartbeat ahead.
        let nobody = conn
            .query_row(
                &format!("{INSTANCE_SELECT} WHERE id = 0"),
                [],
                instance_record,
            )
            .unwrap();
        let judge = crate::liveness::Judge {
            me: crate::liveness::ProcessIdentity::current(),
            instances_dir: std::env::temp_dir(),
            stale_after: std::time::Duration::from_secs(60),
        };
        for now in [
            Timestamp::from_millis(0),
            Timestamp::from_millis(4_102_444_800_000),
        ] {
            assert!(
                matches!(judge.judge(&nobody, now), crate::liveness::Verdict::Alive),
                "{nobody:?}"
            );
        }
        // This release never judges it.
        let open = ids(OPEN_INSTANCES);
        assert!(open.is_empty(), "{open:?}");
    }
}
