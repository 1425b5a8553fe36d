//! The storage boundary: every line of SQL in the crate lives behind it.
//!
//! The rest of the crate speaks in domain terms (runs, states, changes,
//! lock requests) and never sees SQL. [`Store`] is one of two backends with
//! the same methods and the same guarantees:
//!
//! - [`sqlite`]: one SQLite file, the embedded default;
//! - `postgres` (feature `postgres`): one schema of a PostgreSQL database,
//!   shared by processes on many hosts.
//!
//! Both take domain decisions (a run's state machine, lock compatibility)
//! from the same code: a store reads the rows, calls the domain, and writes
//! what it decided, in one transaction.
//!
//! **Wake-ups go out here.** A write that frees keys (a release, a queue
//! place left, a run ended, an owner reaped) returns the wake-up addresses
//! of the waiters it granted or unblocked, and the methods of [`Store`]
//! send them once the store's call returned, that is after the commit that
//! made them true: no caller can forget one. (The feed's watchers are woken
//! by each store's commit itself.)

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod rules;
pub(crate) mod shared;
pub(crate) mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, Timestamp};
use crate::error::Result;
use crate::liveness::{InstanceId, InstanceRecord, ProcessIdentity};
use crate::lock::{LockMode, LockRecord, LockState, Ticket};
use crate::reaper::Reaped;
use crate::record::{EventKind, EventRecord, LockEvent, RunFilter, RunRecord, StepRecord};
use crate::run::{RunChange, RunId, RunState, RunStatus, StepStatus};
use crate::wake::wake;

pub(crate) use sqlite::SCHEMA_VERSION;

/// Where a ledger is to be opened: what the builder was given.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// A SQLite file.
    File(PathBuf),
    /// A PostgreSQL URL, in a build without the PostgreSQL store: refused
    /// at open.
    #[cfg(not(feature = "postgres"))]
    NoPostgres(String),
    /// A schema of a PostgreSQL database.
    #[cfg(feature = "postgres")]
    Postgres {
        /// The connection URL (or key=value string).
        url: String,
        /// The schema the ledger's tables live in.
        schema: String,
        /// Through a transaction pooler, and where to listen.
        route: postgres::Route,
    },
}

/// The store of one open ledger.
#[derive(Debug)]
pub(crate) enum Store {
    /// A SQLite file.
    Sqlite(sqlite::Store),
    /// A schema of a PostgreSQL database.
    #[cfg(feature = "postgres")]
    Postgres(postgres::Store),
}

/// The condition, in the SQL both stores share, that a run was failed by
/// a reaper: the reasons the reapers give begin with these words
/// (`Ledger::reap_owner`, the hung-run reason, [`unadopted_reason`]).
pub(crate) const REAPED_RUN: &str = "status = 'failed' AND (error LIKE 'owner gone: %' \
     OR error LIKE 'hung: %' OR error LIKE 'not adopted within %')";

/// Instances that are closed (or gone) but still own active runs or lock
/// rows: left behind by a failed cleanup, in the SQL both stores share. The
/// active runs are read from the active-runs index, the locks table holds
/// only live requests.
pub(crate) const ORPHANED_OWNERS: &str = "
    SELECT DISTINCT r.instance_id FROM runs r
    WHERE r.status IN ('queued','running') AND r.adopt_by IS NULL
      AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = r.instance_id AND i.closed_at IS NULL)
    UNION
    SELECT DISTINCT l.instance_id FROM locks l
    WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = l.instance_id AND i.closed_at IS NULL)";

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            #[cfg(feature = "postgres")]
            Store::Postgres($s) => off_runtime(|| $e),
        }
    };
}

/// Runs `call`, a call of the PostgreSQL store, where the synchronous
/// PostgreSQL client may block: that client drives a tokio runtime of its
/// own, which cannot start on a thread that is inside another runtime's
/// context (a task, `block_on`). There, the call runs on a scoped helper
/// thread, and the caller blocks for it as it would have for the call
/// itself; elsewhere it runs on the calling thread.
#[cfg(feature = "postgres")]
pub(crate) fn off_runtime<R: Send>(call: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return call();
    }
    std::thread::scope(|s| match s.spawn(call).join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl Store {
    /// Opens the store at `target`, applying pending migrations.
    ///
    /// `clock` is the builder's; `given` says whether the user gave it (a
    /// PostgreSQL store then uses it as it is, instead of following the
    /// server's clock).
    pub(crate) fn open(
        target: &Target,
        config: &StoreConfig,
        clock: Arc<dyn Clock>,
        given: bool,
    ) -> Result<Store> {
        match target {
            Target::File(path) => {
                let _ = given;
                sqlite::Store::open(path, config, clock).map(Store::Sqlite)
            }
            #[cfg(not(feature = "postgres"))]
            Target::NoPostgres(url) => Err(crate::error::Error::Open {
                path: PathBuf::from(url.split('@').next_back().unwrap_or_default()),
                reason:
                    "this build of runledger has no PostgreSQL store (cargo feature `postgres`)"
                        .into(),
                source: None,
            }),
            #[cfg(feature = "postgres")]
            Target::Postgres { url, schema, route } => off_runtime(|| {
                postgres::Store::open(url, schema, config, clock, !given, route)
                    .map(Store::Postgres)
            }),
        }
    }

    /// The clock the ledger stamps and judges with: the builder's on
    /// SQLite, the server's time on PostgreSQL.
    pub(crate) fn clock(&self, given: &Arc<dyn Clock>) -> Arc<dyn Clock> {
        match self {
            Store::Sqlite(_) => given.clone(),
            #[cfg(feature = "postgres")]
            Store::Postgres(s) => s.clock(),
        }
    }

    /// Where the ledger lives, as [`Ledger::location`](crate::Ledger::location)
    /// tells it.
    pub(crate) fn location(&self) -> crate::Location {
        match self {
            Store::Sqlite(s) => s.location(),
            #[cfg(feature = "postgres")]
            Store::Postgres(s) => s.location().clone(),
        }
    }

    /// Whether the store lives in a local file, with the sidecar folder of
    /// instance lock files and key gates beside it.
    pub(crate) fn is_file(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    pub(crate) fn insert_instance(
        &self,
        identity: &ProcessIdentity,
        label: Option<&str>,
        lock_file: Option<&str>,
        lease: Duration,
    ) -> Result<i64> {
        let new = NewInstance {
            identity,
            label,
            lock_file,
            lease,
        };
        dispatch!(self, s => s.insert_instance(&new))
    }

    pub(crate) fn heartbeat_instance(&self, id: i64) -> Result<bool> {
        dispatch!(self, s => s.heartbeat_instance(id))
    }

    /// Runs by status, and how many a reaper failed (see [`REAPED_RUN`]).
    pub(crate) fn run_counts(&self) -> Result<(Vec<(RunStatus, u64)>, u64)> {
        dispatch!(self, s => s.run_counts())
    }

    pub(crate) fn open_instances(&self) -> Result<Vec<InstanceRecord>> {
        dispatch!(self, s => s.open_instances())
    }

    /// Instances closed or gone that still own active runs or lock rows
    /// ([`ORPHANED_OWNERS`]), as records to reap (a missing instance gets a
    /// placeholder).
    pub(crate) fn orphaned_owners(&self) -> Result<Vec<InstanceRecord>> {
        let ids = dispatch!(self, s => s.orphaned_owner_ids())?;
        let mut owners = Vec::with_capacity(ids.len());
        for id in ids {
            owners.push(self.instance(id)?.unwrap_or_else(|| unknown_instance(id)));
        }
        Ok(owners)
    }

    pub(crate) fn instance(&self, id: i64) -> Result<Option<InstanceRecord>> {
        dispatch!(self, s => s.instance(id))
    }

    pub(crate) fn prune_instances(&self, cutoff: Timestamp) -> Result<()> {
        dispatch!(self, s => s.prune_instances(cutoff))
    }

    /// Closes this process's own instance (its last handle dropped): a reap
    /// of itself, so that anything it still owns (a run whose guard was
    /// leaked, a lock row a guard could not delete) is closed with it, in
    /// the same transaction.
    pub(crate) fn close_instance(&self, me: &ProcessIdentity, id: i64) -> Result<()> {
        let owner = Owner {
            id,
            pid: me.pid,
            host: &me.host,
        };
        let reason = CLOSED_BY_ITS_PROCESS;
        self.reap_instance(owner, reason, reason, None, me)
            .map(drop)
    }

    pub(crate) fn reap_instance(
        &self,
        instance: Owner<'_>,
        reason: &str,
        run_reason: &str,
        stale_heartbeat: Option<Timestamp>,
        by: &ProcessIdentity,
    ) -> Result<Vec<Reaped>> {
        let reap = Reap {
            instance,
            reason,
            run_reason,
            stale_heartbeat,
            by,
        };
        let done = dispatch!(self, s => s.reap_instance(&reap))?;
        wake(&done.wakes);
        Ok(done.reaped)
    }

    pub(crate) fn try_lock(&self, ask: &LockAsk<'_>, ticket: Option<i64>) -> Result<Attempt> {
        dispatch!(self, s => s.try_lock(ask, ticket))
    }

    pub(crate) fn lock_blockers(&self, ask: &LockAsk<'_>) -> Result<Vec<Ahead>> {
        dispatch!(self, s => s.lock_blockers(ask))
    }

    pub(crate) fn granted_token(&self, ticket: i64) -> Result<Option<u64>> {
        dispatch!(self, s => s.granted_token(ticket))
    }

    pub(crate) fn leave_queue(&self, ticket: i64) -> Result<()> {
        wake(&dispatch!(self, s => s.leave_queue(ticket))?);
        Ok(())
    }

    /// `keys`, when the caller knows them, are the lock's: a hint that
    /// saves the PostgreSQL store a read (SQLite's single writer needs
    /// none).
    pub(crate) fn release_lock(
        &self,
        id: i64,
        token: u64,
        keys: Option<&[String]>,
        on_commit: impl FnOnce() + Send,
    ) -> Result<bool> {
        let released = match self {
            Store::Sqlite(s) => {
                let _ = keys;
                s.release_lock(id, token, on_commit)?
            }
            #[cfg(feature = "postgres")]
            Store::Postgres(s) => off_runtime(|| s.release_lock(id, token, keys, on_commit))?,
        };
        if let Some(wakes) = &released {
            wake(wakes);
        }
        Ok(released.is_some())
    }

    pub(crate) fn was_taken_away(&self, id: i64) -> Result<bool> {
        dispatch!(self, s => s.was_taken_away(id))
    }

    pub(crate) fn lock_is_held(&self, id: i64, token: u64) -> Result<bool> {
        dispatch!(self, s => s.lock_is_held(id, token))
    }

    pub(crate) fn force_unlock(
        &self,
        key: &str,
        reason: &str,
        by: &ProcessIdentity,
    ) -> Result<usize> {
        let (released, wakes) = dispatch!(self, s => s.force_unlock(key, reason, by))?;
        wake(&wakes);
        Ok(released)
    }

    pub(crate) fn locks(&self) -> Result<Vec<LockRecord>> {
        dispatch!(self, s => s.locks())
    }

    pub(crate) fn insert_run(&self, new: &NewRun<'_>) -> Result<Option<RunId>> {
        dispatch!(self, s => s.insert_run(new))
    }

    pub(crate) fn update_run(
        &self,
        run: RunId,
        decide: impl Fn(&RunState) -> Result<Option<RunChange>> + Send + Sync + 'static,
    ) -> Result<(RunState, RunStatus)> {
        let (state, status, wakes) = dispatch!(self, s => s.update_run(run, decide))?;
        wake(&wakes);
        Ok((state, status))
    }

    pub(crate) fn adopt_run(
        &self,
        run: RunId,
        adopter: &Adopter<'_>,
        start: bool,
    ) -> Result<Adoption> {
        dispatch!(self, s => s.adopt_run(run, adopter, start))
    }

    pub(crate) fn set_log_path(&self, run: RunId, path: &str) -> Result<()> {
        dispatch!(self, s => s.set_log_path(run, path))
    }

    pub(crate) fn unadopted_runs(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(RunId, Timestamp)>> {
        dispatch!(self, s => s.unadopted_runs(now, limit))
    }

    pub(crate) fn fail_unadopted(
        &self,
        run: RunId,
        deadline: Timestamp,
    ) -> Result<Option<(String, RunStatus, String)>> {
        dispatch!(self, s => s.fail_unadopted(run, deadline))
    }

    pub(crate) fn insert_event(&self, run: RunId, name: &str, data: Option<&str>) -> Result<i64> {
        dispatch!(self, s => s.insert_event(run, name, data))
    }

    pub(crate) fn events_since(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>> {
        dispatch!(self, s => s.events_since(after, limit))
    }

    pub(crate) fn add_watcher(&self, instance: i64, address: &str) -> Result<i64> {
        dispatch!(self, s => s.add_watcher(instance, address))
    }

    pub(crate) fn remove_watcher(&self, id: i64) -> Result<()> {
        dispatch!(self, s => s.remove_watcher(id))
    }

    pub(crate) fn last_event_id(&self) -> Result<i64> {
        dispatch!(self, s => s.last_event_id())
    }

    pub(crate) fn run_heartbeat(&self, run: RunId) -> Result<RunStatus> {
        dispatch!(self, s => s.run_heartbeat(run))
    }

    pub(crate) fn hung_runs(&self, now: Timestamp, limit: usize) -> Result<Vec<HungRun>> {
        dispatch!(self, s => s.hung_runs(now, limit))
    }

    pub(crate) fn fail_hung(&self, hung: &HungRun, reason: &str) -> Result<Option<String>> {
        let failed = dispatch!(self, s => s.fail_hung(hung, reason))?;
        Ok(failed.map(|(name, wakes)| {
            wake(&wakes);
            name
        }))
    }

    pub(crate) fn cancel_requested(&self, run: RunId) -> Result<bool> {
        dispatch!(self, s => s.cancel_requested(run))
    }

    pub(crate) fn insert_step(&self, run: RunId, name: &str) -> Result<i64> {
        dispatch!(self, s => s.insert_step(run, name))
    }

    pub(crate) fn finish_step(
        &self,
        run: RunId,
        step: i64,
        name: &str,
        to: StepStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let end = StepEnd {
            step,
            name,
            to,
            error,
        };
        dispatch!(self, s => s.finish_step(run, &end))
    }

    pub(crate) fn run(&self, run: RunId) -> Result<RunRecord> {
        dispatch!(self, s => s.run(run))
    }

    pub(crate) fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        dispatch!(self, s => s.runs(filter))
    }

    pub(crate) fn steps(&self, run: RunId) -> Result<Vec<StepRecord>> {
        dispatch!(self, s => s.steps(run))
    }

    pub(crate) fn events(&self, run: RunId) -> Result<Vec<EventRecord>> {
        dispatch!(self, s => s.events(run))
    }

    pub(crate) fn prune_batch(
        &self,
        cutoff: Timestamp,
        after: i64,
        batch: usize,
    ) -> Result<(usize, Option<i64>)> {
        dispatch!(self, s => s.prune_batch(cutoff, after, batch))
    }

    pub(crate) fn lock_history(&self, key: Option<&str>, limit: usize) -> Result<Vec<EventRecord>> {
        dispatch!(self, s => s.lock_history(key, limit))
    }

    pub(crate) fn prune_lock_events(
        &self,
        cutoff: Timestamp,
        batch: usize,
    ) -> Result<(usize, bool)> {
        dispatch!(self, s => s.prune_lock_events(cutoff, batch))
    }

    pub(crate) fn path(&self) -> &Path {
        dispatch!(self, s => s.path())
    }
}

/// How the store is opened: the builder's settings that concern storage.
#[derive(Clone, Debug)]
pub(crate) struct StoreConfig {
    /// The value of `PRAGMA synchronous` (SQLite).
    pub synchronous: &'static str,
    pub busy_timeout: Duration,
    pub pool_size: u32,
    /// Whether writes of several threads share transactions (SQLite; see
    /// `sqlite::group`).
    pub group_commit: bool,
    /// Whether opening may create a ledger that does not exist yet.
    pub create: bool,
}

/// A lock request as the store sees it: checked, keys sorted.
#[derive(Debug)]
pub(crate) struct LockAsk<'a> {
    pub keys: &'a [String],
    pub mode: LockMode,
    pub run: Option<RunId>,
    pub instance: i64,
    /// The locks the calling thread or task holds (see
    /// `crate::lock::acquire`): waiters they keep out do not count.
    pub own: &'a [i64],
    pub pid: u32,
    pub host: &'a str,
    /// Take a place in the queue when blocked.
    pub queue: bool,
    /// The waiter's wake-up address.
    pub wake: Option<&'a str>,
}

/// What one attempt at a grant found.
#[derive(Debug)]
pub(crate) enum Attempt {
    Granted {
        id: i64,
        token: u64,
    },
    /// Blocked by `ahead`. `ticket` is the request's place in the queue, if
    /// it has one.
    Blocked {
        ticket: Option<i64>,
        ahead: Vec<Ahead>,
    },
    /// The asking instance was closed (a reaper judged it dead): nothing
    /// was written; the caller registers again and retries.
    InstanceClosed,
}

/// A request in the way: a holder, or a waiter queued earlier.
#[derive(Clone, Debug)]
pub(crate) struct Ahead {
    pub lock_id: i64,
    pub key: String,
    /// Every key of that request.
    pub keys: Vec<String>,
    pub mode: LockMode,
    pub state: LockState,
    pub token: Option<i64>,
    pub run: Option<(RunId, String)>,
    pub instance: i64,
    pub owner: InstanceRecord,
    pub since: Timestamp,
}

/// Wake-up addresses of waiters to wake once the transaction committed.
pub(crate) type Wakes = Vec<String>;

/// How a running step ends, as [`Store::finish_step`] asks it of a store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepEnd<'a> {
    /// The step's id, and its name (for its event).
    pub step: i64,
    pub name: &'a str,
    pub to: StepStatus,
    pub error: Option<&'a str>,
}

/// A run to insert, already validated and serialized.
#[derive(Debug)]
pub(crate) struct NewRun<'a> {
    pub name: &'a str,
    pub source: &'a str,
    pub status: RunStatus,
    pub parent: Option<RunId>,
    pub idempotency_key: Option<&'a str>,
    /// With the key: a run of that key created this recently (ms), in any
    /// status, is a duplicate too.
    pub idempotency_window: Option<i64>,
    pub instance: i64,
    pub pid: u32,
    pub host: &'a str,
    pub metadata: Option<String>,
    pub log_path: Option<String>,
    /// The run's progress heartbeat timeout, in ms.
    pub heartbeat_timeout: Option<i64>,
    /// For a run created for another process to adopt: how long it may
    /// wait for its adopter, in ms. The run is then owned by nobody.
    pub adopt_within: Option<i64>,
}

/// A running run past its heartbeat deadline, as the hung-run reaper judged
/// it.
#[derive(Clone, Debug)]
pub(crate) struct HungRun {
    pub id: RunId,
    pub hung_at: Timestamp,
    pub timeout: Duration,
    pub last_heartbeat: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
}

/// What [`Store::adopt_run`] did.
#[derive(Debug)]
pub(crate) enum Adoption {
    /// The run is the adopter's now.
    Adopted,
    /// Its deadline had passed: it was failed instead, and ended in this
    /// status.
    Expired(RunStatus),
    /// The adopter's instance was closed (a reaper judged it dead): nothing
    /// was written; it registers again.
    InstanceClosed,
}

/// Who adopts a run: the new owner's instance and process.
#[derive(Debug)]
pub(crate) struct Adopter<'a> {
    pub instance: i64,
    pub pid: u32,
    pub host: &'a str,
}

/// The instance a reap is about: enough to find its rows and to name it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Owner<'a> {
    pub id: i64,
    pub pid: u32,
    pub host: &'a str,
}

impl<'a> From<&'a InstanceRecord> for Owner<'a> {
    fn from(record: &'a InstanceRecord) -> Owner<'a> {
        Owner {
            id: record.id,
            pid: record.pid,
            host: &record.host,
        }
    }
}

/// A held lock taken away from its holder, as `lock_events` records it.
#[derive(Debug)]
pub(crate) struct TakenLock<'a> {
    pub id: i64,
    pub token: Option<i64>,
    pub run: Option<RunId>,
    pub pid: u32,
    pub host: &'a str,
    /// How it was taken: `reclaimed` or `forced`.
    pub kind: &'a str,
    pub keys: &'a [String],
    pub reason: &'a str,
    pub by: &'a ProcessIdentity,
}

/// A new instance (a process's open ledger), as
/// [`Store::insert_instance`] asks it of a store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NewInstance<'a> {
    pub identity: &'a ProcessIdentity,
    pub label: Option<&'a str>,
    /// Its lock file beside a SQLite file (none on PostgreSQL).
    pub lock_file: Option<&'a str>,
    pub lease: Duration,
}

/// A reap of one instance, as [`Store::reap_instance`] asks it of a store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reap<'a> {
    pub instance: Owner<'a>,
    /// Why the instance is closed.
    pub reason: &'a str,
    /// Why its runs fail, and its locks are reclaimed.
    pub run_reason: &'a str,
    /// The heartbeat a lease verdict judged: nothing is done if the
    /// instance heartbeated since.
    pub stale_heartbeat: Option<Timestamp>,
    pub by: &'a ProcessIdentity,
}

/// A lock request's keys as its row stores them: a JSON array.
pub(crate) fn keys_json(keys: &[String]) -> String {
    serde_json::to_string(keys).unwrap_or_else(|_| "[]".to_owned())
}

/// A lock request's keys, from its row's JSON array.
pub(crate) fn keys_from_json(text: &str) -> serde_json::Result<Vec<String>> {
    serde_json::from_str(text)
}

/// A lock request's state, from its row: anything but `held` waits.
pub(crate) fn state_of(state: &str) -> LockState {
    if state == "held" {
        LockState::Held
    } else {
        LockState::Waiting
    }
}

/// An instance's recorded lease, from its milliseconds.
pub(crate) fn lease_of(ms: Option<i64>) -> Option<Duration> {
    ms.map(|ms| Duration::from_millis(ms.max(0).cast_unsigned()))
}

/// Why a forced release is written into the holder's run history: the
/// reason, and who forced it.
pub(crate) fn forced_by(reason: &str, by: &ProcessIdentity) -> String {
    format!("{reason} (by pid {} on {})", by.pid, by.host)
}

/// Why an instance closed when its own process closed the ledger.
pub(crate) const CLOSED_BY_ITS_PROCESS: &str = "its process closed the ledger";

/// The record of an instance that owns runs or locks but whose row is gone
/// (pruned): a closed placeholder, so that the reaper still cleans up after
/// it.
pub(crate) fn unknown_instance(id: i64) -> InstanceRecord {
    InstanceRecord {
        id,
        host: "an unknown host".into(),
        boot_id: None,
        pid: 0,
        pid_ns: None,
        start_time: None,
        lock_file: None,
        heartbeat_at: Timestamp::EPOCH,
        lease: None,
        closed: true,
        closed_reason: None,
    }
}

/// What reaping one instance changed.
#[derive(Debug, Default)]
pub(crate) struct InstanceReaped {
    pub reaped: Vec<Reaped>,
    pub wakes: Wakes,
}

/// The `adopted` event's detail: who adopted the run, as JSON text. Both
/// stores write it, and read it back with [`adopted_event`].
pub(crate) fn adopter_json(adopter: &Adopter<'_>) -> String {
    serde_json::json!({
        "instance": adopter.instance,
        "pid": adopter.pid,
        "host": adopter.host,
    })
    .to_string()
}

/// The kind of a lock event whose grant began (the `events.kind` of
/// [`EventKind::LockGranted`]).
pub(crate) const LOCK_GRANTED: &str = "lock_granted";

/// How the grant of a held lock ended, as its lock event records it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ending<'a> {
    /// Its holder released it (or its run ended).
    Released,
    /// Taken from a dead holder: why it was judged dead, and by whom.
    Reclaimed(&'a str, &'a ProcessIdentity),
    /// Released by force: the reason given, and by whom.
    Forced(&'a str, &'a ProcessIdentity),
}

impl Ending<'_> {
    /// The `events.kind` of its event.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Ending::Released => "lock_released",
            Ending::Reclaimed(..) => "lock_reclaimed",
            Ending::Forced(..) => "lock_force_released",
        }
    }

    /// The `events.message` of its event.
    pub(crate) fn message(self) -> Option<String> {
        match self {
            Ending::Released => None,
            Ending::Reclaimed(reason, by) | Ending::Forced(reason, by) => {
                Some(forced_by(reason, by))
            }
        }
    }
}

/// A lock event's detail as both stores write it (in `events.step`): its
/// [`LockEvent`] as JSON, read back with [`lock_event_kind`].
pub(crate) fn lock_event_json(lock: &LockEvent) -> String {
    serde_json::to_string(lock).unwrap_or_else(|_| "{}".to_owned())
}

/// The event a lock event's kind and detail ([`lock_event_json`]) stand
/// for; `None` if `kind` is not the kind of a lock event.
pub(crate) fn lock_event_kind(kind: &str, detail: Option<&str>) -> Option<Result<EventKind>> {
    let make: fn(LockEvent) -> EventKind = match kind {
        LOCK_GRANTED => EventKind::LockGranted,
        "lock_released" => EventKind::LockReleased,
        "lock_reclaimed" => EventKind::LockReclaimed,
        "lock_force_released" => EventKind::LockForceReleased,
        _ => return None,
    };
    let parse = || -> std::result::Result<LockEvent, String> {
        let v: serde_json::Value =
            serde_json::from_str(detail.unwrap_or("null")).map_err(|e| e.to_string())?;
        let keys = v["keys"]
            .as_array()
            .ok_or("no keys")?
            .iter()
            .map(|k| k.as_str().map(str::to_owned).ok_or("a key is not a string"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let capacity = v["capacity"].as_u64().and_then(|c| u32::try_from(c).ok());
        let mode = LockMode::from_parts(v["mode"].as_str().unwrap_or_default(), capacity)
            .ok_or("no known mode")?;
        Ok(LockEvent {
            ticket: Ticket::from(v["ticket"].as_i64().ok_or("no ticket")?),
            keys,
            mode,
            token: v["token"].as_u64().ok_or("no token")?,
            pid: v["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or_default(),
            host: v["host"].as_str().unwrap_or_default().to_owned(),
        })
    };
    Some(
        parse()
            .map(make)
            .map_err(|e| bad_data(format!("lock event of unreadable detail: {e}"))),
    )
}

/// The run of an event, from its row's `run_id`: 0 (no run ever has it)
/// for a lock taken without a run.
pub(crate) fn event_run(run_id: i64) -> Option<RunId> {
    (run_id != 0).then(|| RunId::from(run_id))
}

/// The `run_id` an event's row stores for `run` (see [`event_run`]).
pub(crate) fn event_run_id(run: Option<RunId>) -> i64 {
    run.map_or(0, i64::from)
}

/// The event an `adopted` detail ([`adopter_json`]) stands for. A field
/// that is missing or out of range reads as its default rather than
/// failing the whole history.
pub(crate) fn adopted_event(who: &serde_json::Value) -> EventKind {
    EventKind::Adopted {
        instance: InstanceId::from(who["instance"].as_i64().unwrap_or_default()),
        pid: who["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_default(),
        host: who["host"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Why a run awaiting adoption failed: it was created at `created` by `pid`
/// on `host`, and nobody adopted it by `deadline`.
pub(crate) fn unadopted_reason(
    created: Timestamp,
    deadline: Timestamp,
    pid: u32,
    host: &str,
) -> String {
    let within = deadline.saturating_duration_since(created);
    format!(
        "not adopted within {} (created by pid {pid} on {host})",
        crate::lock::Seconds(within)
    )
}

/// The change that starts an adopted run, if it is still queued.
pub(crate) fn start_if_queued(state: &RunState) -> Result<Option<RunChange>> {
    Ok(
        (state.status == RunStatus::Queued).then_some(RunChange::Status {
            to: RunStatus::Running,
            exit_code: None,
            error: None,
            via_running: false,
        }),
    )
}

/// The change that fails a run nobody adopted, if it is still active.
pub(crate) fn fail_if_active(state: &RunState, reason: &str) -> Result<Option<RunChange>> {
    Ok(state.status.is_active().then(|| RunChange::Status {
        to: RunStatus::Failed,
        exit_code: None,
        error: Some(reason.to_owned()),
        via_running: false,
    }))
}

/// The change that fails a hung run, if it is still running.
pub(crate) fn fail_if_running(state: &RunState, reason: &str) -> Result<Option<RunChange>> {
    Ok(
        (state.status == RunStatus::Running).then(|| RunChange::Status {
            to: RunStatus::Failed,
            exit_code: None,
            error: Some(reason.to_owned()),
            via_running: false,
        }),
    )
}

// Both stores number their migrations alike: a version means the same
// domain on either.
#[cfg(feature = "postgres")]
const _: () = assert!(postgres::SCHEMA_VERSION == sqlite::SCHEMA_VERSION);

/// A row that cannot be what the schema says (edited by hand, or written by
/// a broken tool): a storage error, never a panic.
pub(crate) fn bad_data(what: String) -> crate::error::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what).into()
}
