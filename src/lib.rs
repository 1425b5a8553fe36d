//! A crash-safe registry of runs and strict cross-process locks, shared by
//! every process that opens the same SQLite file (or, with the `postgres`
//! feature, the same PostgreSQL schema, from many hosts).
//!
//! Terminals, workers and dashboards of one application often run at once
//! against one database. Without care they leave runs stuck in `running`
//! after a crash, show only the runs one process launched, and fail with
//! `database is locked` under bursts of writers. `runledger` records *who is
//! running what* so that every process sees every run, every run ends with a
//! true status, and concurrent writers simply take turns.
//!
//! # Quick start
//!
//! ```
//! use runledger::{Ledger, RunFilter, RunSpec, RunStatus};
//!
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("runs/control/ledger.db");
//! let ledger = Ledger::open(&path)?; // creates the file and its folders
//!
//! let run = ledger.begin_run(
//!     RunSpec::new("build")
//!         .source("terminal")
//!         .metadata(serde_json::json!({"symbol": "AAPL"})),
//! )?;
//! for day in ["2026-11-20", "2026-11-21"] {
//!     let step = run.step(day)?;
//!     // … the step's work …
//!     step.succeed()?;
//! }
//! let id = run.id();
//! assert_eq!(run.succeed()?, RunStatus::Succeeded);
//!
//! // Any process that opens the same file sees the run.
//! let record = ledger.run(id)?;
//! assert_eq!(record.progress.succeeded, 2);
//! let failures = ledger.runs(RunFilter::default().status(RunStatus::Failed))?;
//! assert!(failures.is_empty());
//! # Ok::<(), runledger::Error>(())
//! ```
//!
//! # The lifecycle of a run
//!
//! ```text
//! queued ──► running ──► succeeded | partial | failed | cancelled
//!    └─────────────────► failed | cancelled
//! ```
//!
//! [`Ledger::begin_run`] records a run and returns a [`Run`] guard. The run
//! ends with [`Run::succeed`], [`Run::fail`], [`Run::exit`] or
//! [`Run::cancelled`]; a guard dropped without an outcome (an early return, a
//! `?`, a panic) still closes the run, as `failed` with the reason. A run with
//! [steps](Run::step) finishes as `succeeded` if every step succeeded,
//! `partial` if some failed, `failed` if all failed.
//!
//! A run begun [`queued`](RunSpec::queued) waits for [`Run::start`]; one
//! ended with `succeed`, `fail` or `exit` without it is recorded as started,
//! then ended.
//!
//! [`Ledger::cancel`] cancels a queued run at once, and asks a running one to
//! stop: the owner sees it through [`Run::is_cancel_requested`]. It returns
//! the run's status after the call. Terminal statuses are final: every
//! transition is a compare-and-set on the status it was decided from, so a
//! late cancel changes nothing and returns the status the run ended with,
//! and an outcome for a run that has already ended changes nothing and
//! returns [`Error::InvalidTransition`].
//!
//! ```
//! use runledger::{Error, Ledger, RunSpec, RunStatus};
//! # let dir = tempfile::tempdir()?;
//! # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
//! let run = ledger.begin_run(RunSpec::new("report"))?;
//! let id = run.id();
//! assert_eq!(run.succeed()?, RunStatus::Succeeded);
//! assert_eq!(ledger.cancel(id)?, RunStatus::Succeeded); // too late: Ok, unchanged
//!
//! let queued = ledger.begin_run(RunSpec::new("deploy").queued())?;
//! assert_eq!(ledger.cancel(queued.id())?, RunStatus::Cancelled);
//! let err = queued.succeed().unwrap_err(); // it has already ended
//! assert!(matches!(err, Error::InvalidTransition { from: RunStatus::Cancelled, .. }));
//! # Ok::<(), runledger::Error>(())
//! ```
//!
//! # Locks
//!
//! [`Ledger::lock`], [`Ledger::try_lock`] and [`Ledger::acquire`] (or
//! [`Run::lock`] for a lock that ends with its run) return a [`LockGuard`]
//! that releases on drop. A [`LockRequest`] names one or more keys, taken all
//! or nothing, in a [`LockMode`]: exclusive, shared, or `Slots(n)`.
//!
//! ```
//! use std::time::Duration;
//! use runledger::{Ledger, LockMode, LockRequest};
//! # let dir = tempfile::tempdir()?;
//! # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
//! let guard = ledger.acquire(
//!     LockRequest::new(["gpu"]).mode(LockMode::Slots(2)).wait(Duration::from_secs(60)),
//! )?;
//! println!("token {}", guard.token());
//! # Ok::<(), runledger::Error>(())
//! ```
//!
//! A request that cannot be granted at once takes a place in a queue that
//! every process can see ([`Ledger::locks`]). It is served first come, first
//! served, or gives up at its deadline with [`Error::Timeout`]. A request
//! that may not wait fails with [`Error::Conflict`], which names who is in
//! the way.
//!
//! **Short waits are not ordered.** An *exclusive* request that finds its
//! keys held by live processes first waits for them outside the queue, for
//! at most [`Builder::queue_after`] (20 ms by default), on the key's
//! *gate*: an OS file lock in the sidecar folder that every exclusive holder
//! keeps until its release has committed. When the holder lets go, the
//! kernel wakes one such request, which takes the key with a single
//! transaction. Among requests that wait less than that bound, the kernel
//! picks who goes next (and a request that arrives just then may go first),
//! not arrival. A request still waiting after the bound takes its place in
//! the queue and is served in order from then on: no request, gated or not,
//! is ever granted ahead of a conflicting one already queued. Shared and
//! slots requests always queue at once, and `queue_after(Duration::ZERO)`
//! makes every wait strictly first come, first served. Gates only decide
//! who asks next; the database decides who holds.
//!
//! **Waking up.** Releasing a lock hands it to the head of the queue in the
//! same transaction and wakes that waiter at once. On Linux the wake-up is a
//! datagram to an abstract Unix socket the waiter listens on. Waiters also
//! re-check every 100 ms, which covers holders killed without releasing and
//! platforms without such sockets. A holder killed without releasing lets
//! go of its gates at once (the kernel drops its file locks), so requests
//! still waiting at a gate take over its lock without that delay.
//!
//! **Dead holders.** A holder or waiter in the way whose process is dead
//! (see [Liveness](#liveness-and-the-reaper)) is reaped by the next acquirer
//! in that same call: its locks, queue places and runs go at once, without
//! waiting for a sweep, and the takeover is recorded.
//!
//! **Within one process.** Threads and tasks that share one [`Ledger`]
//! take turns like processes do; see
//! [Threads, tasks and processes](#threads-tasks-and-processes).
//!
//! # Threads, tasks and processes
//!
//! A [`Ledger`] is `Clone + Send + Sync`, and its clones are one *instance*:
//! one pool of connections, one heartbeat, one identity for liveness. Open
//! it once per process and hand clones to every thread and task.
//!
//! - **Everyone takes turns.** A request that conflicts with a lock that
//!   another thread or task of the same ledger holds waits exactly as if
//!   that holder were another process: in the same queue (visible in
//!   [`Ledger::locks`]), first come, first served, up to the same deadline,
//!   and its grant gets a fencing token of its own. Shared and slots modes
//!   count guards, not processes: two threads holding `Slots(2)` fill both
//!   slots. Releasing one guard never releases another.
//! - **Liveness stays per process.** A process that dies loses every lock
//!   and queue place its threads had, at once, as one owner.
//! - **The caller's own locks.** Each grant belongs to the caller that asked
//!   for it: the thread, or with the `tokio` feature the task, when the call
//!   is made inside one. A blocking request that only the caller's own
//!   locks keep out (asking again for a key it holds) could never be
//!   granted, since the caller would wait for itself: it fails at once with
//!   [`Error::Conflict`], `self_conflict` set, naming the lock. An async
//!   request waits instead, up to its deadline: futures joined within one
//!   task (`join!`, `select!`, a `buffer_unordered` stream) are one caller,
//!   and one of them may release what another waits for. Waiters that the
//!   caller's own locks keep out (directly, or through the waiters ahead of
//!   them) do not hold the caller back, so that first come, first served
//!   never makes it wait for itself. A guard moved to another thread (or
//!   taken inside `spawn_blocking`, a task of its own) still counts as its
//!   acquirer's for these rules; releasing it, from anywhere, frees it as
//!   usual.
//! - **Async.** With the `tokio` feature, [`Ledger::lock_async`],
//!   [`Ledger::acquire_async`], [`Run::lock_async`] and [`Run::acquire_async`]
//!   wait without blocking the runtime, woken by a release in any process
//!   as promptly as a blocked thread is (the wake-up socket is watched by
//!   the runtime's reactor; no thread per waiting task), and
//!   [`Watch::next_async`] (or `Watch` as a `Stream`) waits for events the
//!   same way. A dropped future leaves no queue place and no lock behind.
//!
//! **What may block.** Every call of this crate runs its database work on
//! the calling thread, async ones included:
//!
//! | Call | Blocks the calling thread for |
//! |---|---|
//! | reads: [`Ledger::run`], [`Ledger::runs`], [`Ledger::locks`], [`Ledger::events_since`], [`LockGuard::is_held`], … | one read; on SQLite readers never wait for writers |
//! | writes: [`Ledger::begin_run`], [`Run::succeed`] and the other outcomes, [`Run::step`], [`Ledger::try_lock`], [`LockGuard::release`], [`Ledger::cancel`], dropping a guard, … | one write transaction; while other writers hold the database, up to [`Builder::busy_timeout`] (then [`Error::Busy`]) |
//! | [`Ledger::lock`], [`Ledger::acquire`], [`Run::lock`], [`Run::acquire`] | the writes above, and the wait for the keys, up to the request's deadline |
//! | [`Ledger::lock_async`] and the other async calls | each attempt at the grant is one write as above; the waits between attempts yield to the runtime |
//! | [`Watch::next`], [`Watch::next_timeout`] | until an event commits (or the timeout); [`Watch::next_async`] yields instead |
//! | [`Ledger::open`] | migrations, up to [`Builder::busy_timeout`] behind another process's |
//! | dropping a ledger's last clone | one write (its instance is closed) |
//!
//! The short writes stay synchronous in async code on purpose: each holds
//! the calling thread for one transaction, and handing every call to a
//! blocking pool would cost more than most writes themselves (the benchmark
//! document compares the two). Under a burst of writers from other
//! processes a write can wait for SQLite's write lock; a host whose runtime
//! must never wait that long calls the ledger inside
//! `tokio::task::spawn_blocking`. On the PostgreSQL store, whose client
//! drives a runtime of its own, a call made inside a tokio runtime runs on
//! a helper thread while the caller waits for it.
//!
//! # Liveness and the reaper
//!
//! Each process that opens a ledger registers an *instance*, which owns the
//! runs it begins and the locks and queue places it takes. Whether an
//! instance is alive is decided so that a live process on the same host is
//! never taken for dead, and one elsewhere only once its lease ran out:
//!
//! - **On this host** (same kernel), by the process itself: an instance holds
//!   an OS lock on its own file in the sidecar folder for its whole life, so
//!   a failed try-lock proves it alive and a free one proves it gone. This
//!   is immune to pid reuse, works across pid namespaces (two containers
//!   sharing the file), and never reads the clock: a paused process, a
//!   debugger or a clock jump cannot get it reaped. Without that file, the
//!   pid and the process start time decide.
//! - **Elsewhere** (another host, another boot of this one, or
//!   [`Builder::host`]), by its heartbeat lease: dead once its last
//!   heartbeat is older than [`Builder::stale_after`] (60 s by default). A
//!   process judged dead this way that was only silent finds out: its runs
//!   ended and its locks went ([`Error::LockLost`]), and it registers again
//!   as a new instance for the work it begins next.
//!
//! The instance lock belongs to the process's open file: a child that
//! `fork`s without `exec` shares it and keeps its parent looking alive
//! while it lives (children started with [`std::process::Command`] do not).
//!
//! Every verdict carries a reason (`process exited`, `process exited (pid
//! 4242 reused)`, `heartbeat stale for 93s`, …), which a reaped run's
//! `error` repeats. A background keeper renews the heartbeat (one write per
//! interval, however much the instance owns) and runs [`Ledger::reap`]
//! every [`Builder::reap_interval`], on a thread of its own so that a slow
//! pass never delays a heartbeat. It never keeps a ledger open, and ends
//! with the last handle ([`Builder::background`] turns it off). Opening a ledger
//! reaps the dead at once, so a service restarted on the same boot never
//! shows its previous life's runs as running (after a reboot, they go once
//! their lease is stale).
//!
//! [`Ledger::reap`] runs the built-in [`Reaper`]s (dead owners, hung runs,
//! and retention when [`Builder::retention`] is set) and the host's own
//! ([`Ledger::register_reaper`]), and returns one [`ReapReport`] each. Every
//! change is a compare-and-set on the state that was judged: a run that
//! ended meanwhile stays ended, and a failing or panicking reaper does not
//! stop the others. A run can also prove progress
//! ([`RunSpec::heartbeat_timeout`], [`Run::heartbeat`]): one that stops is
//! failed as hung even though its process lives.
//!
//! ```
//! use std::time::Duration;
//! use runledger::Ledger;
//! # let dir = tempfile::tempdir()?;
//! let ledger = Ledger::builder(dir.path().join("ledger.db"))
//!     .stale_after(Duration::from_secs(30))
//!     .retention(Duration::from_secs(30 * 24 * 3600))
//!     .open()?;
//! for report in ledger.reap()? {
//!     println!("{report}");
//! }
//! # Ok::<(), runledger::Error>(())
//! ```
//!
//! # Handing a run to another process
//!
//! A dashboard often starts a worker to do a run, and the worker, not the
//! dashboard, must own it: the run has to end with the worker's outcome even
//! if the dashboard restarts meanwhile. [`Ledger::create_run`] records a
//! `queued` run owned by nobody and returns its id; the worker calls
//! [`Ledger::adopt_run`] with it and gets a [`Run`] guard, with every rule of
//! one it had begun. Adoption is one compare-and-set: a second adopter gets
//! [`Error::AlreadyOwned`] naming the first. A run nobody adopts within
//! [`RunSpec::adopt_within`] (five minutes by default) is failed by the
//! reaper; the creator's death alone never fails it.
//!
//! ```
//! use runledger::{Ledger, RunSpec};
//! # let dir = tempfile::tempdir()?;
//! # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
//! let id = ledger.create_run(RunSpec::new("backtest").source("dashboard"))?;
//! // Command::new("runledger").args(["exec", "--", "backtest.sh"])
//! //     .env("RUNLEDGER_RUN_ID", id.to_string()).spawn()?;
//! # let worker = ledger.clone();
//! let run = worker.adopt_run(id)?; // in the worker
//! run.succeed()?;
//! # Ok::<(), runledger::Error>(())
//! ```
//!
//! `runledger exec` adopts the run named by `RUNLEDGER_RUN_ID` when it is
//! set, so a parent in any language can hand a run to a command.
//!
//! # The event feed
//!
//! Every change of every run is an event ([`EventRecord`]): status changes,
//! steps, cancel requests, adoptions, and the owner's own events
//! ([`Run::event`]). So is every change of every lock: grants, releases,
//! reclaims from dead holders and forced releases, each with its keys and
//! fencing token ([`EventKind::lock`]); a lock event's `run` is the run that
//! owns the lock, or `None` for a lock taken without a run. Their ids grow
//! in commit order across all runs and locks, so a
//! dashboard follows everything with a cursor: [`Ledger::events_since`]
//! returns the events after it and the next cursor, from an index range
//! whose cost does not grow with the history, and [`Ledger::watch`] yields
//! them as they commit in any process, woken by the writer itself (the
//! wake-up mechanism of the locks) rather than by polling.
//!
//! ```
//! use std::time::Duration;
//! use runledger::{EventCursor, Ledger, RunSpec};
//! # let dir = tempfile::tempdir()?;
//! # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
//! let mut watch = ledger.watch(ledger.events_cursor()?)?;
//! let run = ledger.begin_run(RunSpec::new("train"))?;
//! run.event("progress", serde_json::json!({"epoch": 1}))?;
//! while let Some(event) = watch.next_timeout(Duration::from_millis(100))? {
//!     println!("{} run {:?}: {:?}", event.at, event.run, event.kind);
//! }
//! let saved: EventCursor = watch.cursor(); // resume here next time
//! # run.succeed()?;
//! # let _ = saved;
//! # Ok::<(), runledger::Error>(())
//! ```
//!
//! # Guarantees
//!
//! - **Nothing is lost on a crash.** Every call that changes the ledger is one
//!   SQLite transaction that commits whole or not at all, and returns only
//!   after it committed. A process killed at any instant (kill -9 included)
//!   leaves a consistent database. With the default
//!   [`Synchronous::Normal`], a *power cut* may roll back the last commits;
//!   [`Synchronous::Full`] makes every returned commit durable.
//! - **Every process sees every run**, as soon as the call that wrote it
//!   returns.
//! - **Writers take turns instead of failing.** Every write transaction is
//!   `BEGIN IMMEDIATE` with a busy timeout (30 s by default), so
//!   `database is locked` is not surfaced under normal contention.
//! - **Terminal statuses are final**, and every status change is recorded in
//!   the run's history ([`Ledger::events`]) in the same transaction.
//! - **At most one active run per idempotency key**, enforced by a unique
//!   index, so two racing processes cannot both start the same work; with
//!   [`RunSpec::idempotency_window`], at most one run per key and window,
//!   finished ones included.
//! - **Two holders never overlap.** Conflicting modes are never granted
//!   together. A [fencing token](LockGuard#fencing-tokens) grows strictly per
//!   key, across processes, restarts and pruning. A holder whose lock was
//!   taken away finds out ([`LockGuard::is_held`], [`Error::LockLost`]).
//! - **No request waits behind later ones once queued.** The queue is served
//!   in order; only waits shorter than [`Builder::queue_after`] (20 ms by
//!   default) are ordered by the kernel instead.
//! - **Nothing stays `running` after its owner died.** The next acquirer in
//!   the way, the next open and every reap pass close what a dead instance
//!   owned, in one transaction per owner, with the reason.
//! - **Input never panics.** Bad names, oversized metadata, unknown ids get a
//!   typed [`Error`] naming the offending value.
//! - **On PostgreSQL, a server that goes away for a while reaches no
//!   caller.** A call that loses its connection (a restart, a failover) waits
//!   for the server up to [`Builder::busy_timeout`] and completes: a write
//!   that lost it before committing runs again, one that lost it while
//!   committing asks the server whether it committed, so none is applied
//!   twice. Past the timeout the call fails with an error that says so.
//!   A server that stops answering without closing the connection (a link
//!   down, a host lost) is noticed in about the busy timeout too: a pooled
//!   connection idle for a second is checked with a deadline of the
//!   client's own before it is used, opening a ledger gives up on a server
//!   that does not answer, and TCP's own timeouts (`tcp_user_timeout`,
//!   keepalives, which the URL may set) are bounded by the busy timeout
//!   for a connection that dies under a call.
//!   **A holder that cannot reach the server keeps its guard**: its lock is
//!   still recorded as held, and only its heartbeat lease
//!   ([`Builder::stale_after`]) decides. If the lease runs out first, the
//!   other hosts reap it and hand its keys on with higher tokens; once back,
//!   it learns so from [`LockGuard::is_held`] (false) and
//!   [`LockGuard::release`] ([`Error::LockLost`]), and the resource it wrote
//!   to can refuse its stale token. So a holder cut off for long should stop
//!   writing under its lock, or check `is_held` before it goes on.
//!
//! # Group commit
//!
//! Threads of one process that write to the same file at the same moment
//! share a transaction. A write that finds no other write of this process
//! under way runs alone, exactly as in a single-threaded program; writes
//! that arrive meanwhile wait, and the next transaction carries them all,
//! each isolated from the others:
//!
//! - **No call returns before the commit that holds its write.** A process
//!   killed in the middle of a group loses only writes whose calls had not
//!   returned, as without grouping.
//! - **One write's failure is its own.** A write that fails (a transition
//!   from a terminal state, a duplicate idempotency key, an unknown run) is
//!   undone alone and its error goes to its own caller; a panic in it
//!   resumes in its caller's thread. The others commit. If the commit
//!   itself fails, every write of the group gets an error.
//!
//! Grouping saves commits, not the writes' own SQL. It gains most with
//! [`Synchronous::Full`], where every commit waits for an fsync and a group
//! pays one for all its writes; with the default [`Synchronous::Normal`] a
//! commit costs little more than its writes, and it gains less.
//! [`Builder::group_commit`] says which writes are grouped and turns
//! grouping off; `cargo bench --bench group` measures what it gains on the
//! machine at hand (the repository's `BENCHMARKS.md` has figures).
//!
//! # Command-line tool
//!
//! With the `cli` feature the crate also builds `runledger`, a binary over
//! this API for terminals and for programs in any language (from a clone
//! of the repository, `cargo install --path . --features cli`):
//! `runledger exec --lock K -- CMD…` records a command as a run under the
//! ledger's locks, and `ps`, `runs`, `show`, `logs`, `locks`, `watch`,
//! `cancel`, `reap`, `prune` and `unlock` serve operators, each with
//! `--json`. Library users who leave the feature off never build its
//! dependencies.
//!
//! # PostgreSQL
//!
//! With the `postgres` feature, [`Ledger::builder`] (and [`Ledger::open`])
//! also take a `postgres://` URL, and `Ledger::builder_postgres` a URL with
//! `Builder::schema`: the same ledger, in one schema of a PostgreSQL
//! database that processes on many hosts share. Every method keeps its
//! guarantees there; what differs (the server's clock, liveness across
//! hosts, wake-ups by `LISTEN`/`NOTIFY`, durability) is listed on
//! `Ledger::builder_postgres`.
//!
//! # Time
//!
//! Every timestamp comes from the ledger's [`Clock`]: the system clock by
//! default (on PostgreSQL, the server's clock as each process follows it),
//! a [`ManualClock`] in tests that move time without sleeping.
//!
//! # Features
//!
//! None is on by default; on docs.rs, every item that needs one says so.
//!
//! - `postgres`: the PostgreSQL store: `Ledger::builder_postgres`,
//!   `Builder::schema`, and `postgres://` URLs in [`Ledger::open`] and
//!   [`Ledger::builder`].
//! - `tokio`: waits that yield to a tokio runtime: [`Ledger::lock_async`],
//!   [`Ledger::acquire_async`], [`Run::lock_async`], [`Run::acquire_async`],
//!   [`Watch::next_async`], and [`Watch`] as a `futures_core::Stream` (see
//!   [Threads, tasks and processes](#threads-tasks-and-processes)).
//! - `cli`: the `runledger` command-line tool (see
//!   [Command-line tool](#command-line-tool)); the library is the same with
//!   or without it.
//!
//! # Logging
//!
//! The crate logs through the [`log`](https://docs.rs/log) facade: opening and
//! migrating at `info`, run transitions at `debug`, errors that a guard's
//! `Drop` could not return at `error`.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
mod error;
mod gate;
mod input;
mod keeper;
mod ledger;
mod liveness;
mod location;
mod lock;
mod reaper;
mod record;
mod run;
mod store;
mod wake;
mod watch;
#[cfg(feature = "web")]
#[cfg_attr(docsrs, doc(cfg(feature = "web")))]
pub mod web;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use error::{Error, Result, StorageError};
pub use ledger::{
    Builder, DEFAULT_QUEUE_AFTER, DEFAULT_REAP_INTERVAL, DEFAULT_STALE_AFTER, Ledger, Synchronous,
};
pub use liveness::InstanceId;
pub use location::Location;
pub use lock::{
    Holder, LockGuard, LockKey, LockMode, LockRecord, LockRequest, LockState, Ticket, Wait,
};
pub use reaper::{ReapError, ReapReport, Reaped, Reaper};
pub use record::{
    EventId, EventKind, EventRecord, InstanceInfo, LockEvent, Progress, RunCounts, RunFilter,
    RunRecord, StepRecord,
};
pub use run::{DEFAULT_ADOPT_WITHIN, Run, RunId, RunSpec, RunStatus, Step, StepStatus};
pub use watch::{EventCursor, EventPage, Watch};

/// The newest schema version this build of the crate reads and writes.
pub const SCHEMA_VERSION: u32 = store::SCHEMA_VERSION;

// The README's code is compiled and run as a doctest so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
