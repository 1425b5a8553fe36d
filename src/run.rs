//! Runs and steps: identifiers, statuses, the state machine, the spec a run
//! starts from, and the [`Run`] and [`Step`] guards.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::lock::{LockGuard, LockRequest};

/// The identifier of a run: a positive integer, never reused in one ledger.
///
/// `Display`s as its number and converts from and to `i64`.
///
/// # Examples
///
/// ```
/// use runledger::RunId;
/// let id = RunId::from(42);
/// assert_eq!(id.to_string(), "42");
/// assert_eq!(i64::from(id), 42);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RunId(i64);

impl From<i64> for RunId {
    fn from(id: i64) -> RunId {
        RunId(id)
    }
}

impl From<RunId> for i64 {
    fn from(id: RunId) -> i64 {
        id.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for RunId {
    type Err = Error;

    /// Parses a run id as written by `Display`: a positive decimal integer.
    fn from_str(s: &str) -> Result<RunId> {
        match s.trim().parse::<i64>() {
            Ok(n) if n > 0 => Ok(RunId(n)),
            _ => Err(Error::invalid("run id", s, "must be a positive integer")),
        }
    }
}

/// Where a run is in its life.
///
/// ```text
/// queued ──► running ──► succeeded | partial | failed | cancelled
///    └─────────────────► failed | cancelled
/// ```
///
/// The last four are terminal: once there, a run never changes status again.
/// Serializes and displays in lowercase (`"running"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Registered, not started yet (waiting for locks, a slot or a worker).
    Queued,
    /// Started and not finished.
    Running,
    /// Finished well: every step (if any) succeeded.
    Succeeded,
    /// Finished with some steps succeeded and some failed.
    Partial,
    /// Finished badly: failed explicitly, exited non-zero, every step failed,
    /// dropped without an outcome, or reaped because its owner died.
    Failed,
    /// Stopped on request before finishing.
    Cancelled,
}

impl RunStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Partial,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The statuses of a run that has not finished: queued and running.
    pub const ACTIVE: [RunStatus; 2] = [RunStatus::Queued, RunStatus::Running];

    /// The terminal statuses.
    pub const TERMINAL: [RunStatus; 4] = [
        RunStatus::Succeeded,
        RunStatus::Partial,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// True for the statuses a run never leaves.
    pub fn is_terminal(self) -> bool {
        !self.is_active()
    }

    /// True for queued and running.
    pub fn is_active(self) -> bool {
        matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    /// Whether the state machine allows going from `self` to `to`.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::RunStatus::*;
    /// assert!(Queued.can_become(Running));
    /// assert!(Running.can_become(Partial));
    /// assert!(!Succeeded.can_become(Failed));
    /// assert!(!Queued.can_become(Succeeded));
    /// ```
    pub fn can_become(self, to: RunStatus) -> bool {
        use RunStatus::*;
        matches!(
            (self, to),
            (Queued, Running | Failed | Cancelled)
                | (Running, Succeeded | Partial | Failed | Cancelled)
        )
    }

    /// The lowercase name, as stored and displayed.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Partial => "partial",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = Error;

    /// Parses the lowercase name.
    fn from_str(s: &str) -> Result<RunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "run status",
                    s,
                    "expected queued, running, succeeded, partial, failed or cancelled",
                )
            })
    }
}

/// Where a step is in its life: running, then succeeded or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Started and not finished.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished badly, or left unfinished when its run ended.
    Failed,
}

impl StepStatus {
    /// The lowercase name, as stored and displayed.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<StepStatus> {
        [
            StepStatus::Running,
            StepStatus::Succeeded,
            StepStatus::Failed,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What a new run is: its name and the facts recorded with it.
///
/// # Examples
///
/// ```
/// use runledger::RunSpec;
/// let spec = RunSpec::new("build")
///     .source("terminal")
///     .metadata(serde_json::json!({"symbol": "AAPL"}))
///     .log_path("runs/logs/build-aapl.log")
///     .idempotency_key("build:AAPL:2026-11-22");
/// ```
#[derive(Clone, Debug)]
#[must_use = "a RunSpec does nothing until passed to Ledger::begin_run"]
pub struct RunSpec {
    pub(crate) name: String,
    pub(crate) source: String,
    pub(crate) metadata: serde_json::Value,
    pub(crate) log_path: Option<PathBuf>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) idempotency_window: Option<Duration>,
    pub(crate) parent: Option<RunId>,
    pub(crate) queued: bool,
    pub(crate) heartbeat_timeout: Option<Duration>,
    pub(crate) adopt_within: Option<Duration>,
}

/// How long a run made by [`Ledger::create_run`](crate::Ledger::create_run)
/// waits for a process to adopt it before the reaper fails it, unless
/// [`RunSpec::adopt_within`] says otherwise: five minutes.
pub const DEFAULT_ADOPT_WITHIN: Duration = Duration::from_secs(5 * 60);

impl RunSpec {
    /// A run named `name` (what it does, such as `"build"`; not unique).
    ///
    /// Names are 1 to 256 bytes of UTF-8 without control characters or
    /// leading or trailing whitespace; [`Ledger::begin_run`] checks them.
    pub fn new(name: impl Into<String>) -> RunSpec {
        RunSpec {
            name: name.into(),
            source: "library".to_owned(),
            metadata: serde_json::Value::Null,
            log_path: None,
            idempotency_key: None,
            idempotency_window: None,
            parent: None,
            queued: false,
            heartbeat_timeout: None,
            adopt_within: None,
        }
    }

    /// Who started the run: `"terminal"`, `"dashboard"`, `"worker"`…
    /// Same rules as the name. Defaults to `"library"`.
    pub fn source(mut self, source: impl Into<String>) -> RunSpec {
        self.source = source.into();
        self
    }

    /// Free-form JSON recorded with the run. At most
    /// [`Builder::max_metadata_bytes`](crate::Builder::max_metadata_bytes)
    /// once serialized (64 KiB by default), with arrays and objects nested
    /// at most 127 levels deep (as deep as it can be read back). Defaults to
    /// `null`.
    pub fn metadata(mut self, metadata: serde_json::Value) -> RunSpec {
        self.metadata = metadata;
        self
    }

    /// Where the run writes its log, recorded so that other processes can find
    /// it. The path must be UTF-8. The ledger never opens it. Defaults to none.
    pub fn log_path(mut self, path: impl Into<PathBuf>) -> RunSpec {
        self.log_path = Some(path.into());
        self
    }

    /// Makes the run unique among *active* runs: while a queued or running run
    /// holds this key, [`Ledger::begin_run`] starts nothing and returns
    /// [`Error::Duplicate`] naming that run. Once it has finished, the key is
    /// free again. Same rules as the name. Defaults to none.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> RunSpec {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Widens the [idempotency key](RunSpec::idempotency_key) to a window:
    /// a run with the same key created less than `window` ago, *active or
    /// finished*, makes [`Ledger::begin_run`] (and [`Ledger::create_run`])
    /// start nothing and return [`Error::Duplicate`] naming it; once the
    /// latest such run is older than `window`, a new run starts. A duplicate
    /// trigger within 24 hours of a nightly job is then one run, even after
    /// it finished. Checked in the same transaction as the insert, so two
    /// processes racing with one key make one run. Needs an idempotency
    /// key (else it is ignored). Defaults to none: only an active run
    /// counts.
    ///
    /// The window is measured on the ledger's clock, from each run's
    /// creation.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use runledger::{Error, Ledger, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let nightly = || {
    ///     RunSpec::new("nightly")
    ///         .idempotency_key("nightly:2026-12-02")
    ///         .idempotency_window(Duration::from_secs(24 * 3600))
    /// };
    /// let first = ledger.begin_run(nightly())?;
    /// let id = first.id();
    /// first.succeed()?;
    /// // Finished, but within the window: the same run.
    /// match ledger.begin_run(nightly()) {
    ///     Err(Error::Duplicate { existing, .. }) => assert_eq!(existing, id),
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn idempotency_window(mut self, window: Duration) -> RunSpec {
        self.idempotency_window = Some(window);
        self
    }

    /// Records the run as a child of `parent`, which must exist.
    /// Defaults to none.
    pub fn parent(mut self, parent: RunId) -> RunSpec {
        self.parent = Some(parent);
        self
    }

    /// Registers the run as `queued` instead of `running`: it has not started
    /// yet (it waits for locks, a slot, a worker…). [`Run::start`] starts it;
    /// [`Ledger::cancel`] cancels it at once. Defaults to starting at once.
    pub fn queued(mut self) -> RunSpec {
        self.queued = true;
        self
    }

    /// Makes the run prove progress: once running, it must call
    /// [`Run::heartbeat`] at least every `timeout`, or the `hung-runs`
    /// reaper fails it as hung (its `error` says so) even though its process
    /// is alive. A run that never heartbeats is judged from its start.
    ///
    /// For work that can wedge (a stuck network call, a deadlock) while its
    /// process lives on. Unlike a dead owner, a hung run is judged by the
    /// clock, so pick a timeout well above the longest gap between two
    /// heartbeats, and above any jump the wall clock may make (more than a
    /// century counts as a century). Defaults to none: a run of a live
    /// process is never judged hung.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> RunSpec {
        self.heartbeat_timeout = Some(timeout);
        self
    }

    /// For a run made by [`Ledger::create_run`](crate::Ledger::create_run):
    /// how long it may wait for a process to
    /// [adopt](crate::Ledger::adopt_run) it. Once that has passed without an
    /// adopter, the `dead-owners` reaper fails it (`not adopted within …`),
    /// and a late adopter gets [`Error::RunFinished`]. Measured by the
    /// ledger's clock from the run's creation; more than a century counts as
    /// a century, and zero is refused as invalid input. Defaults to
    /// [`DEFAULT_ADOPT_WITHIN`]; ignored by
    /// [`Ledger::begin_run`](crate::Ledger::begin_run).
    pub fn adopt_within(mut self, within: Duration) -> RunSpec {
        self.adopt_within = Some(within);
        self
    }
}

/// The state of a run as a transition sees it, read in the transition's own
/// write transaction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunState {
    pub status: RunStatus,
    pub steps_succeeded: u32,
    pub steps_failed: u32,
    pub steps_running: u32,
    pub cancel_requested: bool,
}

/// A change a transition asks the store to write, as one compare-and-set on
/// the status it was decided from.
#[derive(Clone, Debug)]
pub(crate) enum RunChange {
    /// Move to another status.
    Status {
        to: RunStatus,
        exit_code: Option<i32>,
        error: Option<String>,
        /// A queued run that did its work without [`Run::start`]: recorded
        /// as started (`queued → running`), then moved to `to`, in the same
        /// transaction.
        via_running: bool,
    },
    /// Record a cancel request; the status stays. `by`, if given, is the
    /// event's message: who asked.
    CancelRequest {
        /// Who asked, as the caller named them.
        by: Option<String>,
    },
}

/// How a run ends, as its owner or its guard's Drop says.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Succeed,
    Exit(i32),
    Fail(String),
    /// Cancelled, with the reason if one was given.
    Cancelled(Option<String>),
    /// The guard was dropped without an outcome; the text is the reason.
    Dropped(String),
}

/// The reason written on a step that was still running when its run ended.
pub(crate) const STEP_LEFT_RUNNING: &str = "its run ended before the step finished";

impl Outcome {
    /// Decides the change an outcome makes to a run in `state`: the state
    /// machine and the step aggregation, in plain Rust.
    ///
    /// `Ok(None)` means nothing to write (a drop after the run already ended).
    pub(crate) fn decide(&self, run: RunId, state: &RunState) -> Result<Option<RunChange>> {
        let (to, exit_code, error) = match self {
            Outcome::Succeed => aggregate(state, None),
            Outcome::Exit(0) => aggregate(state, Some(0)),
            Outcome::Exit(code) => (
                RunStatus::Failed,
                Some(*code),
                Some(format!("exited with code {code}")),
            ),
            Outcome::Fail(reason) => (RunStatus::Failed, None, Some(reason.clone())),
            Outcome::Cancelled(reason) => (RunStatus::Cancelled, None, reason.clone()),
            Outcome::Dropped(reason) => (RunStatus::Failed, None, Some(reason.clone())),
        };
        // A queued run that its owner ends with an outcome of work (succeed,
        // fail, exit) did that work: it is recorded as started, then ended,
        // never as a failure it was not. A cancel or a drop ends it as it is.
        let via_running = state.status == RunStatus::Queued
            && matches!(self, Outcome::Succeed | Outcome::Exit(_) | Outcome::Fail(_));
        let from = if via_running {
            RunStatus::Running
        } else {
            state.status
        };
        if from.can_become(to) {
            Ok(Some(RunChange::Status {
                to,
                exit_code,
                error,
                via_running,
            }))
        } else if matches!(self, Outcome::Dropped(_)) && state.status.is_terminal() {
            // The run ended by another path (cancelled, reaped): Drop has
            // nothing left to do.
            Ok(None)
        } else {
            Err(Error::InvalidTransition {
                run,
                from: state.status,
                to,
            })
        }
    }
}

/// The final status of a run that finished well, from its steps: all
/// succeeded (or none) → succeeded, a mix → partial, all failed → failed.
/// A step still running when the run ends counts as failed.
fn aggregate(state: &RunState, exit_code: Option<i32>) -> (RunStatus, Option<i32>, Option<String>) {
    let ok = state.steps_succeeded;
    let bad = state.steps_failed.saturating_add(state.steps_running);
    let total = ok.saturating_add(bad);
    if bad == 0 {
        (RunStatus::Succeeded, exit_code, None)
    } else if ok == 0 {
        let error = format!("all {total} steps failed");
        (RunStatus::Failed, exit_code, Some(error))
    } else {
        let error = format!("{bad} of {total} steps failed");
        (RunStatus::Partial, exit_code, Some(error))
    }
}

/// What `cancel` does to a run in `state`: a queued run is cancelled at once,
/// a running one gets a request (once), a terminal one is left alone.
pub(crate) fn cancel_change(state: &RunState, by: Option<&str>) -> Option<RunChange> {
    match state.status {
        RunStatus::Queued => Some(RunChange::Status {
            to: RunStatus::Cancelled,
            exit_code: None,
            error: Some(match by {
                Some(by) => format!("cancelled before it started, by {by}"),
                None => "cancelled before it started".to_owned(),
            }),
            via_running: false,
        }),
        RunStatus::Running if !state.cancel_requested => Some(RunChange::CancelRequest {
            by: by.map(|by| format!("by {by}")),
        }),
        _ => None,
    }
}

/// A run this process is doing: the guard [`Ledger::begin_run`] returns.
///
/// End it with [`succeed`](Run::succeed), [`fail`](Run::fail),
/// [`exit`](Run::exit) or [`cancelled`](Run::cancelled). If it is dropped
/// without one (an early return, a `?`, a panic), the run is still closed, as
/// `failed` with the reason `dropped without outcome` (or `panicked` while
/// unwinding). Drop never panics; an error while closing is logged.
///
/// If an outcome cannot be written (the database stayed locked past the
/// busy timeout, an I/O error), the outcome method returns the error and the
/// guard, already consumed, tries once more to close the run as `failed`
/// with the reason `its outcome could not be recorded: …`. Drop therefore
/// waits at most the builder's busy timeout, and only when the database is
/// that busy.
#[must_use = "dropping a Run closes it as failed; end it with succeed(), fail(), exit() or cancelled()"]
#[derive(Debug)]
pub struct Run {
    ledger: Ledger,
    id: RunId,
    /// True while Drop must still close the run.
    open: bool,
    /// Why the last outcome could not be written, for Drop's reason.
    unrecorded: Option<String>,
}

impl Run {
    pub(crate) fn new(ledger: Ledger, id: RunId) -> Run {
        Run {
            ledger,
            id,
            open: true,
            unrecorded: None,
        }
    }

    /// The run's id.
    pub fn id(&self) -> RunId {
        self.id
    }

    /// The ledger the run is recorded in.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Starts a run that was begun [`queued`](RunSpec::queued): `queued →
    /// running`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTransition`] if the run is not queued (it was cancelled
    /// meanwhile, or already started).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("deploy").queued())?;
    /// // … wait for a slot …
    /// run.start()?;
    /// assert_eq!(ledger.run(run.id())?.status, RunStatus::Running);
    /// # run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn start(&self) -> Result<()> {
        let id = self.id;
        self.ledger.transition(id, move |state| {
            if state.status.can_become(RunStatus::Running) {
                Ok(Some(RunChange::Status {
                    to: RunStatus::Running,
                    exit_code: None,
                    error: None,
                    via_running: false,
                }))
            } else {
                Err(Error::InvalidTransition {
                    run: id,
                    from: state.status,
                    to: RunStatus::Running,
                })
            }
        })?;
        Ok(())
    }

    /// Starts a step named `name`, unique within this run.
    ///
    /// The step ends with [`Step::succeed`] or [`Step::fail`]; a step dropped
    /// without an outcome is recorded as failed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad name or one this run already used;
    /// [`Error::RunFinished`] if the run has ended meanwhile (cancelled,
    /// reaped).
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(runledger::RunSpec::new("backfill"))?;
    /// for day in ["2026-11-20", "2026-11-21"] {
    ///     let step = run.step(day)?;
    ///     // … the step's work …
    ///     step.succeed()?;
    /// }
    /// assert_eq!(run.succeed()?, runledger::RunStatus::Succeeded);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn step(&self, name: impl Into<String>) -> Result<Step<'_>> {
        let name = name.into();
        crate::input::check_name("step name", &name)?;
        let id = self.ledger.begin_step(self.id, &name)?;
        Ok(Step {
            run: self,
            id,
            name,
            open: true,
            unrecorded: None,
        })
    }

    /// Takes an exclusive lock on `key` for this run, waiting up to the
    /// ledger's default wait. The lock is released when the guard drops, and
    /// at the latest when the run ends, in the transaction that ends it.
    ///
    /// A run that waits for its locks shows as `queued` if it was begun
    /// [`queued`](RunSpec::queued): take its locks, then [`start`](Run::start).
    ///
    /// # Errors
    ///
    /// As [`Ledger::lock`], and [`Error::RunFinished`] if the run has ended.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("build").queued())?;
    /// let _guard = run.lock("build:symbol=AAPL")?;
    /// run.start()?;
    /// // … build …
    /// run.succeed()?; // releases the lock too
    /// assert!(ledger.locks()?.is_empty());
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn lock(&self, key: impl Into<String>) -> Result<LockGuard> {
        self.acquire(LockRequest::new([key]))
    }

    /// Takes the locks `request` describes for this run; see
    /// [`Ledger::acquire`] and [`Run::lock`].
    ///
    /// # Errors
    ///
    /// As [`Ledger::acquire`], and [`Error::RunFinished`] if the run has
    /// ended.
    pub fn acquire(&self, request: LockRequest) -> Result<LockGuard> {
        self.ledger.acquire_for(request, Some(self.id))
    }

    /// Takes an exclusive lock on `key` for this run, as
    /// [`lock`](Run::lock) does, waiting without blocking the async runtime;
    /// see [`Ledger::lock_async`] for how it waits.
    ///
    /// # Cancel safety
    ///
    /// As [`Ledger::lock_async`]: a dropped future leaves no queue place
    /// and no lock behind.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with IO and time enabled.
    ///
    /// # Errors
    ///
    /// As [`lock`](Run::lock).
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn lock_async(
        &self,
        key: impl Into<String>,
    ) -> impl Future<Output = Result<LockGuard>> + Send + '_ {
        self.acquire_async(LockRequest::new([key]))
    }

    /// Takes the locks `request` describes for this run, as
    /// [`acquire`](Run::acquire) does, waiting without blocking the async
    /// runtime; see [`Ledger::lock_async`] for how it waits.
    ///
    /// # Cancel safety
    ///
    /// As [`Ledger::lock_async`].
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with IO and time enabled.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Run::acquire).
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn acquire_async(
        &self,
        request: LockRequest,
    ) -> impl Future<Output = Result<LockGuard>> + Send + '_ {
        self.ledger.acquire_for_async(request, Some(self.id))
    }

    /// Records progress: the run's `heartbeat_at` moves to now, and with a
    /// [heartbeat timeout](RunSpec::heartbeat_timeout) its deadline moves on.
    /// One small write. Returns the run's status, which a reaper may have
    /// changed (a run no longer `running` is left as it is). A cancel does
    /// not change the status: see [`is_cancel_requested`](Run::is_cancel_requested).
    ///
    /// This is the run's own progress signal, not the process's: the
    /// process's liveness needs nothing from the caller.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`] or [`Error::Storage`] if the write failed.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("crawl").heartbeat_timeout(Duration::from_secs(300)))?;
    /// for page in 0..3 {
    ///     // … fetch `page` …
    ///     # let _ = page;
    ///     if run.heartbeat()? != RunStatus::Running || run.is_cancel_requested()? {
    ///         break; // failed as hung, or asked to stop
    ///     }
    /// }
    /// run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn heartbeat(&self) -> Result<RunStatus> {
        self.ledger.run_heartbeat(self.id)
    }

    /// Whether someone asked this run to stop ([`Ledger::cancel`]), from any
    /// process. One indexed read: cheap enough to call in a work loop.
    ///
    /// The run decides what to do; typically it stops and calls
    /// [`cancelled`](Run::cancelled).
    ///
    /// # Errors
    ///
    /// Storage errors only.
    pub fn is_cancel_requested(&self) -> Result<bool> {
        self.ledger.cancel_requested(self.id)
    }

    /// Records where the run writes its log, for a run begun or
    /// [adopted](crate::Ledger::adopt_run) without one (or to move it). The
    /// path must be UTF-8; the ledger never opens it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a path that is not UTF-8;
    /// [`Error::RunFinished`] if the run has ended.
    pub fn set_log_path(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = crate::input::log_path(path.as_ref())?;
        self.ledger.set_log_path(self.id, &path)
    }

    /// Appends a custom event to the run's history: `name` says what it is
    /// (`"progress"`, `"checkpoint"`…; same rules as a run name), `data` is
    /// free-form JSON with the size and nesting limits of metadata (`null`
    /// for none).
    ///
    /// The event is written in its own transaction and, like every event,
    /// shows in [`Ledger::events`](crate::Ledger::events), in the feed of
    /// [`Ledger::events_since`](crate::Ledger::events_since) and in every
    /// [`Ledger::watch`](crate::Ledger::watch), as
    /// [`EventKind::Custom`](crate::EventKind::Custom).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad name or data over the limits;
    /// [`Error::RunFinished`] if the run has ended meanwhile.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(runledger::RunSpec::new("train"))?;
    /// run.event("progress", serde_json::json!({"epoch": 3, "loss": 0.21}))?;
    /// # run.succeed()?;
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn event(&self, name: impl Into<String>, data: serde_json::Value) -> Result<()> {
        let name = name.into();
        crate::input::check_name("event name", &name)?;
        let data = crate::input::json("event data", &data, self.ledger.max_metadata_bytes())?;
        self.ledger.custom_event(self.id, &name, data.as_deref())
    }

    /// Ends the run well. Without steps it becomes `succeeded`; with steps its
    /// status comes from them: all succeeded → `succeeded`, a mix → `partial`,
    /// all failed → `failed` (a step still running counts as failed).
    /// Returns the final status.
    ///
    /// A run begun [`queued`](RunSpec::queued) and never
    /// [started](Run::start) did its work all the same: it is recorded as
    /// started, then ended (`queued → running → succeeded`, both in its
    /// history, in one transaction). The same holds for [`fail`](Run::fail)
    /// and [`exit`](Run::exit).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTransition`] if the run has already ended (by a
    /// cancel or the reaper); it is left as it is.
    /// [`Error::Busy`] or [`Error::Storage`] if the outcome could not be
    /// written; the guard then closes the run as `failed` (see [`Run`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{EventKind, Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("deploy").queued())?;
    /// let id = run.id();
    /// run.step("push")?.succeed()?;
    /// assert_eq!(run.succeed()?, RunStatus::Succeeded); // no start() needed
    /// let moves: Vec<_> = ledger.events(id)?.into_iter()
    ///     .filter_map(|e| match e.kind {
    ///         EventKind::Status { from: Some(from), to } => Some((from, to)),
    ///         _ => None,
    ///     })
    ///     .collect();
    /// assert_eq!(moves, [
    ///     (RunStatus::Queued, RunStatus::Running),
    ///     (RunStatus::Running, RunStatus::Succeeded),
    /// ]);
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn succeed(mut self) -> Result<RunStatus> {
        self.finish(Outcome::Succeed)
    }

    /// Ends the run as `failed`, recording `reason` as its error. Reasons
    /// longer than 4 KiB are truncated. A queued run is recorded as started,
    /// then failed (see [`succeed`](Run::succeed)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTransition`] if the run has already ended.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("fetch"))?;
    /// let id = run.id();
    /// run.fail("upstream returned 503")?;
    /// assert_eq!(ledger.run(id)?.error.as_deref(), Some("upstream returned 503"));
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn fail(mut self, reason: impl fmt::Display) -> Result<RunStatus> {
        self.finish(Outcome::Fail(crate::input::reason(reason)))
    }

    /// Ends the run with a process-style exit code: `0` behaves as
    /// [`succeed`](Run::succeed), anything else fails the run. The code is
    /// recorded either way. Returns the final status.
    ///
    /// # Errors
    ///
    /// As [`succeed`](Run::succeed).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("make"))?;
    /// let id = run.id();
    /// assert_eq!(run.exit(2)?, RunStatus::Failed);
    /// assert_eq!(ledger.run(id)?.exit_code, Some(2));
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn exit(mut self, code: i32) -> Result<RunStatus> {
        self.finish(Outcome::Exit(code))
    }

    /// Ends the run as `cancelled`, typically after seeing
    /// [`is_cancel_requested`](Run::is_cancel_requested).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTransition`] if the run has already ended.
    pub fn cancelled(mut self) -> Result<RunStatus> {
        self.finish(Outcome::Cancelled(None))
    }

    /// Ends the run as `cancelled`, recording `reason` as its error: for a
    /// run that stops, or never starts, for a reason that is not a failure
    /// (its turn was refused, it was skipped). Reasons longer than 4 KiB are
    /// truncated. A queued run stays unstarted: `queued → cancelled`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTransition`] if the run has already ended.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunFilter, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("nightly").queued())?;
    /// let id = run.id();
    /// run.cancelled_because("skipped: yesterday's run is still going")?;
    /// let record = ledger.run(id)?;
    /// assert_eq!(record.status, RunStatus::Cancelled);
    /// assert_eq!(record.started_at, None);
    /// assert!(ledger.runs(RunFilter::default().status(RunStatus::Failed))?.is_empty());
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn cancelled_because(mut self, reason: impl fmt::Display) -> Result<RunStatus> {
        self.finish(Outcome::Cancelled(Some(crate::input::reason(reason))))
    }

    fn finish(&mut self, outcome: Outcome) -> Result<RunStatus> {
        let result = self.ledger.finish_run(self.id, &outcome);
        self.open = match &result {
            Ok(_) | Err(Error::NotFound { .. }) => false,
            // The state machine refused: nothing changed. A run that ended
            // by another path is left as it is; were it still active, Drop
            // would close it.
            Err(Error::InvalidTransition { from, .. }) => from.is_active(),
            // Storage failed, so nothing was written (each write is one
            // transaction): Drop tries once more to close the run as failed
            // rather than leave it active with no guard to end it.
            Err(e) => {
                self.unrecorded = Some(format!("its outcome could not be recorded: {e}"));
                true
            }
        };
        result
    }
}

/// The reason Drop gives for a guard it closes.
fn drop_reason(unrecorded: &mut Option<String>) -> String {
    if std::thread::panicking() {
        "panicked".to_owned()
    } else {
        unrecorded
            .take()
            .unwrap_or_else(|| "dropped without outcome".to_owned())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let reason = drop_reason(&mut self.unrecorded);
        if let Err(e) = self.finish(Outcome::Dropped(reason.clone())) {
            log::error!("runledger: could not close run {} ({reason}): {e}", self.id);
        }
        self.open = false;
    }
}

/// A step of a [`Run`]: the guard [`Run::step`] returns.
///
/// End it with [`succeed`](Step::succeed) or [`fail`](Step::fail); dropped
/// without one, it is recorded as failed (`dropped without outcome`, or
/// `panicked`). It borrows its run, so a run cannot be finished while one of
/// its step guards is alive.
#[must_use = "dropping a Step records it as failed; end it with succeed() or fail()"]
#[derive(Debug)]
pub struct Step<'r> {
    run: &'r Run,
    id: i64,
    name: String,
    /// True while Drop must still close the step.
    open: bool,
    /// Why the last outcome could not be written, for Drop's reason.
    unrecorded: Option<String>,
}

impl Step<'_> {
    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ends the step as `succeeded`.
    ///
    /// # Errors
    ///
    /// [`Error::RunFinished`] if the run ended meanwhile (cancelled by its
    /// owner elsewhere, or reaped); the step was then already closed as failed.
    pub fn succeed(mut self) -> Result<()> {
        self.finish(StepStatus::Succeeded, None)
    }

    /// Ends the step as `failed`, recording `reason`. Reasons longer than
    /// 4 KiB are truncated.
    ///
    /// # Errors
    ///
    /// As [`succeed`](Step::succeed).
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::{Ledger, RunSpec, RunStatus};
    /// # let dir = tempfile::tempdir()?;
    /// # let ledger = Ledger::open(dir.path().join("ledger.db"))?;
    /// let run = ledger.begin_run(RunSpec::new("per-file"))?;
    /// run.step("a.csv")?.succeed()?;
    /// run.step("b.csv")?.fail("bad header")?;
    /// assert_eq!(run.succeed()?, RunStatus::Partial);
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn fail(mut self, reason: impl fmt::Display) -> Result<()> {
        self.finish(StepStatus::Failed, Some(crate::input::reason(reason)))
    }

    fn finish(&mut self, to: StepStatus, error: Option<String>) -> Result<()> {
        let result = self
            .run
            .ledger
            .finish_step(self.run.id, self.id, &self.name, to, error);
        // As for a run: only a storage failure leaves the step to Drop.
        self.open = match &result {
            Ok(()) | Err(Error::RunFinished { .. } | Error::NotFound { .. }) => false,
            Err(e) => {
                self.unrecorded = Some(format!("its outcome could not be recorded: {e}"));
                true
            }
        };
        result
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let reason = drop_reason(&mut self.unrecorded);
        match self.finish(StepStatus::Failed, Some(reason.clone())) {
            // The run ended first and closed the step itself.
            Ok(()) | Err(Error::RunFinished { .. }) => {}
            Err(e) => log::error!(
                "runledger: could not close step {:?} of run {} ({reason}): {e}",
                self.name,
                self.run.id
            ),
        }
        self.open = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunStatus::*;

    fn state(status: RunStatus, ok: u32, bad: u32, running: u32) -> RunState {
        RunState {
            status,
            steps_succeeded: ok,
            steps_failed: bad,
            steps_running: running,
            cancel_requested: false,
        }
    }

    fn decided(outcome: Outcome, st: RunState) -> Result<Option<RunStatus>> {
        Ok(outcome.decide(RunId(1), &st)?.map(|change| match change {
            RunChange::Status { to, .. } => to,
            RunChange::CancelRequest { .. } => unreachable!(),
        }))
    }

    #[test]
    fn only_the_documented_transitions_are_allowed() {
        let allowed = [
            (Queued, Running),
            (Queued, Failed),
            (Queued, Cancelled),
            (Running, Succeeded),
            (Running, Partial),
            (Running, Failed),
            (Running, Cancelled),
        ];
        for from in RunStatus::ALL {
            for to in RunStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        for terminal in RunStatus::TERMINAL {
            assert!(RunStatus::ALL.iter().all(|&to| !terminal.can_become(to)));
        }
    }

    #[test]
    fn steps_decide_the_final_status() {
        assert_eq!(
            decided(Outcome::Succeed, state(Running, 0, 0, 0)).unwrap(),
            Some(Succeeded)
        );
        assert_eq!(
            decided(Outcome::Succeed, state(Running, 3, 0, 0)).unwrap(),
            Some(Succeeded)
        );
        assert_eq!(
            decided(Outcome::Succeed, state(Running, 2, 1, 0)).unwrap(),
            Some(Partial)
        );
        assert_eq!(
            decided(Outcome::Succeed, state(Running, 2, 0, 1)).unwrap(),
            Some(Partial)
        );
        assert_eq!(
            decided(Outcome::Succeed, state(Running, 0, 2, 0)).unwrap(),
            Some(Failed)
        );
        assert_eq!(
            decided(Outcome::Exit(0), state(Running, 1, 1, 0)).unwrap(),
            Some(Partial)
        );
        assert_eq!(
            decided(Outcome::Exit(3), state(Running, 3, 0, 0)).unwrap(),
            Some(Failed)
        );
    }

    #[test]
    fn terminal_runs_refuse_outcomes_but_drop_is_quiet() {
        for terminal in RunStatus::TERMINAL {
            let err = decided(Outcome::Succeed, state(terminal, 0, 0, 0)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidTransition { from, to: Succeeded, .. } if from == terminal)
            );
            assert_eq!(
                decided(Outcome::Dropped("x".into()), state(terminal, 0, 0, 0)).unwrap(),
                None
            );
        }
        // A queued run ended with an outcome of work goes through running
        // (regression: `succeed` without `start` was refused, and the run
        // then recorded as failed, "dropped without outcome").
        for (outcome, to) in [
            (Outcome::Succeed, Succeeded),
            (Outcome::Exit(0), Succeeded),
            (Outcome::Exit(3), Failed),
            (Outcome::Fail("x".into()), Failed),
        ] {
            let change = outcome.decide(RunId(1), &state(Queued, 1, 0, 0)).unwrap();
            assert!(
                matches!(change, Some(RunChange::Status { to: t, via_running: true, .. }) if t == to),
                "{outcome:?}: {change:?}"
            );
        }
        // A cancel or a drop ends a queued run as it is.
        for outcome in [Outcome::Cancelled(None), Outcome::Dropped("x".into())] {
            let change = outcome.decide(RunId(1), &state(Queued, 0, 0, 0)).unwrap();
            assert!(
                matches!(
                    change,
                    Some(RunChange::Status {
                        via_running: false,
                        ..
                    })
                ),
                "{outcome:?}: {change:?}"
            );
        }
        assert_eq!(
            decided(Outcome::Dropped("x".into()), state(Queued, 0, 0, 0)).unwrap(),
            Some(Failed)
        );
        assert_eq!(
            decided(Outcome::Cancelled(None), state(Queued, 0, 0, 0)).unwrap(),
            Some(Cancelled)
        );
    }

    #[test]
    fn cancel_never_touches_a_terminal_run() {
        for terminal in RunStatus::TERMINAL {
            assert!(cancel_change(&state(terminal, 0, 0, 0), None).is_none());
        }
        assert!(matches!(
            cancel_change(&state(Queued, 0, 0, 0), None),
            Some(RunChange::Status { to: Cancelled, .. })
        ));
        assert!(matches!(
            cancel_change(&state(Running, 0, 0, 0), None),
            Some(RunChange::CancelRequest { by: None })
        ));
        let mut requested = state(Running, 0, 0, 0);
        requested.cancel_requested = true;
        assert!(cancel_change(&requested, Some("x")).is_none());
    }

    #[test]
    fn statuses_round_trip_through_text() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), status);
        }
        assert!("done".parse::<RunStatus>().unwrap_err().is_invalid_input());
    }

    #[test]
    fn run_ids_parse_only_positive_integers() {
        assert_eq!("42".parse::<RunId>().unwrap(), RunId(42));
        for bad in ["", "0", "-3", "4x", "99999999999999999999"] {
            assert!(
                bad.parse::<RunId>().unwrap_err().is_invalid_input(),
                "{bad}"
            );
        }
    }
}
