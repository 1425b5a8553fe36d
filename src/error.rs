//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::lock::{Holder, Seconds};
use crate::run::{RunId, RunStatus};

/// The result type of every fallible `runledger` call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a `runledger` call.
///
/// Each variant names the object it is about, and its `Display` reads as a
/// sentence a person can act on. Match on the variants you handle, or use the
/// predicates ([`is_not_found`](Error::is_not_found),
/// [`is_busy`](Error::is_busy), …) and let the rest propagate.
///
/// The enum is `#[non_exhaustive]`: later versions may add variants without
/// a breaking change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value handed to the API breaks a documented rule (empty or oversized
    /// name, control characters, metadata over the size limit, …).
    #[error("invalid {what} {value}: {reason}")]
    InvalidInput {
        /// What the value is, such as `"run name"` or `"metadata"`.
        what: &'static str,
        /// The offending value, quoted and shortened for display.
        value: String,
        /// The rule it breaks.
        reason: String,
    },

    /// The object named does not exist (or was pruned).
    #[error("{what} {id} not found")]
    NotFound {
        /// What was looked up, such as `"run"`.
        what: &'static str,
        /// Its identifier, as text.
        id: String,
    },

    /// A run transition that the state machine forbids, such as leaving a
    /// terminal state. Nothing was changed.
    #[error("run {run} cannot go from {from} to {to}")]
    InvalidTransition {
        /// The run.
        run: RunId,
        /// The status the run is in (and stays in).
        from: RunStatus,
        /// The status that was asked for.
        to: RunStatus,
    },

    /// A change to a run that has already ended (a new step, a step outcome):
    /// the run was finished, cancelled or reaped meanwhile. Nothing was changed.
    #[error("run {run} has already finished as {status}")]
    RunFinished {
        /// The run.
        run: RunId,
        /// Its terminal status.
        status: RunStatus,
    },

    /// A run could not be adopted because a process owns it: another
    /// adopter that came first, or the process that began it (only runs made
    /// by [`Ledger::create_run`](crate::Ledger::create_run) can be adopted).
    /// Nothing was changed.
    #[error("run {run} is already owned by pid {pid} on {host}")]
    AlreadyOwned {
        /// The run.
        run: RunId,
        /// Its owner's process id.
        pid: u32,
        /// Its owner's host name.
        host: String,
    },

    /// A run already holds this idempotency key: an active one, or, with
    /// [`RunSpec::idempotency_window`](crate::RunSpec::idempotency_window),
    /// one created within the window, in any status. No second run was
    /// started; `existing` is the run to follow instead.
    #[error("run {existing} already holds idempotency key {key:?}")]
    Duplicate {
        /// The idempotency key of the spec.
        key: String,
        /// The active run that holds it.
        existing: RunId,
    },

    /// A lock request was refused because its keys are taken (by holders, or
    /// by earlier waiters it may not overtake). Nothing was changed.
    ///
    /// `self_conflict` is true when locks that the calling thread (or tokio
    /// task) itself holds keep the request out, whoever else is in the way
    /// (asking again for a key one holds): the caller would wait for
    /// itself, so the request fails at once even when it was allowed to
    /// wait. Locks of other threads and tasks of the same process are
    /// waited for like any others.
    #[error("{}{}", holders_sentence(holders), if *self_conflict { "; waiting for it would never end" } else { "" })]
    Conflict {
        /// The keys of the request.
        keys: Vec<String>,
        /// Who is in the way, one entry per key and holder.
        holders: Vec<Holder>,
        /// The caller's own locks keep the request out (re-entry).
        self_conflict: bool,
    },

    /// A lock request waited until its deadline without being granted. Its
    /// place in the queue was removed.
    #[error("gave up after waiting {} for {}: {}", Seconds(*waited), keys_list(keys), holders_sentence(holders))]
    Timeout {
        /// The keys of the request.
        keys: Vec<String>,
        /// How long it waited.
        waited: Duration,
        /// Who was in the way at the end.
        holders: Vec<Holder>,
    },

    /// A lock was taken away from its holder before the holder released it:
    /// released by force, or reclaimed because its holder was judged dead
    /// while it was only paused. Work done under it may have overlapped with
    /// another holder's; its fencing token is stale.
    #[error(
        "lock on {} (token {token}) was taken away before it was released",
        keys_list(keys)
    )]
    LockLost {
        /// The keys of the lock.
        keys: Vec<String>,
        /// Its fencing token, now stale.
        token: u64,
    },

    /// The database was written by a newer version of `runledger`. It was not
    /// modified; upgrade this program to use it.
    #[error(
        "ledger {path} has schema version {found}, newer than the {supported} this version of \
         runledger supports; upgrade runledger (nothing in it was changed)"
    )]
    SchemaTooNew {
        /// The database file, or the ledger's
        /// [`Location`](crate::Location) as it displays: on PostgreSQL, the URL
        /// without its password and `#schema`.
        path: PathBuf,
        /// The schema version found in the file.
        found: u32,
        /// The newest schema version this build knows.
        supported: u32,
    },

    /// The file exists but is not a `runledger` database: not SQLite at all,
    /// or a SQLite database of another application (on PostgreSQL, a schema
    /// holding another application's objects). It was not modified.
    #[error("{path} is not a runledger database: {reason} (nothing in it was changed)")]
    NotALedger {
        /// The file, or the ledger's
        /// [`Location`](crate::Location) as it displays: on PostgreSQL, the URL
        /// without its password and `#schema`.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// The ledger could not be opened or created at this location: a folder
    /// could not be created, the location is read-only, the path is a folder…
    #[error("cannot open ledger {path}: {reason}")]
    Open {
        /// The database path as given, or on PostgreSQL the URL without its
        /// password (or, for a URL that does not parse, without anything
        /// that may be a password) and `#schema`.
        path: PathBuf,
        /// What failed.
        reason: String,
        /// The underlying cause.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The database stayed locked by other writers (or every pooled
    /// connection stayed in use) for longer than the busy timeout. Under
    /// normal contention this does not happen; it means a writer held the
    /// database for very long, or the timeout is too short. Nothing was
    /// written; retrying later may succeed.
    #[error("ledger {} stayed busy longer than the busy timeout", .path.display())]
    Busy {
        /// The database file, or the ledger's
        /// [`Location`](crate::Location) as it displays: on PostgreSQL, the URL
        /// without its password and `#schema`.
        path: PathBuf,
        /// The storage error reported.
        #[source]
        source: StorageError,
    },

    /// The storage layer failed (I/O error, disk full, corruption…).
    #[error("storage error in ledger {}", .path.display())]
    Storage {
        /// The database file, or the ledger's
        /// [`Location`](crate::Location) as it displays: on PostgreSQL, the URL
        /// without its password and `#schema`.
        path: PathBuf,
        /// The storage error reported.
        #[source]
        source: StorageError,
    },
}

fn keys_list(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn holders_sentence(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "the keys are taken".to_owned();
    }
    holders
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// True for [`Error::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True for [`Error::LockLost`].
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, Error::LockLost { .. })
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// True for [`Error::InvalidInput`].
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::InvalidInput { .. })
    }

    /// True for [`Error::InvalidTransition`] and [`Error::RunFinished`]: the
    /// run is not in a state where the call makes sense.
    pub fn is_invalid_transition(&self) -> bool {
        matches!(
            self,
            Error::InvalidTransition { .. } | Error::RunFinished { .. }
        )
    }

    /// True for [`Error::Duplicate`].
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Error::Duplicate { .. })
    }

    /// True for [`Error::Busy`]: retrying later may succeed.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy { .. })
    }

    pub(crate) fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> Error {
        Error::InvalidInput {
            what,
            value: quote(value),
            reason: reason.into(),
        }
    }

    pub(crate) fn run_not_found(id: RunId) -> Error {
        Error::NotFound {
            what: "run",
            id: id.to_string(),
        }
    }

    /// Names the ledger in a storage error made without one.
    pub(crate) fn in_ledger(mut self, ledger: &std::path::Path) -> Error {
        if let Error::Busy { path, .. } | Error::Storage { path, .. } = &mut self
            && path.as_os_str().is_empty()
        {
            ledger.clone_into(path);
        }
        self
    }

    pub(crate) fn open(
        path: impl Into<PathBuf>,
        reason: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Open {
            path: path.into(),
            reason: reason.into(),
            source: Some(source.into()),
        }
    }
}

/// Quotes a value for an error message, escaping control characters and
/// shortening it so that a megabyte of input does not become a megabyte of
/// message.
fn quote(value: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut shown: String = value.chars().take(MAX_CHARS).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// An error of the storage layer (SQLite or PostgreSQL, the connection
/// pool, the file system), kept opaque so that the storage crates' types stay out of the
/// public API.
///
/// Its [`source`](std::error::Error::source) is the underlying error, and
/// its `Display` is that error's message.
pub struct StorageError(StorageErrorKind);

enum StorageErrorKind {
    Sqlite(rusqlite::Error),
    #[cfg(feature = "postgres")]
    Postgres(postgres::Error),
    Pool(r2d2::Error),
    Io(std::io::Error),
    /// One error that several callers get: the writes of a group whose
    /// transaction failed.
    Shared(std::sync::Arc<dyn std::error::Error + Send + Sync>),
}

impl StorageError {
    /// An error of the crate's own making, with this message.
    #[cfg(feature = "postgres")]
    pub(crate) fn other(message: &str) -> StorageError {
        StorageError(StorageErrorKind::Io(std::io::Error::other(
            message.to_owned(),
        )))
    }

    fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match &self.0 {
            StorageErrorKind::Sqlite(e) => e,
            #[cfg(feature = "postgres")]
            StorageErrorKind::Postgres(e) => e,
            StorageErrorKind::Pool(e) => e,
            StorageErrorKind::Io(e) => e,
            StorageErrorKind::Shared(e) => &**e,
        }
    }
}

/// An error that every write of a failed group gets a copy of: the same
/// variant (busy or storage) and ledger, with the one underlying error as
/// the source of each copy.
pub(crate) struct SharedError {
    busy: bool,
    path: PathBuf,
    source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

impl From<Error> for SharedError {
    fn from(e: Error) -> SharedError {
        match e {
            Error::Busy { path, source } => SharedError {
                busy: true,
                path,
                source: std::sync::Arc::new(source),
            },
            Error::Storage { path, source } => SharedError {
                busy: false,
                path,
                source: std::sync::Arc::new(source),
            },
            other => SharedError {
                busy: false,
                path: PathBuf::new(),
                source: std::sync::Arc::new(other),
            },
        }
    }
}

impl SharedError {
    /// One more copy.
    pub(crate) fn error(&self) -> Error {
        let source = StorageError(StorageErrorKind::Shared(self.source.clone()));
        let path = self.path.clone();
        if self.busy {
            Error::Busy { path, source }
        } else {
            Error::Storage { path, source }
        }
    }
}

impl fmt::Debug for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.inner(), f)
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            #[cfg(feature = "postgres")]
            StorageErrorKind::Postgres(e) => postgres_message(e, f),
            _ => fmt::Display::fmt(self.inner(), f),
        }
    }
}

#[cfg(feature = "postgres")]
impl StorageError {
    pub(crate) fn postgres(e: postgres::Error) -> StorageError {
        StorageError(StorageErrorKind::Postgres(e))
    }
}

/// A PostgreSQL error on one line, with what its own `Display` leaves out:
/// the server's message, SQLSTATE, detail and hint (`Display` alone says
/// "db error"), or the cause of a client-side error ("error connecting to
/// server: Connection refused"). None of these carries the password.
#[cfg(feature = "postgres")]
fn postgres_message(e: &postgres::Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if let Some(db) = e.as_db_error() {
        write!(f, "{} (SQLSTATE {})", db.message(), db.code().code())?;
        if let Some(detail) = db.detail() {
            write!(f, "; {detail}")?;
        }
        if let Some(hint) = db.hint() {
            write!(f, "; hint: {hint}")?;
        }
        // A prepared statement missing, or met where none was prepared: a
        // transaction pooler between the ledger and the server, which
        // keeps none from one transaction to the next.
        if matches!(db.code().code(), "26000" | "42P05") {
            write!(
                f,
                "; through a pooler in transaction mode (PgBouncer), open the ledger \
                 with `Builder::transaction_pooler(true)` (`--transaction-pooler`)"
            )?;
        }
        return Ok(());
    }
    write!(f, "{e}")?;
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        write!(f, ": {c}")?;
        cause = c.source();
    }
    Ok(())
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.inner())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        let busy = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        let source = StorageError(StorageErrorKind::Sqlite(e));
        let path = PathBuf::new();
        if busy {
            Error::Busy { path, source }
        } else {
            Error::Storage { path, source }
        }
    }
}

impl From<r2d2::Error> for Error {
    /// r2d2 fails only when no connection came free within its timeout (the
    /// busy timeout): every connection was busy.
    fn from(e: r2d2::Error) -> Error {
        Error::Busy {
            path: PathBuf::new(),
            source: StorageError(StorageErrorKind::Pool(e)),
        }
    }
}

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
impl From<postgres::Error> for Error {
    /// Waiting too long for a lock (a write's claim on PostgreSQL, past `lock_timeout`), a
    /// serialization failure, a deadlock or a server out of connections is
    /// [`Error::Busy`]: retrying later may succeed.
    fn from(e: postgres::Error) -> Error {
        use postgres::error::SqlState;
        let busy = e.code().is_some_and(|code| {
            [
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::QUERY_CANCELED,
                SqlState::TOO_MANY_CONNECTIONS,
            ]
            .contains(code)
        });
        let source = StorageError::postgres(e);
        let path = PathBuf::new();
        if busy {
            Error::Busy { path, source }
        } else {
            Error::Storage { path, source }
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Storage {
            path: PathBuf::new(),
            source: StorageError(StorageErrorKind::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_input_quotes_and_shortens_the_value() {
        let long = "x".repeat(10_000);
        let msg = Error::invalid("run name", &long, "longer than 256 bytes").to_string();
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.starts_with("invalid run name \"xxx"), "{msg}");
        let msg = Error::invalid("run name", "a\nb", "contains a control character").to_string();
        assert_eq!(
            msg,
            "invalid run name \"a\\nb\": contains a control character"
        );
    }

    #[test]
    fn busy_sqlite_errors_become_busy() {
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(Error::from(e).is_busy());
    }
}
