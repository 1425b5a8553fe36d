//! SQL for runs, steps and events.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, ToSql, params};

use super::Store;
use super::locks::release_run_locks;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::liveness::InstanceId;
use crate::record::{EventId, EventKind, EventRecord, RunFilter, RunRecord, StepRecord};
use crate::run::{RunChange, RunId, RunState, RunStatus, STEP_LEFT_RUNNING, StepStatus};
use crate::store::shared::{self, AdoptRow, AdoptRows, Pruned};
use crate::store::{Adopter, Adoption, HungRun, NewRun, StepEnd, Wakes};

/// A [`NewRun`] that owns its strings, for a write another thread may run.
struct OwnedRun {
    name: String,
    source: String,
    status: RunStatus,
    parent: Option<RunId>,
    idempotency_key: Option<String>,
    idempotency_window: Option<i64>,
    instance: i64,
    pid: u32,
    host: String,
    metadata: Option<String>,
    log_path: Option<String>,
    heartbeat_timeout: Option<i64>,
    adopt_within: Option<i64>,
}

impl From<&NewRun<'_>> for OwnedRun {
    fn from(new: &NewRun<'_>) -> OwnedRun {
        OwnedRun {
            name: new.name.to_owned(),
            source: new.source.to_owned(),
            status: new.status,
            parent: new.parent,
            idempotency_key: new.idempotency_key.map(str::to_owned),
            idempotency_window: new.idempotency_window,
            instance: new.instance,
            pid: new.pid,
            host: new.host.to_owned(),
            metadata: new.metadata.clone(),
            log_path: new.log_path.clone(),
            heartbeat_timeout: new.heartbeat_timeout,
            adopt_within: new.adopt_within,
        }
    }
}

impl OwnedRun {
    /// The run to insert; moves the serialized metadata and log path out.
    fn borrowed(&mut self) -> NewRun<'_> {
        NewRun {
            name: &self.name,
            source: &self.source,
            status: self.status,
            parent: self.parent,
            idempotency_key: self.idempotency_key.as_deref(),
            idempotency_window: self.idempotency_window,
            instance: self.instance,
            pid: self.pid,
            host: &self.host,
            metadata: self.metadata.take(),
            log_path: self.log_path.take(),
            heartbeat_timeout: self.heartbeat_timeout,
            adopt_within: self.adopt_within,
        }
    }
}

impl ToSql for RunId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(i64::from(*self)))
    }
}

impl FromSql for RunId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<RunId> {
        i64::column_result(value).map(RunId::from)
    }
}

impl ToSql for RunStatus {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for RunStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<RunStatus> {
        value
            .as_str()?
            .parse()
            .map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

impl ToSql for StepStatus {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for StepStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<StepStatus> {
        let text = value.as_str()?;
        StepStatus::parse(text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown step status {text:?}").into()))
    }
}

impl ToSql for Timestamp {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_millis()))
    }
}

impl FromSql for Timestamp {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Timestamp> {
        i64::column_result(value).map(Timestamp::from_millis)
    }
}

const ACTIVE: &str = "('queued','running')";

/// The owner instance of a run awaiting adoption: the row of id 0 that the
/// schema inserts, which no process is (row ids are handed out from 1).
pub(super) const NOBODY: i64 = 0;

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

/// Appends events to one run's chain (see the schema): each new event points
/// at the previous one, and the caller stores the last id on the run row in
/// the same transaction.
///
/// The PostgreSQL store has a `Chain` of the same three fields and the same
/// `append`: what they share is that shape, not a decision. Each appends
/// with its own statement (here `last_insert_rowid`, there `RETURNING`)
/// inside its own transaction type, and most of the events of a run on
/// PostgreSQL are written by the server's functions instead.
struct Chain {
    run: RunId,
    last: Option<i64>,
    at: Timestamp,
}

impl Chain {
    fn append(
        &mut self,
        tx: &Connection,
        kind: &str,
        step: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
        message: Option<&str>,
    ) -> Result<()> {
        tx.prepare_cached(
            "INSERT INTO events (run_id, prev_id, at, kind, step, from_status, to_status, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute((self.run, self.last, self.at, kind, step, from, to, message))?;
        self.last = Some(tx.last_insert_rowid());
        super::EVENTS_WRITTEN.with(|w| w.set(true));
        Ok(())
    }
}

/// The ids of a run's events, newest first, by walking its chain.
const EVENT_CHAIN: &str = "
    WITH RECURSIVE chain(id) AS (
        SELECT last_event_id FROM runs WHERE id = ?1 AND last_event_id IS NOT NULL
        UNION ALL
        SELECT e.prev_id FROM events e JOIN chain c ON e.id = c.id WHERE e.prev_id IS NOT NULL
    )";

/// The status and event-chain head of a run, read in a write transaction.
pub(super) fn run_head(tx: &Connection, run: RunId) -> Result<(RunStatus, Option<i64>)> {
    tx.prepare_cached("SELECT status, last_event_id FROM runs WHERE id = ?1")?
        .query_row([run], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .ok_or_else(|| Error::run_not_found(run))
}

impl Store {
    /// Inserts a run and its first event. Refuses a second active run with
    /// the same idempotency key (the unique partial index decides, so two
    /// racing processes cannot both insert).
    ///
    /// `None` if the owning instance is closed (a reaper judged it dead):
    /// nothing is written, and the caller registers again.
    pub(crate) fn insert_run(&self, new: &NewRun<'_>) -> Result<Option<RunId>> {
        let mut owned = OwnedRun::from(new);
        self.write_shared(move |tx, at| {
            let new = &owned.borrowed();
            if !super::instances::is_open(tx, new.instance)? {
                return Ok(None);
            }
            if let Some(parent) = new.parent {
                ensure_run_exists(tx, parent).map_err(|e| match e {
                    Error::NotFound { id, .. } => Error::NotFound {
                        what: "parent run",
                        id,
                    },
                    other => other,
                })?;
            }
            if let (Some(key), Some(window)) = (new.idempotency_key, new.idempotency_window) {
                // Any run of the key created within the window, whatever
                // its status; in this transaction, so racing writers of
                // the key take turns.
                let existing: Option<RunId> = tx
                    .prepare_cached(
                        "SELECT id FROM runs
                         WHERE idempotency_key = ?1 AND created_at > ?2
                         ORDER BY created_at DESC, id DESC LIMIT 1",
                    )?
                    .query_row(params![key, at.as_millis().saturating_sub(window)], |row| {
                        row.get(0)
                    })
                    .optional()?;
                if let Some(existing) = existing {
                    return Err(Error::Duplicate {
                        key: key.to_owned(),
                        existing,
                    });
                }
            }
            let started_at = (new.status == RunStatus::Running).then_some(at);
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO runs (name, source, status, parent_id, idempotency_key,
                         instance_id, pid, host, metadata, log_path, created_at, started_at,
                         heartbeat_timeout, hung_at, adopt_by)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
                             CASE WHEN ?13 > 9223372036854775807 - max(?12, 0)
                                  THEN 9223372036854775807 ELSE ?12 + ?13 END,
                             CASE WHEN ?14 > 9223372036854775807 - max(?11, 0)
                                  THEN 9223372036854775807 ELSE ?11 + ?14 END)",
                )?
                .execute((
                    new.name,
                    new.source,
                    new.status,
                    new.parent,
                    new.idempotency_key,
                    // A run awaiting its adopter belongs to no instance.
                    if new.adopt_within.is_some() {
                        NOBODY
                    } else {
                        new.instance
                    },
                    new.pid,
                    new.host,
                    &new.metadata,
                    &new.log_path,
                    at,
                    started_at,
                    new.heartbeat_timeout,
                    new.adopt_within,
                ));
            match (inserted, new.idempotency_key) {
                (Err(e), Some(key)) if is_unique_violation(&e) => {
                    let existing = tx
                        .prepare_cached(&format!(
                            "SELECT id FROM runs WHERE idempotency_key = ?1 AND status IN {ACTIVE}"
                        ))?
                        .query_row([key], |row| row.get(0))?;
                    return Err(Error::Duplicate {
                        key: key.to_owned(),
                        existing,
                    });
                }
                (inserted, _) => inserted?,
            };
            let id = RunId::from(tx.last_insert_rowid());
            let mut chain = Chain {
                run: id,
                last: None,
                at,
            };
            chain.append(tx, "status", None, None, Some(new.status.as_str()), None)?;
            tx.prepare_cached("UPDATE runs SET last_event_id = ?2 WHERE id = ?1")?
                .execute((id, chain.last))?;
            Ok(Some(id))
        })
    }

    /// Applies one transition to a run: reads its state in an immediate
    /// transaction, asks `decide` what to change, and writes that change as a
    /// compare-and-set on the status it was decided from, with its event.
    ///
    /// Returns the state that was decided from and the status after.
    pub(crate) fn update_run(
        &self,
        run: RunId,
        decide: impl Fn(&RunState) -> Result<Option<RunChange>> + Send + Sync + 'static,
    ) -> Result<(RunState, RunStatus, Wakes)> {
        self.write_shared(move |tx, at| apply_change(tx, run, at, decide))
    }

    /// Hands a run awaiting adoption to `adopter`, in one compare-and-set,
    /// and starts it if `start`.
    ///
    /// A run past its adoption deadline is failed here, as the reaper would
    /// have, and reported as [`Adoption::Expired`].
    pub(crate) fn adopt_run(
        &self,
        run: RunId,
        adopter: &Adopter<'_>,
        start: bool,
    ) -> Result<Adoption> {
        self.write(|tx, at| shared::adopt(&mut Adopting { tx, at }, run, adopter, start, at))
    }

    /// Records the log path of an active run.
    pub(crate) fn set_log_path(&self, run: RunId, path: &str) -> Result<()> {
        self.write(|tx, _| {
            let (status, _) = run_head(tx, run)?;
            if status.is_terminal() {
                return Err(Error::RunFinished { run, status });
            }
            tx.prepare_cached("UPDATE runs SET log_path = ?2 WHERE id = ?1")?
                .execute((run, path))?;
            Ok(())
        })
    }

    /// Runs whose adoption deadline passed before `now` without an adopter,
    /// oldest deadline first, at most `limit` (read from the
    /// `runs_unadopted` index).
    pub(crate) fn unadopted_runs(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(RunId, Timestamp)>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(UNADOPTED_RUNS)?
                .query_map(params![now, limit as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Fails a run nobody adopted, only if it still awaits adoption with the
    /// deadline that was judged. Returns its name, the status it was in and
    /// the reason, if it failed it.
    pub(crate) fn fail_unadopted(
        &self,
        run: RunId,
        deadline: Timestamp,
    ) -> Result<Option<(String, RunStatus, String)>> {
        self.write(|tx, at| {
            let current: Option<(Option<Timestamp>, String, RunStatus)> = tx
                .prepare_cached("SELECT adopt_by, name, status FROM runs WHERE id = ?1")?
                .query_row([run], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .optional()?;
            match current {
                Some((Some(by), name, from)) if by == deadline && from.is_active() => {
                    let (_, reason) = fail_unadopted_in(tx, run, deadline, at)?;
                    Ok(Some((name, from, reason)))
                }
                _ => Ok(None),
            }
        })
    }

    /// Appends a custom event to an active run's history.
    pub(crate) fn insert_event(&self, run: RunId, name: &str, data: Option<&str>) -> Result<i64> {
        let (name, data) = (name.to_owned(), data.map(str::to_owned));
        self.write_shared(move |tx, at| {
            let (status, last) = run_head(tx, run)?;
            if status.is_terminal() {
                return Err(Error::RunFinished { run, status });
            }
            let mut chain = Chain { run, last, at };
            chain.append(tx, "custom", Some(&name), None, None, data.as_deref())?;
            tx.prepare_cached("UPDATE runs SET last_event_id = ?2 WHERE id = ?1")?
                .execute((run, chain.last))?;
            Ok(chain.last.unwrap_or_default())
        })
    }

    /// Up to `limit` events of every run after event `after`, in commit
    /// order: a range of the events table's primary key.
    pub(crate) fn events_since(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(EVENTS_SINCE)?
                .query_map(
                    params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                    event_record,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Registers a watcher of the feed: commits that append events wake
    /// `address`. Returns the watcher's id.
    pub(crate) fn add_watcher(&self, instance: i64, address: &str) -> Result<i64> {
        self.write(|tx, _| {
            tx.prepare_cached("INSERT INTO watchers (instance_id, address) VALUES (?1, ?2)")?
                .execute((instance, address))?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Removes a watcher registered by [`add_watcher`](Store::add_watcher).
    pub(crate) fn remove_watcher(&self, id: i64) -> Result<()> {
        self.write(|tx, _| {
            tx.prepare_cached("DELETE FROM watchers WHERE id = ?1")?
                .execute([id])?;
            Ok(())
        })
    }

    /// The id of the newest event, 0 when there is none.
    pub(crate) fn last_event_id(&self) -> Result<i64> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT coalesce(max(id), 0) FROM events")?
                .query_row([], |row| row.get(0))?)
        })
    }

    /// Records a progress heartbeat of a run: a running run's deadline moves
    /// on by its timeout. Returns the run's status; only a running run is
    /// changed.
    pub(crate) fn run_heartbeat(&self, run: RunId) -> Result<RunStatus> {
        self.write_shared(move |tx, at| {
            let (status, _) = run_head(tx, run)?;
            if status == RunStatus::Running {
                tx.prepare_cached(
                    "UPDATE runs SET heartbeat_at = ?2,
                         hung_at = CASE WHEN heartbeat_timeout > 9223372036854775807 - max(?2, 0)
                                        THEN 9223372036854775807
                                        ELSE ?2 + heartbeat_timeout END
                     WHERE id = ?1 AND status = 'running'",
                )?
                .execute((run, at))?;
            }
            Ok(status)
        })
    }

    /// Running runs whose heartbeat deadline passed before `now`, oldest
    /// deadline first, at most `limit` (read from the `runs_hung` index).
    pub(crate) fn hung_runs(&self, now: Timestamp, limit: usize) -> Result<Vec<HungRun>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(HUNG_RUNS)?
                .query_map(params![now, limit as i64], |row| {
                    Ok(HungRun {
                        id: row.get(0)?,
                        hung_at: row.get(1)?,
                        timeout: Duration::from_millis(row.get::<_, i64>(2)?.max(0) as u64),
                        last_heartbeat: row.get(3)?,
                        started_at: row.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Fails a run judged hung, only if it is still running with the
    /// deadline that was judged (it may have heartbeated or ended since).
    /// Returns its name, and the waiters its locks go to.
    pub(crate) fn fail_hung(
        &self,
        hung: &HungRun,
        reason: &str,
    ) -> Result<Option<(String, Wakes)>> {
        self.write(|tx, at| {
            let current: Option<(Option<Timestamp>, String)> = tx
                .prepare_cached("SELECT hung_at, name FROM runs WHERE id = ?1")?
                .query_row([hung.id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            let Some((Some(deadline), name)) = current else {
                return Ok(None);
            };
            if deadline != hung.hung_at {
                return Ok(None);
            }
            let (_, to, wakes) = apply_change(tx, hung.id, at, |state| {
                crate::store::fail_if_running(state, reason)
            })?;
            Ok((to == RunStatus::Failed).then_some((name, wakes)))
        })
    }

    /// Whether a cancel was requested for the run.
    pub(crate) fn cancel_requested(&self, run: RunId) -> Result<bool> {
        self.read(|conn| {
            conn.prepare_cached("SELECT cancel_requested_at IS NOT NULL FROM runs WHERE id = ?1")?
                .query_row([run], |row| row.get(0))
                .optional()?
                .ok_or_else(|| Error::run_not_found(run))
        })
    }

    /// Starts a step of an active run; returns the step's row id.
    pub(crate) fn insert_step(&self, run: RunId, name: &str) -> Result<i64> {
        let name = name.to_owned();
        self.write_shared(move |tx, at| {
            let name = name.as_str();
            let (status, last) = run_head(tx, run)?;
            if status.is_terminal() {
                return Err(Error::RunFinished { run, status });
            }
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO steps (run_id, name, status, started_at)
                     VALUES (?1, ?2, 'running', ?3)",
                )?
                .execute((run, name, at));
            match inserted {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Error::invalid(
                        "step name",
                        name,
                        format!("run {run} already has a step of that name"),
                    ));
                }
                inserted => inserted?,
            };
            let step = tx.last_insert_rowid();
            let mut chain = Chain { run, last, at };
            chain.append(tx, "step", Some(name), None, Some("running"), None)?;
            tx.prepare_cached(
                "UPDATE runs SET steps_total = steps_total + 1, last_event_id = ?2 WHERE id = ?1",
            )?
            .execute((run, chain.last))?;
            Ok(step)
        })
    }

    /// Ends a running step as `to`.
    pub(crate) fn finish_step(&self, run: RunId, end: &StepEnd<'_>) -> Result<()> {
        let (step, to) = (end.step, end.to);
        let (name, error) = (end.name.to_owned(), end.error.map(str::to_owned));
        self.write_shared(move |tx, at| {
            let (name, error) = (name.as_str(), error.as_deref());
            let (status, last) = run_head(tx, run)?;
            let changed = tx
                .prepare_cached(
                    "UPDATE steps SET status = ?2, error = ?3, finished_at = ?4
                     WHERE id = ?1 AND status = 'running'",
                )?
                .execute((step, to, error, at))?;
            if changed == 0 {
                // Ending a run closes its running steps: the run has ended.
                return Err(Error::RunFinished { run, status });
            }
            let mut chain = Chain { run, last, at };
            chain.append(
                tx,
                "step",
                Some(name),
                Some("running"),
                Some(to.as_str()),
                error,
            )?;
            let (ok, bad) = if to == StepStatus::Succeeded {
                (1, 0)
            } else {
                (0, 1)
            };
            tx.prepare_cached(
                "UPDATE runs SET steps_succeeded = steps_succeeded + ?2,
                     steps_failed = steps_failed + ?3, last_event_id = ?4
                 WHERE id = ?1",
            )?
            .execute((run, ok, bad, chain.last))?;
            Ok(())
        })
    }

    /// One run with its progress.
    pub(crate) fn run(&self, run: RunId) -> Result<RunRecord> {
        self.read(|conn| {
            conn.prepare_cached(&format!("{RUN_SELECT} WHERE r.id = ?1"))?
                .query_row([run], run_record)
                .optional()?
                .ok_or_else(|| Error::run_not_found(run))
        })
    }

    /// Runs matching `filter`, newest first.
    ///
    /// Active runs are read from the `runs_active` index; other filters are
    /// applied while walking the history newest first, which stops as soon
    /// as `limit` runs matched.
    pub(crate) fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        let (sql, params) = runs_query(filter);
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), run_record)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Runs by status, and how many a reaper failed: one pass over the
    /// runs.
    pub(crate) fn run_counts(&self) -> Result<(Vec<(RunStatus, u64)>, u64)> {
        self.read(|conn| {
            let mut reaped = 0u64;
            let counts = conn
                .prepare_cached(&format!(
                    "SELECT status, count(*), coalesce(sum({}), 0) FROM runs GROUP BY status",
                    crate::store::REAPED_RUN
                ))?
                .query_map([], |row| {
                    Ok((
                        row.get::<_, RunStatus>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })?
                .map(|row| {
                    row.map(|(status, n, r)| {
                        reaped += u64::try_from(r).unwrap_or(0);
                        (status, u64::try_from(n).unwrap_or(0))
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((counts, reaped))
        })
    }

    /// The steps of a run, in the order they started.
    pub(crate) fn steps(&self, run: RunId) -> Result<Vec<StepRecord>> {
        self.read(|conn| {
            let steps = conn
                .prepare_cached(
                    "SELECT name, status, error, started_at, finished_at
                     FROM steps WHERE run_id = ?1 ORDER BY id",
                )?
                .query_map([run], |row| {
                    Ok(StepRecord {
                        run,
                        name: row.get(0)?,
                        status: row.get(1)?,
                        error: row.get(2)?,
                        started_at: row.get(3)?,
                        finished_at: row.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            shared::of_a_run(steps, || ensure_run_exists(conn, run))
        })
    }

    /// The history of a run, in commit order.
    pub(crate) fn events(&self, run: RunId) -> Result<Vec<EventRecord>> {
        self.read(|conn| {
            let events = conn
                .prepare_cached(&format!(
                    "{EVENT_CHAIN}
                     SELECT id, run_id, at, kind, step, from_status, to_status, message
                     FROM events WHERE id IN chain ORDER BY id"
                ))?
                .query_map([run], event_record)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            shared::of_a_run(events, || ensure_run_exists(conn, run))
        })
    }

    /// One transaction of retention: walks runs oldest first from after
    /// `after`, looking at up to `batch` of them, and deletes those that ended
    /// before `cutoff` (with their steps and events).
    ///
    /// Returns how many were deleted and where the next batch starts, or
    /// `None` when the walk reached runs created at or after the cutoff (or
    /// the end): a run cannot have ended before it was created, so nothing
    /// past that point qualifies, and a pass never walks the recent history.
    ///
    /// The newest run and the run of the newest event are kept, so that
    /// SQLite never hands out their ids again.
    pub(crate) fn prune_batch(&self, cutoff: Timestamp, after: i64, batch: usize) -> Pruned {
        self.write(|tx, _| {
            let keep: Vec<i64> = tx
                .prepare_cached(
                    "SELECT max(id) FROM runs
                     UNION ALL SELECT run_id FROM events WHERE id = (SELECT max(id) FROM events)",
                )?
                .query_map([], |row| row.get::<_, Option<i64>>(0))?
                .filter_map(|id| id.transpose())
                .collect::<rusqlite::Result<_>>()?;
            let candidates = tx
                .prepare_cached(
                    "SELECT id, created_at, status, finished_at FROM runs
                     WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?
                .query_map((after, i64::try_from(batch).unwrap_or(i64::MAX)), |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Timestamp>(1)?,
                        row.get::<_, RunStatus>(2)?,
                        row.get::<_, Option<Timestamp>>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut delete_events = tx.prepare_cached(&format!(
                "{EVENT_CHAIN} DELETE FROM events WHERE id IN chain"
            ))?;
            let mut delete_run = tx.prepare_cached("DELETE FROM runs WHERE id = ?1")?;
            shared::prune_walk(&candidates, &keep, (cutoff, after, batch), |id| {
                delete_events.execute([id])?;
                delete_run.execute([id])?;
                Ok(())
            })
        })
    }
}

/// An adoption's statements (see [`shared::adopt`]), at the time `at`.
struct Adopting<'c> {
    tx: &'c Connection,
    at: Timestamp,
}

impl AdoptRows for Adopting<'_> {
    fn instance_open(&mut self, instance: i64) -> Result<bool> {
        super::instances::is_open(self.tx, instance)
    }

    fn adopt_row(&mut self, run: RunId) -> Result<Option<AdoptRow>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT status, adopt_by, pid, host, last_event_id FROM runs WHERE id = ?1",
            )?
            .query_row([run], |row| {
                Ok(AdoptRow {
                    status: row.get(0)?,
                    adopt_by: row.get(1)?,
                    pid: row.get(2)?,
                    host: row.get(3)?,
                    last: row.get(4)?,
                })
            })
            .optional()?)
    }

    fn expire(&mut self, run: RunId, deadline: Timestamp) -> Result<RunStatus> {
        Ok(fail_unadopted_in(self.tx, run, deadline, self.at)?.0)
    }

    fn hand_over(&mut self, run: RunId, last: Option<i64>, adopter: &Adopter<'_>) -> Result<bool> {
        let (tx, at) = (self.tx, self.at);
        let mut chain = Chain { run, last, at };
        let who = crate::store::adopter_json(adopter);
        chain.append(tx, "adopted", Some(&who), None, None, None)?;
        let changed = tx
            .prepare_cached(
                "UPDATE runs SET instance_id = ?2, pid = ?3, host = ?4, adopt_by = NULL,
                     last_event_id = ?5
                 WHERE id = ?1 AND adopt_by IS NOT NULL AND status = 'queued'",
            )?
            .execute((run, adopter.instance, adopter.pid, adopter.host, chain.last))?;
        Ok(changed == 1)
    }

    fn start(&mut self, run: RunId) -> Result<()> {
        apply_change(self.tx, run, self.at, crate::store::start_if_queued).map(drop)
    }
}

/// The SQL and parameters that list the runs matching `filter`.
pub(super) fn runs_query(filter: &RunFilter) -> (String, Vec<Box<dyn ToSql>>) {
    let mut sql = format!("{RUN_SELECT} WHERE 1");
    let mut params: Vec<Box<dyn ToSql>> = Vec::new();
    let mut param = |sql: &mut String, clause: &str, value: Box<dyn ToSql>| {
        params.push(value);
        sql.push_str(&clause.replace('?', &format!("?{}", params.len())));
    };
    // Active runs are few, and read from their own index: a name or source
    // filter then must not pick its index (`+`), which would walk every
    // past run of that name.
    let active_only = !filter.statuses.is_empty() && filter.statuses.iter().all(|s| s.is_active());
    let unindexed = if active_only { "+" } else { "" };
    if !filter.statuses.is_empty() {
        if active_only {
            // The partial index's own condition, verbatim, so that SQLite
            // uses the index.
            sql.push_str(&format!(" AND r.status IN {ACTIVE}"));
        } else if filter.statuses.iter().all(|s| s.is_terminal()) {
            // `runs_by_status`'s condition, verbatim, for the same reason.
            sql.push_str(&format!(" AND r.status NOT IN {ACTIVE}"));
        }
        let list = filter
            .statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",");
        sql.push_str(&format!(" AND r.status IN ({list})"));
    }
    if let Some(name) = &filter.name {
        let clause = format!(" AND {unindexed}r.name = ?");
        param(&mut sql, &clause, Box::new(name.clone()));
    }
    if let Some(source) = &filter.source {
        let clause = format!(" AND {unindexed}r.source = ?");
        param(&mut sql, &clause, Box::new(source.clone()));
    }
    if let Some(since) = filter.since {
        param(&mut sql, " AND r.created_at >= ?", Box::new(since));
    }
    if let Some(until) = filter.until {
        param(&mut sql, " AND r.created_at < ?", Box::new(until));
    }
    if let Some(before) = filter.before {
        param(&mut sql, " AND r.id < ?", Box::new(before));
    }
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    param(&mut sql, " ORDER BY r.id DESC LIMIT ?", Box::new(limit));
    (sql, params)
}

fn ensure_run_exists(conn: &Connection, run: RunId) -> Result<()> {
    conn.prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?
        .query_row([run], |_| Ok(()))
        .optional()?
        .ok_or_else(|| Error::run_not_found(run))
}

/// Appends one event to a run's history inside the caller's transaction.
///
/// One per store, as [`Chain`] is: the PostgreSQL store's reads the same
/// but runs its own statements on its own transaction type.
pub(super) fn append_event(
    tx: &Connection,
    run: RunId,
    at: Timestamp,
    kind: &str,
    detail: Option<&str>,
    message: Option<&str>,
) -> Result<()> {
    let (_, last) = run_head(tx, run)?;
    let mut chain = Chain { run, last, at };
    chain.append(tx, kind, detail, None, None, message)?;
    tx.prepare_cached("UPDATE runs SET last_event_id = ?2 WHERE id = ?1")?
        .execute((run, chain.last))?;
    Ok(())
}

/// Fails every step of the chain's run still running (its run is ending);
/// returns how many, each with its own event.
fn close_running_steps(tx: &Connection, chain: &mut Chain) -> Result<u32> {
    let running = tx
        .prepare_cached("SELECT id, name FROM steps WHERE run_id = ?1 AND status = 'running'")?
        .query_map([chain.run], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut close = tx.prepare_cached(
        "UPDATE steps SET status = 'failed', error = ?2, finished_at = ?3
         WHERE id = ?1 AND status = 'running'",
    )?;
    for (id, name) in &running {
        close.execute((id, STEP_LEFT_RUNNING, chain.at))?;
        chain.append(
            tx,
            "step",
            Some(name),
            Some("running"),
            Some("failed"),
            Some(STEP_LEFT_RUNNING),
        )?;
    }
    Ok(running.len() as u32)
}

/// Applies one transition to a run inside the caller's write transaction:
/// see [`Store::update_run`].
pub(super) fn apply_change(
    tx: &Connection,
    run: RunId,
    at: Timestamp,
    decide: impl Fn(&RunState) -> Result<Option<RunChange>>,
) -> Result<(RunState, RunStatus, Wakes)> {
    let (state, last_event) = tx
        .prepare_cached(
            "SELECT status, steps_total, steps_succeeded, steps_failed,
                    cancel_requested_at IS NOT NULL, last_event_id
             FROM runs WHERE id = ?1",
        )?
        .query_row([run], |row| {
            let total: u32 = row.get(1)?;
            let succeeded: u32 = row.get(2)?;
            let failed: u32 = row.get(3)?;
            let state = RunState {
                status: row.get(0)?,
                steps_succeeded: succeeded,
                steps_failed: failed,
                steps_running: total.saturating_sub(succeeded.saturating_add(failed)),
                cancel_requested: row.get(4)?,
            };
            Ok((state, row.get::<_, Option<i64>>(5)?))
        })
        .optional()?
        .ok_or_else(|| Error::run_not_found(run))?;
    let Some(change) = decide(&state)? else {
        return Ok((state, state.status, Vec::new()));
    };
    let mut chain = Chain {
        run,
        last: last_event,
        at,
    };
    let (to, changed) = match change {
        RunChange::Status {
            to,
            exit_code,
            error,
            via_running,
        } => {
            let from = if via_running {
                chain.append(
                    tx,
                    "status",
                    None,
                    Some(state.status.as_str()),
                    Some(RunStatus::Running.as_str()),
                    None,
                )?;
                RunStatus::Running
            } else {
                state.status
            };
            let closed = if to.is_terminal() && state.steps_running > 0 {
                close_running_steps(tx, &mut chain)?
            } else {
                0
            };
            chain.append(
                tx,
                "status",
                None,
                Some(from.as_str()),
                Some(to.as_str()),
                error.as_deref(),
            )?;
            let changed = tx
                .prepare_cached(
                    "UPDATE runs SET status = ?3, exit_code = ?4, error = ?5,
                         started_at = coalesce(started_at, ?6), finished_at = ?7,
                         steps_failed = steps_failed + ?8, last_event_id = ?9,
                         hung_at = CASE WHEN ?3 <> 'running' THEN NULL
                                        WHEN heartbeat_timeout > 9223372036854775807 - max(?10, 0)
                                        THEN 9223372036854775807
                                        ELSE ?10 + heartbeat_timeout END,
                         adopt_by = CASE WHEN ?7 IS NULL THEN adopt_by END
                     WHERE id = ?1 AND status = ?2",
                )?
                .execute((
                    run,
                    state.status,
                    to,
                    exit_code,
                    &error,
                    (to == RunStatus::Running || via_running).then_some(at),
                    to.is_terminal().then_some(at),
                    closed,
                    chain.last,
                    at,
                ))?;
            (to, changed)
        }
        RunChange::CancelRequest { by } => {
            chain.append(tx, "cancel_requested", None, None, None, by.as_deref())?;
            let changed = tx
                .prepare_cached(
                    "UPDATE runs SET cancel_requested_at = ?3, last_event_id = ?4
                     WHERE id = ?1 AND status = ?2 AND cancel_requested_at IS NULL",
                )?
                .execute((run, state.status, at, chain.last))?;
            (state.status, changed)
        }
    };
    if changed != 1 {
        // Cannot happen while the write lock is held; refuse rather
        // than record an event for a change that was not made.
        return Err(Error::InvalidTransition {
            run,
            from: state.status,
            to,
        });
    }
    // A run's locks and queue places end with it, in this transaction.
    let wakes = if to.is_terminal() {
        release_run_locks(tx, run, at)?
    } else {
        Vec::new()
    };
    Ok((state, to, wakes))
}

pub(super) const HUNG_RUNS: &str = "
    SELECT id, hung_at, heartbeat_timeout, heartbeat_at, started_at FROM runs
    WHERE hung_at IS NOT NULL AND hung_at < ?1
    ORDER BY hung_at LIMIT ?2";

pub(super) const UNADOPTED_RUNS: &str = "
    SELECT id, adopt_by FROM runs
    WHERE adopt_by IS NOT NULL AND adopt_by <= ?1
    ORDER BY adopt_by LIMIT ?2";

pub(super) const EVENTS_SINCE: &str = "
    SELECT id, run_id, at, kind, step, from_status, to_status, message
    FROM events WHERE id > ?1 ORDER BY id LIMIT ?2";

/// Fails a run awaiting adoption whose deadline passed, in the caller's
/// transaction; returns the status it ended in and the reason.
fn fail_unadopted_in(
    tx: &Connection,
    run: RunId,
    deadline: Timestamp,
    at: Timestamp,
) -> Result<(RunStatus, String)> {
    let (created, pid, host): (Timestamp, u32, String) = tx
        .prepare_cached("SELECT created_at, pid, host FROM runs WHERE id = ?1")?
        .query_row([run], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let reason = crate::store::unadopted_reason(created, deadline, pid, &host);
    let (_, to, _) = apply_change(tx, run, at, |state| {
        crate::store::fail_if_active(state, &reason)
    })?;
    Ok((to, reason))
}

const RUN_SELECT: &str = "
    SELECT r.id, r.name, r.source, r.status, r.parent_id, r.idempotency_key, r.instance_id,
           r.pid, r.host, r.exit_code, r.error, r.metadata, r.log_path, r.created_at,
           r.started_at, r.heartbeat_at, r.finished_at, r.cancel_requested_at,
           r.steps_total, r.steps_succeeded, r.steps_failed,
           CASE WHEN r.steps_total > r.steps_succeeded + r.steps_failed THEN
               (SELECT s.name FROM steps s
                WHERE s.run_id = r.id AND s.status = 'running' ORDER BY s.id DESC LIMIT 1)
           END,
           r.adopt_by
    FROM runs r";

fn run_record(row: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let metadata = match row.get_ref(11)?.as_str_or_null()? {
        None => serde_json::Value::Null,
        Some(text) => serde_json::from_str(text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(11, rusqlite::types::Type::Text, Box::new(e))
        })?,
    };
    let total: u32 = row.get(18)?;
    let succeeded: u32 = row.get(19)?;
    let failed: u32 = row.get(20)?;
    Ok(RunRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        source: row.get(2)?,
        status: row.get(3)?,
        parent: row.get(4)?,
        idempotency_key: row.get(5)?,
        instance: InstanceId::from(row.get::<_, i64>(6)?),
        pid: row.get(7)?,
        host: row.get(8)?,
        exit_code: row.get(9)?,
        error: row.get(10)?,
        metadata,
        log_path: row.get::<_, Option<String>>(12)?.map(Into::into),
        created_at: row.get(13)?,
        started_at: row.get(14)?,
        heartbeat_at: row.get(15)?,
        finished_at: row.get(16)?,
        cancel_requested_at: row.get(17)?,
        adopt_by: row.get(22)?,
        progress: shared::progress([total, succeeded, failed], row.get(21)?),
    })
}

/// A JSON text column (`null` when NULL).
fn json_column(row: &Row<'_>, index: usize) -> rusqlite::Result<serde_json::Value> {
    match row.get_ref(index)?.as_str_or_null()? {
        None => Ok(serde_json::Value::Null),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                index,
                rusqlite::types::Type::Text,
                Box::new(e),
            )
        }),
    }
}

pub(super) fn event_record(row: &Row<'_>) -> rusqlite::Result<EventRecord> {
    let kind: String = row.get(3)?;
    let run = crate::store::event_run(row.get(1)?);
    if let Some(lock) = crate::store::lock_event_kind(&kind, row.get_ref(4)?.as_str_or_null()?) {
        return Ok(EventRecord {
            id: EventId::from(row.get::<_, i64>(0)?),
            run,
            at: row.get(2)?,
            kind: lock.map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, e.into())
            })?,
            message: row.get(7)?,
        });
    }
    let kind = match kind.as_str() {
        "status" => EventKind::Status {
            from: row.get(5)?,
            to: row.get(6)?,
        },
        "step" => EventKind::Step {
            step: row.get(4)?,
            from: row.get(5)?,
            to: row.get(6)?,
        },
        "cancel_requested" => EventKind::CancelRequested,
        "lock_forced" => EventKind::LockForced {
            keys: super::locks::parse_keys(&row.get::<_, String>(4)?)?,
        },
        "adopted" => crate::store::adopted_event(&json_column(row, 4)?),
        "custom" => {
            return Ok(EventRecord {
                id: EventId::from(row.get::<_, i64>(0)?),
                run,
                at: row.get(2)?,
                kind: EventKind::Custom {
                    name: row.get(4)?,
                    data: json_column(row, 7)?,
                },
                message: None,
            });
        }
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                format!("unknown event kind {other:?}").into(),
            ));
        }
    };
    Ok(EventRecord {
        id: EventId::from(row.get::<_, i64>(0)?),
        run,
        at: row.get(2)?,
        kind,
        message: row.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(conn: &Connection, sql: &str, params: &[Box<dyn ToSql>]) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
        .join("; ")
    }

    /// Listing active runs and reading one run use an index, never a scan of
    /// the history.
    #[test]
    fn the_active_list_and_one_run_read_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn, 0).unwrap();
        for filter in [
            RunFilter::default().active(),
            RunFilter::default().status(RunStatus::Running),
            RunFilter::default().status(RunStatus::Queued).name("x"),
        ] {
            let (sql, params) = runs_query(&filter);
            let plan = plan(&conn, &sql, &params);
            assert!(
                plan.contains("USING INDEX runs_active"),
                "{filter:?}: {plan}"
            );
        }
        let plan = plan(
            &conn,
            &format!("{RUN_SELECT} WHERE r.id = ?1"),
            &[Box::new(1)],
        );
        assert!(
            plan.starts_with("SEARCH r USING INTEGER PRIMARY KEY"),
            "{plan}"
        );
        assert!(plan.contains("steps_running"), "{plan}");
    }

    /// The event feed reads a range of the primary key from the cursor: its
    /// cost does not grow with the history.
    #[test]
    fn the_event_feed_reads_a_range_of_the_primary_key() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn, 0).unwrap();
        let plan = plan(&conn, EVENTS_SINCE, &[Box::new(5), Box::new(100)]);
        assert_eq!(plan, "SEARCH events USING INTEGER PRIMARY KEY (rowid>?)");
    }
}
