//! The [`Ledger`] handle and its [`Builder`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::Result;
use crate::input;
use crate::liveness::{ProcessIdentity, Verdict, judge};
use crate::lock::{Holder, LockGuard, LockRecord, LockRequest, Wait};
use crate::record::{EventRecord, RunFilter, RunRecord, StepRecord};
use crate::run::{Outcome, Run, RunChange, RunId, RunSpec, RunState, RunStatus, StepStatus};
use crate::store::{Ahead, Attempt, LockAsk, NewRun, Store, StoreConfig};
use crate::wake::{WakeSocket, wake};

/// How hard SQLite works to make a commit survive a power cut: the
/// `synchronous` pragma.
///
/// Every setting keeps the database consistent and loses nothing if a
/// *process* crashes (kill -9, panic, OOM): a committed transaction is in the
/// write-ahead log, which the operating system keeps. They differ only when
/// the *machine* loses power or the kernel crashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Synchronous {
    /// `synchronous=NORMAL`: no fsync per commit. After a power cut the last
    /// transactions before it may be rolled back (never half-applied). About
    /// 15× faster than `Full` on a typical disk. The default.
    #[default]
    Normal,
    /// `synchronous=FULL`: one fsync of the log per commit, so a commit that
    /// returned survives a power cut.
    Full,
    /// `synchronous=EXTRA`: `Full`, plus an fsync of the folder when the log
    /// is reset.
    Extra,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// Settings for opening a [`Ledger`]; made by [`Ledger::builder`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use runledger::{Ledger, Synchronous};
/// # let dir = tempfile::tempdir()?;
/// let ledger = Ledger::builder(dir.path().join("ledger.db"))
///     .synchronous(Synchronous::Full)
///     .busy_timeout(Duration::from_secs(60))
///     .label("api-server")
///     .open()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[must_use = "a Builder does nothing until open() is called"]
pub struct Builder {
    path: PathBuf,
    synchronous: Synchronous,
    busy_timeout: Duration,
    pool_size: u32,
    max_metadata_bytes: usize,
    clock: Arc<dyn Clock>,
    label: Option<String>,
    lock_wait: Duration,
}

impl Builder {
    /// How long [`Ledger::lock`] (and a [`LockRequest`] without a wait of
    /// its own) waits in the queue before failing with
    /// [`Error::Timeout`](crate::Error::Timeout). Defaults to 30 seconds.
    pub fn lock_wait(mut self, wait: Duration) -> Builder {
        self.lock_wait = wait;
        self
    }

    /// The durability of each commit. Defaults to [`Synchronous::Normal`].
    pub fn synchronous(mut self, synchronous: Synchronous) -> Builder {
        self.synchronous = synchronous;
        self
    }

    /// How long a write waits for other writers before failing with
    /// [`Error::Busy`](crate::Error::Busy). Writers normally wait microseconds to milliseconds;
    /// this bounds pathological cases. Defaults to 30 seconds.
    pub fn busy_timeout(mut self, timeout: Duration) -> Builder {
        self.busy_timeout = timeout;
        self
    }

    /// The most SQLite connections this ledger keeps open (readers run in
    /// parallel; writers take turns). Values below 1 count as 1. Defaults to 8.
    pub fn pool_size(mut self, size: u32) -> Builder {
        self.pool_size = size.max(1);
        self
    }

    /// The largest metadata a run may carry, in bytes of serialized JSON.
    /// Defaults to 64 KiB.
    pub fn max_metadata_bytes(mut self, limit: usize) -> Builder {
        self.max_metadata_bytes = limit;
        self
    }

    /// The clock that stamps every record. Defaults to [`SystemClock`]; tests
    /// inject a [`ManualClock`](crate::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> Builder {
        self.clock = Arc::new(clock);
        self
    }

    /// A label for this process's instance, shown to operators (such as
    /// `"api-server"`). Same rules as a run name. Defaults to none.
    pub fn label(mut self, label: impl Into<String>) -> Builder {
        self.label = Some(label.into());
        self
    }

    /// Opens the ledger, creating the file and its folders if needed and
    /// applying pending schema migrations.
    ///
    /// Any number of processes may open the same file at the same time; the
    /// first one creates the schema while the others wait on a file lock.
    ///
    /// # Errors
    ///
    /// - [`Error::Open`](crate::Error::Open) if the location cannot be created or written (the
    ///   error names the path);
    /// - [`Error::NotALedger`](crate::Error::NotALedger) for a file that is not a SQLite database, or is
    ///   another application's;
    /// - [`Error::SchemaTooNew`](crate::Error::SchemaTooNew) for a ledger written by a newer version;
    /// - [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad label.
    ///
    /// The last three leave the file untouched.
    pub fn open(self) -> Result<Ledger> {
        if let Some(label) = &self.label {
            input::check_name("instance label", label)?;
        }
        let config = StoreConfig {
            synchronous: self.synchronous.pragma(),
            busy_timeout: self.busy_timeout,
            pool_size: self.pool_size,
        };
        let store = Store::open(&self.path, &config, self.clock.clone())?;
        let identity = ProcessIdentity::current();
        let instance = store.insert_instance(&identity, self.label.as_deref())?;
        log::debug!(
            "runledger: opened {} as instance {instance}",
            store.path().display()
        );
        Ok(Ledger {
            inner: Arc::new(Inner {
                store,
                clock: self.clock,
                identity,
                instance,
                max_metadata_bytes: self.max_metadata_bytes,
                lock_wait: self.lock_wait,
                orphans: parking_lot::Mutex::new(Vec::new()),
            }),
        })
    }
}

/// An open ledger: the registry of runs shared by every process that opens
/// the same file.
///
/// `Ledger` is `Clone + Send + Sync`; clones are cheap and share one
/// connection pool and one instance. The instance is closed when the last
/// clone (and the last [`Run`] guard, which holds one) is dropped.
///
/// # Examples
///
/// ```
/// use runledger::{Ledger, RunSpec, RunStatus};
/// # let dir = tempfile::tempdir()?;
/// let ledger = Ledger::open(dir.path().join("runs/ledger.db"))?;
/// let run = ledger.begin_run(RunSpec::new("build").source("terminal"))?;
/// let id = run.id();
/// run.succeed()?;
/// assert_eq!(ledger.run(id)?.status, RunStatus::Succeeded);
/// # Ok::<(), runledger::Error>(())
/// ```
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    clock: Arc<dyn Clock>,
    identity: ProcessIdentity,
    instance: i64,
    max_metadata_bytes: usize,
    lock_wait: Duration,
    /// Lock rows a guard or a queue place could not delete on drop (the
    /// database was busy, an I/O error): retried on the next lock call, so
    /// that a live process never leaves a stale holder or waiter behind.
    orphans: parking_lot::Mutex<Vec<Orphan>>,
}

/// A lock row whose owner dropped it without managing to delete it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Orphan {
    Held { id: i64, token: u64 },
    Queued { ticket: i64 },
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.store.close_instance(self.instance) {
            log::warn!("runledger: could not close instance {}: {e}", self.instance);
        }
    }
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.store.path())
            .field("instance", &self.inner.instance)
            .finish()
    }
}

/// How many runs one pruning transaction deletes at most, so that other
/// writers wait for at most one short batch.
const PRUNE_BATCH: usize = 500;

impl Ledger {
    /// Opens the ledger at `path` with default settings; see
    /// [`Builder::open`] for what opening does and its errors.
    ///
    /// # Errors
    ///
    /// As [`Builder::open`].
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let ledger = runledger::Ledger::open(dir.path().join("control/ledger.db"))?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger> {
        Ledger::builder(path).open()
    }

    /// Settings for opening the ledger at `path`.
    pub fn builder(path: impl AsRef<Path>) -> Builder {
        Builder {
            path: path.as_ref().to_owned(),
            synchronous: Synchronous::default(),
            busy_timeout: Duration::from_secs(30),
            pool_size: 8,
            max_metadata_bytes: 64 * 1024,
            clock: Arc::new(SystemClock),
            label: None,
            lock_wait: Duration::from_secs(30),
        }
    }

    /// The canonical path of the database file.
    pub fn path(&self) -> &Path {
        self.inner.store.path()
    }

    /// The id of this process's instance: the owner of the runs it begins.
    pub fn instance_id(&self) -> i64 {
        self.inner.instance
    }

    /// The current time by the ledger's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Records a new run, owned by this process, and returns its guard.
    ///
    /// The run is `running` (or `queued`, see [`RunSpec::queued`]) and
    /// visible to every process as soon as this returns.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad name, source or idempotency key,
    ///   metadata over the size limit, or a non-UTF-8 log path;
    /// - [`Error::Duplicate`](crate::Error::Duplicate) if an active run holds the spec's idempotency
    ///   key (nothing is started; `existing` names that run);
    /// - [`Error::NotFound`](crate::Error::NotFound) if the spec's parent does not exist.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, Error};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let spec = RunSpec::new("nightly").idempotency_key("nightly:2026-11-22");
    /// let run = ledger.begin_run(spec.clone())?;
    /// match ledger.begin_run(spec) {
    ///     Err(Error::Duplicate { existing, .. }) => assert_eq!(existing, run.id()),
    ///     other => panic!("expected a duplicate, got {other:?}"),
    /// }
    /// run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn begin_run(&self, spec: RunSpec) -> Result<Run> {
        input::check_name("run name", &spec.name)?;
        input::check_name("run source", &spec.source)?;
        if let Some(key) = &spec.idempotency_key {
            input::check_name("idempotency key", key)?;
        }
        let metadata = input::metadata(&spec.metadata, self.inner.max_metadata_bytes)?;
        let log_path = spec.log_path.as_deref().map(input::log_path).transpose()?;
        let inner = &self.inner;
        let id = inner.store.insert_run(&NewRun {
            name: &spec.name,
            source: &spec.source,
            status: if spec.queued {
                RunStatus::Queued
            } else {
                RunStatus::Running
            },
            parent: spec.parent,
            idempotency_key: spec.idempotency_key.as_deref(),
            instance: inner.instance,
            pid: inner.identity.pid,
            host: &inner.identity.host,
            metadata,
            log_path,
        })?;
        log::debug!("runledger: run {id} ({}) begun", spec.name);
        Ok(Run::new(self.clone(), id))
    }

    /// One run, with its progress.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`](crate::Error::NotFound) if no run has this id (or it was pruned).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("index").source("worker"))?;
    /// let record = ledger.run(run.id())?;
    /// assert_eq!((record.status, record.source.as_str()), (RunStatus::Running, "worker"));
    /// assert_eq!(record.pid, std::process::id());
    /// # run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn run(&self, id: RunId) -> Result<RunRecord> {
        self.inner.store.run(id)
    }

    /// The runs that match `filter`, newest first.
    ///
    /// Listing active runs (queued, running, or both) reads an index and never
    /// scans the history. Every other filter (a terminal status, a name, a
    /// source, a time range) is applied while walking the history newest
    /// first, stopping as soon as `limit` runs matched: fast for recent or
    /// common matches, a walk of the whole history for a match that does not
    /// exist. Writes stay cheaper for it (see the crate's performance notes).
    ///
    /// # Errors
    ///
    /// Storage errors only.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunFilter, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("train"))?;
    /// let active = ledger.runs(RunFilter::default().active())?;
    /// assert_eq!(active[0].id, run.id());
    /// # run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn runs(&self, filter: RunFilter) -> Result<Vec<RunRecord>> {
        self.inner.store.runs(&filter)
    }

    /// The steps of a run, in the order they started.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`](crate::Error::NotFound) if no run has this id.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, StepStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("job"))?;
    /// run.step("download")?.succeed()?;
    /// let steps = ledger.steps(run.id())?;
    /// assert_eq!((steps[0].name.as_str(), steps[0].status), ("download", StepStatus::Succeeded));
    /// # run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn steps(&self, id: RunId) -> Result<Vec<StepRecord>> {
        self.inner.store.steps(id)
    }

    /// The history of a run: its status changes, its steps' status changes
    /// and cancel requests, in commit order.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`](crate::Error::NotFound) if no run has this id.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{EventKind, Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("job"))?;
    /// let id = run.id();
    /// run.succeed()?;
    /// let last = ledger.events(id)?.pop().unwrap();
    /// assert_eq!(last.kind, EventKind::Status { from: Some(RunStatus::Running), to: RunStatus::Succeeded });
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn events(&self, id: RunId) -> Result<Vec<EventRecord>> {
        self.inner.store.events(id)
    }

    /// Asks a run to stop, from any process, and returns its status after the
    /// call:
    ///
    /// - a `queued` run is `cancelled` at once;
    /// - a `running` run stays `running` with a cancel request, which its
    ///   owner sees through [`Run::is_cancel_requested`];
    /// - a run that has already ended is left exactly as it is: a cancel that
    ///   arrives after a run succeeded never changes it.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`](crate::Error::NotFound) if no run has this id.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("long-job"))?;
    /// assert_eq!(ledger.cancel(run.id())?, RunStatus::Running);
    /// assert!(run.is_cancel_requested()?);
    /// run.cancelled()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn cancel(&self, id: RunId) -> Result<RunStatus> {
        let (_, status) = self.transition(id, |state| Ok(crate::run::cancel_change(state)))?;
        Ok(status)
    }

    /// Deletes runs that ended more than `older_than` ago, with their steps
    /// and events, and returns how many. Active runs are never deleted. The
    /// records of processes that closed the ledger before the cutoff go too.
    ///
    /// Works in transactions that each look at no more than 500 runs, oldest
    /// first, so other writers are never held up for long; it stops at the
    /// first run created after the cutoff, so it does not walk the recent
    /// history. The newest run is kept whatever its age, so that its id is
    /// never handed out again.
    ///
    /// # Errors
    ///
    /// Storage errors only.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let deleted = ledger.prune(Duration::from_secs(30 * 24 * 3600))?;
    /// # assert_eq!(deleted, 0);
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn prune(&self, older_than: Duration) -> Result<u64> {
        let cutoff = self.now().saturating_sub(older_than);
        let mut deleted = 0u64;
        let mut after = Some(0);
        while let Some(start) = after {
            let (batch, next) = self.inner.store.prune_batch(cutoff, start, PRUNE_BATCH)?;
            deleted += batch as u64;
            after = next;
        }
        self.inner.store.prune_instances(cutoff)?;
        if deleted > 0 {
            log::info!("runledger: pruned {deleted} runs that ended before {cutoff}");
        }
        Ok(deleted)
    }

    /// Takes an exclusive lock on `key`, waiting in the queue up to the
    /// ledger's default wait ([`Builder::lock_wait`], 30 seconds unless set).
    ///
    /// The lock belongs to this process, not to a run; see
    /// [`Run::lock`](crate::Run::lock) for locks that end with a run.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`](crate::Error::Timeout) if the wait ran out (its
    /// place in the queue is removed); [`Error::Conflict`](crate::Error::Conflict)
    /// at once if only this process is in the way;
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let guard = ledger.lock("build:symbol=AAPL")?;
    /// // … only one process at a time gets here …
    /// guard.release()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn lock(&self, key: impl Into<String>) -> Result<LockGuard> {
        self.acquire(LockRequest::new([key]))
    }

    /// Takes an exclusive lock on `key` if it is free, without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`](crate::Error::Conflict), naming each holder in the
    /// way (key, mode, run, pid, host, for how long), if the key is taken or
    /// queued for; [`Error::InvalidInput`](crate::Error::InvalidInput) for a
    /// bad key.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// # let other = runledger::Ledger::open(ledger.path())?;
    /// let held = ledger.try_lock("train:symbol=AAPL")?;
    /// let err = other.try_lock("train:symbol=AAPL").unwrap_err();
    /// assert!(err.is_conflict());
    /// println!("{err}"); // lock "train:symbol=AAPL" is held by pid … on … (exclusive, for 0ms)
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn try_lock(&self, key: impl Into<String>) -> Result<LockGuard> {
        self.acquire(LockRequest::new([key]).no_wait())
    }

    /// Takes the locks `request` describes: all its keys in its mode, or
    /// none, waiting as it says.
    ///
    /// Waiting is first come, first served: the request takes a place in the
    /// queue (visible in [`locks`](Ledger::locks)) and no later request that
    /// conflicts with it overtakes it. A holder or waiter whose process died
    /// is removed on the spot, and the removal recorded.
    ///
    /// # Errors
    ///
    /// As [`lock`](Ledger::lock) and [`try_lock`](Ledger::try_lock), and
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for no keys, zero
    /// slots, or a slots capacity that differs from the one the key is used
    /// with.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use runledger::{LockMode, LockRequest};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// # let other = runledger::Ledger::open(ledger.path())?;
    /// let gpu = LockRequest::new(["gpu"]).mode(LockMode::Slots(2)).wait(Duration::from_secs(5));
    /// let first = ledger.acquire(gpu.clone())?;
    /// let second = other.acquire(gpu)?; // two slots: both hold
    /// assert_ne!(first.token(), second.token());
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn acquire(&self, request: LockRequest) -> Result<LockGuard> {
        self.acquire_for(request, None)
    }

    /// Every lock request, held or waiting: one record per key, ordered by
    /// key, then by place in the queue.
    ///
    /// # Errors
    ///
    /// Storage errors only.
    pub fn locks(&self) -> Result<Vec<LockRecord>> {
        self.inner.store.locks()
    }

    /// Releases every holder of `key` by force, for operators, and returns
    /// how many. Each release is recorded with `reason` and this process's
    /// pid and host; the holders find out ([`LockGuard::is_held`] is false,
    /// [`LockGuard::release`] returns [`Error::LockLost`](crate::Error::LockLost)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key or an
    /// empty reason.
    pub fn force_unlock(&self, key: &str, reason: &str) -> Result<usize> {
        input::check_name("lock key", key)?;
        if reason.trim().is_empty() {
            return Err(crate::Error::invalid("reason", reason, "must say why"));
        }
        let inner = &self.inner;
        let (released, wakes) =
            inner
                .store
                .force_unlock(key, &input::reason(reason), &inner.identity)?;
        wake(&wakes);
        log::warn!("runledger: forced release of {key:?} ({released} holders): {reason}");
        Ok(released)
    }

    /// Remembers a lock row to delete later.
    pub(crate) fn adopt_orphan(&self, orphan: Orphan) {
        self.inner.orphans.lock().push(orphan);
    }

    /// Retries deleting the rows of dropped guards and queue places.
    fn clean_orphans(&self) {
        let orphans = std::mem::take(&mut *self.inner.orphans.lock());
        for orphan in orphans {
            let done = match orphan {
                Orphan::Held { id, token } => self.release_lock(id, token).map(drop),
                Orphan::Queued { ticket } => self.inner.store.leave_queue(ticket).map(|w| wake(&w)),
            };
            if done.is_err() {
                self.adopt_orphan(orphan);
            }
        }
    }

    pub(crate) fn acquire_for(
        &self,
        request: LockRequest,
        run: Option<RunId>,
    ) -> Result<LockGuard> {
        // Without a wake-up socket (another platform) a waiter polls with a
        // backoff; with one, releasers wake it and the timer is only the
        // fallback (a holder killed with SIGKILL wakes no one).
        const FIRST_POLL: Duration = Duration::from_millis(1);
        const MAX_POLL: Duration = Duration::from_millis(100);
        let keys = request.checked_keys()?;
        if !self.inner.orphans.lock().is_empty() {
            self.clean_orphans();
        }
        let wait = request.wait.unwrap_or(Wait::For(self.inner.lock_wait));
        let inner = &self.inner;
        let socket = if wait == Wait::No {
            None
        } else {
            WakeSocket::bind()
        };
        let ask = LockAsk {
            keys: &keys,
            mode: request.mode,
            run,
            instance: inner.instance,
            pid: inner.identity.pid,
            host: &inner.identity.host,
            queue: wait != Wait::No,
            wake: socket.as_ref().map(WakeSocket::address),
        };
        let started = Instant::now();
        let mut place = QueuePlace {
            ledger: self,
            ticket: None,
        };
        let mut poll = if socket.is_some() {
            MAX_POLL
        } else {
            FIRST_POLL
        };
        loop {
            let ahead = match inner.store.try_lock(&ask, place.ticket)? {
                Attempt::Granted { id, token } => {
                    return Ok(place.granted(id, token, keys, request.mode, run));
                }
                Attempt::Blocked { ticket, ahead } => {
                    place.ticket = ticket;
                    ahead
                }
            };
            // Liveness is judged outside the write transaction (it reads
            // /proc); the reclaim then only removes the rows it judged.
            let dead: Vec<(Ahead, String)> = ahead
                .iter()
                .filter(|a| a.instance != inner.instance)
                .filter_map(|a| match judge(&inner.identity, &a.owner) {
                    Verdict::Dead(reason) => Some((a.clone(), reason)),
                    Verdict::Alive | Verdict::Unknown => None,
                })
                .collect();
            if !dead.is_empty() {
                wake(&inner.store.reclaim(&dead, &inner.identity)?);
                continue;
            }
            let now = self.now();
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
                    is_self: a.instance == inner.instance,
                })
                .collect();
            // Only this process's own *held* locks in the way: nothing else
            // will release them while this thread waits.
            let self_conflict = holders
                .iter()
                .all(|h| h.is_self && h.state == crate::lock::LockState::Held);
            if wait == Wait::No || self_conflict {
                return Err(crate::Error::Conflict {
                    keys,
                    holders,
                    self_conflict,
                });
            }
            let waited = started.elapsed();
            let remaining = match wait {
                Wait::For(limit) => limit.saturating_sub(waited),
                _ => Duration::MAX,
            };
            if remaining.is_zero() {
                return Err(crate::Error::Timeout {
                    keys,
                    waited,
                    holders,
                });
            }
            let nap = poll.min(remaining);
            match &socket {
                Some(socket) => {
                    socket.wait(nap);
                }
                None => std::thread::sleep(nap),
            }
            poll = (poll * 2).min(MAX_POLL);
            // Releasers hand keys to the head of the queue themselves: a
            // read tells whether that happened, without the write lock.
            if let Some(ticket) = place.ticket
                && let Some(token) = inner.store.granted_token(ticket)?
            {
                return Ok(place.granted(ticket, token, keys, request.mode, run));
            }
        }
    }

    pub(crate) fn lock_was_taken_away(&self, id: i64) -> Result<bool> {
        self.inner.store.was_taken_away(id)
    }

    pub(crate) fn lock_is_held(&self, id: i64, token: u64) -> Result<bool> {
        self.inner.store.lock_is_held(id, token)
    }

    /// Releases a held lock; false if it was no longer held.
    pub(crate) fn release_lock(&self, id: i64, token: u64) -> Result<bool> {
        match self.inner.store.release_lock(id, token)? {
            Some(wakes) => {
                wake(&wakes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub(crate) fn transition(
        &self,
        id: RunId,
        decide: impl FnOnce(&RunState) -> Result<Option<RunChange>>,
    ) -> Result<(RunState, RunStatus)> {
        let (state, status, wakes) = self.inner.store.update_run(id, decide)?;
        wake(&wakes);
        Ok((state, status))
    }

    pub(crate) fn finish_run(&self, id: RunId, outcome: &Outcome) -> Result<RunStatus> {
        let (_, status) = self.transition(id, |state| outcome.decide(id, state))?;
        log::debug!("runledger: run {id} ended as {status}");
        Ok(status)
    }

    pub(crate) fn cancel_requested(&self, id: RunId) -> Result<bool> {
        self.inner.store.cancel_requested(id)
    }

    pub(crate) fn begin_step(&self, run: RunId, name: &str) -> Result<i64> {
        self.inner.store.insert_step(run, name)
    }

    pub(crate) fn finish_step(
        &self,
        run: RunId,
        step: i64,
        name: &str,
        to: StepStatus,
        error: Option<String>,
    ) -> Result<()> {
        self.inner
            .store
            .finish_step(run, step, name, to, error.as_deref())
    }
}

/// A request's place in the lock queue, left on drop unless it was granted:
/// an error, a timeout or a panic never leaves a stale waiter behind.
struct QueuePlace<'l> {
    ledger: &'l Ledger,
    ticket: Option<i64>,
}

impl QueuePlace<'_> {
    /// The request was granted as lock `id`: the place is kept (it is now
    /// the lock's row) and handed to a guard.
    fn granted(
        &mut self,
        id: i64,
        token: u64,
        keys: Vec<String>,
        mode: crate::LockMode,
        run: Option<RunId>,
    ) -> LockGuard {
        self.ticket = None;
        LockGuard::new(self.ledger.clone(), id, keys, mode, token, run)
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            match self.ledger.inner.store.leave_queue(ticket) {
                Ok(wakes) => wake(&wakes),
                Err(e) => {
                    log::warn!("runledger: could not leave lock queue place {ticket} yet: {e}");
                    self.ledger.adopt_orphan(Orphan::Queued { ticket });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn ledger_is_send_sync_and_clone() {
        assert_send_sync_clone::<Ledger>();
    }

    #[test]
    fn error_is_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<crate::Error>();
    }
}
