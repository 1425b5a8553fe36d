//! Where an open ledger lives: [`Location`].

use std::fmt;
use std::path::Path;
use std::path::PathBuf;

use serde::Serialize;

/// Where an open ledger lives: a SQLite file, or a schema of a PostgreSQL
/// database. What [`Ledger::location`](crate::Ledger::location) returns.
///
/// Its `Display` is the string that names the same ledger to
/// [`Ledger::open`](crate::Ledger::open) and
/// [`Ledger::builder`](crate::Ledger::builder) (and to the command line's
/// `--db`): the file's path, or the PostgreSQL URL with the schema after a
/// `#`. It never holds a password, so it is safe to log and to show. It
/// serializes as that string.
///
/// # Examples
///
/// ```
/// use runledger::{Ledger, Location};
/// # let dir = tempfile::tempdir()?;
/// let ledger = Ledger::open(dir.path().join("ledger.db"))?;
/// let location = ledger.location();
/// assert_eq!(location.as_path(), Some(ledger.path()));
/// assert!(matches!(location, Location::Sqlite(_)));
/// assert_eq!(location.url(), None);
///
/// // The string opens the same ledger again.
/// let again = Ledger::open(location.to_string())?;
/// assert_eq!(again.location(), location);
/// # Ok::<(), runledger::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Location {
    /// A SQLite database file: its canonical path (symbolic links resolved).
    Sqlite(PathBuf),
    /// A schema of a PostgreSQL database (feature `postgres`).
    #[non_exhaustive]
    Postgres {
        /// The connection URL without its password or any other option,
        /// with the port written out: `postgres://app@db.internal:5432/jobs`.
        /// A Unix socket's folder is percent-encoded as the host.
        url: String,
        /// The schema the ledger's tables live in.
        schema: String,
    },
}

impl Location {
    /// The database file, for a ledger on SQLite; `None` on PostgreSQL.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let ledger = runledger::Ledger::open(dir.path().join("ledger.db"))?;
    /// let file = ledger.location().as_path().expect("a SQLite ledger");
    /// assert_eq!(file.file_name().unwrap(), "ledger.db");
    /// # Ok::<(), runledger::Error>(())
    /// ```
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(path) => Some(path),
            Location::Postgres { .. } => None,
        }
    }

    /// The connection URL without its password (and without the schema),
    /// for a ledger on PostgreSQL; `None` on SQLite.
    pub fn url(&self) -> Option<&str> {
        match self {
            Location::Sqlite(_) => None,
            Location::Postgres { url, .. } => Some(url),
        }
    }

    /// The schema of a ledger on PostgreSQL; `None` on SQLite.
    pub fn schema(&self) -> Option<&str> {
        match self {
            Location::Sqlite(_) => None,
            Location::Postgres { schema, .. } => Some(schema),
        }
    }
}

impl fmt::Display for Location {
    /// The file's path, or `postgres://user@host:port/db#schema`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(path) => fmt::Display::fmt(&path.display(), f),
            Location::Postgres { url, schema } => write!(f, "{url}#{schema}"),
        }
    }
}

impl Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_the_string_that_opens_it() {
        let file = Location::Sqlite(PathBuf::from("/srv/runs/ledger.db"));
        assert_eq!(file.to_string(), "/srv/runs/ledger.db");
        assert_eq!(file.schema(), None);
        let pg = Location::Postgres {
            url: "postgres://app@db:5432/jobs".into(),
            schema: "nightly".into(),
        };
        assert_eq!(pg.to_string(), "postgres://app@db:5432/jobs#nightly");
        assert_eq!(pg.as_path(), None);
        assert_eq!(pg.url(), Some("postgres://app@db:5432/jobs"));
        assert_eq!(pg.schema(), Some("nightly"));
        assert_eq!(
            serde_json::to_value(&pg).unwrap(),
            serde_json::json!("postgres://app@db:5432/jobs#nightly")
        );
    }
}
