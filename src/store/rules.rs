//! The lock rules that decide who is in a request's way, on the rows a
//! store reads: one copy for both stores. A store supplies the reads
//! ([`LockReads`], inside its write transaction or a read); the decisions
//! (FIFO, compatibility, which waiters do not count) are made here.

use std::collections::HashMap;

use super::{Ahead, LockAsk};
use crate::error::{Error, Result};
use crate::lock::{LockMode, LockState, compatible};

/// What the lock rules read from a store.
pub(crate) trait LockReads {
    /// The requests on `key` ahead of the one queued as `ticket` (every
    /// holder, and the waiters queued before it; with no ticket, every
    /// request on the key).
    fn ahead_on(&mut self, key: &str, ticket: Option<i64>) -> Result<Vec<Ahead>>;
}

/// Whether the waiting request `waiter` is held back by the locks `own`:
/// one of them is in its way on one of its keys, or an earlier waiter in its
/// way is itself held back by them (first come, first served chains the
/// waits). `known` remembers the waiters already judged.
pub(crate) fn held_back_by(
    reads: &mut impl LockReads,
    waiter: &Ahead,
    own: &[i64],
    known: &mut HashMap<i64, bool>,
) -> Result<bool> {
    if let Some(&judged) = known.get(&waiter.lock_id) {
        return Ok(judged);
    }
    let mut held_back = false;
    'keys: for key in &waiter.keys {
        for a in reads.ahead_on(key, Some(waiter.lock_id))? {
            if compatible(&[a.mode], waiter.mode) == Ok(true) {
                continue;
            }
            let by_own = match a.state {
                LockState::Held => own.contains(&a.lock_id),
                // Queued before it: a smaller ticket, so this ends.
                LockState::Waiting => held_back_by(reads, &a, own, known)?,
            };
            if by_own {
                held_back = true;
                break 'keys;
            }
        }
    }
    known.insert(waiter.lock_id, held_back);
    Ok(held_back)
}

/// Whether a request in `mode` on `keys` (queued as `ticket`) fits with
/// everything ahead of it on every key. A capacity mismatch never fits.
pub(crate) fn fits(
    reads: &mut impl LockReads,
    keys: &[String],
    mode: LockMode,
    ticket: Option<i64>,
) -> Result<bool> {
    for key in keys {
        let modes: Vec<LockMode> = reads
            .ahead_on(key, ticket)?
            .iter()
            .map(|a| a.mode)
            .collect();
        if compatible(&modes, mode) != Ok(true) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The requests that keep `ask` (queued as `ticket`, if it is) out: the
/// holders and earlier waiters in its way on each key, except waiters that
/// only the caller's own locks (`ask.own`) hold back. Empty when it can be
/// granted.
pub(crate) fn blockers(
    reads: &mut impl LockReads,
    ask: &LockAsk<'_>,
    ticket: Option<i64>,
) -> Result<Vec<Ahead>> {
    let mut blocked = Vec::new();
    let mut known = HashMap::new();
    for key in ask.keys {
        let mut ahead = reads.ahead_on(key, ticket)?;
        let waiter_ahead = ahead.iter().any(|a| a.state == LockState::Waiting);
        if waiter_ahead && !ask.own.is_empty() {
            // A waiter that the caller's own locks hold back, directly or
            // through earlier waiters, would wait for this request forever
            // while it waits for that waiter (first come, first served):
            // it does not count.
            let mut kept = Vec::with_capacity(ahead.len());
            for a in ahead {
                if a.state == LockState::Held || !held_back_by(reads, &a, ask.own, &mut known)? {
                    kept.push(a);
                }
            }
            ahead = kept;
        }
        let modes: Vec<LockMode> = ahead.iter().map(|a| a.mode).collect();
        match compatible(&modes, ask.mode) {
            Ok(true) => {}
            Ok(false) => blocked.extend(ahead),
            Err(capacity) => {
                return Err(Error::invalid(
                    "slots capacity",
                    &ask.mode.to_string(),
                    format!("lock {key:?} is used with {capacity} slots"),
                ));
            }
        }
    }
    Ok(blocked)
}
