//! SQL for instances: registering, heartbeating, closing, and reaping the
//! dead ones (PostgreSQL).
//!
//! The same statements as the SQLite store's `instances.rs`, but for lock
//! files: an instance on PostgreSQL never has one (`lock_file` stays NULL),
//! as its peers may live on other hosts.

use postgres::Row;

use super::locks::{parse_keys, pid_of, text_i64};
use super::runs::apply_change;
use super::{Claim, First, Lit, Store, Tx};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::liveness::InstanceRecord;
use crate::run::RunId;
use crate::store::shared::{self, OwnedLock, ReapRows, RunChanged};
use crate::store::{InstanceReaped, NewInstance, ORPHANED_OWNERS, Reap, lease_of, state_of};

/// The columns [`instance_record`] reads, as a `SELECT … FROM instances`.
macro_rules! instance_select {
    () => {
        "SELECT id, host, boot_id, pid, pid_ns, start_time, heartbeat_at,
                closed_at IS NOT NULL, closed_reason, stale_after
         FROM instances"
    };
}

fn instance_record(row: &Row) -> Result<InstanceRecord> {
    Ok(InstanceRecord {
        id: row.try_get(0)?,
        host: row.try_get(1)?,
        boot_id: row.try_get(2)?,
        pid: pid_of(row.try_get(3)?)?,
        pid_ns: row.try_get(4)?,
        // Stored bit for bit as the signed column holds it.
        start_time: row.try_get::<_, Option<i64>>(5)?.map(i64::cast_unsigned),
        lock_file: None,
        heartbeat_at: Timestamp::from_millis(row.try_get(6)?),
        closed: row.try_get(7)?,
        closed_reason: row.try_get(8)?,
        lease: lease_of(row.try_get(9)?),
    })
}

/// The statement that lists the open instances (the `instances_open`
/// index serves it), but for instance 0 (the owner of runs awaiting
/// adoption, which no process is).
const OPEN_INSTANCES: &str = concat!(instance_select!(), " WHERE closed_at IS NULL AND id <> 0");

/// One instance by id.
const INSTANCE: &str = concat!(instance_select!(), " WHERE id = $1");

/// The active runs of one instance, from the active-runs index (its WHERE
/// clause repeats the index's condition verbatim).
const INSTANCE_RUNS: &str = "
    SELECT id, name FROM runs
    WHERE status IN ('queued','running') AND instance_id = $1";

/// Whether an instance is open, read inside the caller's write
/// transaction: rows are only ever written for an open instance, so a
/// reaped one never gains new work.
pub(super) fn is_open(tx: &mut Tx<'_>, instance: i64) -> Result<bool> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM instances WHERE id = $1 AND closed_at IS NULL",
            &[&instance],
        )?
        .is_some())
}

impl Store {
    /// Records a new instance (this process's open ledger); returns its id.
    ///
    /// `lock_file` is not recorded: instance lock files live beside a
    /// SQLite file, and the caller gives none for PostgreSQL.
    pub(crate) fn insert_instance(&self, new: &NewInstance<'_>) -> Result<i64> {
        let NewInstance {
            identity,
            label,
            lock_file: _,
            lease,
        } = *new;
        let pid = i64::from(identity.pid);
        let start_time = identity.start_time.map(u64::cast_signed);
        let lease = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self.write(&[], |tx| {
            let now = tx.now().as_millis();
            Ok(tx
                .query_one(
                    "INSERT INTO instances (host, boot_id, pid, pid_ns, start_time, label,
                                            started_at, heartbeat_at, stale_after)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)
                     RETURNING id",
                    &[
                        &identity.host,
                        &identity.boot_id,
                        &pid,
                        &identity.pid_ns,
                        &start_time,
                        &label,
                        &now,
                        &lease,
                    ],
                )?
                .try_get(0)?)
        })
    }

    /// Renews an instance's heartbeat lease: one write, however many runs
    /// and locks it owns. False if the instance is closed (a reaper judged
    /// it dead).
    ///
    /// Then measures the offset to the server's clock again, so that this
    /// process's timestamps follow the server's time heartbeat by heartbeat
    /// (see [`ServerClock`](super::ServerClock)).
    pub(crate) fn heartbeat_instance(&self, id: i64) -> Result<bool> {
        // A lock left by a grant whose reply was lost is released even in a
        // process that makes no lock call more.
        self.settle_unknown_grants();
        // Shared: a reaper judging the lease takes the instance's claim
        // exclusively, and acts only on the heartbeat it judged.
        // The server's clock is read in the same batch, and followed (see
        // `ServerClock`) by its round trip.
        let first = First::call("runledger_instance_heartbeat", &[Lit::Int(id), Lit::Now])?;
        self.write_first(&[Claim::instance(id, true)], first, |tx| {
            let rows = tx.first_rows().unwrap_or_default();
            let row = rows.first().ok_or_else(|| {
                crate::store::bad_data("an instance heartbeat answered no row".to_owned())
            })?;
            let waited = row.get(2).and_then(|ms| ms.parse().ok()).unwrap_or(0.0);
            tx.follow_server_clock(self.server_clock.as_deref(), text_i64(row.get(1))?, waited);
            Ok(row.get(0) == Some("t"))
        })
    }

    /// Every instance not closed yet.
    pub(crate) fn open_instances(&self) -> Result<Vec<InstanceRecord>> {
        self.read(|tx| {
            tx.query(OPEN_INSTANCES, &[])?
                .iter()
                .map(instance_record)
                .collect()
        })
    }

    /// The instances of [`ORPHANED_OWNERS`].
    pub(crate) fn orphaned_owner_ids(&self) -> Result<Vec<i64>> {
        self.read(|tx| {
            tx.query(ORPHANED_OWNERS, &[])?
                .iter()
                .map(|row| Ok(row.try_get(0)?))
                .collect()
        })
    }

    /// One instance, if it exists.
    pub(crate) fn instance(&self, id: i64) -> Result<Option<InstanceRecord>> {
        self.read(|tx| {
            tx.query_opt(INSTANCE, &[&id])?
                .map(|row| instance_record(&row))
                .transpose()
        })
    }

    /// Deletes the instances that closed before `cutoff`, in bounded
    /// transactions. Runs keep their owner's pid and host in their own row.
    pub(crate) fn prune_instances(&self, cutoff: Timestamp) -> Result<()> {
        const BATCH: i64 = 1000;
        let cutoff = cutoff.as_millis();
        loop {
            // Closed instances, which no writer changes any more.
            let deleted = self.write(&[], |tx| {
                tx.execute(
                    "DELETE FROM instances WHERE id IN (
                         SELECT id FROM instances WHERE closed_at < $1 LIMIT $2)",
                    &[&cutoff, &BATCH],
                )
            })?;
            if i64::try_from(deleted).unwrap_or(i64::MAX) < BATCH {
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
        let instance = reap.instance;
        self.write_later(&[Claim::instance(instance.id, false)], |tx| {
            let now = tx.now();
            // Its active runs, then the keys of its requests and theirs, in
            // claim order. No run or request of it can be added meanwhile:
            // those writes claim the instance (shared).
            let runs: Vec<Claim> = tx
                .query(INSTANCE_RUNS, &[&instance.id])?
                .iter()
                .map(|row| Ok(Claim::run(RunId::from(row.try_get::<_, i64>(0)?), false)))
                .collect::<Result<_>>()?;
            tx.claim(&runs, true)?;
            let mut keys = Vec::new();
            for row in tx.query(
                "SELECT keys FROM locks WHERE instance_id = $1
                 OR run_id IN (SELECT id FROM runs WHERE instance_id = $1
                               AND status IN ('queued','running'))",
                &[&instance.id],
            )? {
                keys.extend(parse_keys(row.try_get(0)?)?);
            }
            super::locks::claim_keys(tx, &keys)?;
            let out = shared::reap(tx, now, reap)?;
            // Every waiter this frees, whether granted here or by a run's
            // end, is notified with the commit (a repeat is notified once).
            tx.wake(&out.wakes);
            Ok(out)
        })
    }
}

impl ReapRows for Tx<'_> {
    fn instance_beat(&mut self, id: i64) -> Result<Option<(Timestamp, bool)>> {
        match self.query_opt(
            "SELECT heartbeat_at, closed_at IS NOT NULL FROM instances WHERE id = $1",
            &[&id],
        )? {
            Some(row) => Ok(Some((
                Timestamp::from_millis(row.try_get(0)?),
                row.try_get(1)?,
            ))),
            None => Ok(None),
        }
    }

    fn instance_locks(&mut self, id: i64) -> Result<Vec<OwnedLock>> {
        // The locks table holds only live requests, never history.
        let found = self.query(
            "SELECT id, token, state, run_id, pid, host, keys FROM locks WHERE instance_id = $1",
            &[&id],
        )?;
        let mut locks = Vec::with_capacity(found.len());
        for row in &found {
            locks.push(OwnedLock {
                id: row.try_get(0)?,
                token: row.try_get(1)?,
                state: state_of(row.try_get(2)?),
                run: row.try_get::<_, Option<i64>>(3)?.map(RunId::from),
                pid: pid_of(row.try_get(4)?)?,
                host: row.try_get(5)?,
                keys: parse_keys(row.try_get(6)?)?,
            });
        }
        Ok(locks)
    }

    fn instance_runs(&mut self, id: i64) -> Result<Vec<(RunId, String)>> {
        let found = self.query(INSTANCE_RUNS, &[&id])?;
        let mut runs = Vec::with_capacity(found.len());
        for row in &found {
            runs.push((RunId::from(row.try_get::<_, i64>(0)?), row.try_get(1)?));
        }
        Ok(runs)
    }

    fn fail_active(&mut self, run: RunId, now: Timestamp, reason: &str) -> RunChanged {
        apply_change(self, run, now, None, |state| {
            crate::store::fail_if_active(state, reason)
        })
    }

    fn close_instance(&mut self, id: i64, now: Timestamp, reason: &str) -> Result<bool> {
        self.execute("DELETE FROM watchers WHERE instance_id = $1", &[&id])?;
        let closed = self.execute(
            "UPDATE instances SET closed_at = $2, closed_reason = $3
             WHERE id = $1 AND closed_at IS NULL",
            &[&id, &now.as_millis(), &reason],
        )?;
        Ok(closed == 1)
    }
}
