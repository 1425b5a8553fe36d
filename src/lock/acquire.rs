//! Taking locks: one implementation of the rules for every caller.
//!
//! A request goes through the same steps whether a thread blocks on it or an
//! async task awaits it: the keys' gates (exclusive requests, SQLite only;
//! see `crate::gate`), a grant transaction that either grants, or queues
//! the request behind those in its way, the reaping of dead owners in the
//! way, the refusal of a request that could never be granted, and, between
//! attempts, a wait for the wake-up that a releaser sends after its commit.
//! [`Acquisition`] is those steps; [`Ledger::acquire_for`] and (with the
//! `tokio` feature) `Ledger::acquire_for_async` only differ in how they
//! wait between two of them.
//!
//! # Callers inside one process
//!
//! The database knows a lock's owner as an *instance*: one opened ledger in
//! one process, which is what liveness judges (a dead process loses all its
//! locks). Inside the instance, every grant also belongs to the *caller*
//! that asked for it: the thread, or the tokio task, that made the call.
//! Requests of one instance wait for each other's locks like requests of
//! different processes, in the same queue. Only the caller's own locks are
//! special:
//!
//! - a blocking request that the caller's own held locks alone keep out
//!   (re-entry: asking again for a key it holds exclusively) could never be
//!   granted, since the caller would wait for itself, so it fails at once
//!   with [`Error::Conflict`] and `self_conflict` set; an async one waits
//!   (up to its deadline), since another future of the same task may
//!   release the lock meanwhile;
//! - a waiter that the caller's own held locks keep out, directly or
//!   through waiters ahead of it that they keep out, does not hold the
//!   caller back (first come, first served would make each wait for the
//!   other).
//!
//! A guard counts as its acquirer's for its whole life, wherever it is
//! moved: a guard sent to another thread is still the acquiring thread's
//! for these two rules (its release, by anyone, frees it as usual).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::gate::Taken;
use crate::ledger::Ledger;
use crate::liveness::Verdict;
use crate::lock::{Holder, LockGuard, LockMode, LockRequest, LockState, Wait, compatible};
use crate::run::RunId;
use crate::store::{Ahead, Attempt, LockAsk};
use crate::wake::WakeSocket;

/// Without a wake-up socket (another platform) a waiter polls with a
/// backoff starting here; with one, releasers wake it and the timer is only
/// the fallback (a holder killed with SIGKILL wakes no one).
const FIRST_POLL: Duration = Duration::from_millis(1);

/// The longest a waiter goes without looking at its request again.
const MAX_POLL: Duration = Duration::from_millis(100);

/// Who, inside this process, asks for a lock: the tokio task the call is
/// made from (with the `tokio` feature, inside a task), else the thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Caller {
    Thread(std::thread::ThreadId),
    #[cfg(feature = "tokio")]
    Task(tokio::task::Id),
}

impl Caller {
    /// The caller running this code.
    pub(crate) fn current() -> Caller {
        #[cfg(feature = "tokio")]
        if let Some(task) = tokio::task::try_id() {
            return Caller::Task(task);
        }
        Caller::Thread(std::thread::current().id())
    }
}

/// The grants of one ledger instance that are held here, by the caller
/// each belongs to.
#[derive(Debug, Default)]
pub(crate) struct Callers(parking_lot::Mutex<HashMap<i64, Caller>>);

impl Callers {
    /// Lock `id` was granted to `caller`.
    pub(crate) fn hold(&self, id: i64, caller: Caller) {
        self.0.lock().insert(id, caller);
    }

    /// Lock `id` is no longer held here.
    pub(crate) fn forget(&self, id: i64) {
        self.0.lock().remove(&id);
    }

    /// The locks `caller` holds.
    fn held_by(&self, caller: Caller) -> Vec<i64> {
        self.0
            .lock()
            .iter()
            .filter(|(_, c)| **c == caller)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// What one step of an [`Acquisition`] came to.
pub(crate) enum Step {
    /// The request holds its keys.
    Granted(LockGuard),
    /// The request waits (queued, or polling): wait for a wake-up, at most
    /// this long, then step again.
    Nap(Duration),
}

/// One lock request on its way to a grant: its place in the queue, its
/// gates, its deadline. Dropped before the grant (an error, a timeout, a
/// panic, a future dropped while it waits), it leaves the queue and lets go
/// of its gates, so that nothing is left behind; a grant that raced with
/// the drop is released at once.
pub(crate) struct Acquisition<'l> {
    ledger: &'l Ledger,
    keys: Vec<String>,
    mode: LockMode,
    run: Option<RunId>,
    wait: Wait,
    caller: Caller,
    /// The locks the caller holds (it cannot take more while it waits).
    own: Vec<i64>,
    /// The wake-up address recorded on the request's queue row.
    wake: Option<String>,
    instance: i64,
    reregistered: bool,
    place: QueuePlace<'l>,
    started: Instant,
    /// Until then, a request kept out only by live holders whose gates it
    /// lacks waits on those gates, invisibly; after it, in the queue.
    gate_until: Instant,
    deadline: Option<Instant>,
    /// Whether the request still may wait at its keys' gates (blocking
    /// callers only: a gate is waited on by a thread).
    gate_phase: bool,
    /// Whether the caller blocks while it waits, so that a request its own
    /// locks keep out could never be granted.
    blocking: bool,
    poll: Duration,
    /// The last step was a nap: look whether a releaser granted the request
    /// meanwhile before asking again.
    napped: bool,
}

impl<'l> Acquisition<'l> {
    /// Starts `request` for `run` (if any). `wake` is the address a
    /// releaser wakes the caller through; `blocking` whether the caller
    /// blocks its thread while it waits (then it may wait at gates, and a
    /// request that only its own locks keep out is refused at once).
    pub(crate) fn new(
        ledger: &'l Ledger,
        request: LockRequest,
        run: Option<RunId>,
        wake: Option<&str>,
        blocking: bool,
    ) -> Result<Acquisition<'l>> {
        let keys = request.checked_keys()?;
        ledger.clean_orphans();
        let inner = &ledger.inner;
        let wait = request.wait.unwrap_or(Wait::For(inner.lock_wait));
        let caller = Caller::current();
        let started = Instant::now();
        let place = QueuePlace {
            ledger,
            ticket: None,
            // An exclusive request takes its keys' gates first, or learns
            // who holds them; shared and slots requests queue in the
            // database alone.
            gates: if request.mode == LockMode::Exclusive {
                inner.gates.try_take(&keys)
            } else {
                None
            },
        };
        Ok(Acquisition {
            ledger,
            mode: request.mode,
            run,
            wait,
            caller,
            own: inner.callers.held_by(caller),
            wake: wake.map(str::to_owned),
            instance: inner.instance(),
            reregistered: false,
            place,
            started,
            gate_until: started.checked_add(inner.queue_after).unwrap_or(started),
            deadline: match wait {
                Wait::For(limit) => started.checked_add(limit),
                Wait::No => Some(started),
                Wait::Forever => None,
            },
            gate_phase: blocking && wait != Wait::No,
            blocking,
            poll: if wake.is_some() { MAX_POLL } else { FIRST_POLL },
            napped: false,
            keys,
        })
    }

    /// Whether the request may wait at all (a `no_wait` one may not, and
    /// needs no wake-up address).
    pub(crate) fn waits(request: &LockRequest) -> bool {
        request.wait != Some(Wait::No)
    }

    /// Asks for the keys until the request is granted, refused, out of
    /// time, or has to wait for someone: then the caller naps as told and
    /// steps again.
    pub(crate) fn step(&mut self) -> Result<Step> {
        let ledger = self.ledger;
        let store = &ledger.inner.store;
        let identity = ledger.inner.identity();
        // A row this process failed to delete may be what it waits for.
        if self.napped {
            ledger.clean_orphans();
        }
        // Releasers hand keys to the head of the queue themselves: after a
        // nap, a read tells whether that happened, without the write lock.
        if std::mem::take(&mut self.napped)
            && let Some(ticket) = self.place.ticket
            && let Some(token) = store.granted_token(ticket)?
        {
            return Ok(Step::Granted(self.granted(ticket, token)));
        }
        loop {
            let mut ask = LockAsk {
                keys: &self.keys,
                mode: self.mode,
                run: self.run,
                instance: self.instance,
                own: &self.own,
                pid: identity.pid,
                host: &identity.host,
                queue: false,
                wake: self.wake.as_deref(),
            };
            if self.gate_phase
                && self.place.ticket.is_none()
                && let Some(gates) = self.place.gates.as_mut()
                && !gates.complete()
            {
                match wait_at_gates(ledger, &ask, gates, self.gate_until, self.deadline)? {
                    GateWait::Again => continue,
                    GateWait::Ask => {}
                    GateWait::Over => self.gate_phase = false,
                }
            }
            // A last attempt past the deadline takes no place in the queue.
            ask.queue = self.wait != Wait::No && self.deadline.is_none_or(|d| Instant::now() < d);
            let ahead = match store.try_lock(&ask, self.place.ticket)? {
                Attempt::Granted { id, token } => {
                    return Ok(Step::Granted(self.granted(id, token)));
                }
                Attempt::Blocked { ticket, ahead } => {
                    self.place.ticket = ticket;
                    ahead
                }
                Attempt::InstanceClosed => {
                    // Reaped (judged by its lease while silent): its queue
                    // place went with it. Register again and ask anew.
                    if self.reregistered {
                        return Err(crate::ledger::closed_twice(store.path()));
                    }
                    ledger.register_again()?;
                    self.reregistered = true;
                    self.instance = ledger.inner.instance();
                    self.place.ticket = None;
                    continue;
                }
            };
            if reap_dead_in_the_way(ledger, &ahead, self.mode)? {
                continue;
            }
            let me = ledger.inner.instance();
            let now = ledger.now();
            let holders: Vec<Holder> = ahead
                .iter()
                .map(|a| Holder {
                    key: a.key.clone(),
                    mode: a.mode,
                    state: a.state,
                    run: a.run.clone(),
                    pid: a.owner.pid,
                    host: a.owner.host.clone(),
                    held_for: now.saturating_duration_since(a.since),
                    is_self: a.instance == me,
                    by_caller: a.state == LockState::Held && self.own.contains(&a.lock_id),
                })
                .collect();
            // An async request waits instead: another future of its task
            // (`join!`, `select!`) may release the lock meanwhile.
            let self_conflict = self.blocking && kept_out_by_own(&ahead, &self.own, self.mode);
            if self.wait == Wait::No || self_conflict {
                return Err(Error::Conflict {
                    keys: self.keys.clone(),
                    holders,
                    self_conflict,
                });
            }
            let waited = self.started.elapsed();
            let remaining = match self.wait {
                Wait::For(limit) => limit.saturating_sub(waited),
                _ => Duration::MAX,
            };
            if remaining.is_zero() {
                return Err(Error::Timeout {
                    keys: self.keys.clone(),
                    waited,
                    holders,
                });
            }
            let nap = self.poll.min(remaining);
            self.poll = (self.poll * 2).min(MAX_POLL);
            self.napped = true;
            return Ok(Step::Nap(nap));
        }
    }

    /// The request was granted as lock `id`: the queue place is kept (it
    /// is now the lock's row) and handed to a guard.
    fn granted(&mut self, id: i64, token: u64) -> LockGuard {
        self.place.ticket = None;
        // A holder granted without some of its gates (handed the lock from
        // the queue, or found it free while its last holder was letting go)
        // takes those that are free now, so that the next requests wait at
        // the gate rather than in the queue.
        let gates = self
            .place
            .gates
            .take()
            .map(|mut gates| {
                gates.retry();
                gates.into_held()
            })
            .unwrap_or_default();
        self.ledger.inner.callers.hold(id, self.caller);
        LockGuard {
            ledger: self.ledger.clone(),
            id,
            keys: std::mem::take(&mut self.keys),
            mode: self.mode,
            token,
            run: self.run,
            held: true,
            gates,
        }
    }
}

impl Ledger {
    /// Takes the locks of `request` (for `run`), blocking the calling
    /// thread while it waits.
    pub(crate) fn acquire_for(
        &self,
        request: LockRequest,
        run: Option<RunId>,
    ) -> Result<LockGuard> {
        let socket = if Acquisition::waits(&request) {
            WakeSocket::for_this_thread()
        } else {
            None
        };
        let address = socket.as_deref().map(WakeSocket::address);
        let mut acquisition = Acquisition::new(self, request, run, address, true)?;
        loop {
            match acquisition.step()? {
                Step::Granted(guard) => return Ok(guard),
                Step::Nap(nap) => match &socket {
                    Some(socket) => _ = socket.wait(nap),
                    None => std::thread::sleep(nap),
                },
            }
        }
    }

    /// Takes the locks of `request` (for `run`), yielding to the runtime
    /// while it waits: the wake-up socket is watched by the runtime's
    /// reactor, and keys' gates are only tried, never waited on.
    #[cfg(feature = "tokio")]
    pub(crate) async fn acquire_for_async(
        &self,
        request: LockRequest,
        run: Option<RunId>,
    ) -> Result<LockGuard> {
        let socket = if Acquisition::waits(&request) {
            WakeSocket::pooled()
        } else {
            None
        };
        let address = socket.as_deref().map(WakeSocket::address);
        let mut acquisition = Acquisition::new(self, request, run, address, false)?;
        loop {
            match acquisition.step()? {
                Step::Granted(guard) => return Ok(guard),
                Step::Nap(nap) => match &socket {
                    Some(socket) => _ = socket.wait_async(nap).await,
                    None => tokio::time::sleep(nap).await,
                },
            }
        }
    }
}

/// Whether the locks `own` (held by the caller) alone keep a request in
/// `mode` out of one of its keys: then it could never be granted while the
/// caller waits for it.
fn kept_out_by_own(ahead: &[Ahead], own: &[i64], mode: LockMode) -> bool {
    if own.is_empty() {
        return false;
    }
    let mine = |a: &&Ahead| a.state == LockState::Held && own.contains(&a.lock_id);
    ahead.iter().filter(mine).any(|a| {
        let modes: Vec<LockMode> = ahead
            .iter()
            .filter(mine)
            .filter(|b| b.key == a.key)
            .map(|b| b.mode)
            .collect();
        compatible(&modes, mode) == Ok(false)
    })
}

/// Judges the owners of the requests in `ahead` and reaps the dead ones;
/// true if any was reaped (the caller asks again).
///
/// Liveness is judged outside the write transaction (it reads /proc and
/// lock files); a dead owner is then reaped whole, its runs and queue
/// places with its locks, and only in the state it was judged in.
/// Holders first: while a live holder alone keeps a request in `mode`
/// out, a dead waiter ahead costs nothing yet (a releaser would grant
/// it, and it is then judged as a holder), so the waiters are judged only
/// once the holders no longer block.
fn reap_dead_in_the_way(ledger: &Ledger, ahead: &[Ahead], mode: LockMode) -> Result<bool> {
    let me = ledger.inner.instance();
    let now = ledger.now();
    let mut reaped_any = false;
    let mut judged = Vec::new();
    for waiting in [false, true] {
        if waiting && (reaped_any || held_off(ahead, mode)) {
            break;
        }
        for a in ahead
            .iter()
            .filter(|a| a.instance != me && (a.state == LockState::Waiting) == waiting)
        {
            if judged.contains(&a.instance) {
                continue;
            }
            judged.push(a.instance);
            if let Verdict::Dead {
                reason,
                stale_heartbeat,
            } = ledger.inner.judge.judge(&a.owner, now)
            {
                ledger.reap_owner(&a.owner, &reason, stale_heartbeat)?;
                reaped_any = true;
            }
        }
    }
    Ok(reaped_any)
}

/// Whether the holders in `ahead` alone keep a request in `mode` out, on at
/// least one key (whatever the waiters ahead of it).
fn held_off(ahead: &[Ahead], mode: LockMode) -> bool {
    ahead.iter().any(|a| {
        let held: Vec<LockMode> = ahead
            .iter()
            .filter(|b| b.key == a.key && b.state == LockState::Held)
            .map(|b| b.mode)
            .collect();
        compatible(&held, mode) == Ok(false)
    })
}

/// What the gate phase of a request came to.
enum GateWait {
    /// A dead holder was reaped: look again.
    Again,
    /// Ask the database for the keys (the gates are held, or the keys look
    /// free).
    Ask,
    /// The phase is over (its time is up, the caller's own lock is in the
    /// way, or the gates cannot be waited on): ask, and queue if blocked.
    Over,
}

/// The gate phase of an exclusive request that lacks some of its keys'
/// gates: if only live holders keep it out, waits on those gates until
/// `until` (or the request's `deadline`), without a place in the queue.
fn wait_at_gates(
    ledger: &Ledger,
    ask: &LockAsk<'_>,
    gates: &mut Taken,
    until: Instant,
    deadline: Option<Instant>,
) -> Result<GateWait> {
    let until = deadline.map_or(until, |d| d.min(until));
    if Instant::now() >= until {
        return Ok(GateWait::Over);
    }
    let blockers = ledger.inner.store.lock_blockers(ask)?;
    if blockers.is_empty() {
        // Free by now (its holder has committed its release and is about
        // to open the gate, or holds no gate): ask for it.
        return Ok(GateWait::Ask);
    }
    if blockers.iter().any(|a| ask.own.contains(&a.lock_id)) {
        // The caller's own lock in the way: the transaction tells (a
        // request that only the caller's locks keep out fails at once).
        return Ok(GateWait::Over);
    }
    // Visible waiters ahead do not end the phase: the grant transaction
    // after the gate refuses to overtake them (and queues the request,
    // gate in hand, so that those behind it keep waiting at the gate
    // instead of all joining the queue).
    if reap_dead_in_the_way(ledger, &blockers, ask.mode)? {
        return Ok(GateWait::Again);
    }
    Ok(if gates.wait(until) {
        GateWait::Ask
    } else {
        GateWait::Over
    })
}

/// A request's place in the lock queue, left on drop unless it was granted:
/// an error, a timeout, a panic or a dropped future never leaves a stale
/// waiter behind.
struct QueuePlace<'l> {
    ledger: &'l Ledger,
    ticket: Option<i64>,
    /// The request's gates, held and busy; the held ones go to its guard,
    /// or are let go after the queue place (on drop).
    gates: Option<Taken>,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            // Deletes the row whether still waiting or granted meanwhile by
            // a releaser, and hands its keys on.
            self.ledger.leave_queue(ticket);
        }
    }
}
