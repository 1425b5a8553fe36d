//! What the ledger reports: plain records with public fields, all
//! `Serialize`, and the filter for listing runs.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::clock::Timestamp;
use crate::liveness::InstanceId;
use crate::lock::{LockMode, Ticket};
use crate::run::{RunId, RunStatus, StepStatus};

/// One run, as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RunRecord {
    /// The run's id.
    pub id: RunId,
    /// What it does, such as `"build"`.
    pub name: String,
    /// Who started it, such as `"terminal"`.
    pub source: String,
    /// Where it is in its life.
    pub status: RunStatus,
    /// The run it is a child of, if any.
    pub parent: Option<RunId>,
    /// Its idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The ledger instance (one process's open ledger) that owns it.
    pub instance: InstanceId,
    /// The owner's process id.
    pub pid: u32,
    /// The owner's host name.
    pub host: String,
    /// The exit code, when the run ended with one.
    pub exit_code: Option<i32>,
    /// Why the run failed, was cancelled or was reaped; for a `partial` run,
    /// how many steps failed.
    pub error: Option<String>,
    /// The JSON metadata of its spec (`null` when none).
    pub metadata: serde_json::Value,
    /// Where its log is written, if recorded.
    pub log_path: Option<PathBuf>,
    /// When it was registered.
    pub created_at: Timestamp,
    /// When it started running (equal to `created_at` unless it was queued).
    pub started_at: Option<Timestamp>,
    /// Its last progress heartbeat, if it ever sent one.
    pub heartbeat_at: Option<Timestamp>,
    /// When it reached its terminal status.
    pub finished_at: Option<Timestamp>,
    /// When a cancel was requested, if one was.
    pub cancel_requested_at: Option<Timestamp>,
    /// For a run made by [`Ledger::create_run`](crate::Ledger::create_run)
    /// that no process has adopted yet: the deadline for its adoption. While
    /// set, the run is owned by nobody (`instance` is 0; `pid` and `host`
    /// name its creator).
    pub adopt_by: Option<Timestamp>,
    /// Its steps, counted by status.
    pub progress: Progress,
}

/// How far a run's steps have got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Progress {
    /// Steps started.
    pub total: u32,
    /// Steps that succeeded.
    pub succeeded: u32,
    /// Steps that failed.
    pub failed: u32,
    /// Steps still running.
    pub running: u32,
    /// The most recently started step that is still running.
    pub current: Option<String>,
}

impl Progress {
    /// Steps finished, well or badly.
    pub fn done(&self) -> u32 {
        self.succeeded.saturating_add(self.failed)
    }
}

/// How many runs the ledger holds, by status: what
/// [`Ledger::run_counts`](crate::Ledger::run_counts) returns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RunCounts {
    /// Every status of [`RunStatus::ALL`], in that order, with its count
    /// (0 included).
    pub by_status: Vec<(RunStatus, u64)>,
    /// Runs a reaper failed: their owner died, they hung, or nobody adopted
    /// them in time.
    pub reaped: u64,
}

impl RunCounts {
    /// How many runs have `status`.
    pub fn of(&self, status: RunStatus) -> u64 {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }
}

/// One process that has the ledger open (an *instance*), and whether it is
/// alive: what [`Ledger::instances`](crate::Ledger::instances) lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InstanceInfo {
    /// The instance's id (the `instance` of the runs and locks it owns).
    pub id: InstanceId,
    /// Its process id.
    pub pid: u32,
    /// Its host name.
    pub host: String,
    /// Its last heartbeat.
    pub heartbeat_at: Timestamp,
    /// Whether it is alive, judged as the reaper judges it (see the crate
    /// docs, "Liveness and the reaper"). A dead one is *stale*: the next
    /// reap closes it and fails its runs.
    pub alive: bool,
    /// Why it is judged dead (`process exited`, `heartbeat stale for 93s`,
    /// …); `None` while alive.
    pub dead_reason: Option<String>,
    /// True for the instance of the ledger asked (this process).
    pub is_self: bool,
}

/// One step of a run, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StepRecord {
    /// The run it belongs to.
    pub run: RunId,
    /// Its name, unique within the run.
    pub name: String,
    /// Where it is in its life.
    pub status: StepStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
}

/// The identifier of an event: its position in the ledger's history,
/// strictly increasing in commit order across all runs, never reused.
///
/// `Display`s as its number, converts from and to `i64`, and serializes as
/// its number. [`EventCursor::after`](crate::EventCursor::after) makes the
/// cursor that continues a feed after an event.
///
/// # Examples
///
/// ```
/// use runledger::{EventCursor, EventId};
/// let last_seen = EventId::from(41);
/// assert_eq!(last_seen.to_string(), "41");
/// assert_eq!(EventCursor::after(last_seen).last_event_id(), last_seen);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct EventId(i64);

impl From<i64> for EventId {
    fn from(id: i64) -> EventId {
        EventId(id)
    }
}

impl From<EventId> for i64 {
    fn from(id: EventId) -> i64 {
        id.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// One entry of the ledger's history, in commit order: every status change
/// of a run or one of its steps, every cancel request, adoption and custom
/// event, and every grant, release, reclaim and forced release of a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EventRecord {
    /// The event's position in the ledger's history: strictly increasing in
    /// commit order across all runs, never reused.
    pub id: EventId,
    /// The run it is about. For a lock event ([`EventKind::is_lock`]), the
    /// run that owns (or owned) the lock, and `None` for a lock taken
    /// without a run ([`Ledger::lock`](crate::Ledger::lock)); every other
    /// event has one. Serialized as its number, or `null`.
    pub run: Option<RunId>,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
    /// The reason given, if any (a failure reason, for example).
    pub message: Option<String>,
}

/// What an [`EventRecord`] records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// The run changed status. `from` is `None` when the run was registered.
    Status {
        /// The status before.
        from: Option<RunStatus>,
        /// The status after.
        to: RunStatus,
    },
    /// A step changed status. `from` is `None` when the step started.
    Step {
        /// The step's name.
        step: String,
        /// The status before.
        from: Option<StepStatus>,
        /// The status after.
        to: StepStatus,
    },
    /// Someone asked the run to stop.
    CancelRequested,
    /// A lock the run held was released by force
    /// ([`Ledger::force_unlock`](crate::Ledger::force_unlock), `runledger
    /// unlock --force`); the event's message is the reason given, and who
    /// gave it.
    LockForced {
        /// The keys of the lock taken away.
        keys: Vec<String>,
    },
    /// A process adopted the run ([`Ledger::adopt_run`](crate::Ledger::adopt_run))
    /// and owns it from then on.
    Adopted {
        /// The adopter's ledger instance.
        instance: InstanceId,
        /// The adopter's process id.
        pid: u32,
        /// The adopter's host name.
        host: String,
    },
    /// An event the run's owner recorded with [`Run::event`](crate::Run::event).
    Custom {
        /// Its name, such as `"progress"`.
        name: String,
        /// Its JSON data (`null` when none).
        data: serde_json::Value,
    },
    /// A lock request was granted (at once, or to a waiter when a holder
    /// left): its keys are held with `token` from now on.
    LockGranted(LockEvent),
    /// A holder released its lock: by the guard's `release` or drop, or
    /// with its run's end.
    LockReleased(LockEvent),
    /// The lock of a dead holder was taken away from it (by the next
    /// acquirer, or by the reaper); the event's message says why the holder
    /// was judged dead, and by whom.
    LockReclaimed(LockEvent),
    /// A held lock was released by force
    /// ([`Ledger::force_unlock`](crate::Ledger::force_unlock), `runledger
    /// unlock --force`); the event's message is the reason given, and who
    /// gave it. (The holder's run records a [`LockForced`](EventKind::LockForced)
    /// event too.)
    LockForceReleased(LockEvent),
}

impl EventKind {
    /// The lock an event of a lock is about: `Some` for
    /// [`LockGranted`](EventKind::LockGranted),
    /// [`LockReleased`](EventKind::LockReleased),
    /// [`LockReclaimed`](EventKind::LockReclaimed) and
    /// [`LockForceReleased`](EventKind::LockForceReleased).
    pub fn lock(&self) -> Option<&LockEvent> {
        match self {
            EventKind::LockGranted(lock)
            | EventKind::LockReleased(lock)
            | EventKind::LockReclaimed(lock)
            | EventKind::LockForceReleased(lock) => Some(lock),
            _ => None,
        }
    }

    /// Whether this is an event of a lock (see [`lock`](EventKind::lock)).
    pub fn is_lock(&self) -> bool {
        self.lock().is_some()
    }
}

/// The lock an event of a lock is about: one grant of a request, from its
/// grant to its release.
///
/// Serialized flat into its event, beside the event's `kind`:
/// `{"kind": "lock_granted", "ticket": 7, "keys": ["gpu"], "mode": "slots",
/// "capacity": 2, "token": 12, "pid": 4242, "host": "build-1", …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LockEvent {
    /// The request's ticket ([`LockRecord::ticket`](crate::LockRecord::ticket)).
    pub ticket: Ticket,
    /// Every key of the request, granted and released together.
    pub keys: Vec<String>,
    /// Its mode.
    #[serde(flatten)]
    pub mode: LockMode,
    /// The fencing token of the grant.
    pub token: u64,
    /// The holder's process id.
    pub pid: u32,
    /// The holder's host name.
    pub host: String,
}

/// The event in words, as `runledger show` and the dashboard put it:
/// `running → succeeded`, `step load: succeeded`, `lock granted: …`.
impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKind::Status { from: None, to } => write!(f, "registered {to}"),
            EventKind::Status {
                from: Some(from),
                to,
            } => write!(f, "{from} → {to}"),
            EventKind::Step {
                step,
                from: None,
                to,
            } => write!(f, "step {step}: {to}"),
            EventKind::Step {
                step,
                from: Some(from),
                to,
            } => write!(f, "step {step}: {from} → {to}"),
            EventKind::CancelRequested => f.write_str("cancel requested"),
            EventKind::LockForced { keys } => write!(f, "lock {keys:?} released by force"),
            EventKind::Adopted { pid, host, .. } => write!(f, "adopted by pid {pid} on {host}"),
            EventKind::Custom { name, data } if data.is_null() => f.write_str(name),
            EventKind::Custom { name, data } => write!(f, "{name} {data}"),
            EventKind::LockGranted(lock) => write!(f, "lock granted: {lock}"),
            EventKind::LockReleased(lock) => write!(f, "lock released: {lock}"),
            EventKind::LockReclaimed(lock) => {
                write!(f, "lock reclaimed from a dead holder: {lock}")
            }
            EventKind::LockForceReleased(lock) => write!(f, "lock released by force: {lock}"),
        }
    }
}

impl fmt::Display for LockEvent {
    /// The keys, then the mode, token and holder: `"build:a, build:b
    /// (exclusive, token 7, pid 4242 on build-1)"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, token {}, pid {} on {})",
            self.keys.join(", "),
            self.mode,
            self.token,
            self.pid,
            self.host
        )
    }
}

/// Which runs [`Ledger::runs`](crate::Ledger::runs) lists: newest first, at
/// most 100 unless [`limit`](RunFilter::limit) says otherwise.
///
/// Every condition narrows the list; the default lists the newest 100 runs.
///
/// # Examples
///
/// ```
/// use runledger::{RunFilter, RunStatus};
/// let active_builds = RunFilter::default().active().name("build");
/// let recent_failures = RunFilter::default().status(RunStatus::Failed).limit(20);
/// ```
#[derive(Clone, Debug)]
#[must_use = "a RunFilter does nothing until passed to Ledger::runs"]
pub struct RunFilter {
    pub(crate) statuses: Vec<RunStatus>,
    pub(crate) name: Option<String>,
    pub(crate) source: Option<String>,
    pub(crate) since: Option<Timestamp>,
    pub(crate) until: Option<Timestamp>,
    pub(crate) before: Option<RunId>,
    pub(crate) limit: usize,
}

impl Default for RunFilter {
    fn default() -> RunFilter {
        RunFilter {
            statuses: Vec::new(),
            name: None,
            source: None,
            since: None,
            until: None,
            before: None,
            limit: RunFilter::DEFAULT_LIMIT,
        }
    }
}

impl RunFilter {
    /// How many runs are listed when no limit is set.
    pub const DEFAULT_LIMIT: usize = 100;

    /// Lists runs in `status` (call again to add more statuses).
    pub fn status(mut self, status: RunStatus) -> RunFilter {
        if !self.statuses.contains(&status) {
            self.statuses.push(status);
        }
        self
    }

    /// Lists runs in any of `statuses`.
    pub fn statuses(self, statuses: impl IntoIterator<Item = RunStatus>) -> RunFilter {
        statuses.into_iter().fold(self, RunFilter::status)
    }

    /// Lists active runs only: queued and running.
    pub fn active(self) -> RunFilter {
        self.statuses(RunStatus::ACTIVE)
    }

    /// Lists runs named exactly `name`.
    pub fn name(mut self, name: impl Into<String>) -> RunFilter {
        self.name = Some(name.into());
        self
    }

    /// Lists runs from exactly `source`.
    pub fn source(mut self, source: impl Into<String>) -> RunFilter {
        self.source = Some(source.into());
        self
    }

    /// Lists runs created at or after `t`.
    pub fn since(mut self, t: Timestamp) -> RunFilter {
        self.since = Some(t);
        self
    }

    /// Lists runs created before `t`.
    pub fn until(mut self, t: Timestamp) -> RunFilter {
        self.until = Some(t);
        self
    }

    /// Lists runs older than `id`: pass the last id of one page to get the
    /// next page.
    pub fn before(mut self, id: RunId) -> RunFilter {
        self.before = Some(id);
        self
    }

    /// Lists at most `limit` runs. Defaults to [`RunFilter::DEFAULT_LIMIT`].
    pub fn limit(mut self, limit: usize) -> RunFilter {
        self.limit = limit;
        self
    }
}
