//! SQL for runs, steps and events (PostgreSQL).

#![allow(unused_variables)]

use super::{Store, Tx};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::record::{EventRecord, RunFilter, RunRecord, StepRecord};
use crate::run::{RunChange, RunId, RunState, RunStatus, StepStatus};
use crate::store::{Adopter, Adoption, HungRun, NewRun, Wakes};

impl Store {
    pub(crate) fn insert_run(&self, new: &NewRun<'_>) -> Result<Option<RunId>> {
        todo!("PostgreSQL insert_run")
    }

    pub(crate) fn set_log_path(&self, run: RunId, path: &str) -> Result<()> {
        todo!("PostgreSQL set_log_path")
    }

    pub(crate) fn insert_event(&self, run: RunId, name: &str, data: Option<&str>) -> Result<i64> {
        todo!("PostgreSQL insert_event")
    }

    pub(crate) fn events_since(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>> {
        todo!("PostgreSQL events_since")
    }

    pub(crate) fn add_watcher(&self, instance: i64, address: &str) -> Result<i64> {
        todo!("PostgreSQL add_watcher")
    }

    pub(crate) fn remove_watcher(&self, id: i64) -> Result<()> {
        todo!("PostgreSQL remove_watcher")
    }

    pub(crate) fn last_event_id(&self) -> Result<i64> {
        todo!("PostgreSQL last_event_id")
    }

    pub(crate) fn run_heartbeat(&self, run: RunId) -> Result<RunStatus> {
        todo!("PostgreSQL run_heartbeat")
    }

    pub(crate) fn hung_runs(&self, now: Timestamp, limit: usize) -> Result<Vec<HungRun>> {
        todo!("PostgreSQL hung_runs")
    }

    pub(crate) fn cancel_requested(&self, run: RunId) -> Result<bool> {
        todo!("PostgreSQL cancel_requested")
    }

    pub(crate) fn insert_step(&self, run: RunId, name: &str) -> Result<i64> {
        todo!("PostgreSQL insert_step")
    }

    pub(crate) fn run(&self, run: RunId) -> Result<RunRecord> {
        todo!("PostgreSQL run")
    }

    pub(crate) fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        todo!("PostgreSQL runs")
    }

    pub(crate) fn steps(&self, run: RunId) -> Result<Vec<StepRecord>> {
        todo!("PostgreSQL steps")
    }

    pub(crate) fn events(&self, run: RunId) -> Result<Vec<EventRecord>> {
        todo!("PostgreSQL events")
    }

    pub(crate) fn adopt_run(
        &self,
        run: RunId,
        adopter: &Adopter<'_>,
        start: bool,
    ) -> Result<Adoption> {
        todo!("PostgreSQL adopt_run")
    }

    pub(crate) fn fail_hung(
        &self,
        hung: &HungRun,
        reason: &str,
    ) -> Result<Option<(String, Wakes)>> {
        todo!("PostgreSQL fail_hung")
    }

    pub(crate) fn fail_unadopted(
        &self,
        run: RunId,
        deadline: Timestamp,
    ) -> Result<Option<(String, RunStatus, String)>> {
        todo!("PostgreSQL fail_unadopted")
    }

    pub(crate) fn finish_step(
        &self,
        run: RunId,
        step: i64,
        name: &str,
        to: StepStatus,
        error: Option<&str>,
    ) -> Result<()> {
        todo!("PostgreSQL finish_step")
    }

    pub(crate) fn prune_batch(
        &self,
        cutoff: Timestamp,
        after: i64,
        batch: usize,
    ) -> Result<(usize, Option<i64>)> {
        todo!("PostgreSQL prune_batch")
    }

    pub(crate) fn unadopted_runs(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(RunId, Timestamp)>> {
        todo!("PostgreSQL unadopted_runs")
    }

    pub(crate) fn update_run(
        &self,
        run: RunId,
        decide: impl FnOnce(&RunState) -> Result<Option<RunChange>> + Send + 'static,
    ) -> Result<(RunState, RunStatus, Wakes)> {
        todo!("PostgreSQL update_run")
    }
}

/// The status and event-chain head of a run, read in a write transaction.
pub(super) fn run_head(tx: &mut Tx<'_>, run: RunId) -> Result<(RunStatus, Option<i64>)> {
    todo!("PostgreSQL run_head")
}

/// Appends one event to a run's history inside the caller's transaction.
pub(super) fn append_event(
    tx: &mut Tx<'_>,
    run: RunId,
    at: Timestamp,
    kind: &str,
    detail: Option<&str>,
    message: Option<&str>,
) -> Result<()> {
    todo!("PostgreSQL append_event")
}

/// Applies one transition to a run inside the caller's write transaction:
/// see [`Store::update_run`].
pub(super) fn apply_change(
    tx: &mut Tx<'_>,
    run: RunId,
    at: Timestamp,
    decide: impl FnOnce(&RunState) -> Result<Option<RunChange>>,
) -> Result<(RunState, RunStatus, Wakes)> {
    todo!("PostgreSQL apply_change")
}
