//! SQL for locks: grants, the queue, releases, reclaims (PostgreSQL).

#![allow(unused_variables)]

use super::{Store, Tx};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::liveness::ProcessIdentity;
use crate::lock::LockRecord;
use crate::run::RunId;
use crate::store::{Ahead, Attempt, LockAsk, Wakes};

impl Store {
    pub(crate) fn try_lock(&self, ask: &LockAsk<'_>, ticket: Option<i64>) -> Result<Attempt> {
        todo!("PostgreSQL try_lock")
    }

    pub(crate) fn lock_blockers(&self, ask: &LockAsk<'_>) -> Result<Vec<Ahead>> {
        todo!("PostgreSQL lock_blockers")
    }

    pub(crate) fn granted_token(&self, ticket: i64) -> Result<Option<u64>> {
        todo!("PostgreSQL granted_token")
    }

    pub(crate) fn leave_queue(&self, ticket: i64) -> Result<Wakes> {
        todo!("PostgreSQL leave_queue")
    }

    pub(crate) fn was_taken_away(&self, id: i64) -> Result<bool> {
        todo!("PostgreSQL was_taken_away")
    }

    pub(crate) fn lock_is_held(&self, id: i64, token: u64) -> Result<bool> {
        todo!("PostgreSQL lock_is_held")
    }

    pub(crate) fn locks(&self) -> Result<Vec<LockRecord>> {
        todo!("PostgreSQL locks")
    }

    pub(crate) fn release_lock(
        &self,
        id: i64,
        token: u64,
        on_commit: impl FnOnce(),
    ) -> Result<Option<Wakes>> {
        todo!("PostgreSQL release_lock")
    }

    pub(crate) fn force_unlock(
        &self,
        key: &str,
        reason: &str,
        by: &ProcessIdentity,
    ) -> Result<(usize, Wakes)> {
        todo!("PostgreSQL force_unlock")
    }
}

/// Releases every lock of a run that ended, inside the caller's write
/// transaction; returns the waiters to wake.
pub(super) fn release_run_locks(tx: &mut Tx<'_>, run: RunId, now: Timestamp) -> Result<Wakes> {
    todo!("PostgreSQL release_run_locks")
}
