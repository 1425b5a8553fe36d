//! Strict cross-process locks: requests, modes, keys, the guard, and the
//! compatibility rules (plain Rust; the store applies them in its
//! transactions). How a request gets its keys is in [`acquire`].

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::gate::Held;
use crate::input;
use crate::ledger::Ledger;
use crate::liveness::InstanceId;
use crate::run::RunId;

pub(crate) mod acquire;
pub(crate) use acquire::Callers;

/// How a lock shares its keys.
///
/// | held \ requested | `Exclusive` | `Shared` | `Slots(n)` |
/// |---|---|---|---|
/// | nothing | granted | granted | granted |
/// | `Exclusive` | waits | waits | waits |
/// | `Shared` | waits | granted | waits |
/// | `Slots(n)`, fewer than n holders | waits | waits | granted |
/// | `Slots(n)`, n holders | waits | waits | waits |
///
/// Every request on a key in `Slots` mode must give the same capacity as the
/// holders and waiters it meets there: a different one is an
/// [`Error::InvalidInput`], never a silent change of the capacity. When the
/// key is idle, a new capacity is fine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode", content = "capacity")]
pub enum LockMode {
    /// One holder, no one else. The default.
    Exclusive,
    /// Any number of shared holders, no exclusive one (readers).
    Shared,
    /// At most n holders at once (`gpu` with 2; "at most 3 active runs of an
    /// agent"). n is at least 1.
    Slots(u32),
}

impl LockMode {
    /// The lowercase name of the mode: `exclusive`, `shared` or `slots`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
            LockMode::Slots(_) => "slots",
        }
    }

    pub(crate) fn capacity(self) -> Option<u32> {
        match self {
            LockMode::Slots(n) => Some(n),
            _ => None,
        }
    }

    pub(crate) fn from_parts(mode: &str, capacity: Option<u32>) -> Option<LockMode> {
        match (mode, capacity) {
            ("exclusive", _) => Some(LockMode::Exclusive),
            ("shared", _) => Some(LockMode::Shared),
            ("slots", Some(n)) => Some(LockMode::Slots(n)),
            _ => None,
        }
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockMode::Slots(n) => write!(f, "slots({n})"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Whether a request in mode `wanted` can join the requests `ahead` of it on
/// one key (its holders, and the waiters queued before it).
///
/// `Err` when `wanted` is `Slots(n)` and a request ahead has another capacity.
pub(crate) fn compatible(ahead: &[LockMode], wanted: LockMode) -> Result<bool, u32> {
    if let LockMode::Slots(n) = wanted
        && let Some(other) = ahead.iter().find_map(|m| m.capacity().filter(|&c| c != n))
    {
        return Err(other);
    }
    Ok(match wanted {
        LockMode::Exclusive => ahead.is_empty(),
        LockMode::Shared => ahead.iter().all(|m| *m == LockMode::Shared),
        LockMode::Slots(n) => {
            ahead.iter().all(|m| matches!(m, LockMode::Slots(_))) && ahead.len() < n as usize
        }
    })
}

/// How long a request waits for its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Refuse at once with [`Error::Conflict`].
    No,
    /// Wait up to this long, then fail with [`Error::Timeout`]: in the queue,
    /// after at most [`Builder::queue_after`](crate::Builder::queue_after)
    /// at the keys' gates for an exclusive request.
    For(Duration),
    /// Wait until granted (in the queue, after the gates as for `For`).
    Forever,
}

/// What to lock: one or more keys, a [`LockMode`] and how long to wait.
///
/// Keys are opaque strings of 1 to 256 bytes of UTF-8, without control
/// characters or leading or trailing whitespace; [`LockKey`] builds
/// conventional ones. Several keys are granted together or not at all.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use runledger::{LockMode, LockRequest};
/// let req = LockRequest::new(["dataset:raw", "dataset:clean"])
///     .mode(LockMode::Shared)
///     .wait(Duration::from_secs(10));
/// ```
#[derive(Clone, Debug)]
#[must_use = "a LockRequest does nothing until passed to Ledger::acquire"]
pub struct LockRequest {
    pub(crate) keys: Vec<String>,
    pub(crate) mode: LockMode,
    pub(crate) wait: Option<Wait>,
}

impl LockRequest {
    /// The keys requested, as given (checked when the request is made).
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// A request for `keys`, exclusive, waiting up to the ledger's default
    /// wait ([`Builder::lock_wait`](crate::Builder::lock_wait)).
    pub fn new<K: Into<String>>(keys: impl IntoIterator<Item = K>) -> LockRequest {
        LockRequest {
            keys: keys.into_iter().map(Into::into).collect(),
            mode: LockMode::Exclusive,
            wait: None,
        }
    }

    /// The mode of every key of the request. Defaults to
    /// [`LockMode::Exclusive`].
    pub fn mode(mut self, mode: LockMode) -> LockRequest {
        self.mode = mode;
        self
    }

    /// Waits in the queue up to `wait`, then fails with [`Error::Timeout`].
    pub fn wait(mut self, wait: Duration) -> LockRequest {
        self.wait = Some(Wait::For(wait));
        self
    }

    /// Refuses at once with [`Error::Conflict`] if a key is taken.
    pub fn no_wait(mut self) -> LockRequest {
        self.wait = Some(Wait::No);
        self
    }

    /// Waits in the queue until granted, however long that takes.
    pub fn wait_forever(mut self) -> LockRequest {
        self.wait = Some(Wait::Forever);
        self
    }

    /// Checks the keys and the mode; returns the keys sorted and deduplicated.
    pub(crate) fn checked_keys(&self) -> Result<Vec<String>> {
        if self.keys.is_empty() {
            return Err(Error::invalid("lock request", "", "names no key"));
        }
        if self.mode == LockMode::Slots(0) {
            return Err(Error::invalid(
                "lock mode",
                "slots(0)",
                "a key needs at least one slot",
            ));
        }
        for key in &self.keys {
            input::check_name("lock key", key)?;
        }
        let mut keys = self.keys.clone();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}

/// Builds a conventional lock key from a kind and named parts:
/// `build:symbol=AAPL,lake=raw`.
///
/// The characters `\`, `:`, `,` and `=` inside the kind, the names and the
/// values are escaped with a backslash, so two different part lists never
/// make the same key.
///
/// # Examples
///
/// ```
/// use runledger::LockKey;
/// let key = LockKey::new("build").part("symbol", "AAPL").part("lake", "raw");
/// assert_eq!(key.to_string(), "build:symbol=AAPL,lake=raw");
/// let odd = LockKey::new("build").part("path", "a,b=c");
/// assert_eq!(odd.to_string(), r"build:path=a\,b\=c");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LockKey {
    kind: String,
    parts: Vec<(String, String)>,
}

impl LockKey {
    /// A key of kind `kind` (what is locked: `build`, `train`, `gpu`…).
    pub fn new(kind: impl Into<String>) -> LockKey {
        LockKey {
            kind: kind.into(),
            parts: Vec::new(),
        }
    }

    /// Adds a `name=value` part; parts keep the order they are added in.
    pub fn part(mut self, name: impl Into<String>, value: impl fmt::Display) -> LockKey {
        self.parts.push((name.into(), value.to_string()));
        self
    }

    /// Parses a key made by this builder back into its kind and parts.
    /// Returns `None` for text the builder cannot have made.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::LockKey;
    /// let key = LockKey::new("build").part("symbol", "AAPL");
    /// assert_eq!(LockKey::parse(&key.to_string()), Some(key));
    /// assert_eq!(LockKey::parse(r"build:bad\"), None);
    /// ```
    pub fn parse(text: &str) -> Option<LockKey> {
        // Split on unescaped separators, unescaping as we go.
        let mut fields: Vec<(String, char)> = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => current.push(chars.next().filter(|c| "\\:,=".contains(*c))?),
                ':' | ',' | '=' => fields.push((std::mem::take(&mut current), c)),
                c => current.push(c),
            }
        }
        fields.push((current, '\0'));
        let mut fields = fields.into_iter();
        let (kind, sep) = fields.next()?;
        let mut key = LockKey::new(kind);
        match sep {
            '\0' => return Some(key),
            ':' => {}
            _ => return None,
        }
        loop {
            let (name, sep) = fields.next()?;
            if sep != '=' {
                return None;
            }
            let (value, sep) = fields.next()?;
            key.parts.push((name, value));
            match sep {
                '\0' => return Some(key),
                ',' => {}
                _ => return None,
            }
        }
    }
}

fn escape(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        if matches!(c, '\\' | ':' | ',' | '=') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    Ok(())
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        escape(f, &self.kind)?;
        for (i, (name, value)) in self.parts.iter().enumerate() {
            f.write_str(if i == 0 { ":" } else { "," })?;
            escape(f, name)?;
            f.write_str("=")?;
            escape(f, value)?;
        }
        Ok(())
    }
}

impl From<LockKey> for String {
    fn from(key: LockKey) -> String {
        key.to_string()
    }
}

impl From<&LockKey> for String {
    fn from(key: &LockKey) -> String {
        key.to_string()
    }
}

/// A lock request's place in the queue of its keys: requests with lower
/// tickets are served first. Tickets only order requests; their numbers
/// mean nothing else.
///
/// `Display`s as its number, converts from and to `i64`, and serializes as
/// its number.
///
/// # Examples
///
/// ```
/// use runledger::Ticket;
/// let (first, second) = (Ticket::from(3), Ticket::from(8));
/// assert!(first < second);
/// assert_eq!(second.to_string(), "8");
/// assert_eq!(i64::from(first), 3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Ticket(i64);

impl From<i64> for Ticket {
    fn from(ticket: i64) -> Ticket {
        Ticket(ticket)
    }
}

impl From<Ticket> for i64 {
    fn from(ticket: Ticket) -> i64 {
        ticket.0
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Whether a lock row is granted or still queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockState {
    /// Granted: the holder may touch the resource.
    Held,
    /// Queued behind the holders (and earlier waiters) of its keys.
    Waiting,
}

/// One key of one lock request, held or waiting: what
/// [`Ledger::locks`](crate::Ledger::locks) lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LockRecord {
    /// The key.
    pub key: String,
    /// The mode of the request. In JSON, flattened: `"mode": "exclusive"`,
    /// or `"mode": "slots", "capacity": 2`.
    #[serde(flatten)]
    pub mode: LockMode,
    /// Held or waiting.
    pub state: LockState,
    /// The fencing token of the grant (`None` while waiting).
    pub token: Option<u64>,
    /// The request's place in the queue: lower tickets are served first.
    pub ticket: Ticket,
    /// Every key of the request (granted together).
    pub keys: Vec<String>,
    /// The run that owns the lock, if any.
    pub run: Option<RunId>,
    /// That run's name.
    pub run_name: Option<String>,
    /// The owner's ledger instance.
    pub instance: InstanceId,
    /// The owner's process id.
    pub pid: u32,
    /// The owner's host.
    pub host: String,
    /// When the request was made.
    pub requested_at: Timestamp,
    /// When it was granted.
    pub granted_at: Option<Timestamp>,
}

/// A holder (or an earlier waiter) in the way of a request, as
/// [`Error::Conflict`] and [`Error::Timeout`] name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Holder {
    /// The key it holds (or waits for).
    pub key: String,
    /// Its mode (flattened in JSON, as in [`LockRecord`]).
    #[serde(flatten)]
    pub mode: LockMode,
    /// Held, or queued ahead of the request.
    pub state: LockState,
    /// The run that owns it, if any, and that run's name.
    pub run: Option<(RunId, String)>,
    /// The owner's process id.
    pub pid: u32,
    /// The owner's host.
    pub host: String,
    /// How long it has held (or waited) when the error was made.
    pub held_for: Duration,
    /// True when the holder is this very ledger instance (this process).
    pub is_self: bool,
    /// True when the holder is the very thread (or tokio task) that made
    /// the request: a request kept out by such locks alone is refused at
    /// once, since it would wait for itself.
    pub by_caller: bool,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.state {
            LockState::Held => "is held",
            LockState::Waiting => "is awaited first",
        };
        write!(f, "lock {:?} {verb} ", self.key)?;
        let since = Seconds(self.held_for);
        match &self.run {
            Some((id, name)) => write!(
                f,
                "by run {id} ({name}, {}, pid {} on {}, for {since})",
                self.mode, self.pid, self.host
            )?,
            None => write!(
                f,
                "by pid {} on {} ({}, for {since})",
                self.pid, self.host, self.mode
            )?,
        }
        if self.by_caller {
            f.write_str(": the calling thread (or task) itself")?;
        } else if self.is_self {
            f.write_str(", in this very process")?;
        }
        Ok(())
    }
}

/// A duration shown to a person: `850ms`, `12s`, `4m10s`, `3h5m`, `7d0h`.
pub(crate) struct Seconds(pub Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let secs = ms / 1000;
        if ms < 1000 {
            write!(f, "{ms}ms")
        } else if secs < 120 {
            write!(f, "{secs}s")
        } else if secs < 3600 {
            write!(f, "{}m{}s", secs / 60, secs % 60)
        } else if secs < 24 * 3600 {
            write!(f, "{}h{}m", secs / 3600, (secs / 60) % 60)
        } else {
            write!(f, "{}d{}h", secs / (24 * 3600), (secs / 3600) % 24)
        }
    }
}

/// A granted lock: the guard [`Ledger::lock`], [`Ledger::try_lock`],
/// [`Ledger::acquire`] and [`Run::lock`](crate::Run::lock) return.
///
/// Dropping it releases the lock (best effort, errors logged);
/// [`release`](LockGuard::release) releases it and reports errors.
///
/// # Fencing tokens
///
/// [`token`](LockGuard::token) is strictly greater than the token of every
/// earlier grant of each of its keys, in any process, across restarts and
/// pruning. A holder that was paused long enough to lose its lock (the
/// reaper judged it dead) still holds an old token: hand the token to the
/// resource with each write, and have the resource refuse tokens lower than
/// the highest it has seen.
#[must_use = "dropping a LockGuard releases the lock at once"]
#[derive(Debug)]
pub struct LockGuard {
    ledger: Ledger,
    id: i64,
    keys: Vec<String>,
    mode: LockMode,
    token: u64,
    run: Option<RunId>,
    held: bool,
    /// The gates of its keys that the request took (exclusive requests):
    /// let go once the release has committed.
    gates: Held,
}

impl LockGuard {
    /// The fencing token of this grant.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The keys held, sorted.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The mode they are held in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The run that owns this lock, if it was taken through a [`Run`](crate::Run).
    pub fn run(&self) -> Option<RunId> {
        self.run
    }

    /// Whether this grant is still recorded as held. False once the lock was
    /// taken away (its holder judged dead while it was only paused, or
    /// released by force) or released with its run.
    ///
    /// # Errors
    ///
    /// Storage errors only.
    pub fn is_held(&self) -> Result<bool> {
        Ok(self.held && self.ledger.lock_is_held(self.id, self.token)?)
    }

    /// Releases the lock and wakes whoever waits for its keys.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] if the lock was taken away before (by force, or
    /// because its holder was judged dead): whatever was done under it since
    /// may have overlapped with another holder. A lock released with its run
    /// is not lost: that returns `Ok`.
    pub fn release(mut self) -> Result<()> {
        self.release_()
    }

    fn release_(&mut self) -> Result<()> {
        if !self.held {
            return Ok(());
        }
        // On a storage error `held` stays true, so that Drop tries again.
        // The gates go once the row is gone (whoever gets one finds its key
        // free), or with this call if it fails.
        let gates = std::mem::take(&mut self.gates);
        let released = self
            .ledger
            .release_lock(self.id, self.token, Some(&self.keys), gates)?;
        self.held = false;
        self.ledger.inner.callers.forget(self.id);
        if released {
            return Ok(());
        }
        // Gone already: taken away (recorded), or released with its run.
        if self.run.is_some() && !self.ledger.lock_was_taken_away(self.id)? {
            return Ok(());
        }
        Err(Error::LockLost {
            keys: self.keys.clone(),
            token: self.token,
        })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let released = self.release_();
        // A row left to the orphan list is this process's, no caller's.
        self.ledger.inner.callers.forget(self.id);
        match released {
            Ok(()) => {}
            Err(e @ Error::LockLost { .. }) => log::error!("runledger: {e}"),
            Err(e) => {
                // Not deleted: retried on this ledger's next lock call.
                log::warn!(
                    "runledger: releasing lock {:?} failed, will retry: {e}",
                    self.keys
                );
                self.ledger.adopt_orphan(crate::ledger::Orphan::Held {
                    id: self.id,
                    token: self.token,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LockMode::*;
    use proptest::prelude::*;

    #[test]
    fn every_pair_of_modes() {
        // (held, wanted, granted)
        let table = [
            (Exclusive, Exclusive, false),
            (Exclusive, Shared, false),
            (Exclusive, Slots(2), false),
            (Shared, Exclusive, false),
            (Shared, Shared, true),
            (Shared, Slots(2), false),
            (Slots(2), Exclusive, false),
            (Slots(2), Shared, false),
            (Slots(2), Slots(2), true),
        ];
        for (held, wanted, granted) in table {
            assert_eq!(
                compatible(&[held], wanted),
                Ok(granted),
                "{held} then {wanted}"
            );
        }
        for wanted in [Exclusive, Shared, Slots(1)] {
            assert_eq!(compatible(&[], wanted), Ok(true));
        }
        assert_eq!(compatible(&[Slots(2), Slots(2)], Slots(2)), Ok(false));
        assert_eq!(compatible(&[Slots(2)], Slots(3)), Err(2));
    }

    /// The simple model: count the holders by mode.
    fn model_grants(held: &[LockMode], wanted: LockMode) -> Option<bool> {
        let exclusive = held.iter().filter(|m| **m == Exclusive).count();
        let shared = held.iter().filter(|m| **m == Shared).count();
        let slots: Vec<u32> = held.iter().filter_map(|m| m.capacity()).collect();
        if let Slots(n) = wanted
            && slots.iter().any(|&c| c != n)
        {
            return None;
        }
        Some(match wanted {
            Exclusive => held.is_empty(),
            Shared => exclusive == 0 && slots.is_empty(),
            Slots(n) => exclusive == 0 && shared == 0 && slots.len() < n as usize,
        })
    }

    fn mode() -> impl Strategy<Value = LockMode> {
        prop_oneof![Just(Exclusive), Just(Shared), (1u32..4).prop_map(Slots)]
    }

    proptest! {
        /// Random sequences of grants and releases on one key never break
        /// the model's limits, and agree with it on every decision.
        #[test]
        fn grants_and_releases_follow_the_model(
            ops in proptest::collection::vec((mode(), any::<bool>(), any::<prop::sample::Index>()), 1..60)
        ) {
            let mut held: Vec<LockMode> = Vec::new();
            for (wanted, release, which) in ops {
                if release && !held.is_empty() {
                    held.remove(which.index(held.len()));
                    continue;
                }
                let decision = compatible(&held, wanted).ok();
                prop_assert_eq!(decision, model_grants(&held, wanted));
                if decision == Some(true) {
                    held.push(wanted);
                }
                let exclusive = held.iter().filter(|m| **m == Exclusive).count();
                prop_assert!(exclusive == 0 || held.len() == 1);
                if let Some(n) = held.iter().find_map(|m| m.capacity()) {
                    prop_assert!(held.len() <= n as usize);
                    prop_assert!(held.iter().all(|m| *m == Slots(n)));
                }
            }
        }

        /// Different part lists never make the same key: every key parses
        /// back to the parts it was built from.
        #[test]
        fn keys_round_trip(kind in ".{0,8}", parts in proptest::collection::vec((".{0,6}", ".{0,6}"), 0..4)) {
            let key = parts.iter().fold(LockKey::new(kind), |k, (n, v)| k.part(n.clone(), v));
            prop_assert_eq!(LockKey::parse(&key.to_string()), Some(key));
        }

        #[test]
        fn parse_never_panics(text in ".{0,40}") {
            let _ = LockKey::parse(&text);
        }
    }

    #[test]
    fn requests_check_their_keys() {
        assert!(
            LockRequest::new(Vec::<String>::new())
                .checked_keys()
                .is_err()
        );
        assert!(
            LockRequest::new(["k"])
                .mode(Slots(0))
                .checked_keys()
                .is_err()
        );
        let err = LockRequest::new(["ok", "bad\n"])
            .checked_keys()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "lock key",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            LockRequest::new(["b", "a", "b"]).checked_keys().unwrap(),
            vec!["a".to_owned(), "b".to_owned()]
        );
    }
}
