//! The [`Ledger`] handle and its [`Builder`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::Result;
use crate::gate::{Gates, Held};
use crate::input;
use crate::keeper::{Keeper, Kept};
use crate::liveness::{InstanceId, InstanceLock, InstanceRecord, Judge, ProcessIdentity, Verdict};
use crate::location::Location;
use crate::lock::{Callers, LockGuard, LockRecord, LockRequest};
use crate::reaper::{DeadOwners, HungRuns, ReapReport, Reaped, Reaper, Retention, run_pass};
use crate::record::{EventRecord, InstanceInfo, RunCounts, RunFilter, RunRecord, StepRecord};
use crate::run::{
    DEFAULT_ADOPT_WITHIN, Outcome, Run, RunChange, RunId, RunSpec, RunState, RunStatus, StepStatus,
};
use crate::store::{Adopter, Adoption, HungRun, NewRun, Store, StoreConfig, Target};
use crate::watch::{EventCursor, EventPage, Watch};

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
    /// transactions before it may be rolled back (never half-applied). Much
    /// faster than `Full` on most disks, since a commit then waits for no
    /// fsync. The default.
    #[default]
    Normal,
    /// `synchronous=FULL`: one fsync of the log per commit, so a commit that
    /// returned survives a power cut. Writes that threads of one process make
    /// at the same moment share a commit, and so one fsync (see
    /// [`Builder::group_commit`]).
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
    target: Target,
    /// The PostgreSQL schema, if set (refused for a SQLite file).
    schema: Option<String>,
    /// How the PostgreSQL server is reached beside the URL (refused for a
    /// SQLite file unless left as it is).
    #[cfg(feature = "postgres")]
    route: crate::store::postgres::Route,
    /// The clock was given by the user.
    clock_given: bool,
    synchronous: Synchronous,
    busy_timeout: Duration,
    pool_size: u32,
    max_metadata_bytes: usize,
    clock: Arc<dyn Clock>,
    label: Option<String>,
    lock_wait: Duration,
    queue_after: Duration,
    stale_after: Duration,
    heartbeat_interval: Option<Duration>,
    reap_interval: Duration,
    retention: Option<Duration>,
    background: bool,
    reap_on_open: bool,
    host: Option<String>,
    group_commit: bool,
    create: bool,
}

/// How long an instance may go without a heartbeat before the lease judges
/// it dead, unless [`Builder::stale_after`] says otherwise.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);

/// How long an exclusive lock request waits for a held key outside the
/// queue, unless [`Builder::queue_after`] says otherwise.
///
/// Chosen with `cargo bench --bench locks -- contention` (32 processes
/// looping on 4 keys, against SQLite's `busy_timeout` alone; the figures
/// are in the repository's `BENCHMARKS.md`). Below the bound more requests
/// queue, which costs writes; above it the tail of an acquire grows.
pub const DEFAULT_QUEUE_AFTER: Duration = Duration::from_millis(20);

/// How often the background keeper runs the reapers, unless
/// [`Builder::reap_interval`] says otherwise.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(10);

impl Builder {
    /// How long this instance may stay silent before others that judge it
    /// by its heartbeat lease call it dead: the lease is recorded with the
    /// instance, so each process is judged by its own setting. Defaults to
    /// [`DEFAULT_STALE_AFTER`] (60 s).
    ///
    /// The lease only decides where the process itself cannot be checked:
    /// an instance on another host, or one on this host without a lock file
    /// or pid to check. A process on this host is judged by the process
    /// itself, never by the clock, so a long pause (a debugger, a suspended
    /// laptop, a clock jump) never gets it reaped. The lease compares the
    /// ledger's own timestamps, so hosts that share a ledger need clocks in
    /// step (NTP) to within a fraction of this.
    pub fn stale_after(mut self, stale_after: Duration) -> Builder {
        self.stale_after = stale_after;
        self
    }

    /// How often the background keeper renews this instance's heartbeat
    /// lease: one small write each time, however many runs and locks the
    /// instance owns. Must be shorter than [`stale_after`](Builder::stale_after);
    /// defaults to a quarter of it (15 s).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Builder {
        self.heartbeat_interval = Some(interval);
        self
    }

    /// How often the background keeper runs every reaper
    /// ([`Ledger::reap`]). Defaults to [`DEFAULT_REAP_INTERVAL`] (10 s). A
    /// lock of a dead holder does not wait for this: the next acquirer
    /// reclaims it at once.
    pub fn reap_interval(mut self, interval: Duration) -> Builder {
        self.reap_interval = interval;
        self
    }

    /// Prunes runs that finished more than `older_than` ago on every reap
    /// pass (the `retention` reaper; see [`Ledger::prune`]). Off unless set.
    pub fn retention(mut self, older_than: Duration) -> Builder {
        self.retention = Some(older_than);
        self
    }

    /// Whether this ledger keeps a background thread that heartbeats its
    /// instance and runs the reapers. On by default.
    ///
    /// One thread serves every ledger of the same database in a process and
    /// holds none of them open: it ends when the last one closes (a reap
    /// pass in progress, on a second thread, finishes first and closes the
    /// ledger if it was the last handle). With
    /// `false` the host calls [`Ledger::heartbeat`] more often than
    /// [`stale_after`](Builder::stale_after) (only processes judged by the
    /// lease need it) and [`Ledger::reap`] when it likes. Opening still
    /// reaps the dead instances at once either way, unless
    /// [`reap_on_open`](Builder::reap_on_open) is off.
    pub fn background(mut self, background: bool) -> Builder {
        self.background = background;
        self
    }

    /// Whether opening reaps dead owners at once (restart recovery, the
    /// `dead-owners` pass of [`Ledger::reap`]). On by default, so that a
    /// restarted service never shows its previous life's runs as running;
    /// turn it off to see those changes in the reports of your own first
    /// [`Ledger::reap`] instead.
    pub fn reap_on_open(mut self, reap: bool) -> Builder {
        self.reap_on_open = reap;
        self
    }

    /// Records this instance under another host name than the machine's,
    /// and makes it a host of its own: its process cannot be checked by
    /// others, so they judge it by its heartbeat lease only, and it judges
    /// every other instance that way too.
    ///
    /// For processes whose host name is not unique, and for tests that play
    /// several hosts in one process. Same rules as a run name.
    pub fn host(mut self, host: impl Into<String>) -> Builder {
        self.host = Some(host.into());
        self
    }

    /// How long [`Ledger::lock`] (and a [`LockRequest`] without a wait of
    /// its own) waits in the queue before failing with
    /// [`Error::Timeout`](crate::Error::Timeout). Defaults to 30 seconds.
    pub fn lock_wait(mut self, wait: Duration) -> Builder {
        self.lock_wait = wait;
        self
    }

    /// How long an exclusive request that finds a key held waits for it
    /// outside the queue before it takes a visible place there. Defaults to
    /// [`DEFAULT_QUEUE_AFTER`] (20 ms).
    ///
    /// Meanwhile it waits on the key's gate, an OS file lock that the holder
    /// lets go right after its release commits: the kernel wakes the next
    /// holder, which takes the key with one transaction, where a queued
    /// waiter first writes its place in the queue, is handed the key by the
    /// releaser and reads its grant. A busy key changes hands with fewer
    /// writes. The price is order: among the requests that wait less than
    /// this, the kernel picks who goes next, not arrival, and a request
    /// that arrives just as the key is let go (the releaser asking again at
    /// once, say) may take it first. A request that waits longer is queued
    /// and served first come, first served from then on, and nothing that
    /// comes later overtakes it. `Duration::ZERO`
    /// queues every waiting request at once (strict arrival order). Shared
    /// and slots requests always queue.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use runledger::Ledger;
    /// # let dir = tempfile::tempdir()?;
    /// let strict = Ledger::builder(dir.path().join("ledger.db"))
    ///     .queue_after(Duration::ZERO)
    ///     .open()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn queue_after(mut self, wait: Duration) -> Builder {
        self.queue_after = wait;
        self
    }

    /// The durability of each commit. Defaults to [`Synchronous::Normal`].
    pub fn synchronous(mut self, synchronous: Synchronous) -> Builder {
        self.synchronous = synchronous;
        self
    }

    /// How long a write waits for other writers before failing with
    /// [`Error::Busy`](crate::Error::Busy). Writers normally wait microseconds to milliseconds;
    /// this bounds pathological cases. Defaults to 30 seconds. A write that
    /// [shares a transaction](crate#group-commit) with writes of other
    /// ledgers of the file waits as long as the most patient of them. Values above
    /// SQLite's limit of `i32::MAX` milliseconds (about 24.8 days) count as
    /// that limit.
    pub fn busy_timeout(mut self, timeout: Duration) -> Builder {
        // SQLite takes the timeout in an i32 of milliseconds: rusqlite
        // panics on more, and the connection pool adds it to an Instant.
        const MAX_BUSY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);
        self.busy_timeout = timeout.min(MAX_BUSY_TIMEOUT);
        self
    }

    /// Whether writes that threads of this process make at the same moment
    /// share one transaction (group commit). On by default.
    ///
    /// A write that finds no other write of this process under way runs
    /// alone, as with grouping off. Writes that arrive while one is under
    /// way wait, and the next transaction runs them all, each isolated
    /// from the others (savepoints): one that fails is undone alone and its
    /// error goes to its own caller, and no call returns before the commit
    /// that holds its write (see [Group commit](crate#group-commit)). It
    /// concerns SQLite only.
    ///
    /// **Which writes are grouped.** The writes of a run's life —
    /// [`Ledger::begin_run`], [`Ledger::create_run`],
    /// [`Run::start`](crate::Run::start), [`Run::step`](crate::Run::step)
    /// and the step's outcome, the run's outcome, [`Ledger::cancel`],
    /// [`Run::heartbeat`](crate::Run::heartbeat),
    /// [`Run::event`](crate::Run::event) — wait in a queue and are run by
    /// whichever thread leads the next group. Lock writes (a grant, a
    /// release, leaving the queue), instance heartbeats, adoptions,
    /// [`Run::set_log_path`](crate::Run::set_log_path), watch registrations
    /// and reaper passes always run on their own thread: each waits for its
    /// turn and then leads the next group, taking the queued run writes into
    /// its transaction. A lock write therefore waits at most for the
    /// transaction under way, the lock writes queued before it and one group
    /// of run writes; its waiters are woken only after the commit, as
    /// always.
    ///
    /// **Which ledgers share a group.** Every [`Ledger`] of the same file in
    /// a process shares the queue (so threads that open a ledger each, for
    /// locks that exclude each other, group too), if they commit with the
    /// same [`Synchronous`] setting. Writes of other processes still take
    /// turns at SQLite's write lock.
    ///
    /// **What it gains.** With [`Synchronous::Full`] every commit waits for
    /// an fsync of the log, so one writer can commit only as often as the
    /// disk syncs. A group pays one fsync for all its writes: throughput
    /// grows with the number of threads writing, and each caller waits for
    /// about one fsync more at most, instead of queueing behind one fsync
    /// per writer. With [`Synchronous::Normal`] a commit costs about as much
    /// as the SQL of one write, so grouping gains less. Either way a group's
    /// writes still run one after another under SQLite's write lock:
    /// grouping saves commits, not the writes' own SQL, so what it can gain
    /// is bounded by how much a commit costs against a write. `cargo bench
    /// --bench group` measures that bound, its *floor*, on the machine at
    /// hand; the repository's `BENCHMARKS.md` has figures.
    ///
    /// **Nothing slow runs inside a group**: SQL and the plain-Rust state
    /// machine only, never file I/O or user code (a
    /// [`Reaper`](crate::Reaper) runs outside any transaction).
    ///
    /// With `false`, every write is a transaction of its own thread, and
    /// threads of one process meet at SQLite's write lock as other
    /// processes do.
    pub fn group_commit(mut self, group: bool) -> Builder {
        self.group_commit = group;
        self
    }

    /// The most connections this ledger keeps open, SQLite or PostgreSQL
    /// (readers run in parallel; writers take turns). Values below 1 count
    /// as 1. Defaults to 8.
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
    ///
    /// On PostgreSQL the ledger's time is otherwise the server's (see
    /// `Ledger::builder_postgres`); a clock given here replaces it.
    pub fn clock(mut self, clock: impl Clock) -> Builder {
        self.clock = Arc::new(clock);
        self.clock_given = true;
        self
    }

    /// The PostgreSQL schema the ledger's tables live in, created if
    /// missing, so that several applications (or environments) can share
    /// one database. Defaults to `runledger`. Use 1 to 48 lower-case ASCII
    /// letters, digits and underscores, not starting with a digit or `pg_`.
    ///
    /// Only for a ledger on PostgreSQL: [`open`](Builder::open) refuses it
    /// for a SQLite file.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn schema(mut self, schema: impl Into<String>) -> Builder {
        self.schema = Some(schema.into());
        self
    }

    /// Whether the URL goes through a pooler in transaction pooling mode,
    /// such as PgBouncer with `pool_mode = transaction`, which may give the
    /// server connection of one client to another between two
    /// transactions. Defaults to `false`: a direct connection (or a pooler
    /// in session mode), and nothing below applies.
    ///
    /// With `true`, the ledger relies on nothing of a session beyond one
    /// transaction: no setting of the session (the schema is set with `SET
    /// LOCAL` in every transaction), no named prepared statements (every
    /// statement is sent unnamed, in one round trip, and planned each
    /// time), no session advisory lock (the migrations at open take one of
    /// their transaction, as they do on a direct connection too). What it
    /// costs: each read (a method that only reads, such as
    /// [`Ledger::run`] or [`Ledger::locks`], and each re-read of a waiting
    /// lock request or watch) becomes a transaction, two round trips more;
    /// writes cost what they cost on a direct connection.
    ///
    /// **Wake-ups.** A pooler cannot carry `LISTEN`: give a direct URL to
    /// the same server with [`Builder::listen_url`], and waiters and
    /// watches are woken across hosts as on a direct connection. Without
    /// one the ledger does not listen: a lock waiter or a
    /// [`watch`](Ledger::watch) is still woken at once by a process of its
    /// own host (wake-ups of one host never go through the server), but a
    /// release or an event on another host reaches it only at its next
    /// timed re-read, at most 100 ms later for a lock waiter and 1 s for a
    /// watch. The connection budget of a process is then its ledgers' pool
    /// sizes through the pooler, plus one direct connection per listen URL.
    ///
    /// Only for a ledger on PostgreSQL: [`open`](Builder::open) refuses it
    /// for a SQLite file.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use runledger::Ledger;
    ///
    /// // PgBouncer on 6432, PostgreSQL itself on 5432 for LISTEN.
    /// let ledger = Ledger::builder_postgres("postgres://app@db.internal:6432/jobs")
    ///     .transaction_pooler(true)
    ///     .listen_url("postgres://app@db.internal:5432/jobs")
    ///     .open()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn transaction_pooler(mut self, pooler: bool) -> Builder {
        self.route.transaction_pooler = pooler;
        self
    }

    /// A connection URL (or key=value string, with its own `sslmode`) for
    /// the connection that listens for wake-ups (`LISTEN`), if it must not
    /// go to the ledger's URL: a direct connection to the same PostgreSQL
    /// server, when the ledger's URL goes through a transaction pooler
    /// (see [`Builder::transaction_pooler`]). Defaults to none: the
    /// ledger's own URL, or no listening at all through a transaction
    /// pooler.
    ///
    /// It must reach the database the ledger's writes go to (notifications
    /// of a database reach only its own listeners), else wake-ups of other
    /// hosts arrive only at the waiters' timed re-reads. One
    /// connection per listen URL serves every ledger of the process that
    /// names it.
    ///
    /// Only for a ledger on PostgreSQL: [`open`](Builder::open) refuses it
    /// for a SQLite file.
    ///
    /// # Examples
    ///
    /// See [`Builder::transaction_pooler`].
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn listen_url(mut self, url: impl Into<String>) -> Builder {
        self.route.listen_url = Some(url.into());
        self
    }

    /// A label for this process's instance, shown to operators (such as
    /// `"api-server"`). Same rules as a run name. Defaults to none.
    pub fn label(mut self, label: impl Into<String>) -> Builder {
        self.label = Some(label.into());
        self
    }

    /// Whether [`open`](Builder::open) creates a ledger that does not exist
    /// yet (the default), or refuses with [`Error::Open`](crate::Error::Open)
    /// and creates nothing: no file (and no folder) for a path, no schema
    /// or tables on PostgreSQL. For tools that only read, where a typo in
    /// the location must not look like an empty ledger.
    pub fn create(mut self, create: bool) -> Builder {
        self.create = create;
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
        if let Some(host) = &self.host {
            input::check_name("host", host)?;
        }
        let heartbeat_every = self.heartbeat_interval.unwrap_or(self.stale_after / 4);
        if heartbeat_every.is_zero() || heartbeat_every >= self.stale_after {
            return Err(crate::Error::InvalidInput {
                what: "heartbeat interval",
                value: format!(
                    "{heartbeat_every:?} with stale_after {:?}",
                    self.stale_after
                ),
                reason: "must be above zero and shorter than stale_after".into(),
            });
        }
        if self.reap_interval.is_zero() {
            return Err(crate::Error::InvalidInput {
                what: "reap interval",
                value: "0s".into(),
                reason: "must be above zero".into(),
            });
        }
        let config = StoreConfig {
            synchronous: self.synchronous.pragma(),
            busy_timeout: self.busy_timeout,
            pool_size: self.pool_size,
            group_commit: self.group_commit,
            create: self.create,
        };
        // `sqlite:///srv/ledger.db`, `file://…`: a URL of another kind,
        // which would otherwise make a file of that name in the working
        // folder.
        if let Target::File(path) = &self.target
            && let Some(scheme) = url_scheme(path)
        {
            return Err(crate::Error::InvalidInput {
                what: "ledger location",
                value: path.display().to_string(),
                reason: format!(
                    "a {scheme}:// URL names no ledger: give a file path (such as \
                     /srv/ledger.db) or a postgres:// URL"
                ),
            });
        }
        #[cfg(feature = "postgres")]
        if let Target::File(path) = &self.target
            && self.route != crate::store::postgres::Route::default()
        {
            return Err(crate::Error::InvalidInput {
                what: "PostgreSQL connection setting",
                value: format!("transaction_pooler or listen_url for {}", path.display()),
                reason: "these settings are for a ledger on PostgreSQL, not a SQLite file".into(),
            });
        }
        let target = match (self.target, self.schema) {
            (Target::File(path), None) => Target::File(path),
            #[cfg(not(feature = "postgres"))]
            (target @ Target::NoPostgres(_), _) => target,
            (Target::File(path), Some(schema)) => {
                return Err(crate::Error::InvalidInput {
                    what: "schema name",
                    value: format!("{schema:?} for {}", path.display()),
                    reason: "a schema is for a ledger on PostgreSQL, not a SQLite file".into(),
                });
            }
            #[cfg(feature = "postgres")]
            (Target::Postgres { url, schema, .. }, given) => {
                // The builder's schema wins over one in the URL.
                let schema = given.unwrap_or(schema);
                crate::store::postgres::check_schema(&schema)?;
                Target::Postgres {
                    url,
                    schema,
                    route: self.route,
                }
            }
        };
        let store = Store::open(&target, &config, self.clock.clone(), self.clock_given)?;
        let clock = store.clock(&self.clock);
        let mut identity = ProcessIdentity::current();
        if let Some(host) = self.host {
            // A host of its own: nothing here can check its process.
            identity.host = host;
            identity.boot_id = None;
        }
        // Instance lock files and key gates live in the sidecar folder of a
        // SQLite file; on PostgreSQL, processes are judged by pid and lease.
        let (instances_dir, gates, instance_lock) = if store.is_file() {
            let instances_dir = crate::store::sqlite::instances_dir(store.path());
            let gates = Gates::new(&crate::store::sqlite::sidecar_dir(store.path()));
            let instance_lock = match InstanceLock::take(&instances_dir, &identity) {
                Ok(lock) => Some(lock),
                Err(e) => {
                    // Liveness then falls back to the pid and the lease.
                    log::warn!(
                        "runledger: no instance lock in {}: {e}",
                        instances_dir.display()
                    );
                    None
                }
            };
            (instances_dir, gates, instance_lock)
        } else {
            (PathBuf::new(), Gates::none(), None)
        };
        let instance = store.insert_instance(
            &identity,
            self.label.as_deref(),
            instance_lock.as_ref().map(InstanceLock::name),
            self.stale_after,
        )?;
        log::debug!(
            "runledger: opened {} as instance {instance}",
            store.path().display()
        );
        let mut reapers: Vec<Arc<dyn Reaper>> = vec![Arc::new(DeadOwners), Arc::new(HungRuns)];
        if let Some(older_than) = self.retention {
            reapers.push(Arc::new(Retention(older_than)));
        }
        let inner = Arc::new(Inner {
            judge: Judge {
                me: identity,
                instances_dir,
                stale_after: self.stale_after,
            },
            location: store.location(),
            store,
            gates,
            clock,
            instance: AtomicI64::new(instance),
            instance_lock,
            label: self.label,
            max_metadata_bytes: self.max_metadata_bytes,
            lock_wait: self.lock_wait,
            queue_after: self.queue_after,
            callers: Callers::default(),
            orphans: parking_lot::Mutex::new(Vec::new()),
            reapers: parking_lot::RwLock::new(reapers),
            keeper: std::sync::OnceLock::new(),
        });
        let ledger = Ledger { inner };
        // Restart recovery: whatever a previous life of this service (or any
        // dead process) left running is closed before this one starts.
        if self.reap_on_open
            && let Err(e) = ledger.reap_dead_owners()
        {
            log::warn!("runledger: could not reap dead instances on open: {e}");
        }
        if self.background {
            let weak = Arc::downgrade(&ledger.inner);
            let kept: std::sync::Weak<dyn Kept> = weak;
            let keeper = Keeper::join(
                ledger.inner.store.path(),
                kept,
                heartbeat_every,
                self.reap_interval,
            )
            .map_err(|e| crate::Error::open(ledger.path(), "cannot start the keeper thread", e))?;
            let _ = ledger.inner.keeper.set(keeper);
        }
        Ok(ledger)
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
    pub(crate) inner: Arc<Inner>,
}

/// What every clone of a ledger shares: the store, the gates, and this
/// instance's state. Guards hold it through a [`Ledger`].
pub(crate) struct Inner {
    pub(crate) store: Store,
    /// Where the store lives.
    location: Location,
    /// The per-key gates of exclusive requests.
    pub(crate) gates: Gates,
    clock: Arc<dyn Clock>,
    /// This process's identity, and how it judges others.
    pub(crate) judge: Judge,
    /// This process's instance: changes only if a reaper closed it (see
    /// [`Ledger::heartbeat`]).
    instance: AtomicI64,
    /// Held for the instance's whole life; released last, on drop.
    instance_lock: Option<InstanceLock>,
    /// The instance's label, recorded again if it registers again.
    label: Option<String>,
    max_metadata_bytes: usize,
    pub(crate) lock_wait: Duration,
    pub(crate) queue_after: Duration,
    /// Which thread or task holds each lock granted here.
    pub(crate) callers: Callers,
    /// Lock rows a guard or a queue place could not delete on drop (the
    /// database was busy, an I/O error): retried on the next lock call, so
    /// that a live process never leaves a stale holder or waiter behind.
    orphans: parking_lot::Mutex<Vec<Orphan>>,
    /// The built-in reapers, then the host's.
    reapers: parking_lot::RwLock<Vec<Arc<dyn Reaper>>>,
    /// The background keeper serving this instance, if any.
    keeper: std::sync::OnceLock<Arc<Keeper>>,
}

impl Inner {
    pub(crate) fn instance(&self) -> i64 {
        self.instance.load(Ordering::Acquire)
    }

    pub(crate) fn identity(&self) -> &ProcessIdentity {
        &self.judge.me
    }
}

impl Kept for Inner {
    fn heartbeat(self: Arc<Self>) {
        if let Err(e) = (Ledger { inner: self }).heartbeat() {
            log::warn!("runledger: heartbeat failed: {e}");
        }
    }

    fn reap(self: Arc<Self>) {
        // Each failing pass is logged by the pass itself.
        if let Err(e) = (Ledger { inner: self }).reap() {
            log::warn!("runledger: reap failed: {e}");
        }
    }
}

/// A lock row whose owner dropped it without managing to delete it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Orphan {
    Held { id: i64, token: u64 },
    Queued { ticket: i64 },
}

impl Drop for Inner {
    fn drop(&mut self) {
        let instance = self.instance();
        match self.store.close_instance(self.identity(), instance) {
            Ok(()) => {}
            Err(e) => log::warn!("runledger: could not close instance {instance}: {e}"),
        }
        // The lock file goes after the row is closed (the field's own drop).
        if let Some(keeper) = self.keeper.get() {
            keeper.wake();
        }
    }
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.store.path())
            .field("instance", &self.inner.instance())
            .finish()
    }
}

/// The error when reapers closed this process's instance again right after
/// it registered anew: its heartbeats cannot keep up with the lease.
pub(crate) fn closed_twice(path: &Path) -> crate::Error {
    let e = std::io::Error::other(
        "this process's instance was closed by reapers twice in a row \
         (its heartbeat cannot keep up with stale_after)",
    );
    crate::Error::from(e).in_ledger(path)
}

/// Why a run is judged hung, for its `error`.
fn hung_reason(run: &HungRun, now: crate::Timestamp) -> String {
    use crate::lock::Seconds;
    match run.last_heartbeat {
        Some(beat) => format!(
            "hung: no heartbeat for {} (timeout {})",
            Seconds(now.saturating_duration_since(beat)),
            Seconds(run.timeout)
        ),
        None => format!(
            "hung: no heartbeat since it started {} ago (timeout {})",
            Seconds(now.saturating_duration_since(run.started_at.unwrap_or(run.hung_at))),
            Seconds(run.timeout)
        ),
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

    /// Settings for opening the ledger at `path`: a SQLite file, created if
    /// missing.
    ///
    /// A `path` that is a `postgres://` or `postgresql://` URL names a
    /// ledger on PostgreSQL instead, exactly as `Ledger::builder_postgres`
    /// does (the crate must be built with the `postgres` feature, else
    /// [`Builder::open`] refuses it): a command
    /// line or a configuration file can then name either kind of ledger
    /// with one string. [`Ledger::location`] gives back a string that names the
    /// same ledger (without a password).
    pub fn builder(path: impl AsRef<Path>) -> Builder {
        let path = path.as_ref();
        if let Some(url) = path.to_str().filter(|p| is_postgres_url(p)) {
            #[cfg(feature = "postgres")]
            return Ledger::builder_postgres(url);
            #[cfg(not(feature = "postgres"))]
            return Builder::at(Target::NoPostgres(url.to_owned()));
        }
        Builder::at(Target::File(path.to_owned()))
    }

    /// Settings for opening the ledger in a PostgreSQL database: one ledger
    /// that processes on many hosts share (feature `postgres`).
    ///
    /// `url` is a libpq-style connection URL or key=value string, such as
    /// `postgres://app@db.internal:5432/jobs` or `host=/run/postgresql
    /// dbname=jobs`. TLS (with rustls) follows libpq's `sslmode` (`disable`,
    /// `prefer`, the default, `require`, `verify-ca`, `verify-full`) and
    /// `sslrootcert` (a PEM file of root certificates), in either form:
    /// `postgres://app@db.internal/jobs?sslmode=verify-full&sslrootcert=/etc/ca.pem`.
    /// `prefer` and `require` encrypt without checking the server's
    /// certificate, as in libpq; `verify-ca` checks that a root signed it,
    /// `verify-full` also that it names the host (without `sslrootcert`,
    /// both read `~/.postgresql/root.crt`). The ledger's tables live in
    /// one schema, created (and migrated, under an advisory lock) on open:
    /// the one [`Builder::schema`] gives, else the one named after a `#` at
    /// the end of a URL (`postgres://app@db.internal/jobs#nightly`, the
    /// form [`Ledger::location`] shows), else `runledger`. Every method
    /// then behaves as on SQLite, with these differences:
    ///
    /// - **Time is the server's.** Timestamps, leases and staleness follow
    ///   the database server's clock: each process measures its offset to
    ///   it at open and at every heartbeat (within half a round trip), so
    ///   hosts whose clocks disagree still agree on when a lease ran out.
    ///   (A clock given to [`Builder::clock`] replaces it, for tests.)
    /// - **Liveness.** A process on the same host (same boot, same pid
    ///   namespace) is judged by its pid and start time, as on SQLite;
    ///   processes on other hosts by their heartbeat lease
    ///   ([`Builder::stale_after`]).
    /// - **Writes run in parallel.** Each write transaction claims
    ///   (transaction-level advisory locks) only the run, the instance and
    ///   the lock keys it changes, so the writers of one run or one key take
    ///   turns, as SQLite's writers take turns on the file, while those of
    ///   unrelated runs and keys commit side by side, from every host;
    ///   [`Builder::busy_timeout`] bounds a wait. The event feed stays
    ///   complete and ordered: an event id is its transaction's id shifted
    ///   left (not a count), and [`events_since`](Ledger::events_since)
    ///   returns an event once every transaction older than its own has
    ///   ended (it waits for them, up to [`Builder::busy_timeout`]), so a
    ///   transaction left open on the server (any database of
    ///   it, for example a session idle in a transaction) delays the feed
    ///   until it ends, and never makes it skip. Lock waiters and
    ///   [`watch`](Ledger::watch)es are woken across hosts by
    ///   `LISTEN`/`NOTIFY`.
    /// - **Connections.** A ledger (all its clones) keeps at most
    ///   [`Builder::pool_size`] pooled connections, opened as they are
    ///   needed, and the process keeps one more per server, shared by all
    ///   its ledgers there, that listens for wake-ups: the budget of a
    ///   process is its ledgers' pool sizes plus one per server (through a
    ///   transaction pooler, one per [`Builder::listen_url`] instead, or
    ///   none; see [`Builder::transaction_pooler`]). A server
    ///   that refuses connections (`max_connections`, a role's limit)
    ///   makes a call fail with an error carrying the server's words once
    ///   [`Builder::busy_timeout`] has passed without a connection.
    /// - **Durability** is the server's (`synchronous_commit`):
    ///   [`Builder::synchronous`], [`Builder::group_commit`] and
    ///   [`Builder::queue_after`] concern SQLite only.
    /// - [`Ledger::location`] is [`Location::Postgres`]: the URL without its
    ///   password, and the schema; it displays as
    ///   `postgres://app@db.internal:5432/jobs#runledger`, the string that
    ///   [`Ledger::path`] holds.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use runledger::{Ledger, RunSpec};
    ///
    /// let ledger = Ledger::builder_postgres("postgres://app@db.internal/jobs")
    ///     .schema("nightly")
    ///     .open()?;
    /// let run = ledger.begin_run(RunSpec::new("backup"))?;
    /// run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn builder_postgres(url: impl Into<String>) -> Builder {
        let mut url = url.into();
        // The scheme in any case (`POSTGRES://`), as `Ledger::builder`
        // takes it, in the lower case the client library reads.
        if is_postgres_url(&url)
            && let Some((scheme, _)) = url.split_once("://")
        {
            let lower = scheme.to_ascii_lowercase();
            url.replace_range(..scheme.len(), &lower);
        }
        // The form `Location` displays: the schema after a `#`, in a URL
        // only (in a key=value string, a `#` may be part of a password).
        let mut schema = crate::store::postgres::DEFAULT_SCHEMA.to_owned();
        // A `#` before the last `@` is part of a password, not a schema.
        if is_postgres_url(&url)
            && let Some(hash) = url.rfind('#')
            && url.rfind('@').is_none_or(|at| hash > at)
        {
            schema = url[hash + 1..].to_owned();
            url.truncate(hash);
        }
        Builder::at(Target::Postgres {
            url,
            schema,
            route: crate::store::postgres::Route::default(),
        })
    }
}

/// The scheme of a location that starts as a URL (`scheme://`), a
/// scheme being a letter, then letters, digits, `+`, `-` or `.`.
fn url_scheme(path: &Path) -> Option<&str> {
    let (scheme, _) = path.to_str()?.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// Whether a ledger's location is a PostgreSQL URL rather than a path.
fn is_postgres_url(location: &str) -> bool {
    let scheme = location.split_once("://").map(|(scheme, _)| scheme);
    scheme
        .is_some_and(|s| s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql"))
}

impl Builder {
    fn at(target: Target) -> Builder {
        Builder {
            target,
            schema: None,
            #[cfg(feature = "postgres")]
            route: crate::store::postgres::Route::default(),
            clock_given: false,
            synchronous: Synchronous::default(),
            busy_timeout: Duration::from_secs(30),
            pool_size: 8,
            max_metadata_bytes: 64 * 1024,
            clock: Arc::new(SystemClock),
            label: None,
            lock_wait: Duration::from_secs(30),
            queue_after: DEFAULT_QUEUE_AFTER,
            stale_after: DEFAULT_STALE_AFTER,
            heartbeat_interval: None,
            reap_interval: DEFAULT_REAP_INTERVAL,
            retention: None,
            background: true,
            reap_on_open: true,
            host: None,
            group_commit: true,
            create: true,
        }
    }
}

impl Ledger {
    /// The canonical path of the database file, for a ledger on SQLite
    /// (symbolic links resolved).
    ///
    /// A ledger on PostgreSQL has no file: there the path holds the string
    /// [`Location`] displays, the URL without its password and the schema
    /// after a `#` (`postgres://app@db.internal:5432/jobs#runledger`), so
    /// that `Ledger::open(ledger.path())` opens the same ledger on either
    /// store. Code that may meet both stores should ask
    /// [`location`](Ledger::location) instead, which says which it is;
    /// `path` stays for the common case of a file, and is not deprecated.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let db = dir.path().join("ledger.db");
    /// let ledger = runledger::Ledger::open(&db)?;
    /// assert_eq!(ledger.path(), db.canonicalize()?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> &Path {
        self.inner.store.path()
    }

    /// Where the ledger lives: a SQLite file or a PostgreSQL schema.
    ///
    /// Its `Display` is the string that opens the same ledger again (never
    /// with a password), the one errors and logs name it by.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, Location};
    /// # let dir = tempfile::tempdir()?;
    /// let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// match ledger.location() {
    ///     Location::Sqlite(file) => println!("ledger file {}", file.display()),
    ///     Location::Postgres { url, schema, .. } => println!("schema {schema} of {url}"),
    ///     other => println!("ledger {other}"),
    /// }
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// The id of this process's instance: the owner of the runs it begins
    /// and the locks it takes.
    ///
    /// It changes only if reapers judged this process dead (after a long
    /// pause, say) and it registered again (see [`Ledger::heartbeat`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("build"))?;
    /// assert_eq!(ledger.run(run.id())?.instance, ledger.instance_id());
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn instance_id(&self) -> InstanceId {
        InstanceId::from(self.inner.instance())
    }

    /// The current time by the ledger's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Checks `spec` as [`begin_run`](Ledger::begin_run) does, and records
    /// nothing: for a tool that must refuse bad input before it starts
    /// anything. What only the database can tell (a duplicate idempotency
    /// key, a missing parent) is not checked.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput), as
    /// [`begin_run`](Ledger::begin_run).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let err = ledger.check_run_spec(&RunSpec::new("")).unwrap_err();
    /// assert!(err.is_invalid_input());
    /// assert!(ledger.runs(Default::default())?.is_empty());
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn check_run_spec(&self, spec: &RunSpec) -> Result<()> {
        self.checked_spec(spec).map(drop)
    }

    /// The checks of a spec; returns its metadata and log path as stored.
    fn checked_spec(&self, spec: &RunSpec) -> Result<(Option<String>, Option<String>)> {
        input::check_name("run name", &spec.name)?;
        input::check_name("run source", &spec.source)?;
        if let Some(key) = &spec.idempotency_key {
            input::check_name("idempotency key", key)?;
        }
        let metadata = input::metadata(&spec.metadata, self.inner.max_metadata_bytes)?;
        let log_path = spec.log_path.as_deref().map(input::log_path).transpose()?;
        Ok((metadata, log_path))
    }

    /// Records a new run, owned by this process, and returns its guard.
    ///
    /// The run is `running` (or `queued`, see [`RunSpec::queued`]) and
    /// visible to every process as soon as this returns.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad name, source or idempotency key,
    ///   metadata over the size limit or nested more than 127 levels deep, or a non-UTF-8 log path;
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
        let id = self.insert_run(&spec, None)?;
        log::debug!("runledger: run {id} ({}) begun", spec.name);
        Ok(Run::new(self.clone(), id))
    }

    /// Records a new run for another process to do, and returns its id.
    ///
    /// The run is `queued` and owned by nobody: this process cannot end it,
    /// and its death does not fail it. Pass the id to the worker (through
    /// `RUNLEDGER_RUN_ID` in its environment, for example, which `runledger
    /// exec` reads); the worker calls [`adopt_run`](Ledger::adopt_run) and
    /// from then on owns the run like one it had begun: its outcome, its
    /// steps, its locks, and its death, after which the reaper fails the run.
    ///
    /// A run that nobody adopts within [`RunSpec::adopt_within`] (by default
    /// [`DEFAULT_ADOPT_WITHIN`], five minutes) is failed by the `dead-owners`
    /// reaper with the reason `not adopted within …`. Until then it can be
    /// cancelled like any queued run. The record's `pid` and `host` name the
    /// creating process until the run is adopted, and its `instance` is 0.
    ///
    /// # Errors
    ///
    /// As [`begin_run`](Ledger::begin_run).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// // The dashboard:
    /// let id = ledger.create_run(RunSpec::new("backtest").source("dashboard"))?;
    /// // std::process::Command::new("worker").env("RUNLEDGER_RUN_ID", id.to_string()).spawn()?;
    /// assert_eq!(ledger.run(id)?.status, RunStatus::Queued);
    ///
    /// // The worker, in another process:
    /// # let worker = ledger.clone();
    /// let run = worker.adopt_run(id)?;
    /// assert_eq!(worker.run(id)?.status, RunStatus::Running);
    /// run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn create_run(&self, spec: RunSpec) -> Result<RunId> {
        let within = spec.adopt_within.unwrap_or(DEFAULT_ADOPT_WITHIN);
        if within.is_zero() {
            return Err(crate::Error::invalid(
                "adoption deadline",
                "0s",
                "must be more than zero, or no process could ever adopt the run",
            ));
        }
        let id = self.insert_run(&spec, Some(within))?;
        log::debug!("runledger: run {id} ({}) created for adoption", spec.name);
        Ok(id)
    }

    /// Takes ownership of a run made by [`create_run`](Ledger::create_run)
    /// in another process, and starts it (`queued → running`), in one
    /// compare-and-set: of several processes that try, exactly one wins.
    ///
    /// The returned guard has the same rules as one from
    /// [`begin_run`](Ledger::begin_run): the run ends with its outcome, or
    /// as failed if the guard drops without one, and the reaper fails it if
    /// this process dies. Use [`adopt_run_queued`](Ledger::adopt_run_queued)
    /// to take its locks before it counts as running.
    ///
    /// # Errors
    ///
    /// - [`Error::AlreadyOwned`](crate::Error::AlreadyOwned) if another
    ///   process adopted the run first, or it was begun by its owner rather
    ///   than created for adoption: the error names that owner;
    /// - [`Error::RunFinished`](crate::Error::RunFinished) if the run has
    ///   ended (cancelled, or failed because its adoption deadline passed:
    ///   adopting it after the deadline fails it at once);
    /// - [`Error::NotFound`](crate::Error::NotFound) for an unknown id.
    pub fn adopt_run(&self, id: RunId) -> Result<Run> {
        self.adopt(id, true)
    }

    /// As [`adopt_run`](Ledger::adopt_run), but leaves the run `queued`:
    /// take its locks with [`Run::acquire`], then call [`Run::start`].
    ///
    /// # Errors
    ///
    /// As [`adopt_run`](Ledger::adopt_run).
    pub fn adopt_run_queued(&self, id: RunId) -> Result<Run> {
        self.adopt(id, false)
    }

    fn adopt(&self, id: RunId, start: bool) -> Result<Run> {
        let inner = &self.inner;
        let mut reregistered = false;
        loop {
            let adopter = Adopter {
                instance: inner.instance(),
                pid: inner.identity().pid,
                host: &inner.identity().host,
            };
            match inner.store.adopt_run(id, &adopter, start)? {
                Adoption::Adopted => {
                    log::debug!("runledger: run {id} adopted");
                    return Ok(Run::new(self.clone(), id));
                }
                Adoption::Expired(status) => {
                    return Err(crate::Error::RunFinished { run: id, status });
                }
                Adoption::InstanceClosed if reregistered => {
                    return Err(closed_twice(inner.store.path()));
                }
                Adoption::InstanceClosed => {
                    self.register_again()?;
                    reregistered = true;
                }
            }
        }
    }

    /// Checks a spec and inserts its run: owned by this instance, or by
    /// nobody until adopted when `adopt_within` is given.
    fn insert_run(&self, spec: &RunSpec, adopt_within: Option<Duration>) -> Result<RunId> {
        let (metadata, log_path) = self.checked_spec(spec)?;
        // Stored in ms and added to times in SQL: a century is long enough
        // for any deadline, and keeps every sum far from overflowing.
        const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        let millis = |d: Duration| d.min(CENTURY).as_millis() as i64;
        let inner = &self.inner;
        let mut new = NewRun {
            name: &spec.name,
            source: &spec.source,
            status: if spec.queued || adopt_within.is_some() {
                RunStatus::Queued
            } else {
                RunStatus::Running
            },
            parent: spec.parent,
            idempotency_key: spec.idempotency_key.as_deref(),
            idempotency_window: spec
                .idempotency_key
                .as_ref()
                .and(spec.idempotency_window)
                .map(millis),
            instance: inner.instance(),
            pid: inner.identity().pid,
            host: &inner.identity().host,
            metadata,
            log_path,
            heartbeat_timeout: spec.heartbeat_timeout.map(millis),
            adopt_within: adopt_within.map(millis),
        };
        match inner.store.insert_run(&new)? {
            Some(id) => Ok(id),
            None => {
                // This instance was reaped while silent: register again.
                self.register_again()?;
                new.instance = inner.instance();
                inner
                    .store
                    .insert_run(&new)?
                    .ok_or_else(|| closed_twice(inner.store.path()))
            }
        }
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
        // No stored name or source holds a control character (they are
        // refused on the way in), and PostgreSQL cannot take a NUL in a
        // parameter at all.
        let impossible = |v: &Option<String>| v.as_deref().is_some_and(|v| v.contains('\0'));
        if impossible(&filter.name) || impossible(&filter.source) {
            return Ok(Vec::new());
        }
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

    /// The next events of every run and every lock after `cursor`, at most
    /// `limit` of them, in commit order, with the cursor to continue from
    /// (lock events are not in [`events`](Ledger::events) of a run): the feed a
    /// dashboard polls to follow every change in every process without
    /// reading the ledger again.
    ///
    /// One read of the events table's primary key from the cursor on: its
    /// cost depends on the events returned, not on the history's length.
    /// Start from [`EventCursor::START`] for the whole history, or from
    /// [`events_cursor`](Ledger::events_cursor) for only what comes next;
    /// [`watch`](Ledger::watch) waits for new events instead of polling.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a cursor past
    /// the end of the feed (saved from another ledger, say: it would skip
    /// every event up to it); [`Error::Busy`](crate::Error::Busy) or
    /// [`Error::Storage`](crate::Error::Storage) if the ledger cannot be read.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{EventCursor, Ledger, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let mut cursor = EventCursor::START;
    /// ledger.begin_run(RunSpec::new("a"))?.succeed()?;
    /// let page = ledger.events_since(cursor, 100)?;
    /// assert_eq!(page.events.len(), 2); // registered running, then succeeded
    /// cursor = page.next;
    /// assert!(ledger.events_since(cursor, 100)?.events.is_empty());
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn events_since(&self, cursor: EventCursor, limit: usize) -> Result<EventPage> {
        let events = self
            .inner
            .store
            .events_since(i64::from(cursor.last_event_id()), limit)?;
        if events.is_empty() {
            self.check_cursor(cursor)?;
        }
        let next = events
            .last()
            .map_or(cursor, |event| EventCursor::after(event.id));
        Ok(EventPage { events, next })
    }

    /// Refuses a cursor past the end of the feed: saved from another ledger
    /// (or a ledger since made anew), it would skip every event up to it.
    fn check_cursor(&self, cursor: EventCursor) -> Result<()> {
        let end = self.events_cursor()?;
        if cursor > end {
            return Err(crate::Error::invalid(
                "event cursor",
                &cursor.to_string(),
                format!(
                    "is past the end of this ledger's feed (event {end}); \
                     was it saved from another ledger?"
                ),
            ));
        }
        Ok(())
    }

    /// The cursor at the end of the feed as it is now: the events after it
    /// are those still to come.
    ///
    /// # Errors
    ///
    /// As [`events_since`](Ledger::events_since).
    pub fn events_cursor(&self) -> Result<EventCursor> {
        Ok(EventCursor::after(self.inner.store.last_event_id()?))
    }

    /// Follows the event feed live from `cursor`: see [`Watch`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a cursor past
    /// the end of the feed; [`Error::Busy`](crate::Error::Busy) or
    /// [`Error::Storage`](crate::Error::Storage) if the watch cannot be
    /// registered.
    pub fn watch(&self, cursor: EventCursor) -> Result<Watch> {
        self.check_cursor(cursor)?;
        Watch::new(self.clone(), cursor)
    }

    pub(crate) fn add_watcher(&self, address: &str) -> Result<i64> {
        self.inner.store.add_watcher(self.inner.instance(), address)
    }

    pub(crate) fn remove_watcher(&self, id: i64) -> Result<()> {
        self.inner.store.remove_watcher(id)
    }

    pub(crate) fn set_log_path(&self, run: RunId, path: &str) -> Result<()> {
        self.inner.store.set_log_path(run, path)
    }

    pub(crate) fn max_metadata_bytes(&self) -> usize {
        self.inner.max_metadata_bytes
    }

    pub(crate) fn custom_event(&self, run: RunId, name: &str, data: Option<&str>) -> Result<()> {
        self.inner.store.insert_event(run, name, data).map(drop)
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
        let (_, status) =
            self.transition(id, |state| Ok(crate::run::cancel_change(state, None)))?;
        Ok(status)
    }

    /// As [`cancel`](Ledger::cancel), and records who asked: the cancel
    /// request's event has the message `by WHO` (a queued run's reason
    /// reads `cancelled before it started, by WHO`). For operators' tools,
    /// such as the dashboard's cancel button.
    ///
    /// # Errors
    ///
    /// As [`cancel`](Ledger::cancel); [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// if `who` is empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{EventKind, Ledger, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("long-job"))?;
    /// ledger.cancel_by(run.id(), "alice from 10.0.0.7")?;
    /// let asked = ledger.events(run.id())?.pop().expect("an event");
    /// assert_eq!(asked.kind, EventKind::CancelRequested);
    /// assert_eq!(asked.message.as_deref(), Some("by alice from 10.0.0.7"));
    /// # run.cancelled()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn cancel_by(&self, id: RunId, who: &str) -> Result<RunStatus> {
        let who = input::reason(who);
        if who.trim().is_empty() {
            return Err(crate::Error::invalid("who", &who, "must name who asked"));
        }
        let (_, status) = self.transition(id, move |state| {
            Ok(crate::run::cancel_change(state, Some(&who)))
        })?;
        Ok(status)
    }

    /// Deletes runs that ended more than `older_than` ago, with their steps
    /// and events, and returns how many. Active runs are never deleted. The
    /// records of processes that closed the ledger before the cutoff go too,
    /// and so do the lock events (grants, releases…) older than it.
    ///
    /// Works in transactions that each look at no more than 500 runs, oldest
    /// first, so other writers are never held up for long; it stops at the
    /// first run created after the cutoff, so it does not walk the recent
    /// history. The newest run is kept whatever its age, so that its id is
    /// never handed out again.
    ///
    /// On SQLite it also removes the gate files (`<db>-runledger/keys/`) of
    /// the keys no one holds now; the reap pass does so too whenever there
    /// are more than 1,024 of them. So the folder stays bounded by the keys
    /// in use, however many distinct keys were ever locked.
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
        // Lock events belong to no run's history: they go by their age.
        while let (_, true) = self.inner.store.prune_lock_events(cutoff, PRUNE_BATCH)? {}
        self.inner.store.prune_instances(cutoff)?;
        // The gate files of idle keys go with the history (one key per job
        // would leave one file per job).
        self.inner.gates.sweep(0);
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
    /// conflicts with it overtakes it. An exclusive request first waits up
    /// to [`Builder::queue_after`] (20 ms by default) outside the queue, at
    /// its keys' gates, where the kernel, not arrival, orders it among the
    /// others waiting there. A holder or waiter whose process died is
    /// removed on the spot, and the removal recorded.
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

    /// Takes an exclusive lock on `key` as [`lock`](Ledger::lock) does, but
    /// waits without blocking the async runtime: other tasks, the holder's
    /// included, keep running on the same thread meanwhile.
    ///
    /// Each attempt at the grant is one short write on the calling thread
    /// (see [Threads, tasks and processes](crate#threads-tasks-and-processes));
    /// between attempts the task sleeps until a release in any process
    /// wakes it, or until its next re-check. An exclusive request only tries
    /// its keys' gates and never waits at them ([`Builder::queue_after`]
    /// concerns blocking calls): an async wait is always first come, first
    /// served.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future (a `tokio::time::timeout` that expired, a
    /// `select!` branch that lost) leaves nothing behind: its place in the
    /// queue is deleted on drop, and a grant that raced with the drop is
    /// released at once, waking the next waiter.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with IO and time enabled.
    ///
    /// # Errors
    ///
    /// As [`lock`](Ledger::lock).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> runledger::Result<()> {
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let guard = ledger.lock_async("build:symbol=AAPL").await?;
    /// // … only one task or process at a time gets here …
    /// guard.release()?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn lock_async(
        &self,
        key: impl Into<String>,
    ) -> impl Future<Output = Result<LockGuard>> + Send + '_ {
        self.acquire_async(LockRequest::new([key]))
    }

    /// Takes the locks `request` describes as [`acquire`](Ledger::acquire)
    /// does, waiting without blocking the async runtime; see
    /// [`lock_async`](Ledger::lock_async) for how it waits.
    ///
    /// # Cancel safety
    ///
    /// As [`lock_async`](Ledger::lock_async): a dropped future leaves no
    /// queue place and no lock behind.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with IO and time enabled.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Ledger::acquire).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use runledger::{LockMode, LockRequest};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> runledger::Result<()> {
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let gpu = LockRequest::new(["gpu"]).mode(LockMode::Slots(2)).wait(Duration::from_secs(5));
    /// let first = ledger.acquire_async(gpu.clone()).await?;
    /// let second = ledger.acquire_async(gpu).await?; // two slots: both hold
    /// assert_ne!(first.token(), second.token());
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn acquire_async(
        &self,
        request: LockRequest,
    ) -> impl Future<Output = Result<LockGuard>> + Send + '_ {
        self.acquire_for_async(request, None)
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

    /// The history of locks, newest first: the lock events
    /// ([`EventKind::is_lock`](crate::EventKind::is_lock)) of `key`, or of
    /// every key when `None`, at most `limit` of them. Each event of a
    /// request of several keys is in the history of each. Read from an index
    /// of the keys' events, whatever the size of the runs' history; events
    /// older than a [prune](Ledger::prune) are gone.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key;
    /// storage errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::EventKind;
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// ledger.try_lock("build:a")?.release()?;
    /// let history = ledger.lock_history(Some("build:a"), 10)?;
    /// assert!(matches!(history[0].kind, EventKind::LockReleased(_)));
    /// assert!(matches!(history[1].kind, EventKind::LockGranted(_)));
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn lock_history(&self, key: Option<&str>, limit: usize) -> Result<Vec<EventRecord>> {
        if let Some(key) = key {
            input::check_name("lock key", key)?;
        }
        self.inner.store.lock_history(key, limit)
    }

    /// Every process that has the ledger open (each open instance, this
    /// one included), oldest first, each judged alive or dead as the
    /// reaper would judge it now. Judging changes nothing: a dead (stale)
    /// instance stays listed until a reap closes it.
    ///
    /// # Errors
    ///
    /// Storage errors only.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let me = ledger.instances()?.into_iter().find(|i| i.is_self).expect("listed");
    /// assert!(me.alive);
    /// assert_eq!(me.pid, std::process::id());
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn instances(&self) -> Result<Vec<InstanceInfo>> {
        let inner = &self.inner;
        let me = inner.instance();
        let now = self.now();
        let mut list: Vec<InstanceInfo> = inner
            .store
            .open_instances()?
            .into_iter()
            .map(|instance| {
                let verdict = if instance.id == me {
                    Verdict::Alive
                } else {
                    inner.judge.judge(&instance, now)
                };
                let dead_reason = match verdict {
                    Verdict::Alive => None,
                    Verdict::Dead { reason, .. } => Some(reason),
                };
                InstanceInfo {
                    id: InstanceId::from(instance.id),
                    pid: instance.pid,
                    host: instance.host,
                    heartbeat_at: instance.heartbeat_at,
                    alive: dead_reason.is_none(),
                    dead_reason,
                    is_self: instance.id == me,
                }
            })
            .collect();
        list.sort_by_key(|i| i.id);
        Ok(list)
    }

    /// How many runs the ledger holds, by status, and how many of them a
    /// reaper failed.
    ///
    /// Unlike the other queries this reads the whole history (one pass over
    /// the runs, no index narrows it): it costs in proportion to the runs
    /// kept, which [`Builder::retention`] bounds.
    ///
    /// # Errors
    ///
    /// Storage errors only.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// ledger.begin_run(RunSpec::new("report"))?.succeed()?;
    /// assert_eq!(ledger.run_counts()?.of(RunStatus::Succeeded), 1);
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn run_counts(&self) -> Result<RunCounts> {
        let (counts, reaped) = self.inner.store.run_counts()?;
        let by_status = RunStatus::ALL
            .iter()
            .map(|s| {
                let n = counts.iter().find(|(c, _)| c == s).map_or(0, |(_, n)| *n);
                (*s, n)
            })
            .collect();
        Ok(RunCounts { by_status, reaped })
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
        let released = inner
            .store
            .force_unlock(key, &input::reason(reason), inner.identity())?;
        log::warn!("runledger: forced release of {key:?} ({released} holders): {reason}");
        Ok(released)
    }

    /// Renews this instance's heartbeat lease: one small write, however many
    /// runs and locks the instance owns.
    ///
    /// The background keeper calls this on its own (see
    /// [`Builder::background`]); a host that turned it off calls it more
    /// often than [`Builder::stale_after`].
    ///
    /// If another process already judged this instance dead (possible only
    /// through the lease: this process was silent for longer than
    /// `stale_after`, or its clock and theirs disagree), its runs were failed
    /// and its locks released; this logs an error and registers the process
    /// again as a new instance, so that work begun from now on is owned and
    /// kept alive. Guards of the old runs and locks find out on their next
    /// call ([`Error::InvalidTransition`](crate::Error::InvalidTransition) or
    /// [`Error::RunFinished`](crate::Error::RunFinished) for a run,
    /// [`Error::LockLost`](crate::Error::LockLost) for a lock).
    ///
    /// # Errors
    ///
    /// [`Error::Busy`](crate::Error::Busy) or [`Error::Storage`](crate::Error::Storage) if the write failed.
    pub fn heartbeat(&self) -> Result<()> {
        if self.inner.store.heartbeat_instance(self.inner.instance())? {
            Ok(())
        } else {
            self.register_again()
        }
    }

    /// Registers this process again as a new instance, after a reaper
    /// closed its instance (see [`Ledger::heartbeat`]).
    pub(crate) fn register_again(&self) -> Result<()> {
        let inner = &self.inner;
        let instance = inner.instance();
        let reason = inner
            .store
            .instance(instance)?
            .and_then(|i| i.closed_reason)
            .map_or_else(String::new, |r| format!(" ({r})"));
        let fresh = inner.store.insert_instance(
            inner.identity(),
            inner.label.as_deref(),
            inner.instance_lock.as_ref().map(InstanceLock::name),
            inner.judge.stale_after,
        )?;
        // Only one thread registers again; another one's fresh instance is
        // closed at once.
        if inner
            .instance
            .compare_exchange(instance, fresh, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            inner.store.close_instance(inner.identity(), fresh)?;
        } else {
            log::error!(
                "runledger: instance {instance} was judged dead by another process{reason}; \
                 its runs were failed and its locks released; registered again as instance {fresh}"
            );
        }
        Ok(())
    }

    /// Runs every reaper once and returns one report per reaper, the
    /// built-ins first (see [`Reaper`] for what each does), then those of
    /// [`Ledger::register_reaper`] in the order they were registered.
    ///
    /// Every change is a compare-and-set on the state that was judged: a run
    /// that ended between the check and the write stays ended, and an
    /// instance judged by its lease that heartbeated meanwhile is left
    /// alone. A pass that fails or panics is reported in its
    /// [`ReapReport::error`] and the others still run.
    ///
    /// The background keeper runs this every
    /// [`Builder::reap_interval`]; call it yourself after turning the keeper
    /// off, or to see at once what is left of a crash.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`](crate::Error::Busy) or [`Error::Storage`](crate::Error::Storage)
    /// if this instance's own heartbeat, written first, failed: the ledger is
    /// not usable now.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// for report in ledger.reap()? {
    ///     println!("{report}"); // "dead-owners: nothing to do", …
    ///     assert!(report.is_ok());
    /// }
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn reap(&self) -> Result<Vec<ReapReport>> {
        self.heartbeat()?;
        let reapers = self.inner.reapers.read().clone();
        Ok(reapers.iter().map(|r| run_pass(r.as_ref(), self)).collect())
    }

    /// Adds a reaper of the host's own to every [`reap`](Ledger::reap) pass
    /// of this ledger (and of its clones), after the built-ins.
    ///
    /// See [`Reaper`] for an example.
    pub fn register_reaper(&self, reaper: impl Reaper) {
        self.inner.reapers.write().push(Arc::new(reaper));
    }

    /// The `dead-owners` pass: judges every open instance and reaps the dead
    /// (and, past a bound, removes the gate files of idle keys).
    pub(crate) fn reap_dead_owners(&self) -> Result<Vec<Reaped>> {
        let inner = &self.inner;
        inner.gates.sweep(crate::gate::KEEP_FILES);
        let me = inner.instance();
        let mut reaped = Vec::new();
        for instance in inner.store.open_instances()? {
            if instance.id == me {
                continue;
            }
            if let Verdict::Dead {
                reason,
                stale_heartbeat,
            } = inner.judge.judge(&instance, self.now())
            {
                reaped.extend(self.reap_owner(&instance, &reason, stale_heartbeat)?);
            }
        }
        // Leftovers of instances already closed (a cleanup that failed).
        for owner in inner.store.orphaned_owners()? {
            let reason = owner
                .closed_reason
                .clone()
                .unwrap_or_else(|| "its instance was closed".to_owned());
            reaped.extend(self.reap_owner(&owner, &reason, None)?);
        }
        // Runs made for adoption that nobody adopted in time (a batch a
        // pass; the next pass takes the rest).
        for (id, deadline) in inner.store.unadopted_runs(self.now(), 1000)? {
            if let Some((name, from, reason)) = inner.store.fail_unadopted(id, deadline)? {
                log::warn!("runledger: run {id} failed: {reason}");
                reaped.push(Reaped::Run {
                    id,
                    name,
                    from,
                    reason,
                });
            }
        }
        Ok(reaped)
    }

    /// Reaps one instance judged dead; see `Store::reap_instance`.
    pub(crate) fn reap_owner(
        &self,
        owner: &InstanceRecord,
        reason: &str,
        stale_heartbeat: Option<crate::Timestamp>,
    ) -> Result<Vec<Reaped>> {
        let inner = &self.inner;
        let run_reason = format!("owner gone: {reason} (pid {} on {})", owner.pid, owner.host);
        let reaped = inner.store.reap_instance(
            owner.into(),
            reason,
            &run_reason,
            stale_heartbeat,
            inner.identity(),
        )?;
        // The lock file goes only when its lock was found free: a closed
        // instance's file may serve the same process registered again.
        if stale_heartbeat.is_none()
            && !owner.closed
            && let Some(file) = &owner.lock_file
        {
            crate::liveness::remove_lock_file(&inner.judge.instances_dir, file);
        }
        if !reaped.is_empty() {
            log::warn!(
                "runledger: reaped instance {} (pid {} on {}): {reason}",
                owner.id,
                owner.pid,
                owner.host
            );
        }
        Ok(reaped)
    }

    /// The `hung-runs` pass: fails running runs whose heartbeat deadline
    /// passed.
    pub(crate) fn reap_hung_runs(&self) -> Result<Vec<Reaped>> {
        const BATCH: usize = 1000;
        let inner = &self.inner;
        let mut reaped = Vec::new();
        loop {
            let now = self.now();
            let hung = inner.store.hung_runs(now, BATCH)?;
            let full = hung.len() == BATCH;
            let before = reaped.len();
            for run in &hung {
                let reason = hung_reason(run, now);
                if let Some(name) = inner.store.fail_hung(run, &reason)? {
                    reaped.push(Reaped::Run {
                        id: run.id,
                        name,
                        from: RunStatus::Running,
                        reason,
                    });
                }
            }
            if !full || reaped.len() == before {
                return Ok(reaped);
            }
        }
    }

    /// Remembers a lock row to delete later.
    pub(crate) fn adopt_orphan(&self, orphan: Orphan) {
        self.inner.orphans.lock().push(orphan);
    }

    /// Retries deleting the rows of dropped guards and queue places, if
    /// there are any.
    pub(crate) fn clean_orphans(&self) {
        if self.inner.orphans.lock().is_empty() {
            return;
        }
        let orphans = std::mem::take(&mut *self.inner.orphans.lock());
        for orphan in orphans {
            let done = match orphan {
                Orphan::Held { id, token } => self
                    .release_lock(id, token, None, Held::default())
                    .map(drop),
                Orphan::Queued { ticket } => self.inner.store.leave_queue(ticket),
            };
            if done.is_err() {
                self.adopt_orphan(orphan);
            }
        }
    }

    /// Leaves the lock queue: deletes the request queued as `ticket`,
    /// whether still waiting or granted meanwhile, and hands its keys on. A
    /// failure is retried on the next lock call.
    pub(crate) fn leave_queue(&self, ticket: i64) {
        match self.inner.store.leave_queue(ticket) {
            Ok(()) => {}
            Err(e) => {
                log::warn!("runledger: could not leave lock queue place {ticket} yet: {e}");
                self.adopt_orphan(Orphan::Queued { ticket });
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
    ///
    /// `keys`, when known, are the lock's (its guard's): the PostgreSQL
    /// store claims them as its transaction begins instead of reading them
    /// first. `gates` (the lock's gates) are let go as soon as the release
    /// has committed: before the waiters are woken, and before a
    /// checkpoint.
    pub(crate) fn release_lock(
        &self,
        id: i64,
        token: u64,
        keys: Option<&[String]>,
        gates: Held,
    ) -> Result<bool> {
        self.inner
            .store
            .release_lock(id, token, keys, move || drop(gates))
    }

    pub(crate) fn transition(
        &self,
        id: RunId,
        decide: impl Fn(&RunState) -> Result<Option<RunChange>> + Send + Sync + 'static,
    ) -> Result<(RunState, RunStatus)> {
        self.inner.store.update_run(id, decide)
    }

    pub(crate) fn finish_run(&self, id: RunId, outcome: &Outcome) -> Result<RunStatus> {
        let outcome = outcome.clone();
        let (_, status) = self.transition(id, move |state| outcome.decide(id, state))?;
        log::debug!("runledger: run {id} ended as {status}");
        Ok(status)
    }

    pub(crate) fn run_heartbeat(&self, id: RunId) -> Result<RunStatus> {
        self.inner.store.run_heartbeat(id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::Instant;

    fn ledger_in(dir: &Path, clock: &ManualClock) -> Builder {
        Ledger::builder(dir.join("ledger.db"))
            .clock(clock.clone())
            .background(false)
    }

    /// Regression: a busy timeout above `i32::MAX` milliseconds made `open`
    /// panic in rusqlite ("too big"), and `Duration::MAX` would have
    /// overflowed the pool's `Instant` arithmetic.
    #[test]
    fn a_busy_timeout_beyond_sqlites_limit_opens_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::default();
        for timeout in [Duration::from_millis(i32::MAX as u64 + 1), Duration::MAX] {
            let ledger = ledger_in(dir.path(), &clock)
                .busy_timeout(timeout)
                .open()
                .unwrap();
            ledger
                .begin_run(RunSpec::new("x"))
                .unwrap()
                .succeed()
                .unwrap();
            ledger.try_lock("k").unwrap().release().unwrap();
        }
    }

    /// A reaper writes only in the state it judged: an instance judged by
    /// its lease that heartbeats before the write is kept, and a run that
    /// ends between the check and the write stays ended.
    #[test]
    fn a_verdict_is_acted_on_only_in_the_state_it_was_made_in() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(crate::Timestamp::from_millis(1_000_000_000_000));
        let judge_side = ledger_in(dir.path(), &clock).open().unwrap();
        let remote = ledger_in(dir.path(), &clock)
            .host("elsewhere")
            .open()
            .unwrap();
        let ends = remote.begin_run(RunSpec::new("ends")).unwrap();
        let stays = remote.begin_run(RunSpec::new("stays")).unwrap();
        clock.advance(Duration::from_secs(120));

        let judge = |ledger: &Ledger| {
            let record = ledger
                .inner
                .store
                .instance(remote.inner.instance())
                .unwrap()
                .unwrap();
            match ledger.inner.judge.judge(&record, ledger.now()) {
                Verdict::Dead {
                    reason,
                    stale_heartbeat,
                } => (record, reason, stale_heartbeat),
                Verdict::Alive => panic!("judged alive"),
            }
        };

        // Judged stale; then it heartbeats; then the write: nothing changes.
        let (record, reason, stale) = judge(&judge_side);
        assert!(stale.is_some(), "{reason}");
        remote.heartbeat().unwrap();
        let reaped = judge_side.reap_owner(&record, &reason, stale).unwrap();
        assert!(reaped.is_empty(), "{reaped:?}");
        assert_eq!(
            judge_side.run(stays.id()).unwrap().status,
            RunStatus::Running
        );

        // Judged stale again; a run ends meanwhile: it stays ended, the
        // others fail.
        clock.advance(Duration::from_secs(120));
        let (record, reason, stale) = judge(&judge_side);
        let ends_id = ends.id();
        assert_eq!(ends.succeed().unwrap(), RunStatus::Succeeded);
        // (Ending a run writes no heartbeat: the verdict still holds.)
        let reaped = judge_side.reap_owner(&record, &reason, stale).unwrap();
        assert_eq!(
            judge_side.run(ends_id).unwrap().status,
            RunStatus::Succeeded
        );
        assert_eq!(
            judge_side.run(stays.id()).unwrap().status,
            RunStatus::Failed
        );
        let runs: Vec<RunId> = reaped
            .iter()
            .filter_map(|r| match r {
                Reaped::Run { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(runs, [stays.id()]);
    }

    #[test]
    fn a_hung_verdict_is_dropped_if_the_run_heartbeats_or_ends_first() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(crate::Timestamp::from_millis(1_000_000_000_000));
        let ledger = ledger_in(dir.path(), &clock).open().unwrap();
        let spec = RunSpec::new("slow").heartbeat_timeout(Duration::from_secs(10));
        let beats = ledger.begin_run(spec.clone()).unwrap();
        let ends = ledger.begin_run(spec).unwrap();
        clock.advance(Duration::from_secs(11));
        let hung = ledger.inner.store.hung_runs(ledger.now(), 10).unwrap();
        assert_eq!(hung.len(), 2);
        beats.heartbeat().unwrap();
        let ends_id = ends.id();
        ends.succeed().unwrap();
        for run in &hung {
            assert!(ledger.inner.store.fail_hung(run, "hung").unwrap().is_none());
        }
        assert_eq!(beats.succeed().unwrap(), RunStatus::Succeeded);
        assert_eq!(ledger.run(ends_id).unwrap().status, RunStatus::Succeeded);
    }

    /// A slow reap pass (a host's own reaper, a long prune) must not hold
    /// back the heartbeat: the lease would go stale while the process lives.
    #[test]
    fn a_slow_reap_pass_does_not_delay_heartbeats() {
        use std::sync::atomic::AtomicBool;
        struct Slow(Arc<AtomicBool>);
        impl Reaper for Slow {
            fn name(&self) -> &str {
                "slow"
            }
            fn reap(&self, _: &Ledger) -> std::result::Result<Vec<Reaped>, crate::ReapError> {
                self.0.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(2));
                Ok(Vec::new())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(crate::Timestamp::from_millis(1_000_000_000_000));
        let ledger = Ledger::builder(dir.path().join("ledger.db"))
            .clock(clock.clone())
            .stale_after(Duration::from_millis(400))
            .reap_interval(Duration::from_millis(20))
            .open()
            .unwrap();
        let started = Arc::new(AtomicBool::new(false));
        ledger.register_reaper(Slow(started.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !started.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the pass never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The pass sleeps; the heartbeat (every 100 ms) goes on.
        clock.advance(Duration::from_secs(5));
        let beat = || {
            ledger
                .inner
                .store
                .instance(ledger.inner.instance())
                .unwrap()
                .unwrap()
                .heartbeat_at
        };
        let deadline = Instant::now() + Duration::from_millis(1500);
        while beat() != clock.now() {
            assert!(Instant::now() < deadline, "no heartbeat during the pass");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_keeper_heartbeats_and_stops_with_the_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(crate::Timestamp::from_millis(1_000_000_000_000));
        let ledger = Ledger::builder(dir.path().join("ledger.db"))
            .clock(clock.clone())
            .stale_after(Duration::from_millis(400))
            .open()
            .unwrap();
        let path = ledger.path().to_owned();
        let second = Ledger::builder(&path)
            .clock(clock.clone())
            .stale_after(Duration::from_millis(400))
            .open()
            .unwrap();
        assert!(Keeper::is_running(&path));
        clock.advance(Duration::from_secs(5));
        let beat_of = |l: &Ledger| {
            l.inner
                .store
                .instance(l.inner.instance())
                .unwrap()
                .unwrap()
                .heartbeat_at
        };
        // One thread heartbeats both instances (every 100 ms).
        let deadline = Instant::now() + Duration::from_secs(10);
        while beat_of(&ledger) != clock.now() || beat_of(&second) != clock.now() {
            assert!(Instant::now() < deadline, "no heartbeat");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(ledger);
        assert!(Keeper::is_running(&path), "one instance is still open");
        drop(second);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Keeper::is_running(&path) {
            assert!(Instant::now() < deadline, "the keeper did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Without the keeper, nothing runs.
        let quiet = ledger_in(dir.path(), &clock).open().unwrap();
        assert!(!Keeper::is_running(quiet.path()));
    }

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
