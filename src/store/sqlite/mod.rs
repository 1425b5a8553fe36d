//! The SQLite store: its SQL, the connection pool, the pragmas, immediate
//! write transactions, and the schema.
//!
//! # Files
//!
//! Beside the database `ledger.db`, SQLite keeps `ledger.db-wal` and
//! `ledger.db-shm`, and runledger keeps a sidecar folder `ledger.db-runledger/`
//! for its cross-process file locks (`init.lock` serializes opening and
//! migrating; `instances/` proves processes alive; `keys/` holds the lock
//! gates, see `crate::gate`). The sidecar is named from the *canonical* path of the database,
//! so every path that reaches the same file (a symlink, `..`) locks the same
//! sidecar.

mod group;
mod instances;
mod locks;
mod runs;
mod schema;

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, MAIN_DB, OpenFlags};
use scheduled_thread_pool::ScheduledThreadPool;

use super::StoreConfig;
use crate::clock::{Clock, Timestamp};
use crate::error::{Error, Result};
use crate::wake::wake;

pub(crate) use schema::LATEST as SCHEMA_VERSION;

/// The SQLite store of one open ledger.
pub(crate) struct Store {
    pool: Arc<Pool<SqliteConnectionManager>>,
    /// A checkpoint is queued or running on the background thread.
    checkpointing: Arc<AtomicBool>,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    busy_timeout: Duration,
    /// The lead and queue of group commit, shared with the other stores of
    /// the file in this process; `None` when it is off.
    group: Option<Arc<group::Group>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

impl Store {
    /// Opens (creating if needed) the database at `path`, applies pending
    /// migrations under the cross-process init lock, and starts the pool.
    pub(crate) fn open(path: &Path, config: &StoreConfig, clock: Arc<dyn Clock>) -> Result<Store> {
        if path.as_os_str().is_empty() {
            return Err(Error::Open {
                path: path.into(),
                reason: "the path is empty".into(),
                source: None,
            });
        }
        if path.is_dir() {
            return Err(Error::Open {
                path: path.into(),
                reason: "it is a folder, not a database file".into(),
                source: None,
            });
        }
        // An empty file is no ledger yet either: opening would make one.
        if !config.create && fs::metadata(path).map_or(true, |m| m.len() == 0) {
            return Err(Error::Open {
                path: path.into(),
                reason: "there is no ledger here (and the builder said not to create one)".into(),
                source: None,
            });
        }
        refuse_non_sqlite(path)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::create_dir_all(parent).map_err(|e| {
            Error::open(
                path,
                format!("cannot create the folder {}", parent.display()),
                e,
            )
        })?;
        let canonical = canonical_path(path, parent)
            .map_err(|e| Error::open(path, "cannot resolve the path", e))?;

        let init_lock = InitLock::acquire(&canonical)
            .map_err(|e| Error::open(path, "cannot take the init lock in the sidecar folder", e))?;
        let mut conn = open_connection(&canonical, config).map_err(|e| open_error(path, e))?;
        // Closing the last connection to a WAL database folds the log into
        // the file: a file refused below must stay untouched, so this
        // connection never checkpoints on close. (A hot rollback journal of a
        // non-WAL foreign file would still be rolled back on first read, as
        // by any SQLite reader; ledgers are always in WAL mode.)
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(|e| open_error(path, e))?;
        match schema::inspect(&conn).map_err(|e| open_error(path, e))? {
            schema::Found::Foreign(reason) => {
                drop(conn);
                init_lock.refused();
                return Err(Error::NotALedger {
                    path: path.into(),
                    reason,
                });
            }
            schema::Found::Ledger(found) if found > schema::LATEST => {
                drop(conn);
                init_lock.refused();
                return Err(Error::SchemaTooNew {
                    path: path.into(),
                    found,
                    supported: schema::LATEST,
                });
            }
            schema::Found::Ledger(_) if conn.is_readonly(MAIN_DB).unwrap_or(false) => {
                return Err(Error::Open {
                    path: path.into(),
                    reason: "the file is read-only (or its folder is)".into(),
                    source: None,
                });
            }
            schema::Found::Ledger(found) => {
                if found == 0 {
                    // Only takes effect on a file with no pages yet.
                    conn.pragma_update(None, "page_size", schema::PAGE_SIZE)
                        .map_err(|e| open_error(path, e))?;
                }
                let mode: String = conn
                    .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
                    .map_err(|e| open_error(path, e))?;
                if !mode.eq_ignore_ascii_case("wal") {
                    log::warn!(
                        "runledger: {} stays in journal mode {mode}, not WAL",
                        path.display()
                    );
                }
                if found < schema::LATEST {
                    let applied = schema::migrate(&mut conn, clock.now().as_millis())
                        .map_err(|e| open_error(path, e))?;
                    log::info!(
                        "runledger: {} migrated to schema {} ({applied} migrations)",
                        path.display(),
                        schema::LATEST
                    );
                }
                let rewritten =
                    schema::rewrite_checks(&mut conn).map_err(|e| open_error(path, e))?;
                if rewritten > 0 {
                    log::debug!(
                        "runledger: {}: CHECK constraints of {rewritten} tables rewritten",
                        path.display()
                    );
                }
            }
        }
        let init_config = config.clone();
        let manager = SqliteConnectionManager::file(&canonical)
            .with_flags(open_flags())
            .with_init(move |c| configure(c, &init_config));
        // No minimum of idle connections: r2d2 would open a replacement in
        // the background whenever one is checked out, and a connection still
        // being opened there outlives the ledger's last handle for a moment
        // (closing the ledger must let go of the file at once). Connections
        // are opened on demand and kept: the caller waits for them.
        let pool = Pool::builder()
            .max_size(config.pool_size)
            .min_idle(Some(0))
            .idle_timeout(None)
            .test_on_check_out(false)
            .max_lifetime(None)
            .connection_timeout(config.busy_timeout.max(Duration::from_secs(1)))
            .thread_pool(shared_thread_pool())
            .build(manager)
            .map_err(|e| Error::open(path, "cannot open the connection pool", e))?;
        // The pool's first connection opens while the inspecting one is
        // still open: the first connection to a write-ahead log that no
        // process has open rebuilds its index from the log, and this way
        // only one of them does.
        drop(pool.get().map_err(|e| open_error(path, e))?);
        drop(conn);
        drop(init_lock);
        let group = config
            .group_commit
            .then(|| group::Group::for_file(&canonical, config.synchronous));
        Ok(Store {
            group,
            pool: Arc::new(pool),
            checkpointing: Arc::new(AtomicBool::new(false)),
            path: canonical,
            clock,
            busy_timeout: config.busy_timeout,
        })
    }

    /// The canonical path of the database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Where the ledger lives: the database file.
    pub(crate) fn location(&self) -> crate::Location {
        crate::Location::Sqlite(self.path.clone())
    }

    /// Runs `f` in one immediate write transaction and commits it. An error
    /// from `f` (or from the commit) rolls everything back.
    ///
    /// With group commit on, `f` waits for its turn behind the other writes
    /// of this process, and runs with the shared writes queued meanwhile
    /// (see [`group`]); [`Store::write_shared`] is for writes that another
    /// thread may run.
    fn write<T>(&self, f: impl FnOnce(&Connection, Timestamp) -> Result<T>) -> Result<T> {
        match &self.group {
            Some(group) => self.write_leading(group, f),
            None => self.transaction(f),
        }
    }

    /// Runs `f` in one immediate write transaction of this thread and
    /// commits it. An error from `f` (or from the commit) rolls everything
    /// back.
    ///
    /// `BEGIN IMMEDIATE` takes the write lock up front, so SQLite's busy
    /// handler waits for it; a deferred transaction that reads and then writes
    /// would fail with `SQLITE_BUSY` without waiting. The `BEGIN` and
    /// `COMMIT` statements are cached like every other statement.
    ///
    /// `f` gets the time to stamp its writes with, read once the write lock is
    /// held: timestamps then follow commit order, whatever the wait.
    fn transaction<T>(&self, f: impl FnOnce(&Connection, Timestamp) -> Result<T>) -> Result<T> {
        let in_transaction = || {
            let conn = self.pool.get()?;
            let _deadline = BusyDeadline::set(self.busy_timeout);
            WAL_FRAMES.with(|f| f.set(0));
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let mut tx = WriteTx {
                conn: &conn,
                open: true,
            };
            EVENTS_WRITTEN.with(|w| w.set(false));
            let value = f(tx.conn, self.clock.now())?;
            let watchers = watchers_to_wake(tx.conn)?;
            tx.conn.prepare_cached("COMMIT")?.execute([])?;
            tx.open = false;
            wake(&watchers);
            self.after_commit();
            Ok(value)
        };
        in_transaction().map_err(|e: Error| e.in_ledger(&self.path))
    }

    /// What follows a commit of this thread: the checkpoint that the log's
    /// size asks for, on the background thread.
    fn after_commit(&self) {
        let frames = WAL_FRAMES.with(Cell::get);
        if frames >= RESTART_FRAMES {
            self.checkpoint_soon(true);
        } else if frames >= CHECKPOINT_FRAMES && frames % CHECKPOINT_FRAMES < CHECKPOINT_WINDOW {
            // Only the commits that just crossed a multiple of the
            // threshold (give or take a few), in whatever process: every
            // commit past it would start one more (two fsyncs each).
            self.checkpoint_soon(false);
        }
    }

    /// [`write`](Store::write), and `on_commit` once the write has committed
    /// (dropped, not called, if it failed). The checkpoint a commit may call
    /// for runs on the background thread, so it never delays `on_commit`.
    fn write_then<T>(
        &self,
        f: impl FnOnce(&Connection, Timestamp) -> Result<T>,
        on_commit: impl FnOnce(),
    ) -> Result<T> {
        let value = self.write(f)?;
        on_commit();
        Ok(value)
    }

    /// Copies the write-ahead log back into the database on the shared
    /// background thread, unless that is already under way.
    ///
    /// SQLite's automatic checkpoint runs inside the `COMMIT` that crosses
    /// its threshold, so the caller waits for it (with synchronous=NORMAL,
    /// two fsyncs: milliseconds). A lock release would wake its waiters only
    /// after that, and every waiter queued behind them would wait too. On
    /// another thread, the commit returns at once; a passive checkpoint
    /// never blocks writers.
    ///
    /// A passive checkpoint never empties a log that writers keep appending
    /// to, though: the log only starts over once a checkpoint has copied all
    /// of it, and under a steady stream of commits new frames always arrive
    /// meanwhile. The log then grows without bound, each commit past the
    /// threshold asks for another checkpoint (two fsyncs each), and lookups
    /// in it get slower. With `restart`, the checkpoint blocks writers while
    /// it copies the rest and waits for readers (at most [`RESTART_WAIT`]),
    /// so that the next writer starts the log over.
    fn checkpoint_soon(&self, restart: bool) {
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(&self.pool);
        let flag = self.checkpointing.clone();
        shared_thread_pool().execute(move || {
            let sql = if restart {
                "PRAGMA wal_checkpoint(RESTART)"
            } else {
                "PRAGMA wal_checkpoint(PASSIVE)"
            };
            if let Some(pool) = pool.upgrade()
                && let Ok(conn) = pool.get()
            {
                let _deadline = BusyDeadline::set(RESTART_WAIT);
                if let Err(e) = conn.execute_batch(sql) {
                    log::debug!("runledger: background checkpoint failed: {e}");
                }
            }
            flag.store(false, Ordering::Release);
        });
    }

    /// Runs `f` on a pooled connection, outside any explicit transaction.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let on_connection = || {
            let conn = self.pool.get()?;
            let _deadline = BusyDeadline::set(self.busy_timeout);
            f(&conn)
        };
        on_connection().map_err(|e| e.in_ledger(&self.path))
    }
}

impl Drop for Store {
    /// Waits (briefly) for a background checkpoint still running, so that no
    /// connection of this store outlives it: closing the ledger lets go of
    /// the file at once.
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.checkpointing.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Rolls back the open write transaction of a connection unless it committed,
/// so that an error (or a panic) never leaves the pooled connection inside a
/// transaction.
struct WriteTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl Drop for WriteTx<'_> {
    fn drop(&mut self) {
        if self.open
            && !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            log::error!("runledger: rollback failed: {e}");
        }
    }
}

fn open_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

fn open_connection(path: &Path, config: &StoreConfig) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open_with_flags(path, open_flags())?;
    configure(&mut conn, config)?;
    Ok(conn)
}

/// The per-connection settings, applied to every pooled connection.
fn configure(conn: &mut Connection, config: &StoreConfig) -> rusqlite::Result<()> {
    conn.busy_timeout(config.busy_timeout)?;
    // Replaces the handler busy_timeout installed; see `busy_handler`.
    conn.busy_handler(Some(busy_handler))?;
    conn.wal_hook(Some(wal_hook));
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = {};",
        config.synchronous
    ))?;
    conn.set_prepared_statement_cache_capacity(64);
    // The last connection to close would fold the write-ahead log into the
    // file, with two fsyncs: milliseconds at the end of every short-lived
    // process (a CLI call). The log is folded by SQLite's auto-checkpoint
    // as writers commit instead, and stays beside the file meanwhile.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    Ok(())
}

/// The size of the write-ahead log, in frames, from which a commit asks for
/// a checkpoint: SQLite's default automatic threshold.
const CHECKPOINT_FRAMES: i32 = 1000;

/// How far past a multiple of [`CHECKPOINT_FRAMES`] a commit may land and
/// still ask for a passive checkpoint: about the frames of two small
/// transactions.
const CHECKPOINT_WINDOW: i32 = 16;

/// The size from which the checkpoint makes the log start over (a restart
/// checkpoint): the bound on the log's growth under a steady stream of
/// writers, which passive checkpoints never catch up with.
const RESTART_FRAMES: i32 = 4 * CHECKPOINT_FRAMES;

/// How long a restart checkpoint waits for the writer and the readers before
/// it gives up (having copied what it could): it blocks writers meanwhile.
const RESTART_WAIT: Duration = Duration::from_millis(20);

thread_local! {
    /// Frames in the write-ahead log after this thread's last commit, as
    /// reported by SQLite's WAL hook (0 if the commit reported none).
    static WAL_FRAMES: Cell<i32> = const { Cell::new(0) };
}

/// Replaces SQLite's automatic checkpoint (which runs inside the commit):
/// notes the log's size for [`Store::write`], which hands the checkpoint to
/// a background thread.
fn wal_hook(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|f| f.set(frames));
    Ok(())
}

thread_local! {
    /// Set when the write transaction under way appended an event: its
    /// commit then wakes the watchers of the feed.
    pub(super) static EVENTS_WRITTEN: Cell<bool> = const { Cell::new(false) };
}

/// The wake-up addresses of the feed's watchers if the transaction under
/// way appended events (this thread's [`EVENTS_WRITTEN`], cleared at its
/// `BEGIN`): read in that transaction, woken after its commit. A read of an
/// empty table when nobody watches.
fn watchers_to_wake(tx: &Connection) -> Result<Vec<String>> {
    if !EVENTS_WRITTEN.with(Cell::get) {
        return Ok(Vec::new());
    }
    Ok(tx
        .prepare_cached("SELECT address FROM watchers")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

thread_local! {
    /// When the statement this thread runs must stop waiting for the lock.
    static BUSY_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets this thread's busy deadline for one store call.
struct BusyDeadline(Option<Instant>);

impl BusyDeadline {
    fn set(timeout: Duration) -> BusyDeadline {
        BusyDeadline::until(Instant::now().checked_add(timeout))
    }

    /// Sets this thread's busy deadline to `deadline` (a group's earliest).
    fn until(deadline: Option<Instant>) -> BusyDeadline {
        BusyDeadline(BUSY_DEADLINE.with(|d| d.replace(deadline)))
    }
}

impl Drop for BusyDeadline {
    fn drop(&mut self) {
        BUSY_DEADLINE.with(|d| d.set(self.0));
    }
}

/// Waits for SQLite's write lock with short sleeps, until the deadline of
/// the store call.
///
/// SQLite's own handler (what `busy_timeout` installs) sleeps 1, 2, 5, 10 …
/// up to 100 ms between tries: a writer that just missed the lock sleeps far
/// longer than the transactions it waits for (tens of microseconds), which
/// stretches the tail and wastes the wake-up a lock waiter just received.
/// rusqlite takes a plain `fn`, so the deadline lives in a thread-local set
/// around each store call; without one, the handler gives up after about
/// 30 seconds of tries.
fn busy_handler(count: i32) -> bool {
    let within = match BUSY_DEADLINE.with(Cell::get) {
        Some(deadline) => Instant::now() < deadline,
        None => count < 15_000,
    };
    if within {
        let backoff = Duration::from_micros(50) * (1u32 << count.clamp(0, 5));
        std::thread::sleep(backoff.min(Duration::from_millis(2)));
    }
    within
}

/// Maps an error met while opening to the error a person can act on.
fn open_error(path: &Path, e: impl Into<Error>) -> Error {
    let e = e.into();
    let code = match &e {
        Error::Storage { source, .. } | Error::Busy { source, .. } => {
            std::error::Error::source(source)
                .and_then(|s| s.downcast_ref::<rusqlite::Error>())
                .and_then(rusqlite::Error::sqlite_error_code)
        }
        _ => None,
    };
    match code {
        Some(ErrorCode::NotADatabase) => Error::NotALedger {
            path: path.into(),
            reason: "not a SQLite database".into(),
        },
        Some(ErrorCode::CannotOpen) => {
            Error::open(path, "cannot open or create the database file", e)
        }
        Some(ErrorCode::ReadOnly) => Error::open(path, "the location is read-only", e),
        Some(ErrorCode::PermissionDenied) => Error::open(path, "permission denied", e),
        _ => e.in_ledger(path),
    }
}

/// Refuses an existing, non-empty file that does not start with SQLite's
/// header, before anything (the sidecar folder included) is created for it.
fn refuse_non_sqlite(path: &Path) -> Result<()> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::open(path, "cannot read the database file", e)),
    };
    let mut header = [0u8; 16];
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::open(path, "cannot read the database file", e)),
        }
    }
    if read == 0 || header == *SQLITE_HEADER {
        Ok(())
    } else {
        Err(Error::NotALedger {
            path: path.into(),
            reason: "not a SQLite database".into(),
        })
    }
}

/// The canonical path of `path`, which may not exist yet: its file if it
/// does (following symlinks), else its canonical folder joined with its name.
fn canonical_path(path: &Path, parent: &Path) -> io::Result<PathBuf> {
    match fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let name = path.file_name().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name")
            })?;
            Ok(fs::canonicalize(parent)?.join(name))
        }
        Err(e) => Err(e),
    }
}

/// The folder of the instances' lock files, in the sidecar folder.
pub(crate) fn instances_dir(canonical: &Path) -> PathBuf {
    sidecar_dir(canonical).join("instances")
}

/// The sidecar folder of a database: `<canonical path>-runledger`.
pub(crate) fn sidecar_dir(canonical: &Path) -> PathBuf {
    let mut name = canonical.file_name().unwrap_or_default().to_owned();
    name.push("-runledger");
    canonical.with_file_name(name)
}

/// The cross-process lock held while opening and migrating: an exclusive
/// `flock` on `<sidecar>/init.lock`, released on drop (or by the kernel if
/// the process dies).
struct InitLock {
    file: File,
    /// The sidecar folder, if this open made it: a file refused (another
    /// application's, a newer ledger's) gets no folder beside it.
    made: Option<PathBuf>,
}

impl InitLock {
    fn acquire(canonical: &Path) -> io::Result<InitLock> {
        let dir = sidecar_dir(canonical);
        let made = (!dir.exists()).then(|| dir.clone());
        fs::create_dir_all(&dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("init.lock"))?;
        // Called through the trait on purpose: std's inherent `File::lock`
        // would shadow it.
        fs4::FileExt::lock(&file)?;
        Ok(InitLock { file, made })
    }

    /// Leaves the file as it was found, refused: the sidecar folder goes if
    /// this open made it and nothing else came into it meanwhile (best
    /// effort; another process refusing the same file may keep it).
    fn refused(self) {
        if let Some(dir) = &self.made {
            let _ = fs::remove_file(dir.join("init.lock"));
            let _ = fs::remove_dir(dir);
        }
    }
}

impl Drop for InitLock {
    fn drop(&mut self) {
        let _ = fs4::FileExt::unlock(&self.file);
    }
}

/// One small thread pool shared by every connection pool of the process, for
/// r2d2's housekeeping (replacing idle connections), instead of three threads
/// per open ledger.
pub(crate) fn shared_thread_pool() -> Arc<ScheduledThreadPool> {
    static POOL: OnceLock<Arc<ScheduledThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(1)
                .thread_name_pattern("runledger-pool-{}")
                .build(),
        )
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_is_named_from_the_file() {
        assert_eq!(
            sidecar_dir(Path::new("/data/runs/ledger.db")),
            Path::new("/data/runs/ledger.db-runledger")
        );
    }
}
