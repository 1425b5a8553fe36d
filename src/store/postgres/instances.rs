//! SQL for instances: registering, heartbeating, closing, and reaping the
//! dead ones (PostgreSQL).
//!
//! The same statements as the SQLite store's `instances.rs`, but for lock
//! files: an instance on PostgreSQL never has one (`lock_file` stays NULL),
//! as its peers may live on other hosts.

use postgres::Row;

use super::locks::{
    delete_lock, grant_waiters, parse_keys, pid_of, record_taken, text_i64, token_of,
};
use super::runs::apply_change;
use super::{Claim, First, Lit, Store, Tx};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::liveness::{InstanceId, InstanceRecord, ProcessIdentity};
use crate::lock::LockState;
use crate::reaper::Reaped;
use crate::run::{RunId, RunStatus};
use crate::store::{InstanceReaped, Owner, TakenLock, lease_of, state_of, unknown_instance};

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

/// Instances that are closed (or gone) but still own active runs or lock
/// rows: left behind by a failed cleanup. The active runs are read from the
/// active-runs index, the locks table holds only live requests.
const ORPHANED_OWNERS: &str = "
    SELECT DISTINCT r.instance_id FROM runs r
    WHERE r.status IN ('queued','running') AND r.adopt_by IS NULL
      AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = r.instance_id AND i.closed_at IS NULL)
    UNION
    SELECT DISTINCT l.instance_id FROM locks l
    WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = l.instance_id AND i.closed_at IS NULL)";

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
    pub(crate) fn insert_instance(
        &self,
        identity: &ProcessIdentity,
        label: Option<&str>,
        lock_file: Option<&str>,
        lease: std::time::Duration,
    ) -> Result<i64> {
        let _ = lock_file;
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

    /// Instances closed or gone that still own active runs or lock rows,
    /// as records to reap (a missing instance gets a placeholder).
    pub(crate) fn orphaned_owners(&self) -> Result<Vec<InstanceRecord>> {
        let ids: Vec<i64> = self.read(|tx| {
            tx.query(ORPHANED_OWNERS, &[])?
                .iter()
                .map(|row| Ok(row.try_get(0)?))
                .collect()
        })?;
        let mut owners = Vec::with_capacity(ids.len());
        for id in ids {
            owners.push(self.instance(id)?.unwrap_or_else(|| unknown_instance(id)));
        }
        Ok(owners)
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
    pub(crate) fn reap_instance(
        &self,
        instance: Owner<'_>,
        reason: &str,
        run_reason: &str,
        stale_heartbeat: Option<Timestamp>,
        by: &ProcessIdentity,
    ) -> Result<InstanceReaped> {
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
            let current: Option<(Timestamp, bool)> = match tx.query_opt(
                "SELECT heartbeat_at, closed_at IS NOT NULL FROM instances WHERE id = $1",
                &[&instance.id],
            )? {
                Some(row) => Some((Timestamp::from_millis(row.try_get(0)?), row.try_get(1)?)),
                None => None,
            };
            if let Some(judged) = stale_heartbeat
                && current != Some((judged, false))
            {
                return Ok(InstanceReaped::default());
            }
            let mut out = InstanceReaped::default();
            let freed = delete_instance_locks(tx, now, instance, run_reason, by, &mut out)?;
            fail_instance_runs(tx, now, instance.id, run_reason, &mut out)?;
            out.wakes.extend(grant_waiters(tx, &freed, now)?);
            tx.execute(
                "DELETE FROM watchers WHERE instance_id = $1",
                &[&instance.id],
            )?;
            let at = now.as_millis();
            let closed = tx.execute(
                "UPDATE instances SET closed_at = $2, closed_reason = $3
                 WHERE id = $1 AND closed_at IS NULL",
                &[&instance.id, &at, &reason],
            )?;
            if closed == 1 {
                out.reaped.push(Reaped::Instance {
                    id: InstanceId::from(instance.id),
                    pid: instance.pid,
                    host: instance.host.to_owned(),
                    reason: reason.to_owned(),
                });
            }
            // Every waiter this frees, whether granted here or by a run's
            // end, is notified with the commit (a repeat is notified once).
            tx.wake(&out.wakes);
            Ok(out)
        })
    }
}

/// Deletes every lock request of an instance; returns the keys it held.
fn delete_instance_locks(
    tx: &mut Tx<'_>,
    now: Timestamp,
    instance: Owner<'_>,
    reason: &str,
    by: &ProcessIdentity,
    out: &mut InstanceReaped,
) -> Result<Vec<String>> {
    // The locks table holds only live requests, never history.
    let found = tx.query(
        "SELECT id, token, state, run_id, pid, host, keys FROM locks WHERE instance_id = $1",
        &[&instance.id],
    )?;
    let mut rows = Vec::with_capacity(found.len());
    for row in &found {
        rows.push((
            row.try_get::<_, i64>(0)?,
            row.try_get::<_, Option<i64>>(1)?,
            state_of(row.try_get(2)?),
            row.try_get::<_, Option<i64>>(3)?.map(RunId::from),
            pid_of(row.try_get(4)?)?,
            row.try_get::<_, String>(5)?,
            parse_keys(row.try_get(6)?)?,
        ));
    }
    let mut freed = Vec::new();
    for (id, token, state, run, pid, host, keys) in rows {
        let reclaimed = crate::store::Ending::Reclaimed(reason, by);
        if delete_lock(tx, id, token, now, reclaimed)?.is_none() {
            continue;
        }
        if state == LockState::Held {
            let taken = TakenLock {
                id,
                token,
                run,
                pid,
                host: &host,
            };
            record_taken(tx, now, "reclaimed", &keys, &taken, reason, by)?;
        }
        // A waiter gone may unblock the ones queued behind it, too.
        freed.extend(keys.iter().cloned());
        out.reaped.push(Reaped::Lock {
            keys,
            state,
            token: token.map(token_of).transpose()?,
            reason: reason.to_owned(),
        });
    }
    freed.sort();
    freed.dedup();
    Ok(freed)
}

/// Fails every active run of an instance, each as its own compare-and-set.
fn fail_instance_runs(
    tx: &mut Tx<'_>,
    now: Timestamp,
    instance: i64,
    reason: &str,
    out: &mut InstanceReaped,
) -> Result<()> {
    let found = tx.query(INSTANCE_RUNS, &[&instance])?;
    let mut runs = Vec::with_capacity(found.len());
    for row in &found {
        runs.push((
            RunId::from(row.try_get::<_, i64>(0)?),
            row.try_get::<_, String>(1)?,
        ));
    }
    for (id, name) in runs {
        let (state, to, wakes) = apply_change(tx, id, now, None, |state| {
            crate::store::fail_if_active(state, reason)
        })?;
        out.wakes.extend(wakes);
        if to == RunStatus::Failed && state.status.is_active() {
            out.reaped.push(Reaped::Run {
                id,
                name,
                from: state.status,
                reason: reason.to_owned(),
            });
        }
    }
    Ok(())
}
