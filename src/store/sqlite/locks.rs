//! SQL for locks: grants, the queue, releases, reclaims.

use rusqlite::{Connection, OptionalExtension, params};

use super::Store;
use super::runs::run_head;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::liveness::{InstanceId, InstanceRecord, ProcessIdentity};
use crate::lock::{LockMode, LockRecord, Ticket};
use crate::record::{EventRecord, LockEvent};
use crate::run::RunId;
use crate::store::rules::{LockReads, blockers};
use crate::store::shared::{self, DeletedRow, Forced, Holder, LockNote, LockRows, Waiter};
use crate::store::{
    Ahead, Attempt, LOCK_GRANTED, LockAsk, TakenLock, Wakes, event_run_id, keys_from_json,
    keys_json, lease_of, lock_event_json, state_of,
};

pub(super) fn parse_keys(text: &str) -> rusqlite::Result<Vec<String>> {
    keys_from_json(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn mode_of(mode: &str, capacity: Option<u32>) -> rusqlite::Result<LockMode> {
    LockMode::from_parts(mode, capacity).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown lock mode {mode:?}").into(),
        )
    })
}

/// The requests ahead of `ticket` on `key`: every holder, and the waiters
/// with a lower ticket (all waiters, for a request without a ticket).
fn ahead_on(tx: &Connection, key: &str, ticket: Option<i64>) -> Result<Vec<Ahead>> {
    let rows = tx
        .prepare_cached(
            "SELECT l.id, l.state, l.mode, l.capacity, l.token, l.run_id, r.name,
                    l.instance_id, coalesce(i.host, l.host), i.boot_id, l.pid, i.start_time,
                    i.id IS NULL OR i.closed_at IS NOT NULL,
                    coalesce(l.granted_at, l.requested_at), i.pid_ns, l.keys,
                    i.lock_file, coalesce(i.heartbeat_at, 0), i.stale_after
             FROM lock_entries e
             JOIN locks l ON l.id = e.lock_id
             LEFT JOIN instances i ON i.id = l.instance_id
             LEFT JOIN runs r ON r.id = l.run_id
             WHERE e.key = ?1 AND e.lock_id <> ?2 AND (l.state = 'held' OR e.lock_id < ?2)
             ORDER BY e.lock_id",
        )?
        .query_map(params![key, ticket.unwrap_or(i64::MAX)], |row| {
            let run: Option<RunId> = row.get(5)?;
            let name: Option<String> = row.get(6)?;
            Ok(Ahead {
                lock_id: row.get(0)?,
                key: key.to_owned(),
                keys: parse_keys(&row.get::<_, String>(15)?)?,
                state: state_of(&row.get::<_, String>(1)?),
                mode: mode_of(&row.get::<_, String>(2)?, row.get(3)?)?,
                token: row.get(4)?,
                run: run.map(|id| (id, name.unwrap_or_default())),
                instance: row.get(7)?,
                owner: InstanceRecord {
                    id: row.get(7)?,
                    lock_file: row.get(16)?,
                    heartbeat_at: row.get(17)?,
                    host: row.get(8)?,
                    boot_id: row.get(9)?,
                    pid: row.get(10)?,
                    pid_ns: row.get(14)?,
                    start_time: row.get::<_, Option<i64>>(11)?.map(|t| t as u64),
                    closed: row.get(12)?,
                    closed_reason: None,
                    lease: lease_of(row.get(18)?),
                },
                since: row.get(13)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// The waiting requests on `key`, in ticket order.
fn waiters_on(tx: &Connection, key: &str) -> Result<Vec<Waiter>> {
    let waiters = tx
        .prepare_cached(
            "SELECT l.id, l.mode, l.capacity, l.keys, l.wake, l.run_id, l.pid, l.host
             FROM lock_entries e JOIN locks l ON l.id = e.lock_id
             WHERE e.key = ?1 AND l.state = 'waiting'
             ORDER BY e.lock_id",
        )?
        .query_map([key], |row| {
            Ok(Waiter {
                id: row.get(0)?,
                mode: mode_of(&row.get::<_, String>(1)?, row.get(2)?)?,
                keys: parse_keys(&row.get::<_, String>(3)?)?,
                wake: row.get(4)?,
                run: row.get(5)?,
                pid: row.get(6)?,
                host: row.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(waiters)
}

/// Takes the next fencing token for a grant of `keys`: above the last token
/// of every one of them, recorded on each.
fn next_token(tx: &Connection, keys: &[String]) -> Result<i64> {
    let mut last = 0i64;
    let mut read = tx.prepare_cached("SELECT last_token FROM lock_keys WHERE key = ?1")?;
    for key in keys {
        let token: Option<i64> = read.query_row([key], |row| row.get(0)).optional()?;
        last = last.max(token.unwrap_or(0));
    }
    let token = last
        .checked_add(1)
        .ok_or_else(|| crate::store::bad_data(format!("fencing token {last} has no successor")))?;
    let mut write = tx.prepare_cached(
        "INSERT INTO lock_keys (key, last_token) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET last_token = excluded.last_token",
    )?;
    for key in keys {
        write.execute(params![key, token])?;
    }
    Ok(token)
}

/// The row and entries that [`LockRows::delete_row`] deletes.
fn delete_row(tx: &Connection, id: i64, token: Option<i64>) -> DeletedRow {
    let row = tx
        .prepare_cached(
            "DELETE FROM locks WHERE id = ?1 AND token IS ?2
             RETURNING keys, mode, capacity, run_id, pid, host",
        )?
        .query_row(params![id, token], |row| {
            Ok((
                parse_keys(&row.get::<_, String>(0)?)?,
                Holder {
                    mode: mode_of(&row.get::<_, String>(1)?, row.get(2)?)?,
                    run: row.get(3)?,
                    pid: row.get(4)?,
                    host: row.get(5)?,
                },
            ))
        })
        .optional()?;
    let Some((keys, holder)) = row else {
        return Ok(None);
    };
    let mut entry =
        tx.prepare_cached("DELETE FROM lock_entries WHERE key = ?1 AND lock_id = ?2")?;
    for key in &keys {
        entry.execute(params![key, id])?;
    }
    Ok(Some((keys, token.map(|_| holder))))
}

/// Appends a lock event to the feed (in no run's chain: see the schema)
/// and to the history of each of its keys.
/// One key's lock events, newest first: a range of `lock_history`'s key.
const KEY_HISTORY: &str = "
    SELECT e.id, e.run_id, e.at, e.kind, e.step, e.from_status, e.to_status, e.message
    FROM lock_history h JOIN events e ON e.id = h.event_id
    WHERE h.key = ?1 ORDER BY h.event_id DESC LIMIT ?2";

/// Every key's lock events, newest first: the end of `lock_history_by_event`.
const ALL_KEYS_HISTORY: &str = "
    SELECT e.id, e.run_id, e.at, e.kind, e.step, e.from_status, e.to_status, e.message
    FROM events e
    WHERE e.id IN (SELECT DISTINCT event_id FROM lock_history ORDER BY event_id DESC LIMIT ?1)
    ORDER BY e.id DESC";

fn lock_event(tx: &Connection, now: Timestamp, note: &LockNote<'_>) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO events (run_id, at, kind, step, message) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        event_run_id(note.run),
        now,
        note.kind,
        lock_event_json(note.lock),
        note.message
    ])?;
    let event = tx.last_insert_rowid();
    let mut history =
        tx.prepare_cached("INSERT INTO lock_history (key, event_id) VALUES (?1, ?2)")?;
    for key in &note.lock.keys {
        history.execute(params![key, event])?;
    }
    super::EVENTS_WRITTEN.with(|w| w.set(true));
    Ok(())
}

/// Releases every lock (held or queued) of a run that is ending, in its
/// transaction (see [`shared::release_run_locks`]).
pub(super) fn release_run_locks(tx: &Connection, run: RunId, now: Timestamp) -> Result<Wakes> {
    shared::release_run_locks(&mut Reads(tx), run, now)
}

/// The lock rules' reads, and the shared lock logic's statements, on a
/// connection of this store.
pub(super) struct Reads<'c>(pub(super) &'c Connection);

impl LockReads for Reads<'_> {
    fn ahead_on(&mut self, key: &str, ticket: Option<i64>) -> Result<Vec<Ahead>> {
        ahead_on(self.0, key, ticket)
    }
}

impl LockRows for Reads<'_> {
    fn waiters_on(&mut self, key: &str) -> Result<Vec<Waiter>> {
        waiters_on(self.0, key)
    }

    /// The single writer may grant any waiter.
    fn may_grant(&mut self, _keys: &[String]) -> Result<bool> {
        Ok(true)
    }

    fn next_token(&mut self, keys: &[String]) -> Result<i64> {
        next_token(self.0, keys)
    }

    fn set_held(&mut self, id: i64, token: i64, now: Timestamp) -> Result<()> {
        set_held(self.0, id, token, now)
    }

    fn delete_row(&mut self, id: i64, token: Option<i64>) -> DeletedRow {
        delete_row(self.0, id, token)
    }

    fn lock_event(&mut self, now: Timestamp, note: &LockNote<'_>) -> Result<()> {
        lock_event(self.0, now, note)
    }

    fn record_taken(&mut self, now: Timestamp, taken: &TakenLock<'_>) -> Result<()> {
        record_taken(self.0, now, taken)
    }

    fn forced_event(&mut self, run: RunId, now: Timestamp, keys: &str, why: &str) -> Result<()> {
        super::runs::append_event(self.0, run, now, "lock_forced", Some(keys), Some(why))
    }

    fn run_locks(&mut self, run: RunId) -> Result<Vec<(i64, Option<i64>)>> {
        Ok(self
            .0
            .prepare_cached("SELECT id, token FROM locks WHERE run_id = ?1")?
            .query_map([run], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Wake-ups go out from [`Store`](crate::store::Store) once committed.
    fn granted(&mut self, _wakes: &Wakes) {}
}

/// Marks the waiting request `id` held with `token`.
fn set_held(tx: &Connection, id: i64, token: i64, now: Timestamp) -> Result<()> {
    tx.prepare_cached(
        "UPDATE locks SET state = 'held', token = ?2, granted_at = ?3, wake = NULL
         WHERE id = ?1 AND state = 'waiting'",
    )?
    .execute(params![id, token, now])?;
    Ok(())
}

impl Store {
    /// One attempt at granting `ask` (already queued as `ticket`, if given),
    /// in one immediate transaction. A blocked request that may wait takes a
    /// place in the queue in the same transaction.
    ///
    /// Its blocked branch reads like PostgreSQL's `try_lock_in`, but the two
    /// attempts are not one sequence of statements: that one comes after
    /// the one-call grant of free keys (`runledger_grant_alone`) for a
    /// request without a ticket, reads the instance and the run in one statement,
    /// and runs under the claims of the keys.
    pub(crate) fn try_lock(&self, ask: &LockAsk<'_>, ticket: Option<i64>) -> Result<Attempt> {
        self.write(|tx, now| {
            if !super::instances::is_open(tx, ask.instance)? {
                return Ok(Attempt::InstanceClosed);
            }
            if let Some(run) = ask.run {
                let (status, _) = run_head(tx, run)?;
                if status.is_terminal() {
                    return Err(Error::RunFinished { run, status });
                }
            }
            // A queued request may have been granted by a releaser meanwhile;
            // a queue place that vanished (its run ended) is taken anew.
            let ticket = match ticket {
                Some(t) => {
                    let row: Option<(String, Option<i64>)> = tx
                        .prepare_cached("SELECT state, token FROM locks WHERE id = ?1")?
                        .query_row([t], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()?;
                    match row {
                        Some((state, Some(token))) if state == "held" => {
                            return Ok(Attempt::Granted {
                                id: t,
                                token: token as u64,
                            });
                        }
                        Some(_) => Some(t),
                        None => None,
                    }
                }
                None => None,
            };
            let blocked = blockers(&mut Reads(tx), ask, ticket)?;
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
            let token = next_token(tx, ask.keys)?;
            let id = match ticket {
                Some(t) => {
                    set_held(tx, t, token, now)?;
                    t
                }
                None => insert_lock(tx, ask, "held", Some(token), now)?,
            };
            let lock = LockEvent {
                ticket: Ticket::from(id),
                keys: ask.keys.to_vec(),
                mode: ask.mode,
                token: token as u64,
                pid: ask.pid,
                host: ask.host.to_owned(),
            };
            let note = LockNote {
                kind: LOCK_GRANTED,
                lock: &lock,
                run: ask.run,
                message: None,
            };
            lock_event(tx, now, &note)?;
            Ok(Attempt::Granted {
                id,
                token: token as u64,
            })
        })
    }

    /// What keeps `ask` out right now, read without the write lock: empty if
    /// it looks grantable. Only a hint for how to wait (the grant
    /// transaction decides); a request that has no place in the queue.
    pub(crate) fn lock_blockers(&self, ask: &LockAsk<'_>) -> Result<Vec<Ahead>> {
        self.read(|conn| blockers(&mut Reads(conn), ask, None))
    }

    /// The token of a queued request that a releaser has granted meanwhile:
    /// a read, so a woken waiter does not compete for the write lock.
    pub(crate) fn granted_token(&self, ticket: i64) -> Result<Option<u64>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT token FROM locks WHERE id = ?1 AND state = 'held'")?
                .query_row([ticket], |row| row.get::<_, i64>(0))
                .optional()?
                .map(|t| t as u64))
        })
    }

    /// Leaves the queue: deletes a request that gave up (timed out, failed),
    /// whether still waiting or granted by a releaser after it stopped
    /// looking; hands its keys on.
    pub(crate) fn leave_queue(&self, ticket: i64) -> Result<Wakes> {
        self.write(|tx, now| {
            let token: Option<Option<i64>> = tx
                .prepare_cached("SELECT token FROM locks WHERE id = ?1")?
                .query_row([ticket], |row| row.get(0))
                .optional()?;
            let Some(token) = token else {
                return Ok(Vec::new());
            };
            Ok(shared::release(&mut Reads(tx), ticket, token, now)?.unwrap_or_default())
        })
    }

    /// Releases a held lock. `None` if it was no longer held (taken away, or
    /// released with its run); otherwise the waiters to wake. `on_commit`
    /// runs as soon as the release has committed.
    pub(crate) fn release_lock(
        &self,
        id: i64,
        token: u64,
        on_commit: impl FnOnce(),
    ) -> Result<Option<Wakes>> {
        self.write_then(
            |tx, now| shared::release(&mut Reads(tx), id, Some(token as i64), now),
            on_commit,
        )
    }

    /// Whether the lock `id` was taken away from its holder (reclaimed or
    /// released by force) rather than released.
    pub(crate) fn was_taken_away(&self, id: i64) -> Result<bool> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM lock_events WHERE lock_id = ?1")?
                .query_row([id], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    /// Whether the grant `id` with `token` is still held.
    pub(crate) fn lock_is_held(&self, id: i64, token: u64) -> Result<bool> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT 1 FROM locks WHERE id = ?1 AND token = ?2 AND state = 'held'",
                )?
                .query_row(params![id, token as i64], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    /// Releases by force every holder of `key`; returns how many and the
    /// waiters to wake.
    pub(crate) fn force_unlock(&self, key: &str, reason: &str, by: &ProcessIdentity) -> Forced {
        self.write(|tx, now| {
            let rows = &mut Reads(tx);
            let holders = shared::holders_of(rows, key)?;
            shared::force_release(rows, &holders, now, reason, by)
        })
    }

    /// The lock events of `key` (of every key when `None`), newest first.
    pub(crate) fn lock_history(&self, key: Option<&str>, limit: usize) -> Result<Vec<EventRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let events = match key {
                Some(key) => conn
                    .prepare_cached(KEY_HISTORY)?
                    .query_map(params![key, limit], super::runs::event_record)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
                None => conn
                    .prepare_cached(ALL_KEYS_HISTORY)?
                    .query_map([limit], super::runs::event_record)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            };
            Ok(events)
        })
    }

    /// One transaction of retention for lock events: deletes the oldest of
    /// them, up to `batch`, that happened before `cutoff`, with their
    /// history rows. Returns how many, and whether more may qualify. The
    /// newest event of the feed is kept, so that its id is never handed out
    /// again.
    pub(crate) fn prune_lock_events(
        &self,
        cutoff: Timestamp,
        batch: usize,
    ) -> Result<(usize, bool)> {
        self.write(|tx, _| {
            let oldest = tx
                .prepare_cached(
                    "SELECT e.id, e.at < ?1 AND e.id < (SELECT max(id) FROM events)
                     FROM (SELECT DISTINCT event_id FROM lock_history ORDER BY event_id LIMIT ?2) h
                     JOIN events e ON e.id = h.event_id
                     ORDER BY e.id",
                )?
                .query_map(
                    params![cutoff, i64::try_from(batch).unwrap_or(i64::MAX)],
                    |row| Ok((row.get::<_, i64>(0)?, row.get::<_, bool>(1)?)),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut event = tx.prepare_cached("DELETE FROM events WHERE id = ?1")?;
            let mut history = tx.prepare_cached("DELETE FROM lock_history WHERE event_id = ?1")?;
            let mut deleted = 0;
            for (id, old) in &oldest {
                if !old {
                    return Ok((deleted, false));
                }
                event.execute([id])?;
                history.execute([id])?;
                deleted += 1;
            }
            Ok((deleted, oldest.len() == batch))
        })
    }

    /// Every lock request, held or waiting, one record per key, by key then
    /// ticket.
    pub(crate) fn locks(&self) -> Result<Vec<LockRecord>> {
        self.read(|conn| {
            let records = conn
                .prepare_cached(
                    "SELECT e.key, l.mode, l.capacity, l.state, l.token, l.id, l.keys, l.run_id,
                            r.name, l.instance_id, l.pid, l.host, l.requested_at, l.granted_at
                     FROM lock_entries e
                     JOIN locks l ON l.id = e.lock_id
                     LEFT JOIN runs r ON r.id = l.run_id
                     ORDER BY e.key, e.lock_id",
                )?
                .query_map([], |row| {
                    Ok(LockRecord {
                        key: row.get(0)?,
                        mode: mode_of(&row.get::<_, String>(1)?, row.get(2)?)?,
                        state: state_of(&row.get::<_, String>(3)?),
                        token: row.get::<_, Option<i64>>(4)?.map(|t| t as u64),
                        ticket: Ticket::from(row.get::<_, i64>(5)?),
                        keys: parse_keys(&row.get::<_, String>(6)?)?,
                        run: row.get(7)?,
                        run_name: row.get(8)?,
                        instance: InstanceId::from(row.get::<_, i64>(9)?),
                        pid: row.get(10)?,
                        host: row.get(11)?,
                        requested_at: row.get(12)?,
                        granted_at: row.get(13)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(records)
        })
    }
}

fn insert_lock(
    tx: &Connection,
    ask: &LockAsk<'_>,
    state: &str,
    token: Option<i64>,
    now: Timestamp,
) -> Result<i64> {
    let granted_at = token.map(|_| now);
    tx.prepare_cached(
        "INSERT INTO locks (state, mode, capacity, token, keys, instance_id, run_id, pid, host,
                            wake, requested_at, granted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        state,
        ask.mode.as_str(),
        ask.mode.capacity(),
        token,
        keys_json(ask.keys),
        ask.instance,
        ask.run,
        ask.pid,
        ask.host,
        if state == "waiting" { ask.wake } else { None },
        now,
        granted_at,
    ])?;
    let id = tx.last_insert_rowid();
    let mut entry = tx.prepare_cached("INSERT INTO lock_entries (key, lock_id) VALUES (?1, ?2)")?;
    for key in ask.keys {
        entry.execute(params![key, id])?;
    }
    Ok(id)
}

/// Records that a held lock was taken away, so that its guard reports
/// [`Error::LockLost`](crate::Error::LockLost).
pub(super) fn record_taken(tx: &Connection, now: Timestamp, taken: &TakenLock<'_>) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO lock_events (at, kind, lock_id, keys, token, run_id, holder_pid, holder_host,
                                  reason, by_pid, by_host)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        now,
        taken.kind,
        taken.id,
        keys_json(taken.keys),
        taken.token,
        taken.run,
        taken.pid,
        taken.host,
        taken.reason,
        taken.by.pid,
        taken.by.host,
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        stmt.query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// A key's history, and every key's, are read from lock_history's
    /// indexes and the events' primary key: never a scan of the runs'
    /// history.
    #[test]
    fn lock_histories_read_indexes_not_the_history() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn, 0).unwrap();
        let key = plan(&conn, KEY_HISTORY, params!["k", 10]);
        assert!(key.contains("SEARCH h USING PRIMARY KEY (key=?)"), "{key}");
        assert!(key.contains("SEARCH e USING INTEGER PRIMARY KEY"), "{key}");
        let all = plan(&conn, ALL_KEYS_HISTORY, [10]);
        assert!(all.contains("lock_history_by_event"), "{all}");
        assert!(all.contains("SEARCH e USING INTEGER PRIMARY KEY"), "{all}");
        assert!(!all.contains("SCAN e"), "{all}");
    }
}
