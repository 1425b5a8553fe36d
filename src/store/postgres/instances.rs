//! SQL for instances: registering, heartbeating, closing, and reaping the
//! dead ones (PostgreSQL).

#![allow(unused_variables)]

use super::{Store, Tx};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::liveness::{InstanceRecord, ProcessIdentity};
use crate::store::{InstanceReaped, Owner, Wakes};

impl Store {
    pub(crate) fn heartbeat_instance(&self, id: i64) -> Result<bool> {
        todo!("PostgreSQL heartbeat_instance")
    }

    pub(crate) fn open_instances(&self) -> Result<Vec<InstanceRecord>> {
        todo!("PostgreSQL open_instances")
    }

    pub(crate) fn orphaned_owners(&self) -> Result<Vec<InstanceRecord>> {
        todo!("PostgreSQL orphaned_owners")
    }

    pub(crate) fn instance(&self, id: i64) -> Result<Option<InstanceRecord>> {
        todo!("PostgreSQL instance")
    }

    pub(crate) fn prune_instances(&self, cutoff: Timestamp) -> Result<()> {
        todo!("PostgreSQL prune_instances")
    }

    pub(crate) fn close_instance(&self, me: &ProcessIdentity, id: i64) -> Result<Wakes> {
        todo!("PostgreSQL close_instance")
    }

    pub(crate) fn insert_instance(
        &self,
        identity: &ProcessIdentity,
        label: Option<&str>,
        lock_file: Option<&str>,
        lease: std::time::Duration,
    ) -> Result<i64> {
        todo!("PostgreSQL insert_instance")
    }

    pub(crate) fn reap_instance(
        &self,
        instance: Owner<'_>,
        reason: &str,
        run_reason: &str,
        stale_heartbeat: Option<Timestamp>,
        by: &ProcessIdentity,
    ) -> Result<InstanceReaped> {
        todo!("PostgreSQL reap_instance")
    }
}

/// Whether an instance is open, read inside the caller's write
/// transaction: rows are only ever written for an open instance, so a
/// reaped one never gains new work.
pub(super) fn is_open(tx: &mut Tx<'_>, instance: i64) -> Result<bool> {
    todo!("PostgreSQL is_open")
}
