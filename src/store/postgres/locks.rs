//! SQL for locks: grants, the queue, releases, reclaims (PostgreSQL).
//!
//! The same queries and the same order of decisions as the SQLite store's
//! `locks.rs`: every write holds the claims of the keys it reads and changes
//! (see [`super::Claim`]), so a grant's check and its insert see one state
//! that no other writer changes in between.

use postgres::Row;

use super::{Claim, Lit, Store, Tx};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::liveness::{InstanceId, InstanceRecord, ProcessIdentity};
use crate::lock::{LockMode, LockRecord, Ticket};
use crate::record::{EventRecord, LockEvent};
use crate::run::{RunId, RunStatus};
use crate::store::rules::{LockReads, blockers};
use crate::store::shared::{self, DeletedRow, Forced, Holder, LockNote, LockRows, Waiter};
use crate::store::{
    Ahead, Attempt, Ending, LOCK_GRANTED, LockAsk, TakenLock, Wakes, event_run_id, keys_from_json,
    keys_json, lease_of, lock_event_json, state_of,
};

pub(super) use crate::store::bad_data;

/// A request's keys, from its row's JSON array.
pub(super) fn parse_keys(text: &str) -> Result<Vec<String>> {
    keys_from_json(text).map_err(|e| bad_data(format!("lock keys {text:?}: {e}")))
}

fn mode_of(mode: &str, capacity: Option<i64>) -> Result<LockMode> {
    let capacity = capacity
        .map(|c| u32::try_from(c).map_err(|_| bad_data(format!("lock capacity {c}"))))
        .transpose()?;
    LockMode::from_parts(mode, capacity)
        .ok_or_else(|| bad_data(format!("unknown lock mode {mode:?}")))
}

/// A process id from its `bigint` column.
pub(super) fn pid_of(pid: i64) -> Result<u32> {
    u32::try_from(pid).map_err(|_| bad_data(format!("process id {pid}")))
}

/// A fencing token from its `bigint` column: tokens start at 1.
pub(super) use crate::store::shared::token_of;

/// The columns [`ahead`] reads, for the requests on the key `$1` ahead of
/// the ticket `$2`.
const AHEAD_ON: &str = "
    SELECT l.id, l.state, l.mode, l.capacity, l.token, l.run_id, r.name,
           l.instance_id, coalesce(i.host, l.host), i.boot_id, l.pid, i.start_time,
           i.id IS NULL OR i.closed_at IS NOT NULL,
           coalesce(l.granted_at, l.requested_at), i.pid_ns, l.keys,
           coalesce(i.heartbeat_at, 0), i.stale_after
    FROM lock_entries e
    JOIN locks l ON l.id = e.lock_id
    LEFT JOIN instances i ON i.id = l.instance_id
    LEFT JOIN runs r ON r.id = l.run_id
    WHERE e.key = $1 AND e.lock_id <> $2 AND (l.state = 'held' OR e.lock_id < $2)
    ORDER BY e.lock_id";

fn ahead(row: &Row, key: &str) -> Result<Ahead> {
    let run: Option<i64> = row.try_get(5)?;
    let name: Option<String> = row.try_get(6)?;
    let instance: i64 = row.try_get(7)?;
    Ok(Ahead {
        lock_id: row.try_get(0)?,
        key: key.to_owned(),
        keys: parse_keys(row.try_get(15)?)?,
        state: state_of(row.try_get(1)?),
        mode: mode_of(row.try_get(2)?, row.try_get(3)?)?,
        token: row.try_get(4)?,
        run: run.map(|id| (RunId::from(id), name.unwrap_or_default())),
        instance,
        owner: InstanceRecord {
            id: instance,
            // Instances on PostgreSQL have no lock file.
            lock_file: None,
            heartbeat_at: Timestamp::from_millis(row.try_get(16)?),
            host: row.try_get(8)?,
            boot_id: row.try_get(9)?,
            pid: pid_of(row.try_get(10)?)?,
            pid_ns: row.try_get(14)?,
            // Stored bit for bit as the signed column holds it.
            start_time: row.try_get::<_, Option<i64>>(11)?.map(i64::cast_unsigned),
            closed: row.try_get(12)?,
            closed_reason: None,
            lease: lease_of(row.try_get(17)?),
        },
        since: Timestamp::from_millis(row.try_get(13)?),
    })
}

/// The requests ahead of `ticket` on `key`: every holder, and the waiters
/// with a lower ticket (all waiters, for a request without a ticket).
fn ahead_on(tx: &mut Tx<'_>, key: &str, ticket: Option<i64>) -> Result<Vec<Ahead>> {
    let ticket = ticket.unwrap_or(i64::MAX);
    tx.query(AHEAD_ON, &[&key, &ticket])?
        .iter()
        .map(|row| ahead(row, key))
        .collect()
}

/// Hands `keys`, just freed, to their waiters (see
/// [`shared::grant_waiters`]). The wake-up addresses are also noted for
/// the commit's notification, so that waiters on other hosts wake too,
/// whatever the caller does with them.
pub(super) fn grant_waiters(tx: &mut Tx<'_>, keys: &[String], now: Timestamp) -> Result<Wakes> {
    shared::grant_waiters(tx, keys, now)
}

/// The waiting requests on `key`, in ticket order.
fn waiters_on(tx: &mut Tx<'_>, key: &str) -> Result<Vec<Waiter>> {
    let rows = tx.query(
        "SELECT l.id, l.mode, l.capacity, l.keys, l.wake, l.run_id, l.pid, l.host
         FROM lock_entries e JOIN locks l ON l.id = e.lock_id
         WHERE e.key = $1 AND l.state = 'waiting'
         ORDER BY e.lock_id",
        &[&key],
    )?;
    let mut waiters = Vec::with_capacity(rows.len());
    for row in &rows {
        waiters.push(Waiter {
            id: row.try_get(0)?,
            mode: mode_of(row.try_get(1)?, row.try_get(2)?)?,
            keys: parse_keys(row.try_get(3)?)?,
            wake: row.try_get(4)?,
            run: row.try_get::<_, Option<i64>>(5)?.map(RunId::from),
            pid: pid_of(row.try_get(6)?)?,
            host: row.try_get(7)?,
        });
    }
    Ok(waiters)
}

/// The common table expressions that take the next fencing token for the
/// keys `$1` (`next`, one row: `token`) and record it on each (`put`).
macro_rules! next_token {
    () => {
        "WITH next AS (
             SELECT coalesce(max(last_token), 0) + 1 AS token
             FROM lock_keys WHERE key = ANY($1)
         ), put AS (
             INSERT INTO lock_keys (key, last_token)
             SELECT DISTINCT unnest($1::text[]), (SELECT token FROM next)
             ON CONFLICT (key) DO UPDATE SET last_token = excluded.last_token
         )"
    };
}

/// Takes the next fencing token for a grant of `keys`: above the last token
/// of every one of them, recorded on each. One statement for all the keys
/// (a request's keys are distinct), as each statement is a round trip made
/// while the keys are claimed.
fn next_token(tx: &mut Tx<'_>, keys: &[String]) -> Result<i64> {
    // The keys are claimed: no other writer moves their tokens in between.
    // A token past the column's range fails the statement (and the grant).
    let row = tx.query_one(concat!(next_token!(), " SELECT token FROM next"), &[&keys])?;
    Ok(row.try_get(0)?)
}

/// Deletes a lock row and its entries (see [`shared::delete_lock`]).
pub(super) fn delete_lock(
    tx: &mut Tx<'_>,
    id: i64,
    token: Option<i64>,
    now: Timestamp,
    ending: Ending<'_>,
) -> Result<Option<Vec<String>>> {
    shared::delete_lock(tx, id, token, now, ending)
}

/// The row and entries that [`LockRows::delete_row`] deletes, in one
/// statement. Its holder is read only when it was held.
fn delete_row(tx: &mut Tx<'_>, id: i64, token: Option<i64>) -> DeletedRow {
    let Some(row) = tx.query_opt(
        "WITH l AS (
             DELETE FROM locks WHERE id = $1 AND token IS NOT DISTINCT FROM $2
             RETURNING id, keys, mode, capacity, run_id, pid, host
         ), e AS (
             -- By key and id: the primary key's order.
             DELETE FROM lock_entries
             WHERE lock_id = $1
               AND key IN (SELECT jsonb_array_elements_text(keys::jsonb) FROM l)
         )
         SELECT keys, mode, capacity, run_id, pid, host FROM l",
        &[&id, &token],
    )?
    else {
        return Ok(None);
    };
    let keys = parse_keys(row.try_get(0)?)?;
    let holder = match token {
        Some(_) => Some(Holder {
            mode: mode_of(row.try_get(1)?, row.try_get(2)?)?,
            run: row.try_get::<_, Option<i64>>(3)?.map(RunId::from),
            pid: pid_of(row.try_get(4)?)?,
            host: row.try_get(5)?,
        }),
        None => None,
    };
    Ok(Some((keys, holder)))
}

/// Appends a lock event to the feed (in no run's chain: see the SQLite
/// schema) and to the history of each of its keys, in one statement.
fn lock_event(
    tx: &mut Tx<'_>,
    now: Timestamp,
    kind: &str,
    lock: &LockEvent,
    run: Option<RunId>,
    message: Option<&str>,
) -> Result<()> {
    tx.execute(
        "WITH e AS (
             INSERT INTO events (run_id, at, kind, step, message) VALUES ($1, $2, $3, $4, $5)
             RETURNING id
         )
         INSERT INTO lock_history (key, event_id)
         SELECT DISTINCT unnest($6::text[]), e.id FROM e",
        &[
            &event_run_id(run),
            &now.as_millis(),
            &kind,
            &lock_event_json(lock),
            &message,
            &lock.keys,
        ],
    )?;
    tx.events_written();
    Ok(())
}

/// Claims lock keys the transaction cannot do without (see [`Tx::claim`]).
pub(super) fn claim_keys(tx: &mut Tx<'_>, keys: &[String]) -> Result<()> {
    let claims: Vec<Claim> = keys.iter().map(|k| Claim::key(k)).collect();
    tx.claim(&claims, true).map(drop)
}

/// Releases every lock (held or queued) of a run that is ending, in its
/// transaction (see [`shared::release_run_locks`]); the waiters to wake
/// are already noted for the commit's notification.
///
/// The caller holds the claims of the run (so no request of it is added)
/// and of the keys of its requests, taken before the rows are read here: a
/// waiting row may be granted until then, and its token is the one to
/// delete.
pub(super) fn release_run_locks(tx: &mut Tx<'_>, run: RunId, now: Timestamp) -> Result<Wakes> {
    shared::release_run_locks(tx, run, now)
}

impl LockReads for Tx<'_> {
    fn ahead_on(&mut self, key: &str, ticket: Option<i64>) -> Result<Vec<Ahead>> {
        ahead_on(self, key, ticket)
    }
}

impl LockRows for Tx<'_> {
    fn waiters_on(&mut self, key: &str) -> Result<Vec<Waiter>> {
        waiters_on(self, key)
    }

    /// A waiter's other keys are claimed too, only if that can be done at
    /// once (they may come before a key held, in claim order): a waiter
    /// left so is woken, and takes its grant itself, holding the claims of
    /// all its keys. (Not its run's claim: a run ended meanwhile claims its
    /// keys before it reads its requests, and so deletes this grant.)
    fn may_grant(&mut self, keys: &[String]) -> Result<bool> {
        let claims: Vec<Claim> = keys.iter().map(|k| Claim::key(k)).collect();
        self.claim(&claims, false)
    }

    fn next_token(&mut self, keys: &[String]) -> Result<i64> {
        next_token(self, keys)
    }

    fn set_held(&mut self, id: i64, token: i64, now: Timestamp) -> Result<()> {
        self.execute(
            "UPDATE locks SET state = 'held', token = $2, granted_at = $3, wake = NULL
             WHERE id = $1 AND state = 'waiting'",
            &[&id, &token, &now.as_millis()],
        )
        .map(drop)
    }

    fn delete_row(&mut self, id: i64, token: Option<i64>) -> DeletedRow {
        delete_row(self, id, token)
    }

    fn lock_event(&mut self, now: Timestamp, note: &LockNote<'_>) -> Result<()> {
        lock_event(self, now, note.kind, note.lock, note.run, note.message)
    }

    fn record_taken(&mut self, now: Timestamp, taken: &TakenLock<'_>) -> Result<()> {
        record_taken(self, now, taken)
    }

    fn forced_event(&mut self, run: RunId, now: Timestamp, keys: &str, why: &str) -> Result<()> {
        super::runs::append_event(self, run, now, "lock_forced", Some(keys), Some(why))
    }

    fn run_locks(&mut self, run: RunId) -> Result<Vec<(i64, Option<i64>)>> {
        let rows = self.query(
            "SELECT id, token FROM locks WHERE run_id = $1",
            &[&i64::from(run)],
        )?;
        let mut owned = Vec::with_capacity(rows.len());
        for row in &rows {
            owned.push((row.try_get(0)?, row.try_get(1)?));
        }
        Ok(owned)
    }

    fn granted(&mut self, wakes: &Wakes) {
        self.wake(wakes);
    }
}

/// The lock held that a grant of one round trip numbered `nonce` by
/// `instance` made, if it committed: its id and token.
fn grant_numbered(tx: &mut Tx<'_>, instance: i64, nonce: i64) -> Result<Option<(i64, u64)>> {
    tx.query_opt(
        "SELECT id, token FROM locks
         WHERE instance_id = $1 AND nonce = $2 AND state = 'held'",
        &[&instance, &nonce],
    )?
    .map(|row| Ok((row.try_get(0)?, token_of(row.try_get(1)?)?)))
    .transpose()
}

/// A grant of one round trip whose outcome is unknown (see
/// `Store::settle_unknown_grants`): its instance, its number in the
/// process, and the claims it took.
pub(super) struct UnknownGrant {
    instance: i64,
    nonce: i64,
    claims: Vec<Claim>,
}

impl Store {
    /// One attempt at granting `ask` (already queued as `ticket`, if given),
    /// in one write transaction. A blocked request that may wait takes a
    /// place in the queue in the same transaction.
    ///
    /// A new request (no ticket) first tries `runledger_grant_alone`
    /// (migration 11) as a transaction of its own (see [`grant_alone`] and
    /// [`Store::write_alone`]): a grant of keys nobody holds or waits for
    /// then costs one round trip. Otherwise the statements of
    /// [`try_lock_in`](Store::try_lock_in) decide, in a transaction of
    /// their own.
    pub(crate) fn try_lock(&self, ask: &LockAsk<'_>, ticket: Option<i64>) -> Result<Attempt> {
        let mut claims = vec![Claim::instance(ask.instance, true)];
        claims.extend(ask.run.map(|run| Claim::run(run, true)));
        claims.extend(ask.keys.iter().map(|key| Claim::key(key)));
        self.settle_unknown_grants();
        if ticket.is_none() {
            let nonce = self.next_nonce();
            let detail = grant_detail(ask);
            let keys = keys_json(ask.keys);
            let active: Vec<String> = RunStatus::ALL
                .iter()
                .filter(|s| s.is_active())
                .map(|s| s.as_str().to_owned())
                .collect();
            let alone = self.write_alone(
                &claims,
                "runledger_grant_alone",
                &grant_alone(ask, nonce, &detail, &keys, &active),
                |row| match row.get(0) {
                    Some(_) => Ok(Some(Attempt::Granted {
                        id: text_i64(row.get(0))?,
                        token: token_of(text_i64(row.get(1))?)?,
                    })),
                    None => Ok(None),
                },
                |tx| {
                    Ok(grant_numbered(tx, ask.instance, nonce)?
                        .map(|(id, token)| Attempt::Granted { id, token }))
                },
                || {
                    self.unknown_grants.lock().push(UnknownGrant {
                        instance: ask.instance,
                        nonce,
                        claims: claims.clone(),
                    });
                },
            )?;
            if let Some(attempt) = alone {
                return Ok(attempt);
            }
        }
        self.write(&claims, |tx| self.try_lock_in(tx, ask, ticket))
    }

    /// [`try_lock`](Store::try_lock) in its transaction, statement by
    /// statement.
    fn try_lock_in(
        &self,
        tx: &mut Tx<'_>,
        ask: &LockAsk<'_>,
        ticket: Option<i64>,
    ) -> Result<Attempt> {
        {
            let now = tx.now();
            // The instance open, and the run (if any) active: one read.
            let row = tx.query_one(
                "SELECT EXISTS (SELECT 1 FROM instances WHERE id = $1 AND closed_at IS NULL),
                        (SELECT status FROM runs WHERE id = $2)",
                &[&ask.instance, &ask.run.map(i64::from)],
            )?;
            if !row.try_get::<_, bool>(0)? {
                return Ok(Attempt::InstanceClosed);
            }
            if let Some(run) = ask.run {
                let status = super::runs::opt_run_status(&row, 1)?
                    .ok_or_else(|| Error::run_not_found(run))?;
                if status.is_terminal() {
                    return Err(Error::RunFinished { run, status });
                }
            }
            // A queued request may have been granted by a releaser meanwhile;
            // a queue place that vanished (its run ended) is taken anew.
            let ticket = match ticket {
                Some(t) => {
                    let row =
                        tx.query_opt("SELECT state, token FROM locks WHERE id = $1", &[&t])?;
                    match row {
                        Some(row) => {
                            let state: &str = row.try_get(0)?;
                            match row.try_get::<_, Option<i64>>(1)? {
                                Some(token) if state == "held" => {
                                    return Ok(Attempt::Granted {
                                        id: t,
                                        token: token_of(token)?,
                                    });
                                }
                                _ => Some(t),
                            }
                        }
                        None => None,
                    }
                }
                None => None,
            };
            let blocked = blockers(tx, ask, ticket)?;
            if !blocked.is_empty() {
                let ticket = match ticket {
                    Some(t) => Some(t),
                    None if ask.queue => Some(insert_lock(tx, ask, "waiting", None, now)?),
                    None => None,
                };
                return Ok(Attempt::Blocked {
                    ticket,
                    ahead: blocked,
                });
            }
            let Some(ticket) = ticket else {
                let (id, token) = grant_new(tx, ask, now)?;
                return Ok(Attempt::Granted { id, token });
            };
            // A queued request, granted in its place.
            let token = next_token(tx, ask.keys)?;
            let id = ticket;
            tx.execute(
                "UPDATE locks SET state = 'held', token = $2, granted_at = $3, wake = NULL
                 WHERE id = $1 AND state = 'waiting'",
                &[&id, &token, &now.as_millis()],
            )?;
            let lock = LockEvent {
                ticket: Ticket::from(id),
                keys: ask.keys.to_vec(),
                mode: ask.mode,
                token: token_of(token)?,
                pid: ask.pid,
                host: ask.host.to_owned(),
            };
            lock_event(tx, now, LOCK_GRANTED, &lock, ask.run, None)?;
            Ok(Attempt::Granted {
                id,
                token: token_of(token)?,
            })
        }
    }

    /// What keeps `ask` out right now, read without claims: empty
    /// if it looks grantable. Only a hint for how to wait (the grant
    /// transaction decides); a request that has no place in the queue.
    ///
    /// Its statements run outside a transaction, each on what was committed
    /// when it started: a write committing in between may make the hint
    /// stale, as on SQLite it may be by the time it is used.
    pub(crate) fn lock_blockers(&self, ask: &LockAsk<'_>) -> Result<Vec<Ahead>> {
        self.read(|tx| blockers(tx, ask, None))
    }

    /// The token of a queued request that a releaser has granted meanwhile:
    /// a read, so a woken waiter needs no write of its own.
    pub(crate) fn granted_token(&self, ticket: i64) -> Result<Option<u64>> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT token FROM locks WHERE id = $1 AND state = 'held'",
                &[&ticket],
            )?
            .map(|row| token_of(row.try_get(0)?))
            .transpose()
        })
    }

    /// Leaves the queue: deletes a request that gave up (timed out, failed),
    /// whether still waiting or granted by a releaser after it stopped
    /// looking; hands its keys on.
    pub(crate) fn leave_queue(&self, ticket: i64) -> Result<Wakes> {
        self.write_later(&[], |tx| {
            let now = tx.now();
            let Some(row) = tx.query_opt("SELECT keys FROM locks WHERE id = $1", &[&ticket])?
            else {
                return Ok(Vec::new());
            };
            claim_keys(tx, &parse_keys(row.try_get(0)?)?)?;
            // Read again under the claims: a releaser may have granted it
            // meanwhile, and its token is the one to delete.
            let Some(row) = tx.query_opt("SELECT token FROM locks WHERE id = $1", &[&ticket])?
            else {
                return Ok(Vec::new());
            };
            let token: Option<i64> = row.try_get(0)?;
            Ok(shared::release(tx, ticket, token, now)?.unwrap_or_default())
        })
    }

    /// Releases a held lock. `None` if it was no longer held (taken away, or
    /// released with its run); otherwise the waiters to wake. `on_commit`
    /// runs as soon as the release has committed.
    ///
    /// `keys`, the lock's own when the caller knows them (its guard does),
    /// are claimed as the transaction begins; else they are read first.
    /// Keys given that are not the lock's only claim too much: the
    /// release hands on the keys of the row it deletes, and claims any of
    /// them not claimed yet.
    pub(crate) fn release_lock(
        &self,
        id: i64,
        token: u64,
        keys: Option<&[String]>,
        on_commit: impl FnOnce(),
    ) -> Result<Option<Wakes>> {
        let claims: Vec<Claim> = keys
            .unwrap_or_default()
            .iter()
            .map(|k| Claim::key(k))
            .collect();
        let known = keys.is_some_and(|keys| !keys.is_empty());
        // A token beyond the column's range was never granted.
        if let (Ok(token), Some(given), true) = (i64::try_from(token), keys, known) {
            let given_json = keys_json(given);
            let alone = self.write_alone(
                &claims,
                "runledger_release_alone",
                &[
                    Lit::Int(id),
                    Lit::Int(token),
                    Lit::Now,
                    Lit::Text(&given_json),
                ],
                |row| Ok(row.get(0).map(|_| ())),
                // Gone, and not taken away: released by this batch. Taken
                // away (by a reaper, by force) before it: sent again, the
                // release finds it gone, as its guard does.
                |tx| {
                    let gone = tx
                        .query_one(
                            "SELECT NOT EXISTS (SELECT 1 FROM locks WHERE id = $1 AND token = $2)
                                AND NOT EXISTS (SELECT 1 FROM lock_events WHERE lock_id = $1)",
                            &[&id, &token],
                        )?
                        .try_get::<_, bool>(0)?;
                    Ok(gone.then_some(()))
                },
                // The guard stays held, and its drop hands the lock to the
                // ledger's orphans, released on a later lock call.
                || {},
            )?;
            if alone.is_some() {
                on_commit();
                return Ok(Some(Vec::new()));
            }
        }
        self.write_then(
            &claims,
            keys.is_none(),
            |tx| {
                let Ok(token) = i64::try_from(token) else {
                    return Ok(None);
                };
                let now = tx.now();
                if !known {
                    let Some(row) = tx.query_opt(
                        "SELECT keys FROM locks WHERE id = $1 AND token = $2",
                        &[&id, &token],
                    )?
                    else {
                        return Ok(None);
                    };
                    claim_keys(tx, &parse_keys(row.try_get(0)?)?)?;
                }
                match delete_lock(tx, id, Some(token), now, Ending::Released)? {
                    Some(keys) => {
                        // The row's keys are the ones given (a guard's): a
                        // claim of each is held already, and this costs
                        // nothing. Were they not, it claims them, or runs
                        // the write again with them taken first.
                        claim_keys(tx, &keys)?;
                        Ok(Some(grant_waiters(tx, &keys, now)?))
                    }
                    None => Ok(None),
                }
            },
            on_commit,
        )
    }

    /// Whether the lock `id` was taken away from its holder (reclaimed or
    /// released by force) rather than released.
    pub(crate) fn was_taken_away(&self, id: i64) -> Result<bool> {
        self.read(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT 1 FROM lock_events WHERE lock_id = $1 LIMIT 1",
                    &[&id],
                )?
                .is_some())
        })
    }

    /// Releases the locks that grants of one round trip may have left
    /// with no guard: those whose reply was lost and whose outcome could
    /// not be settled then (see [`Store::write_alone`]). Each is looked up
    /// by its number in a transaction that takes the grant's claims
    /// first, as the settle of `write_alone` does: it waits for the lost
    /// transaction, if the server still has it, to end. Found, the lock
    /// is released, its keys handed on, as its guard's release would; not
    /// found, the grant never committed and left nothing. Called before
    /// each lock call and with each heartbeat, whose callers are not
    /// bothered with it; at the first failure (the server still out of
    /// reach) the rest wait for the next call, so that a call pays for at
    /// most one. Until then, the lock stays held by this process, as a
    /// lock of a guard not dropped yet would.
    pub(super) fn settle_unknown_grants(&self) {
        if self.unknown_grants.lock().is_empty() {
            return;
        }
        let mut unknown = std::mem::take(&mut *self.unknown_grants.lock()).into_iter();
        for grant in unknown.by_ref() {
            let released = self
                .write(&grant.claims, |tx| {
                    grant_numbered(tx, grant.instance, grant.nonce)
                })
                .and_then(|row| match row {
                    Some((id, token)) => self
                        .release_lock(id, token, None, || {})
                        .map(|wakes| crate::wake::wake(&wakes.unwrap_or_default())),
                    None => Ok(()),
                });
            if let Err(e) = released {
                log::debug!("runledger: a grant whose reply was lost is not settled yet: {e}");
                let mut left = self.unknown_grants.lock();
                left.push(grant);
                left.extend(unknown);
                return;
            }
        }
    }

    /// Whether the grant `id` with `token` is still held.
    pub(crate) fn lock_is_held(&self, id: i64, token: u64) -> Result<bool> {
        // A token beyond the column's range was never granted.
        let Ok(token) = i64::try_from(token) else {
            return Ok(false);
        };
        self.read(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT 1 FROM locks WHERE id = $1 AND token = $2 AND state = 'held'",
                    &[&id, &token],
                )?
                .is_some())
        })
    }

    /// Releases by force every holder of `key`; returns how many and the
    /// waiters to wake.
    pub(crate) fn force_unlock(&self, key: &str, reason: &str, by: &ProcessIdentity) -> Forced {
        self.write_later(&[Claim::key(key)], |tx| {
            let now = tx.now();
            let holders = shared::holders_of(tx, key)?;
            // The holders' runs record it (a class below keys: taken first
            // when the write runs again), and every key of each holder is
            // handed on.
            let runs: Vec<Claim> = holders
                .iter()
                .filter_map(|h| h.run.as_ref().map(|(run, _)| Claim::run(*run, false)))
                .collect();
            tx.claim(&runs, true)?;
            let keys: Vec<String> = holders.iter().flat_map(|h| h.keys.clone()).collect();
            claim_keys(tx, &keys)?;
            shared::force_release(tx, &holders, now, reason, by)
        })
    }

    /// The lock events of `key` (of every key when `None`), newest first.
    pub(crate) fn lock_history(&self, key: Option<&str>, limit: usize) -> Result<Vec<EventRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|tx| {
            let rows = match key {
                Some(key) => tx.query(
                    "SELECT e.id, e.run_id, e.at, e.kind, e.step, e.from_status, e.to_status,
                            e.message
                     FROM lock_history h JOIN events e ON e.id = h.event_id
                     WHERE h.key = $1 ORDER BY h.event_id DESC LIMIT $2",
                    &[&key, &limit],
                )?,
                None => tx.query(
                    "SELECT e.id, e.run_id, e.at, e.kind, e.step, e.from_status, e.to_status,
                            e.message
                     FROM events e
                     WHERE e.id IN (SELECT DISTINCT event_id FROM lock_history
                                    ORDER BY event_id DESC LIMIT $1)
                     ORDER BY e.id DESC",
                    &[&limit],
                )?,
            };
            rows.iter().map(super::runs::event_record).collect()
        })
    }

    /// One transaction of retention for lock events, as on SQLite.
    pub(crate) fn prune_lock_events(
        &self,
        cutoff: Timestamp,
        batch: usize,
    ) -> Result<(usize, bool)> {
        // Lock events of the past, which no writer changes: no claim.
        self.write(&[], |tx| {
            let limit = i64::try_from(batch).unwrap_or(i64::MAX);
            let rows = tx.query(
                "SELECT e.id, e.at < $1 AND e.id < (SELECT max(id) FROM events)
                 FROM (SELECT DISTINCT event_id FROM lock_history ORDER BY event_id LIMIT $2) h
                 JOIN events e ON e.id = h.event_id
                 ORDER BY e.id",
                &[&cutoff.as_millis(), &limit],
            )?;
            let mut old = Vec::with_capacity(rows.len());
            let mut more = rows.len() == batch;
            for row in &rows {
                if !row.try_get::<_, bool>(1)? {
                    more = false;
                    break;
                }
                old.push(row.try_get::<_, i64>(0)?);
            }
            tx.execute(
                "WITH gone AS (DELETE FROM events WHERE id = ANY($1))
                 DELETE FROM lock_history WHERE event_id = ANY($1)",
                &[&old],
            )?;
            Ok((old.len(), more))
        })
    }

    /// Every lock request, held or waiting, one record per key, by key then
    /// ticket. Keys are ordered byte by byte (`COLLATE "C"`), as SQLite
    /// orders them and as lock keys are sorted everywhere else, whatever
    /// the database's collation.
    pub(crate) fn locks(&self) -> Result<Vec<LockRecord>> {
        self.read(|tx| {
            tx.query(
                "SELECT e.key, l.mode, l.capacity, l.state, l.token, l.id, l.keys, l.run_id,
                        r.name, l.instance_id, l.pid, l.host, l.requested_at, l.granted_at
                 FROM lock_entries e
                 JOIN locks l ON l.id = e.lock_id
                 LEFT JOIN runs r ON r.id = l.run_id
                 ORDER BY e.key COLLATE \"C\", e.lock_id",
                &[],
            )?
            .iter()
            .map(lock_record)
            .collect()
        })
    }
}

fn lock_record(row: &Row) -> Result<LockRecord> {
    Ok(LockRecord {
        key: row.try_get(0)?,
        mode: mode_of(row.try_get(1)?, row.try_get(2)?)?,
        state: state_of(row.try_get(3)?),
        token: row
            .try_get::<_, Option<i64>>(4)?
            .map(token_of)
            .transpose()?,
        ticket: Ticket::from(row.try_get::<_, i64>(5)?),
        keys: parse_keys(row.try_get(6)?)?,
        run: row.try_get::<_, Option<i64>>(7)?.map(RunId::from),
        run_name: row.try_get(8)?,
        instance: InstanceId::from(row.try_get::<_, i64>(9)?),
        pid: pid_of(row.try_get(10)?)?,
        host: row.try_get(11)?,
        requested_at: Timestamp::from_millis(row.try_get(12)?),
        granted_at: row
            .try_get::<_, Option<i64>>(13)?
            .map(Timestamp::from_millis),
    })
}

/// The common table expressions of a grant, after those that take its
/// token (`next`): the lock row, its key entries, its event in the feed
/// and in each key's history; then its id and token. `$from` is the
/// `FROM` (and `WHERE`) of the row's insert. Parameters: `$1` the keys,
/// `$2` the mode, `$3` the capacity, `$4` the keys as JSON, `$5` the
/// instance, `$6` the run, `$7` the pid, `$8` the host, `$9` the time,
/// `$10` the event's run id, `$11` its kind, `$12` its detail (ticket and
/// token set by the statement). Each with its type. (The grant of one
/// round trip, `runledger_grant_alone`, makes the same writes.)
macro_rules! grant_rows {
    ($from:literal) => {
        concat!(
            ", l AS (
                 INSERT INTO locks (state, mode, capacity, token, keys, instance_id, run_id,
                                    pid, host, wake, requested_at, granted_at)
                 SELECT 'held', $2::text, $3::bigint, next.token, $4::text, $5::bigint,
                        $6::bigint, $7::bigint, $8::text, NULL, $9::bigint, $9::bigint ",
            $from,
            "
                 RETURNING id, token
             ), entries AS (
                 INSERT INTO lock_entries (key, lock_id) SELECT unnest($1::text[]), l.id FROM l
             ), ev AS (
                 INSERT INTO events (run_id, at, kind, step, message)
                 SELECT $10::bigint, $9::bigint, $11::text,
                        jsonb_set(jsonb_set($12::text::jsonb, '{ticket}', to_jsonb(l.id)),
                                  '{token}', to_jsonb(l.token))::text,
                        NULL
                 FROM l
                 RETURNING id
             ), history AS (
                 INSERT INTO lock_history (key, event_id)
                 SELECT DISTINCT unnest($1::text[]), ev.id FROM ev
             )
             SELECT id, token FROM l"
        )
    };
}

/// Grants `ask`, which has no place in the queue, with every key free for
/// it: its next token, its row and key entries, and its event in the feed
/// and in each key's history, in one statement (one round trip). The same
/// writes as [`next_token`], [`insert_lock`] and [`lock_event`] one after
/// the other; the event's ticket and token, known only once the row is
/// in, are set in its detail by the statement.
fn grant_new(tx: &mut Tx<'_>, ask: &LockAsk<'_>, now: Timestamp) -> Result<(i64, u64)> {
    let at = now.as_millis();
    let capacity = ask.mode.capacity().map(i64::from);
    let run = ask.run.map(i64::from);
    let pid = i64::from(ask.pid);
    let detail = grant_detail(ask);
    let row = tx.query_one(
        concat!(next_token!(), grant_rows!("FROM next")),
        &[
            &ask.keys,
            &ask.mode.as_str(),
            &capacity,
            &keys_json(ask.keys),
            &ask.instance,
            &run,
            &pid,
            &ask.host,
            &at,
            &event_run_id(ask.run),
            &LOCK_GRANTED,
            &detail,
        ],
    )?;
    tx.events_written();
    Ok((row.try_get(0)?, token_of(row.try_get(1)?)?))
}

/// The detail of the event of a grant of `ask`, its ticket and token to be
/// set by the statement that grants it ([`grant_rows`]).
fn grant_detail(ask: &LockAsk<'_>) -> String {
    lock_event_json(&LockEvent {
        ticket: Ticket::from(0),
        keys: ask.keys.to_vec(),
        mode: ask.mode,
        token: 0,
        pid: ask.pid,
        host: ask.host.to_owned(),
    })
}

/// The values of `runledger_grant_alone` for `ask` after its claims and
/// lock timeout (see [`Store::write_alone`]): stamped when it is sent, its row numbered
/// `nonce`, its event's `detail`, its `keys` as JSON, the `active`
/// statuses of a run.
///
/// Its time ([`Lit::Now`]) is read as the call is sent (after its
/// statement's preparation), before the claims are held, unlike
/// [`Tx::now`]; so that a grant is never stamped before the release that
/// freed its key, the function only tries its claims and grants only if
/// they came at once (within a millisecond of the call's arrival): a
/// request whose keys another writer holds is decided by the statements,
/// at their time. What is left is the trip of the call to the server,
/// during which another writer of the key may commit a stamp a round trip
/// later: times of one key agree with its commits to within a round trip,
/// as they do when several hosts' clocks follow the server's. The release
/// (`runledger_release_alone`) is held to the same millisecond.
fn grant_alone<'a>(
    ask: &'a LockAsk<'a>,
    nonce: i64,
    detail: &'a str,
    keys: &'a str,
    active: &'a [String],
) -> [Lit<'a>; 14] {
    [
        Lit::Texts(ask.keys),
        Lit::Text(ask.mode.as_str()),
        ask.mode.capacity().map(i64::from).into(),
        Lit::Text(keys),
        Lit::Int(ask.instance),
        ask.run.map(i64::from).into(),
        Lit::Int(i64::from(ask.pid)),
        Lit::Text(ask.host),
        Lit::Now,
        Lit::Int(event_run_id(ask.run)),
        Lit::Text(LOCK_GRANTED),
        Lit::Text(detail),
        Lit::Texts(active),
        Lit::Int(nonce),
    ]
}

/// An integer column of a row read as text (a simple query's).
pub(super) fn text_i64(value: Option<&str>) -> Result<i64> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| crate::store::bad_data(format!("not an integer: {value:?}")))
}

fn insert_lock(
    tx: &mut Tx<'_>,
    ask: &LockAsk<'_>,
    state: &str,
    token: Option<i64>,
    now: Timestamp,
) -> Result<i64> {
    let at = now.as_millis();
    let granted_at = token.map(|_| at);
    let capacity = ask.mode.capacity().map(i64::from);
    let keys = keys_json(ask.keys);
    let run = ask.run.map(i64::from);
    let pid = i64::from(ask.pid);
    let wake = if state == "waiting" { ask.wake } else { None };
    // The row and its entries, in one statement.
    let id: i64 = tx
        .query_one(
            "WITH l AS (
                 INSERT INTO locks (state, mode, capacity, token, keys, instance_id, run_id,
                                    pid, host, wake, requested_at, granted_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 RETURNING id
             ), e AS (
                 INSERT INTO lock_entries (key, lock_id)
                 SELECT unnest($13::text[]), l.id FROM l
             )
             SELECT id FROM l",
            &[
                &state,
                &ask.mode.as_str(),
                &capacity,
                &token,
                &keys,
                &ask.instance,
                &run,
                &pid,
                &ask.host,
                &wake,
                &at,
                &granted_at,
                &ask.keys,
            ],
        )?
        .try_get(0)?;
    Ok(id)
}

/// Records that a held lock was taken away, so that its guard reports
/// [`Error::LockLost`](crate::Error::LockLost).
pub(super) fn record_taken(tx: &mut Tx<'_>, now: Timestamp, taken: &TakenLock<'_>) -> Result<()> {
    let at = now.as_millis();
    let keys = keys_json(taken.keys);
    let run = taken.run.map(i64::from);
    let holder_pid = i64::from(taken.pid);
    let by_pid = i64::from(taken.by.pid);
    tx.execute(
        "INSERT INTO lock_events (at, kind, lock_id, keys, token, run_id, holder_pid,
                                  holder_host, reason, by_pid, by_host)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &at,
            &taken.kind,
            &taken.id,
            &keys,
            &taken.token,
            &run,
            &holder_pid,
            &taken.host,
            &taken.reason,
            &by_pid,
            &taken.by.host,
        ],
    )?;
    Ok(())
}
