//! Reapers: passes that bring the ledger back to a true state when owners
//! die or runs hang. See [`Reaper`] and [`Ledger::reap`].

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::ledger::Ledger;
use crate::liveness::InstanceId;
use crate::lock::LockState;
use crate::run::{RunId, RunStatus};

/// The error a [`Reaper`] pass returns: any error type of the host's.
pub type ReapError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One sweep over the ledger, run by [`Ledger::reap`] and by the background
/// keeper.
///
/// The ledger has three of its own, always run first and in this order:
///
/// - `dead-owners`: instances whose process is gone (or whose heartbeat is
///   stale): their runs become `failed` with the verdict's reason, their
///   steps fail, their locks are released and their queue places removed,
///   all in one transaction per owner; and runs made by
///   [`Ledger::create_run`](crate::Ledger::create_run) that nobody adopted
///   within their deadline: `failed`, `not adopted within …`;
/// - `hung-runs`: running runs with a
///   [heartbeat timeout](crate::RunSpec::heartbeat_timeout) that did not
///   heartbeat in time: `failed`, the reason says so;
/// - `retention`: prunes finished runs older than
///   [`Builder::retention`](crate::Builder::retention); only when that is set.
///
/// A host adds its own with [`Ledger::register_reaper`], for example to
/// archive what it keeps in memory about runs that ended. A pass that returns
/// an error or panics is reported in its [`ReapReport`] and does not stop
/// the others.
///
/// Like the built-ins, a pass should change a row only if it is still in the
/// state it judged: use the ledger's own calls, which are compare-and-sets.
/// A reaper must not keep a [`Ledger`] clone of its own (it is given one for
/// each pass), or the ledger it is registered on is never closed.
///
/// # Examples
///
/// ```
/// use runledger::{Ledger, ReapError, Reaped, Reaper, RunFilter, RunStatus};
///
/// /// Reports failed runs for someone to look at.
/// struct FailedRuns;
///
/// impl Reaper for FailedRuns {
///     fn name(&self) -> &str {
///         "failed-runs"
///     }
///
///     fn reap(&self, ledger: &Ledger) -> Result<Vec<Reaped>, ReapError> {
///         let failed = ledger.runs(RunFilter::default().status(RunStatus::Failed))?;
///         Ok(failed
///             .into_iter()
///             .map(|run| Reaped::Other {
///                 what: format!("run {} is failed", run.id),
///                 reason: run.error.unwrap_or_default(),
///             })
///             .collect())
///     }
/// }
///
/// # let dir = tempfile::tempdir()?;
/// let ledger = Ledger::open(dir.path().join("ledger.db"))?;
/// ledger.register_reaper(FailedRuns);
/// let reports = ledger.reap()?;
/// assert_eq!(reports.last().unwrap().reaper, "failed-runs");
/// # Ok::<(), runledger::Error>(())
/// ```
pub trait Reaper: Send + Sync + 'static {
    /// A short name for reports and logs, such as `"archive"`.
    fn name(&self) -> &str;

    /// Does one pass and says what it changed, and why.
    ///
    /// # Errors
    ///
    /// Whatever stopped the pass; it is reported in the pass's
    /// [`ReapReport::error`].
    fn reap(&self, ledger: &Ledger) -> Result<Vec<Reaped>, ReapError>;
}

/// What one reaper did in one pass: the reports [`Ledger::reap`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReapReport {
    /// The reaper's [name](Reaper::name).
    pub reaper: String,
    /// What it changed. Empty when everything was already true.
    pub reaped: Vec<Reaped>,
    /// Why the pass failed or panicked, if it did. What a failed pass
    /// committed before failing stays changed (the built-ins commit one
    /// owner or run at a time) but is not listed in `reaped`.
    pub error: Option<String>,
    /// How long the pass took (in JSON: `took_ms`, milliseconds).
    #[serde(rename = "took_ms", serialize_with = "as_millis")]
    pub took: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

impl ReapReport {
    /// True when the pass ran to the end.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

impl fmt::Display for ReapReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.reaper)?;
        match (&self.error, self.reaped.len()) {
            (Some(e), _) => write!(f, "failed: {e}")?,
            (None, 0) => f.write_str("nothing to do")?,
            (None, n) => write!(f, "{n} change{}", if n == 1 { "" } else { "s" })?,
        }
        for reaped in &self.reaped {
            write!(f, "\n  {reaped}")?;
        }
        Ok(())
    }
}

/// One change a reaper made, with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reaped {
    /// A run was closed as `failed`.
    Run {
        /// The run.
        id: RunId,
        /// Its name.
        name: String,
        /// Its status before.
        from: RunStatus,
        /// Why, as written in the run's `error`.
        reason: String,
    },
    /// A lock request of a dead owner was removed: a held lock released
    /// (its waiters are served next), or a queue place dropped.
    Lock {
        /// The request's keys.
        keys: Vec<String>,
        /// Held or waiting.
        state: LockState,
        /// The fencing token of a held lock.
        token: Option<u64>,
        /// Why.
        reason: String,
    },
    /// An instance (one process's open ledger) was judged dead and closed.
    Instance {
        /// The instance.
        id: InstanceId,
        /// Its process id.
        pid: u32,
        /// Its host.
        host: String,
        /// The verdict: `process exited`, `heartbeat stale for 93s`, …
        reason: String,
    },
    /// Finished runs were pruned.
    Pruned {
        /// How many.
        runs: u64,
        /// Why.
        reason: String,
    },
    /// Anything else, for a host's own reapers.
    Other {
        /// What changed.
        what: String,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Reaped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reaped::Run {
                id,
                name,
                from,
                reason,
            } => write!(f, "run {id} ({name}) {from} → failed: {reason}"),
            Reaped::Lock {
                keys,
                state: LockState::Held,
                token,
                reason,
            } => {
                write!(f, "lock {keys:?} released")?;
                if let Some(token) = token {
                    write!(f, " (token {token})")?;
                }
                write!(f, ": {reason}")
            }
            Reaped::Lock { keys, reason, .. } => {
                write!(f, "queue place for {keys:?} removed: {reason}")
            }
            Reaped::Instance {
                id,
                pid,
                host,
                reason,
            } => write!(f, "instance {id} (pid {pid} on {host}) closed: {reason}"),
            Reaped::Pruned { runs, reason } => write!(f, "{runs} runs pruned: {reason}"),
            Reaped::Other { what, reason } => write!(f, "{what}: {reason}"),
        }
    }
}

/// The built-in reapers.
pub(crate) struct DeadOwners;
pub(crate) struct HungRuns;
pub(crate) struct Retention(pub Duration);

impl Reaper for DeadOwners {
    fn name(&self) -> &str {
        "dead-owners"
    }

    fn reap(&self, ledger: &Ledger) -> Result<Vec<Reaped>, ReapError> {
        Ok(ledger.reap_dead_owners()?)
    }
}

impl Reaper for HungRuns {
    fn name(&self) -> &str {
        "hung-runs"
    }

    fn reap(&self, ledger: &Ledger) -> Result<Vec<Reaped>, ReapError> {
        Ok(ledger.reap_hung_runs()?)
    }
}

impl Reaper for Retention {
    fn name(&self) -> &str {
        "retention"
    }

    fn reap(&self, ledger: &Ledger) -> Result<Vec<Reaped>, ReapError> {
        let runs = ledger.prune(self.0)?;
        Ok(if runs == 0 {
            Vec::new()
        } else {
            vec![Reaped::Pruned {
                runs,
                reason: format!("finished more than {} ago", crate::lock::Seconds(self.0)),
            }]
        })
    }
}

/// Runs one pass, turning an error or a panic into its report.
pub(crate) fn run_pass(reaper: &dyn Reaper, ledger: &Ledger) -> ReapReport {
    let started = std::time::Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reaper.reap(ledger)));
    let (reaped, error) = match outcome {
        Ok(Ok(reaped)) => (reaped, None),
        Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            (Vec::new(), Some(format!("panicked: {message}")))
        }
    };
    if let Some(e) = &error {
        log::error!("runledger: reaper {} failed: {e}", reaper.name());
    }
    for r in &reaped {
        log::warn!("runledger: reaper {}: {r}", reaper.name());
    }
    ReapReport {
        reaper: reaper.name().to_owned(),
        reaped,
        error,
        took: started.elapsed(),
    }
}
