//! SQL for runs, steps and events (PostgreSQL).
//!
//! A port of the SQLite store's `runs.rs`: the same rows, the same event
//! chains, the same domain calls. Where the two differ, it is because a
//! PostgreSQL error aborts its transaction: a uniqueness the SQLite store
//! learns from a failed insert is checked before the insert here, which the
//! transaction's claims make as safe (no other writer of that run or key
//! can insert in between: see [`super::Claim`]), and the unique indexes
//! stay as the backstop.

use std::time::Duration;

use postgres::{Row, SimpleQueryRow};

use super::locks::release_run_locks;
use super::locks::text_i64;
use super::{Claim, First, Lit, Store, Tx};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::liveness::InstanceId;
use crate::record::{EventId, EventKind, EventRecord, RunFilter, RunRecord, StepRecord};
use crate::run::{RunChange, RunId, RunState, RunStatus, STEP_LEFT_RUNNING, StepStatus};
use crate::store::shared::{self, AdoptRow, AdoptRows, Pruned};
use crate::store::{Adopter, Adoption, HungRun, NewRun, StepEnd, Wakes};

/// The owner instance of a run awaiting adoption: the row of id 0 that the
/// schema inserts, which no process is (identity ids start at 1).
pub(super) const NOBODY: i64 = 0;

use crate::store::bad_data;

fn timestamp(row: &Row, index: usize) -> Result<Timestamp> {
    Ok(Timestamp::from_millis(row.try_get::<_, i64>(index)?))
}

fn opt_timestamp(row: &Row, index: usize) -> Result<Option<Timestamp>> {
    Ok(row
        .try_get::<_, Option<i64>>(index)?
        .map(Timestamp::from_millis))
}

/// A `bigint` column that the domain holds in a narrower integer (pids,
/// step counts): out of range is damage, never truncated.
fn narrow<T: TryFrom<i64>>(row: &Row, index: usize) -> Result<T> {
    let value: i64 = row.try_get(index)?;
    T::try_from(value).map_err(|_| {
        let column = row.columns().get(index).map_or("?", |c| c.name());
        bad_data(format!("{column} {value} is out of range"))
    })
}

fn run_status(row: &Row, index: usize) -> Result<RunStatus> {
    let text: &str = row.try_get(index)?;
    text.parse()
        .map_err(|_| bad_data(format!("unknown run status {text:?}")))
}

pub(super) fn opt_run_status(row: &Row, index: usize) -> Result<Option<RunStatus>> {
    match row.try_get::<_, Option<&str>>(index)? {
        None => Ok(None),
        Some(_) => run_status(row, index).map(Some),
    }
}

fn step_status(row: &Row, index: usize) -> Result<StepStatus> {
    let text: &str = row.try_get(index)?;
    StepStatus::parse(text).ok_or_else(|| bad_data(format!("unknown step status {text:?}")))
}

fn opt_step_status(row: &Row, index: usize) -> Result<Option<StepStatus>> {
    match row.try_get::<_, Option<&str>>(index)? {
        None => Ok(None),
        Some(_) => step_status(row, index).map(Some),
    }
}

/// A JSON text column (`null` when NULL).
fn json_column(row: &Row, index: usize) -> Result<serde_json::Value> {
    match row.try_get::<_, Option<&str>>(index)? {
        None => Ok(serde_json::Value::Null),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| bad_data(format!("column {index} is not JSON: {e}"))),
    }
}

/// Appends events to one run's chain (see the schema): each new event points
/// at the previous one, and the caller stores the last id on the run row in
/// the same transaction.
///
/// Of the same shape as the SQLite store's `Chain`, each with its own
/// statement and transaction type (see there).
struct Chain {
    run: RunId,
    last: Option<i64>,
    at: Timestamp,
}

impl Chain {
    fn append(
        &mut self,
        tx: &mut Tx<'_>,
        kind: &str,
        step: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
        message: Option<&str>,
    ) -> Result<()> {
        let row = tx.query_one(
            "INSERT INTO events (run_id, prev_id, at, kind, step, from_status, to_status, message)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             RETURNING id",
            &[
                &i64::from(self.run),
                &self.last,
                &self.at.as_millis(),
                &kind,
                &step,
                &from,
                &to,
                &message,
            ],
        )?;
        let id = row.try_get(0)?;
        self.last = Some(id);
        tx.event_written(id);
        Ok(())
    }
}

/// The feed's horizon, as an SQL expression: the lowest event id that a
/// transaction not yet ended may still write (see migration 7 and
/// [`Store::events_since`]).
macro_rules! horizon {
    () => {
        "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20)"
    };
}

/// The longest pause between two looks of [`Store::events_since`] for
/// events held back by transactions not yet ended.
const HELD_BACK_PAUSE: Duration = Duration::from_millis(20);

/// The ids of a run's events, newest first, by walking its chain.
macro_rules! event_chain {
    () => {
        "WITH RECURSIVE chain(id) AS (
             SELECT last_event_id FROM runs WHERE id = $1 AND last_event_id IS NOT NULL
             UNION ALL
             SELECT e.prev_id FROM events e JOIN chain c ON e.id = c.id
             WHERE e.prev_id IS NOT NULL
         )"
    };
}

/// The columns [`run_record`] reads.
macro_rules! run_select {
    () => {
        "SELECT r.id, r.name, r.source, r.status, r.parent_id, r.idempotency_key,
                r.instance_id, r.pid, r.host, r.exit_code, r.error, r.metadata, r.log_path,
                r.created_at, r.started_at, r.heartbeat_at, r.finished_at,
                r.cancel_requested_at, r.steps_total, r.steps_succeeded, r.steps_failed,
                CASE WHEN r.steps_total > r.steps_succeeded + r.steps_failed THEN
                    (SELECT s.name FROM steps s
                     WHERE s.run_id = r.id AND s.status = 'running' ORDER BY s.id DESC LIMIT 1)
                END,
                r.adopt_by
         FROM runs r"
    };
}

/// The conditions of [`Store::runs`] after its first: `$1` the statuses,
/// `$2` the name, `$3` the source, `$4` and `$5` the creation range (each
/// NULL when not filtered on), `$6` the id to list below, `$7` the limit.
macro_rules! runs_filter {
    () => {
        " AND ($1::text[] IS NULL OR r.status = ANY($1::text[]))
          AND ($8::text IS NULL OR r.status = $8::text)
          AND ($2::text IS NULL OR r.name = $2::text)
          AND ($3::text IS NULL OR r.source = $3::text)
          AND ($4::bigint IS NULL OR r.created_at >= $4::bigint)
          AND ($5::bigint IS NULL OR r.created_at < $5::bigint)
          AND r.id < $6
          ORDER BY r.id DESC LIMIT $7"
    };
}

/// The status and event-chain head of a run, read in a write transaction.
pub(super) fn run_head(tx: &mut Tx<'_>, run: RunId) -> Result<(RunStatus, Option<i64>)> {
    let row = tx
        .query_opt(
            "SELECT status, last_event_id FROM runs WHERE id = $1",
            &[&i64::from(run)],
        )?
        .ok_or_else(|| Error::run_not_found(run))?;
    Ok((run_status(&row, 0)?, row.try_get(1)?))
}

impl Store {
    /// Inserts a run and its first event. Refuses a second active run with
    /// the same idempotency key: checked under the key's claim before the
    /// insert, so two racing processes cannot both insert (the unique
    /// partial index stays as the backstop).
    ///
    /// `None` if the owning instance is closed (a reaper judged it dead):
    /// nothing is written, and the caller registers again.
    pub(crate) fn insert_run(&self, new: &NewRun<'_>) -> Result<Option<RunId>> {
        let mut claims = vec![Claim::instance(new.instance, true)];
        claims.extend(new.idempotency_key.map(Claim::idempotency));
        claims.extend(new.parent.map(|parent| Claim::run(parent, true)));
        let started_at = (new.status == RunStatus::Running).then_some(Lit::Now);
        // A run awaiting its adopter belongs to no instance.
        let owner = if new.adopt_within.is_some() {
            NOBODY
        } else {
            new.instance
        };
        // The window counts back from the run's time, read as the batch
        // is sent.
        let window = new.idempotency_key.and(new.idempotency_window);
        let first = First::call(
            "runledger_insert_run",
            &[
                Lit::Text(new.name),
                Lit::Text(new.source),
                Lit::Text(new.status.as_str()),
                new.parent.map(i64::from).into(),
                new.idempotency_key.into(),
                Lit::Int(owner),
                Lit::Int(i64::from(new.pid)),
                Lit::Text(new.host),
                new.metadata.as_deref().into(),
                new.log_path.as_deref().into(),
                Lit::Now,
                started_at.unwrap_or(Lit::Null),
                new.heartbeat_timeout.into(),
                new.adopt_within.into(),
                Lit::Int(new.instance),
                window.into(),
            ],
        )?;
        self.write_first(&claims, first, |tx| {
            let rows = tx.first_rows().unwrap_or_default();
            let row = rows
                .first()
                .ok_or_else(|| bad_data("the insert of a run answered no row".to_owned()))?;
            let id = || text_i64(row.get(1)).map(RunId::from);
            match row.get(0) {
                Some("ok") => {
                    tx.events_written();
                    Ok(Some(id()?))
                }
                Some("closed") => Ok(None),
                Some("no parent") => Err(Error::NotFound {
                    what: "parent run",
                    id: new.parent.map(|p| p.to_string()).unwrap_or_default(),
                }),
                Some("duplicate") => Err(Error::Duplicate {
                    key: new.idempotency_key.unwrap_or_default().to_owned(),
                    existing: id()?,
                }),
                other => Err(bad_data(format!("the insert of a run answered {other:?}"))),
            }
        })
    }

    /// Applies one transition to a run: reads its state under the writer
    /// lock, asks `decide` what to change, and writes that change as a
    /// compare-and-set on the status it was decided from, with its event.
    ///
    /// Returns the state that was decided from and the status after.
    pub(crate) fn update_run(
        &self,
        run: RunId,
        decide: impl Fn(&RunState) -> Result<Option<RunChange>> + Send + Sync + 'static,
    ) -> Result<(RunState, RunStatus, Wakes)> {
        // The state to decide from comes with `BEGIN`, the change goes
        // with the commit: two round trips (more for a run that still
        // holds locks, whose keys are claimed on a second try).
        let first = First::call("runledger_run_state", &[Lit::Int(i64::from(run))])?;
        self.write_first(&[Claim::run(run, false)], first, |tx| {
            let at = tx.now();
            let state = tx.first_rows();
            apply_change(tx, run, at, state, &decide)
        })
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
        let claims = [
            Claim::instance(adopter.instance, true),
            Claim::run(run, false),
        ];
        self.write_later(&claims, |tx| {
            let at = tx.now();
            shared::adopt(&mut Adopting { tx, at }, run, adopter, start, at)
        })
    }

    /// Records the log path of an active run.
    pub(crate) fn set_log_path(&self, run: RunId, path: &str) -> Result<()> {
        let first = First::call(
            "runledger_set_log_path",
            &[Lit::Int(i64::from(run)), Lit::Text(path)],
        )?;
        self.write_first(&[Claim::run(run, false)], first, |tx| {
            answered(&tx.first_rows().unwrap_or_default(), run).map(drop)
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
        self.read(|tx| {
            tx.query(
                "SELECT id, adopt_by FROM runs
                 WHERE adopt_by IS NOT NULL AND adopt_by <= $1
                 ORDER BY adopt_by LIMIT $2",
                &[&now.as_millis(), &as_limit(limit)],
            )?
            .iter()
            .map(|row| Ok((RunId::from(row.try_get::<_, i64>(0)?), timestamp(row, 1)?)))
            .collect()
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
        self.write_later(&[Claim::run(run, false)], |tx| {
            let at = tx.now();
            let Some(row) = tx.query_opt(
                "SELECT adopt_by, name, status FROM runs WHERE id = $1",
                &[&i64::from(run)],
            )?
            else {
                return Ok(None);
            };
            let by = opt_timestamp(&row, 0)?;
            let name: String = row.try_get(1)?;
            let from = run_status(&row, 2)?;
            if by == Some(deadline) && from.is_active() {
                let (_, reason) = fail_unadopted_in(tx, run, deadline, at)?;
                Ok(Some((name, from, reason)))
            } else {
                Ok(None)
            }
        })
    }

    /// Appends a custom event to an active run's history.
    pub(crate) fn insert_event(&self, run: RunId, name: &str, data: Option<&str>) -> Result<i64> {
        let first = First::call(
            "runledger_run_event",
            &[
                Lit::Int(i64::from(run)),
                Lit::Text(name),
                data.into(),
                Lit::Now,
            ],
        )?;
        self.write_first(&[Claim::run(run, false)], first, |tx| {
            let rows = tx.first_rows().unwrap_or_default();
            let id = text_i64(answered(&rows, run)?.get(2))?;
            tx.events_written();
            Ok(id)
        })
    }

    /// Up to `limit` events of every run after event `after`, in feed
    /// order: a range of the events table's primary key, below the
    /// horizon.
    ///
    /// Writers commit in parallel, so an event id (see migration 7) is its
    /// transaction's id shifted left, plus its place in the transaction,
    /// and only the events of transactions older than this read's snapshot
    /// `xmin` (the horizon, `horizon!`) are returned: each of those transactions
    /// has ended, and every transaction still to commit has a higher id, so
    /// no event can ever appear below a position once read.
    ///
    /// The cost is a delay, never a skip: an event waits until every
    /// transaction older than its own has ended, in any database of the
    /// server. A writer of this ledger ends its transaction within a few
    /// round trips; a transaction left open elsewhere (an idle session in
    /// a transaction, a long report) holds the feed back until it ends. A
    /// read that finds committed events above the horizon, and fewer than
    /// `limit` below it, waits for the transactions before them to end, as
    /// a call waits for a busy ledger: up to the busy timeout, past which
    /// it returns the events below the horizon. So a caller that has just
    /// committed reads its own events, whatever its neighbours are
    /// writing, and a watcher woken by a commit does not wait for its next
    /// timed read.
    pub(crate) fn events_since(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>> {
        self.read_past_held_back(|tx| {
            let rows = tx.query(
                concat!(
                    "SELECT id, run_id, at, kind, step, from_status, to_status, message,
                                e.id >= h.horizon
                         FROM events e, (SELECT ",
                    horizon!(),
                    " AS horizon) h
                         WHERE e.id > $1 ORDER BY e.id LIMIT $2"
                ),
                &[&after, &as_limit(limit.saturating_add(1))],
            )?;
            let mut events = Vec::with_capacity(rows.len());
            let mut held_back = false;
            for row in &rows {
                if row.try_get::<_, bool>(8)? {
                    held_back = true;
                    break;
                }
                if events.len() < limit {
                    events.push(event_record(row)?);
                }
            }
            let again = held_back && events.len() < limit;
            Ok((events, again))
        })
    }

    /// Runs `read`, which returns what it read and whether committed events
    /// above the horizon held some back, again until none does, or the busy
    /// timeout has passed (see [`events_since`](Store::events_since)).
    fn read_past_held_back<T>(&self, read: impl Fn(&mut Tx<'_>) -> Result<(T, bool)>) -> Result<T> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let (value, held_back) = self.read(&read)?;
            if !held_back || started.elapsed() >= self.busy_timeout() {
                return Ok(value);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(HELD_BACK_PAUSE);
        }
    }

    /// Registers a watcher of the feed: commits that append events wake
    /// `address`. Returns the watcher's id.
    pub(crate) fn add_watcher(&self, instance: i64, address: &str) -> Result<i64> {
        self.write(&[], |tx| {
            let row = tx.query_one(
                "INSERT INTO watchers (instance_id, address) VALUES ($1, $2) RETURNING id",
                &[&instance, &address],
            )?;
            Ok(row.try_get(0)?)
        })
    }

    /// Removes a watcher registered by [`add_watcher`](Store::add_watcher).
    pub(crate) fn remove_watcher(&self, id: i64) -> Result<()> {
        self.write(&[], |tx| {
            tx.execute("DELETE FROM watchers WHERE id = $1", &[&id])?;
            Ok(())
        })
    }

    /// The id of the newest event below the horizon (see
    /// [`events_since`](Store::events_since)), 0 when there is none: the
    /// end of the feed as a reader may see it now. An event above it
    /// (committed, or still to commit) comes after it. Like
    /// [`events_since`](Store::events_since), a read that finds committed
    /// events above the horizon waits, up to the busy timeout, for the
    /// transactions before them to end, so that a caller's own commit is
    /// behind the end it gets.
    pub(crate) fn last_event_id(&self) -> Result<i64> {
        self.read_past_held_back(|tx| {
            let row = tx.query_one(
                concat!(
                    "SELECT (SELECT coalesce(max(id), 0) FROM events WHERE id < h.horizon),
                                EXISTS (SELECT 1 FROM events WHERE id >= h.horizon)
                         FROM (SELECT ",
                    horizon!(),
                    " AS horizon) h"
                ),
                &[],
            )?;
            Ok((row.try_get::<_, i64>(0)?, row.try_get::<_, bool>(1)?))
        })
    }

    /// Records a progress heartbeat of a run: a running run's deadline moves
    /// on by its timeout. Returns the run's status; only a running run is
    /// changed.
    pub(crate) fn run_heartbeat(&self, run: RunId) -> Result<RunStatus> {
        let first = First::call(
            "runledger_run_heartbeat",
            &[Lit::Int(i64::from(run)), Lit::Now],
        )?;
        self.write_first(&[Claim::run(run, false)], first, |tx| {
            let rows = tx.first_rows().unwrap_or_default();
            text_status(answered(&rows, run)?.get(1))
        })
    }

    /// Running runs whose heartbeat deadline passed before `now`, oldest
    /// deadline first, at most `limit` (read from the `runs_hung` index).
    pub(crate) fn hung_runs(&self, now: Timestamp, limit: usize) -> Result<Vec<HungRun>> {
        self.read(|tx| {
            tx.query(
                "SELECT id, hung_at, heartbeat_timeout, heartbeat_at, started_at FROM runs
                 WHERE hung_at IS NOT NULL AND hung_at < $1
                 ORDER BY hung_at LIMIT $2",
                &[&now.as_millis(), &as_limit(limit)],
            )?
            .iter()
            .map(|row| {
                let timeout: i64 = row.try_get(2)?;
                Ok(HungRun {
                    id: RunId::from(row.try_get::<_, i64>(0)?),
                    hung_at: timestamp(row, 1)?,
                    timeout: Duration::from_millis(u64::try_from(timeout).unwrap_or(0)),
                    last_heartbeat: opt_timestamp(row, 3)?,
                    started_at: opt_timestamp(row, 4)?,
                })
            })
            .collect()
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
        self.write_later(&[Claim::run(hung.id, false)], |tx| {
            let at = tx.now();
            let Some(row) = tx.query_opt(
                "SELECT hung_at, name FROM runs WHERE id = $1",
                &[&i64::from(hung.id)],
            )?
            else {
                return Ok(None);
            };
            let Some(deadline) = opt_timestamp(&row, 0)? else {
                return Ok(None);
            };
            let name: String = row.try_get(1)?;
            if deadline != hung.hung_at {
                return Ok(None);
            }
            let (_, to, wakes) = apply_change(tx, hung.id, at, None, |state| {
                crate::store::fail_if_running(state, reason)
            })?;
            Ok((to == RunStatus::Failed).then_some((name, wakes)))
        })
    }

    /// Whether a cancel was requested for the run.
    pub(crate) fn cancel_requested(&self, run: RunId) -> Result<bool> {
        self.read(|tx| {
            let row = tx
                .query_opt(
                    "SELECT cancel_requested_at IS NOT NULL FROM runs WHERE id = $1",
                    &[&i64::from(run)],
                )?
                .ok_or_else(|| Error::run_not_found(run))?;
            Ok(row.try_get(0)?)
        })
    }

    /// Starts a step of an active run; returns the step's row id.
    pub(crate) fn insert_step(&self, run: RunId, name: &str) -> Result<i64> {
        let first = First::call(
            "runledger_step_start",
            &[Lit::Int(i64::from(run)), Lit::Text(name), Lit::Now],
        )?;
        self.write_first(&[Claim::run(run, false)], first, |tx| {
            let rows = tx.first_rows().unwrap_or_default();
            if rows.first().and_then(|row| row.get(0)) == Some("taken") {
                return Err(Error::invalid(
                    "step name",
                    name,
                    format!("run {run} already has a step of that name"),
                ));
            }
            let step = text_i64(answered(&rows, run)?.get(2))?;
            tx.events_written();
            Ok(step)
        })
    }

    /// Ends a running step as `to`.
    pub(crate) fn finish_step(&self, run: RunId, end: &StepEnd<'_>) -> Result<()> {
        let StepEnd {
            step,
            name,
            to,
            error,
        } = *end;
        let first = First::call(
            "runledger_step_end",
            &[
                Lit::Int(i64::from(run)),
                Lit::Int(step),
                Lit::Text(name),
                Lit::Text(to.as_str()),
                error.into(),
                Lit::Now,
            ],
        )?;
        self.write_first(&[Claim::run(run, false)], first, |tx| {
            answered(&tx.first_rows().unwrap_or_default(), run)?;
            tx.events_written();
            Ok(())
        })
    }

    /// One run with its progress.
    pub(crate) fn run(&self, run: RunId) -> Result<RunRecord> {
        self.read(|tx| {
            let row = tx
                .query_opt(
                    concat!(run_select!(), " WHERE r.id = $1"),
                    &[&i64::from(run)],
                )?
                .ok_or_else(|| Error::run_not_found(run))?;
            run_record(&row)
        })
    }

    /// Runs matching `filter`, newest first.
    ///
    /// Active runs are read from the `runs_active` index; other filters are
    /// applied while walking the history newest first, which stops as soon
    /// as `limit` runs matched. Two fixed statements (statements are cached
    /// per connection) in which an absent filter is a NULL parameter; the
    /// walk starts below `before` (or at the top) as an index bound, so a
    /// page deep in the history does not walk the newer runs again.
    /// Runs by status, and how many a reaper failed: one pass over the
    /// runs.
    pub(crate) fn run_counts(&self) -> Result<(Vec<(RunStatus, u64)>, u64)> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT status, count(*), count(*) FILTER (WHERE {}) FROM runs GROUP BY status",
                crate::store::REAPED_RUN
            )
        });
        self.read(|tx| {
            let mut reaped = 0u64;
            let mut counts = Vec::new();
            for row in tx.query(&SQL, &[])? {
                let n: i64 = row.try_get(1)?;
                let r: i64 = row.try_get(2)?;
                reaped += u64::try_from(r).unwrap_or(0);
                counts.push((run_status(&row, 0)?, u64::try_from(n).unwrap_or(0)));
            }
            Ok((counts, reaped))
        })
    }

    pub(crate) fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        // One status is compared with `=`, which `runs_by_status` serves in
        // id order; `= ANY` of an array would have the planner sort every
        // run of the status, so it walks the whole history instead.
        let (statuses, status): (Option<Vec<&str>>, Option<&str>) = match &filter.statuses[..] {
            [] => (None, None),
            [one] => (None, Some(one.as_str())),
            many => (Some(many.iter().map(|s| s.as_str()).collect()), None),
        };
        let before = filter.before.map_or(i64::MAX, i64::from);
        let since = filter.since.map(Timestamp::as_millis);
        let until = filter.until.map(Timestamp::as_millis);
        let limit = as_limit(filter.limit);
        let params: [&(dyn postgres::types::ToSql + Sync); 8] = [
            &statuses,
            &filter.name,
            &filter.source,
            &since,
            &until,
            &before,
            &limit,
            &status,
        ];
        let active_only =
            !filter.statuses.is_empty() && filter.statuses.iter().all(|s| s.is_active());
        self.read(|tx| {
            let rows = if active_only {
                // The partial index's own condition, verbatim, so that the
                // planner can use the index.
                tx.query(
                    concat!(
                        run_select!(),
                        " WHERE r.status IN ('queued','running')",
                        runs_filter!()
                    ),
                    &params,
                )?
            } else {
                tx.query(
                    concat!(run_select!(), " WHERE true", runs_filter!()),
                    &params,
                )?
            };
            rows.iter().map(run_record).collect()
        })
    }

    /// The steps of a run, in the order they started.
    pub(crate) fn steps(&self, run: RunId) -> Result<Vec<StepRecord>> {
        self.read(|tx| {
            let steps = tx
                .query(
                    "SELECT name, status, error, started_at, finished_at
                     FROM steps WHERE run_id = $1 ORDER BY id",
                    &[&i64::from(run)],
                )?
                .iter()
                .map(|row| {
                    Ok(StepRecord {
                        run,
                        name: row.try_get(0)?,
                        status: step_status(row, 1)?,
                        error: row.try_get(2)?,
                        started_at: timestamp(row, 3)?,
                        finished_at: opt_timestamp(row, 4)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            shared::of_a_run(steps, || ensure_run_exists(tx, run))
        })
    }

    /// The history of a run, in commit order.
    pub(crate) fn events(&self, run: RunId) -> Result<Vec<EventRecord>> {
        self.read(|tx| {
            let events = tx
                .query(
                    concat!(
                        event_chain!(),
                        " SELECT id, run_id, at, kind, step, from_status, to_status, message
                          FROM events WHERE id IN (SELECT id FROM chain) ORDER BY id"
                    ),
                    &[&i64::from(run)],
                )?
                .iter()
                .map(event_record)
                .collect::<Result<Vec<_>>>()?;
            shared::of_a_run(events, || ensure_run_exists(tx, run))
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
    /// The newest run and the run of the newest event are kept, as on
    /// SQLite. Sequences never hand out an id twice, so PostgreSQL does not
    /// need it; keeping them makes both stores prune alike.
    pub(crate) fn prune_batch(&self, cutoff: Timestamp, after: i64, batch: usize) -> Pruned {
        // Only runs that have ended, which no writer changes any more, are
        // deleted: no claim.
        self.write(&[], |tx| {
            let keep = tx
                .query(
                    "SELECT max(id) FROM runs
                     UNION ALL SELECT run_id FROM events WHERE id = (SELECT max(id) FROM events)",
                    &[],
                )?
                .iter()
                .map(|row| row.try_get::<_, Option<i64>>(0))
                .filter_map(|id| id.transpose())
                .collect::<std::result::Result<Vec<i64>, _>>()?;
            let candidates = tx
                .query(
                    "SELECT id, created_at, status, finished_at FROM runs
                     WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after, &as_limit(batch)],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get::<_, i64>(0)?,
                        timestamp(row, 1)?,
                        run_status(row, 2)?,
                        opt_timestamp(row, 3)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            shared::prune_walk(&candidates, &keep, (cutoff, after, batch), |id| {
                tx.execute(
                    concat!(
                        event_chain!(),
                        " DELETE FROM events WHERE id IN (SELECT id FROM chain)"
                    ),
                    &[&id],
                )?;
                // Its steps go with it (ON DELETE CASCADE).
                tx.execute("DELETE FROM runs WHERE id = $1", &[&id])?;
                Ok(())
            })
        })
    }
}

/// An adoption's statements (see [`shared::adopt`]), at the time `at`.
struct Adopting<'t, 'c> {
    tx: &'t mut Tx<'c>,
    at: Timestamp,
}

impl AdoptRows for Adopting<'_, '_> {
    fn instance_open(&mut self, instance: i64) -> Result<bool> {
        super::instances::is_open(self.tx, instance)
    }

    fn adopt_row(&mut self, run: RunId) -> Result<Option<AdoptRow>> {
        let Some(row) = self.tx.query_opt(
            "SELECT status, adopt_by, pid, host, last_event_id FROM runs WHERE id = $1",
            &[&i64::from(run)],
        )?
        else {
            return Ok(None);
        };
        Ok(Some(AdoptRow {
            status: run_status(&row, 0)?,
            adopt_by: opt_timestamp(&row, 1)?,
            pid: narrow(&row, 2)?,
            host: row.try_get(3)?,
            last: row.try_get(4)?,
        }))
    }

    fn expire(&mut self, run: RunId, deadline: Timestamp) -> Result<RunStatus> {
        Ok(fail_unadopted_in(self.tx, run, deadline, self.at)?.0)
    }

    fn hand_over(&mut self, run: RunId, last: Option<i64>, adopter: &Adopter<'_>) -> Result<bool> {
        let at = self.at;
        let tx = &mut *self.tx;
        let mut chain = Chain { run, last, at };
        let who = crate::store::adopter_json(adopter);
        chain.append(tx, "adopted", Some(&who), None, None, None)?;
        let changed = tx.execute(
            "UPDATE runs SET instance_id = $2, pid = $3, host = $4, adopt_by = NULL,
                 last_event_id = $5
             WHERE id = $1 AND adopt_by IS NOT NULL AND status = 'queued'",
            &[
                &i64::from(run),
                &adopter.instance,
                &i64::from(adopter.pid),
                &adopter.host,
                &chain.last,
            ],
        )?;
        Ok(changed == 1)
    }

    fn start(&mut self, run: RunId) -> Result<()> {
        apply_change(self.tx, run, self.at, None, crate::store::start_if_queued).map(drop)
    }
}

/// A count of rows as a `LIMIT` parameter.
fn as_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Points a run at the newest event of its chain.
fn set_last_event(tx: &mut Tx<'_>, run: RunId, last: Option<i64>) -> Result<()> {
    tx.execute(
        "UPDATE runs SET last_event_id = $2 WHERE id = $1",
        &[&i64::from(run), &last],
    )?;
    Ok(())
}

fn ensure_run_exists(tx: &mut Tx<'_>, run: RunId) -> Result<()> {
    tx.query_opt("SELECT 1 FROM runs WHERE id = $1", &[&i64::from(run)])?
        .map(drop)
        .ok_or_else(|| Error::run_not_found(run))
}

/// Appends one event to a run's history inside the caller's transaction.
///
/// One per store, as [`Chain`] is (see the SQLite store's).
pub(super) fn append_event(
    tx: &mut Tx<'_>,
    run: RunId,
    at: Timestamp,
    kind: &str,
    detail: Option<&str>,
    message: Option<&str>,
) -> Result<()> {
    let (_, last) = run_head(tx, run)?;
    let mut chain = Chain { run, last, at };
    chain.append(tx, kind, detail, None, None, message)?;
    set_last_event(tx, run, chain.last)
}

/// Applies one transition to a run inside the caller's write transaction:
/// see [`Store::update_run`].
///
/// The waiters that the run's released locks free are noted on `tx` (for
/// the other hosts, with the commit) and returned (for this host's, which
/// the caller wakes).
pub(super) fn apply_change(
    tx: &mut Tx<'_>,
    run: RunId,
    at: Timestamp,
    state: Option<Vec<SimpleQueryRow>>,
    decide: impl Fn(&RunState) -> Result<Option<RunChange>>,
) -> Result<(RunState, RunStatus, Wakes)> {
    // The state: read with `BEGIN` (see `Store::update_run`), or now. A
    // change decided from a state read with `BEGIN` is the transaction's
    // only write, sent with the commit; otherwise it is written now, in
    // its place among the transaction's other writes.
    let only_write = state.is_some();
    let rows = match state {
        Some(rows) => rows,
        None => tx.call("runledger_run_state", &[Lit::Int(i64::from(run))], false)?,
    };
    // A function of one row answers NULLs for a run that does not exist.
    let row = rows
        .first()
        .filter(|row| row.get(0).is_some())
        .ok_or_else(|| Error::run_not_found(run))?;
    let count = |i: usize| -> Result<u32> {
        u32::try_from(text_i64(row.get(i))?)
            .map_err(|_| bad_data(format!("a step count of run {run} is out of range")))
    };
    let total = count(1)?;
    let succeeded = count(2)?;
    let failed = count(3)?;
    let state = RunState {
        status: text_status(row.get(0))?,
        steps_succeeded: succeeded,
        steps_failed: failed,
        steps_running: total.saturating_sub(succeeded.saturating_add(failed)),
        cancel_requested: row.get(4) == Some("t"),
    };
    // The keys of the run's requests, one JSON array per request and line
    // (JSON text holds no raw line break). Under the run's claim no request
    // of the run can be added, so these are all it will have.
    let requests = row.get(6).map(str::to_owned);
    let Some(change) = decide(&state)? else {
        return Ok((state, state.status, Vec::new()));
    };
    let ends_with_locks =
        matches!(&change, RunChange::Status { to, .. } if to.is_terminal()) && requests.is_some();
    if ends_with_locks && let Some(requests) = &requests {
        // Its locks go with it: their keys are claimed before the
        // transaction's id (see `Store::write_later`), on a second try if
        // the id came with `BEGIN`.
        let mut keys = Vec::new();
        for line in requests.lines() {
            keys.extend(super::locks::parse_keys(line)?);
        }
        super::locks::claim_keys(tx, &keys)?;
    }
    let run_id = Lit::Int(i64::from(run));
    let (function, values, to) = match &change {
        RunChange::Status {
            to,
            exit_code,
            error,
            via_running,
        } => (
            "runledger_set_status",
            vec![
                run_id,
                Lit::Text(state.status.as_str()),
                Lit::Text(to.as_str()),
                exit_code.map(i64::from).into(),
                error.as_deref().into(),
                Lit::Bool(*via_running),
                Lit::Int(at.as_millis()),
                Lit::Text(STEP_LEFT_RUNNING),
            ],
            *to,
        ),
        RunChange::CancelRequest { by } => (
            "runledger_request_cancel",
            vec![
                run_id,
                Lit::Text(state.status.as_str()),
                Lit::Int(at.as_millis()),
                by.as_deref().into(),
            ],
            state.status,
        ),
    };
    if only_write && !ends_with_locks {
        // Nothing read back: it goes with the commit.
        tx.at_commit(function, &values)?;
        return Ok((state, to, Vec::new()));
    }
    // The status event before the lock events, as on SQLite.
    let rows = tx.call(function, &values, true)?;
    let row = rows.first();
    tx.event_written(text_i64(row.and_then(|row| row.get(0)))?);
    if !ends_with_locks {
        return Ok((state, to, Vec::new()));
    }
    // A run's locks and queue places end with it, in this transaction, at
    // the time its end was stamped with (see `runledger_at`).
    let at = Timestamp::from_millis(text_i64(row.and_then(|row| row.get(1)))?);
    let wakes = release_run_locks(tx, run, at)?;
    tx.wake(&wakes);
    Ok((state, to, wakes))
}

/// The row of a call of migration 10 that answers its outcome and the
/// run's status first: the row if the outcome is `ok`, else the error it
/// stands for.
fn answered(rows: &[SimpleQueryRow], run: RunId) -> Result<&SimpleQueryRow> {
    let row = rows
        .first()
        .ok_or_else(|| bad_data(format!("a call on run {run} answered no row")))?;
    match row.get(0) {
        Some("ok") => Ok(row),
        Some("no run") => Err(Error::run_not_found(run)),
        Some("ended") => Err(Error::RunFinished {
            run,
            status: text_status(row.get(1))?,
        }),
        other => Err(bad_data(format!("a call on run {run} answered {other:?}"))),
    }
}

/// A run status read as text (a simple query's).
fn text_status(text: Option<&str>) -> Result<RunStatus> {
    let text = text.unwrap_or_default();
    text.parse()
        .map_err(|_| bad_data(format!("unknown run status {text:?}")))
}

/// Fails a run awaiting adoption whose deadline passed, in the caller's
/// transaction; returns the status it ended in and the reason.
fn fail_unadopted_in(
    tx: &mut Tx<'_>,
    run: RunId,
    deadline: Timestamp,
    at: Timestamp,
) -> Result<(RunStatus, String)> {
    let row = tx.query_one(
        "SELECT created_at, pid, host FROM runs WHERE id = $1",
        &[&i64::from(run)],
    )?;
    let created = timestamp(&row, 0)?;
    let pid: u32 = narrow(&row, 1)?;
    let host: &str = row.try_get(2)?;
    let reason = crate::store::unadopted_reason(created, deadline, pid, host);
    let (_, to, _) = apply_change(tx, run, at, None, |state| {
        crate::store::fail_if_active(state, &reason)
    })?;
    Ok((to, reason))
}

fn run_record(row: &Row) -> Result<RunRecord> {
    let total: u32 = narrow(row, 18)?;
    let succeeded: u32 = narrow(row, 19)?;
    let failed: u32 = narrow(row, 20)?;
    Ok(RunRecord {
        id: RunId::from(row.try_get::<_, i64>(0)?),
        name: row.try_get(1)?,
        source: row.try_get(2)?,
        status: run_status(row, 3)?,
        parent: row.try_get::<_, Option<i64>>(4)?.map(RunId::from),
        idempotency_key: row.try_get(5)?,
        instance: InstanceId::from(row.try_get::<_, i64>(6)?),
        pid: narrow(row, 7)?,
        host: row.try_get(8)?,
        exit_code: row.try_get(9)?,
        error: row.try_get(10)?,
        metadata: json_column(row, 11)?,
        log_path: row.try_get::<_, Option<String>>(12)?.map(Into::into),
        created_at: timestamp(row, 13)?,
        started_at: opt_timestamp(row, 14)?,
        heartbeat_at: opt_timestamp(row, 15)?,
        finished_at: opt_timestamp(row, 16)?,
        cancel_requested_at: opt_timestamp(row, 17)?,
        adopt_by: opt_timestamp(row, 22)?,
        progress: shared::progress([total, succeeded, failed], row.try_get(21)?),
    })
}

pub(super) fn event_record(row: &Row) -> Result<EventRecord> {
    let id = EventId::from(row.try_get::<_, i64>(0)?);
    let run = crate::store::event_run(row.try_get(1)?);
    let at = timestamp(row, 2)?;
    let kind: &str = row.try_get(3)?;
    if let Some(lock) = crate::store::lock_event_kind(kind, row.try_get(4)?) {
        return Ok(EventRecord {
            id,
            run,
            at,
            kind: lock?,
            message: row.try_get(7)?,
        });
    }
    let kind = match kind {
        "status" => EventKind::Status {
            from: opt_run_status(row, 5)?,
            to: run_status(row, 6)?,
        },
        "step" => EventKind::Step {
            step: row.try_get(4)?,
            from: opt_step_status(row, 5)?,
            to: step_status(row, 6)?,
        },
        "cancel_requested" => EventKind::CancelRequested,
        "lock_forced" => {
            let keys: &str = row.try_get(4)?;
            EventKind::LockForced {
                keys: serde_json::from_str(keys)
                    .map_err(|e| bad_data(format!("lock keys are not a JSON list: {e}")))?,
            }
        }
        "adopted" => crate::store::adopted_event(&json_column(row, 4)?),
        "custom" => {
            return Ok(EventRecord {
                id,
                run,
                at,
                kind: EventKind::Custom {
                    name: row.try_get(4)?,
                    data: json_column(row, 7)?,
                },
                message: None,
            });
        }
        other => return Err(bad_data(format!("unknown event kind {other:?}"))),
    };
    Ok(EventRecord {
        id,
        run,
        at,
        kind,
        message: row.try_get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::TestSchema;

    /// The runs list filtered by one status walks `runs_by_status` in id
    /// order, over a history where that status is rare, instead of the
    /// whole history backwards (as `= ANY` of an array would).
    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn the_runs_list_filtered_by_one_status_walks_its_index() {
        let schema = TestSchema::new("status_plan");
        drop(schema.store());
        let mut client = schema.client();
        client
            .batch_execute(&format!(
                "SET search_path TO {};
                 INSERT INTO runs (name, source, status, instance_id, pid, host, created_at,
                                   heartbeat_timeout)
                 SELECT 'job', 'cli', CASE WHEN g % 1000 = 0 THEN 'failed' ELSE 'succeeded' END,
                        0, 1, 'h', g, 0
                 FROM generate_series(1, 50000) g;
                 ANALYZE runs;",
                schema.name
            ))
            .unwrap();
        let sql = concat!(run_select!(), " WHERE true", runs_filter!());
        client
            .batch_execute(&format!("PREPARE q AS {sql}"))
            .unwrap();
        // Past the five custom plans, so that a generic plan would show.
        for _ in 0..7 {
            let plan: Vec<String> = client
                .query(
                    "EXPLAIN EXECUTE q(NULL, NULL, NULL, NULL, NULL, 9223372036854775807, 50, \
                     'failed')",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            let plan = plan.join("\n");
            assert!(plan.contains("using runs_by_status"), "{plan}");
            assert!(!plan.contains("Sort"), "{plan}");
            client
                .batch_execute(
                    "EXECUTE q(NULL, NULL, NULL, NULL, NULL, 9223372036854775807, 50, 'failed')",
                )
                .unwrap();
        }
    }
}
