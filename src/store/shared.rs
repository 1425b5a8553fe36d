//! The lock and reap logic both stores share, on the rows a store reads
//! and writes: one copy of the loops and decisions (who is granted, in
//! which order, what is recorded when a lock is taken away, what a reap
//! closes), as [`rules`](super::rules) is one copy of the lock rules.
//!
//! A store supplies only its statements ([`LockRows`], [`ReapRows`]), on
//! its write transaction: SQLite's single writer on a connection,
//! PostgreSQL's claims (see `postgres::Claim`) on a `Tx`. What a store does
//! before calling in (PostgreSQL's claims of the keys and runs it will
//! change) stays in that store.

use super::rules::{LockReads, fits};
use super::{
    Adopter, Adoption, Ahead, Ending, InstanceReaped, LOCK_GRANTED, Reap, TakenLock, Wakes,
    bad_data,
};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::liveness::{InstanceId, ProcessIdentity};
use crate::lock::{LockMode, LockState, Ticket};
use crate::reaper::Reaped;
use crate::record::{LockEvent, Progress};
use crate::run::{RunId, RunState, RunStatus};

/// A waiting request, as [`grant_waiters`] reads it.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub id: i64,
    pub mode: LockMode,
    pub keys: Vec<String>,
    pub wake: Option<String>,
    pub run: Option<RunId>,
    pub pid: u32,
    pub host: String,
}

/// Who held a lock row just deleted, for the event that ends its grant.
#[derive(Debug)]
pub(crate) struct Holder {
    pub mode: LockMode,
    pub run: Option<RunId>,
    pub pid: u32,
    pub host: String,
}

/// What [`LockRows::delete_row`] found: the keys of the row deleted, and
/// its holder when it was held; `None` if it was gone.
pub(crate) type DeletedRow = Result<Option<(Vec<String>, Option<Holder>)>>;

/// What a run's compare-and-set did: the state decided from, the status
/// after, and the waiters its released locks free.
pub(crate) type RunChanged = Result<(RunState, RunStatus, Wakes)>;

/// How many holders a forced release released, and the waiters to wake.
pub(crate) type Forced = Result<(usize, Wakes)>;

/// A lock request of an instance being reaped.
#[derive(Debug)]
pub(crate) struct OwnedLock {
    pub id: i64,
    pub token: Option<i64>,
    pub state: LockState,
    pub run: Option<RunId>,
    pub pid: u32,
    pub host: String,
    pub keys: Vec<String>,
}

/// A lock event to append to the feed and to its keys' histories.
#[derive(Debug)]
pub(crate) struct LockNote<'a> {
    /// Its `events.kind`.
    pub kind: &'a str,
    pub lock: &'a LockEvent,
    pub run: Option<RunId>,
    pub message: Option<&'a str>,
}

/// The statements the shared lock logic needs of a store, inside its
/// write transaction.
pub(crate) trait LockRows: LockReads {
    /// The waiting requests on `key`, in ticket order.
    fn waiters_on(&mut self, key: &str) -> Result<Vec<Waiter>>;

    /// Whether a waiter on `keys` may be granted in this transaction: on
    /// PostgreSQL, whether the claims of all its keys could be taken at
    /// once (a waiter left so is woken and takes its grant itself).
    fn may_grant(&mut self, keys: &[String]) -> Result<bool>;

    /// Takes the next fencing token for a grant of `keys`.
    fn next_token(&mut self, keys: &[String]) -> Result<i64>;

    /// Marks the waiting request `id` held with `token`.
    fn set_held(&mut self, id: i64, token: i64, now: Timestamp) -> Result<()>;

    /// Deletes the lock row `id` (with that token) and its key entries;
    /// its keys, and its holder when `token` is given. `None` if gone.
    fn delete_row(&mut self, id: i64, token: Option<i64>) -> DeletedRow;

    /// Appends a lock event (see [`LockNote`]).
    fn lock_event(&mut self, now: Timestamp, note: &LockNote<'_>) -> Result<()>;

    /// Records that a held lock was taken away, so that its guard reports
    /// [`Error::LockLost`](crate::Error::LockLost).
    fn record_taken(&mut self, now: Timestamp, taken: &TakenLock<'_>) -> Result<()>;

    /// Writes a forced release into the history of the holder's run.
    fn forced_event(&mut self, run: RunId, now: Timestamp, keys: &str, why: &str) -> Result<()>;

    /// Every lock row (id and token) of `run`.
    fn run_locks(&mut self, run: RunId) -> Result<Vec<(i64, Option<i64>)>>;

    /// The waiters a write granted or unblocked, once it chose them: on
    /// PostgreSQL, noted for the commit's notification.
    fn granted(&mut self, wakes: &Wakes);
}

/// A fencing token read from a row: tokens start at 1.
pub(crate) fn token_of(token: i64) -> Result<u64> {
    u64::try_from(token).map_err(|_| bad_data(format!("fencing token {token}")))
}

/// Hands `keys`, just freed, to their waiters: per key, the waiters are taken
/// in ticket order and each one that fits now (with every one of its keys,
/// behind every earlier waiter) is granted in this same transaction, up to
/// the first exclusive one that does not fit. Returns the wake-up addresses
/// of those granted (and of those the store would not grant here, see
/// [`LockRows::may_grant`]): they find their lock held with a read, without
/// a write of their own.
pub(crate) fn grant_waiters(
    rows: &mut impl LockRows,
    keys: &[String],
    now: Timestamp,
) -> Result<Wakes> {
    let mut wakes = Vec::new();
    for key in keys {
        for waiter in rows.waiters_on(key)? {
            let mode = waiter.mode;
            if !rows.may_grant(&waiter.keys)? {
                wake_once(&mut wakes, waiter.wake);
                if mode == LockMode::Exclusive {
                    break;
                }
                continue;
            }
            if !fits(rows, &waiter.keys, mode, Some(waiter.id))? {
                // Nothing behind an exclusive waiter fits on this key; a
                // shared or slots waiter may be blocked only by another of
                // its keys, and those behind it may still fit.
                if mode == LockMode::Exclusive {
                    break;
                }
                continue;
            }
            let token = rows.next_token(&waiter.keys)?;
            rows.set_held(waiter.id, token, now)?;
            let lock = LockEvent {
                ticket: Ticket::from(waiter.id),
                keys: waiter.keys,
                mode,
                token: token_of(token)?,
                pid: waiter.pid,
                host: waiter.host,
            };
            let note = LockNote {
                kind: LOCK_GRANTED,
                lock: &lock,
                run: waiter.run,
                message: None,
            };
            rows.lock_event(now, &note)?;
            wake_once(&mut wakes, waiter.wake);
            // An exclusive holder now: nothing behind it fits on this key.
            if mode == LockMode::Exclusive {
                break;
            }
        }
    }
    rows.granted(&wakes);
    Ok(wakes)
}

/// Adds `wake` to `wakes`, once.
fn wake_once(wakes: &mut Wakes, wake: Option<String>) {
    if let Some(wake) = wake
        && !wakes.contains(&wake)
    {
        wakes.push(wake);
    }
}

/// Deletes a lock row and its entries; returns its keys, or `None` if the
/// row (with that token) was gone. A held row (one with a token) ends its
/// grant as `ending` says, with a lock event.
pub(crate) fn delete_lock(
    rows: &mut impl LockRows,
    id: i64,
    token: Option<i64>,
    now: Timestamp,
    ending: Ending<'_>,
) -> Result<Option<Vec<String>>> {
    let Some((keys, holder)) = rows.delete_row(id, token)? else {
        return Ok(None);
    };
    if let (Some(token), Some(holder)) = (token, holder) {
        let lock = LockEvent {
            ticket: Ticket::from(id),
            keys: keys.clone(),
            mode: holder.mode,
            token: token_of(token)?,
            pid: holder.pid,
            host: holder.host,
        };
        let message = ending.message();
        let note = LockNote {
            kind: ending.kind(),
            lock: &lock,
            run: holder.run,
            message: message.as_deref(),
        };
        rows.lock_event(now, &note)?;
    }
    Ok(Some(keys))
}

/// Deletes the request `id` (with `token`, as it was read) and hands its
/// keys on; `None` if it was gone.
pub(crate) fn release(
    rows: &mut impl LockRows,
    id: i64,
    token: Option<i64>,
    now: Timestamp,
) -> Result<Option<Wakes>> {
    match delete_lock(rows, id, token, now, Ending::Released)? {
        Some(keys) => Ok(Some(grant_waiters(rows, &keys, now)?)),
        None => Ok(None),
    }
}

/// Releases every lock (held or queued) of a run that is ending, in its
/// transaction; returns the waiters to wake.
///
/// Every row of the run goes first, and only then are the keys handed on: a
/// key freed by one of the run's rows must not be granted to another of its
/// rows.
pub(crate) fn release_run_locks(
    rows: &mut impl LockRows,
    run: RunId,
    now: Timestamp,
) -> Result<Wakes> {
    let mut freed = Vec::new();
    for (id, token) in rows.run_locks(run)? {
        if let Some(keys) = delete_lock(rows, id, token, now, Ending::Released)? {
            freed.extend(keys);
        }
    }
    freed.sort();
    freed.dedup();
    grant_waiters(rows, &freed, now)
}

/// The holders of `key`, as the lock rules read them.
pub(crate) fn holders_of(rows: &mut impl LockReads, key: &str) -> Result<Vec<Ahead>> {
    Ok(rows
        .ahead_on(key, Some(i64::MIN))?
        .into_iter()
        .filter(|a| a.state == LockState::Held)
        .collect())
}

/// Releases by force each of `holders` still held: records it for its
/// guard and in its run's history, and hands its keys on. Returns how
/// many, and the waiters to wake.
pub(crate) fn force_release(
    rows: &mut impl LockRows,
    holders: &[Ahead],
    now: Timestamp,
    reason: &str,
    by: &ProcessIdentity,
) -> Forced {
    let ending = Ending::Forced(reason, by);
    let mut wakes = Vec::new();
    let mut released = 0;
    for holder in holders {
        let Some(keys) = delete_lock(rows, holder.lock_id, holder.token, now, ending)? else {
            continue;
        };
        let taken = TakenLock {
            id: holder.lock_id,
            token: holder.token,
            run: holder.run.as_ref().map(|(id, _)| *id),
            pid: holder.owner.pid,
            host: &holder.owner.host,
            kind: "forced",
            keys: &keys,
            reason,
            by,
        };
        rows.record_taken(now, &taken)?;
        // The holder's run keeps it in its history too.
        if let Some((run, _)) = &holder.run {
            let why = ending.message().unwrap_or_default();
            rows.forced_event(*run, now, &super::keys_json(&keys), &why)?;
        }
        wakes.extend(grant_waiters(rows, &keys, now)?);
        released += 1;
    }
    Ok((released, wakes))
}

/// The statements a reap needs of a store, besides its locks'.
pub(crate) trait ReapRows: LockRows {
    /// An instance's heartbeat, and whether it is closed; `None` if gone.
    fn instance_beat(&mut self, id: i64) -> Result<Option<(Timestamp, bool)>>;

    /// Every lock request of an instance.
    fn instance_locks(&mut self, id: i64) -> Result<Vec<OwnedLock>>;

    /// The active runs of an instance, with their names.
    fn instance_runs(&mut self, id: i64) -> Result<Vec<(RunId, String)>>;

    /// Fails `run` with `reason` if it is still active, as one
    /// compare-and-set: the state decided from, the status after, and the
    /// waiters its released locks free.
    fn fail_active(&mut self, run: RunId, now: Timestamp, reason: &str) -> RunChanged;

    /// Deletes an instance's watchers and closes it with `reason`; whether
    /// it was open.
    fn close_instance(&mut self, id: i64, now: Timestamp, reason: &str) -> Result<bool>;
}

/// Closes an instance judged dead (see `Store::reap_instance` of either
/// store), in the caller's write transaction.
pub(crate) fn reap(
    rows: &mut impl ReapRows,
    now: Timestamp,
    reap: &Reap<'_>,
) -> Result<InstanceReaped> {
    let instance = reap.instance;
    let current = rows.instance_beat(instance.id)?;
    if let Some(judged) = reap.stale_heartbeat
        && current != Some((judged, false))
    {
        return Ok(InstanceReaped::default());
    }
    let mut out = InstanceReaped::default();
    let freed = delete_instance_locks(rows, now, reap, &mut out)?;
    fail_instance_runs(rows, now, instance.id, reap.run_reason, &mut out)?;
    out.wakes.extend(grant_waiters(rows, &freed, now)?);
    if rows.close_instance(instance.id, now, reap.reason)? {
        out.reaped.push(Reaped::Instance {
            id: InstanceId::from(instance.id),
            pid: instance.pid,
            host: instance.host.to_owned(),
            reason: reap.reason.to_owned(),
        });
    }
    Ok(out)
}

/// Deletes every lock request of an instance; returns the keys it held.
fn delete_instance_locks(
    rows: &mut impl ReapRows,
    now: Timestamp,
    reap: &Reap<'_>,
    out: &mut InstanceReaped,
) -> Result<Vec<String>> {
    let (reason, by) = (reap.run_reason, reap.by);
    let mut freed = Vec::new();
    for lock in rows.instance_locks(reap.instance.id)? {
        let reclaimed = Ending::Reclaimed(reason, by);
        if delete_lock(rows, lock.id, lock.token, now, reclaimed)?.is_none() {
            continue;
        }
        if lock.state == LockState::Held {
            let taken = TakenLock {
                id: lock.id,
                token: lock.token,
                run: lock.run,
                pid: lock.pid,
                host: &lock.host,
                kind: "reclaimed",
                keys: &lock.keys,
                reason,
                by,
            };
            rows.record_taken(now, &taken)?;
        }
        // A waiter gone may unblock the ones queued behind it, too.
        freed.extend(lock.keys.iter().cloned());
        out.reaped.push(Reaped::Lock {
            keys: lock.keys,
            state: lock.state,
            token: lock.token.map(token_of).transpose()?,
            reason: reason.to_owned(),
        });
    }
    freed.sort();
    freed.dedup();
    Ok(freed)
}

/// Fails every active run of an instance, each as its own compare-and-set.
fn fail_instance_runs(
    rows: &mut impl ReapRows,
    now: Timestamp,
    instance: i64,
    reason: &str,
    out: &mut InstanceReaped,
) -> Result<()> {
    for (id, name) in rows.instance_runs(instance)? {
        let (state, to, wakes) = rows.fail_active(id, now, reason)?;
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

/// A run's row as an adoption reads it.
#[derive(Debug)]
pub(crate) struct AdoptRow {
    pub status: RunStatus,
    /// Its adoption deadline: `None` once owned.
    pub adopt_by: Option<Timestamp>,
    pub pid: u32,
    pub host: String,
    /// The head of its event chain.
    pub last: Option<i64>,
}

/// The statements an adoption needs of a store, inside its write
/// transaction, at the time `at` given to [`adopt`].
pub(crate) trait AdoptRows {
    /// Whether the instance is open (see `instances::is_open`).
    fn instance_open(&mut self, instance: i64) -> Result<bool>;

    /// The run's row; `None` if it does not exist.
    fn adopt_row(&mut self, run: RunId) -> Result<Option<AdoptRow>>;

    /// Fails the run nobody adopted by `deadline`; the status after.
    fn expire(&mut self, run: RunId, deadline: Timestamp) -> Result<RunStatus>;

    /// Appends the `adopted` event after `last` and hands the run over, if
    /// it still awaits adoption; whether it did.
    fn hand_over(&mut self, run: RunId, last: Option<i64>, adopter: &Adopter<'_>) -> Result<bool>;

    /// Starts the run, if it is still queued (queued → running releases
    /// nothing: no waiters to wake).
    fn start(&mut self, run: RunId) -> Result<()>;
}

/// Hands a run awaiting adoption to `adopter` at `at` (see
/// `Store::adopt_run` of either store), in the caller's write transaction.
pub(crate) fn adopt(
    rows: &mut impl AdoptRows,
    run: RunId,
    adopter: &Adopter<'_>,
    start: bool,
    at: Timestamp,
) -> Result<Adoption> {
    if !rows.instance_open(adopter.instance)? {
        return Ok(Adoption::InstanceClosed);
    }
    let row = rows
        .adopt_row(run)?
        .ok_or_else(|| Error::run_not_found(run))?;
    let (status, pid, host) = (row.status, row.pid, row.host);
    if status.is_terminal() {
        return Err(Error::RunFinished { run, status });
    }
    let Some(deadline) = row.adopt_by else {
        return Err(Error::AlreadyOwned { run, pid, host });
    };
    if at >= deadline {
        // Failing it is this transaction's only write: it commits, and the
        // adopter hears that the run has finished.
        return Ok(Adoption::Expired(rows.expire(run, deadline)?));
    }
    if !rows.hand_over(run, row.last, adopter)? {
        // Cannot happen while the write lock (or the run's claim) is held.
        return Err(Error::AlreadyOwned { run, pid, host });
    }
    if start {
        rows.start(run)?;
    }
    Ok(Adoption::Adopted)
}

/// A run that retention looks at: its id, when it was created, its status
/// and when it ended.
pub(crate) type PruneCandidate = (i64, Timestamp, RunStatus, Option<Timestamp>);

/// How many runs a batch of retention deleted, and where the next starts.
pub(crate) type Pruned = Result<(usize, Option<i64>)>;

/// One batch of retention over `candidates` (the runs after `after`, oldest
/// first, at most `batch`; see `Store::prune_batch` of either store):
/// `delete`s each that ended before `cutoff` but those in `keep`.
pub(crate) fn prune_walk(
    candidates: &[PruneCandidate],
    keep: &[i64],
    (cutoff, after, batch): (Timestamp, i64, usize),
    mut delete: impl FnMut(i64) -> Result<()>,
) -> Pruned {
    let mut deleted = 0;
    let mut next = Some(after);
    for &(id, created_at, status, finished_at) in candidates {
        if created_at >= cutoff {
            next = None;
            break;
        }
        next = Some(id);
        let ended_before_cutoff = finished_at.is_some_and(|t| t < cutoff);
        if status.is_terminal() && ended_before_cutoff && !keep.contains(&id) {
            delete(id)?;
            deleted += 1;
        }
    }
    if candidates.len() < batch {
        next = None;
    }
    Ok((deleted, next))
}

/// A run's rows (its steps, its events) as read: an empty list is checked
/// against the run's existence (`exists` fails for a run that is not).
pub(crate) fn of_a_run<T>(items: Vec<T>, exists: impl FnOnce() -> Result<()>) -> Result<Vec<T>> {
    if items.is_empty() {
        exists()?;
    }
    Ok(items)
}

/// A run's progress, from its step counters (`[total, succeeded, failed]`)
/// and its newest running step.
pub(crate) fn progress([total, succeeded, failed]: [u32; 3], current: Option<String>) -> Progress {
    Progress {
        total,
        succeeded,
        failed,
        running: total.saturating_sub(succeeded.saturating_add(failed)),
        current,
    }
}
