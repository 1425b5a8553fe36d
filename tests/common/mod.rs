//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use runledger::{Ledger, LockState, ManualClock, Timestamp};

pub mod proxy;

/// Declares each named test, a `fn(Store)`, once per store: `sqlite::NAME`
/// and `postgres::NAME`, the one conformance suite both stores pass.
///
/// The PostgreSQL tests need a server: `RUNLEDGER_PG_URL` (such as
/// `postgres://postgres@127.0.0.1:5432/postgres`) set when the tests are
/// built. Without it they are listed as ignored, with a message saying so;
/// each run creates and drops a schema of its own per test.
///
/// Attributes before a name (such as `#[cfg(target_os = "linux")]`) apply to
/// both of its tests.
#[macro_export]
macro_rules! on_both_stores {
    ($($(#[$attr:meta])* $name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                $(#[$attr])*
                #[test]
                fn $name() {
                    super::$name($crate::common::Store::Sqlite)
                }
            )+
        }
        mod postgres {
            $(
                $(#[$attr])*
                #[test]
                #[cfg_attr(
                    not(runledger_pg),
                    ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
                )]
                fn $name() {
                    super::$name($crate::common::Store::Postgres)
                }
            )+
        }
    };
}

/// Tests of the PostgreSQL store alone, each `super::name()` as a test in
/// `mod postgres`: ignored, saying why, without a server to test against.
#[macro_export]
macro_rules! pg_tests {
    ($($(#[$attr:meta])* $name:ident),+ $(,)?) => {
        mod postgres {
            $(
                $(#[$attr])*
                #[test]
                #[cfg_attr(
                    not(runledger_pg),
                    ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
                )]
                fn $name() {
                    super::$name()
                }
            )+
        }
    };
}

/// A fresh ledger with a manual clock: a SQLite file in a temporary folder,
/// or (see [`Store`]) a schema of its own in the PostgreSQL database of
/// `RUNLEDGER_PG_URL`, dropped with the fixture.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub ledger: Ledger,
    /// How to name this ledger to [`Ledger::builder`] (and to workers):
    /// the database path, or the URL with `#schema`.
    pub location: String,
    pub store: Store,
    /// Drops the PostgreSQL schema last, after the ledger.
    _schema: Option<SchemaGuard>,
}

pub const T0: Timestamp = Timestamp::from_millis(1_763_799_302_000);

/// The store a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server of the tests: `RUNLEDGER_PG_URL`, if set.
pub fn pg_url() -> Option<String> {
    std::env::var("RUNLEDGER_PG_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// The store `fixture()` uses: `RUNLEDGER_TEST_STORE=postgres` picks
/// PostgreSQL (with `RUNLEDGER_PG_URL` set), else SQLite.
pub fn default_store() -> Store {
    match std::env::var("RUNLEDGER_TEST_STORE").as_deref() {
        Ok("postgres") => Store::Postgres,
        _ => Store::Sqlite,
    }
}

pub fn fixture() -> Fixture {
    Fixture::new(default_store())
}

impl Fixture {
    /// A fresh ledger on `store`.
    ///
    /// # Panics
    ///
    /// On PostgreSQL without `RUNLEDGER_PG_URL`: tests that run on both
    /// stores check [`pg_url`] first and report themselves skipped.
    pub fn new(store: Store) -> Fixture {
        Fixture::with_clock(store, ManualClock::new(T0))
    }

    /// A fresh ledger on `store` whose clock is `clock`.
    pub fn with_clock(store: Store, clock: ManualClock) -> Fixture {
        let Place {
            dir,
            location,
            store,
            schema,
        } = Place::new(store);
        let ledger = Ledger::builder(&location)
            .clock(clock.clone())
            .open()
            .unwrap();
        Fixture {
            dir,
            clock,
            ledger,
            location,
            store,
            _schema: schema,
        }
    }

    /// Settings for another ledger (another process's view) of the same
    /// store, with this fixture's clock.
    pub fn builder(&self) -> runledger::Builder {
        Ledger::builder(&self.location).clock(self.clock.clone())
    }
}

impl Fixture {
    /// Runs `sql` (statements with no parameters, in the dialect both
    /// stores share) straight on the ledger's tables: for tests that
    /// stage a state no API call makes, such as a cleanup cut off halfway.
    pub fn sql(&self, sql: &str) {
        raw_sql(self.store, &self.location, sql);
    }

    /// The one integer a query (with no parameters) returns, read straight
    /// from the ledger's tables.
    pub fn query_i64(&self, sql: &str) -> i64 {
        raw_query_i64(self.store, &self.location, sql)
    }
}

/// A connection to the schema of a PostgreSQL location (`URL#schema`).
fn pg_client(location: &str) -> postgres::Client {
    let (url, schema) = location.rsplit_once('#').unwrap();
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .unwrap();
    client
}

/// See [`Fixture::sql`].
pub fn raw_sql(store: Store, location: &str, sql: &str) {
    match store {
        Store::Sqlite => rusqlite::Connection::open(location)
            .unwrap()
            .execute_batch(sql)
            .unwrap(),
        Store::Postgres => pg_client(location).batch_execute(sql).unwrap(),
    }
}

/// The columns of the one row a query returns, as text (cast them in the
/// query: `CAST(x AS TEXT)` reads the same on both stores).
pub fn raw_query_text(store: Store, location: &str, sql: &str) -> Vec<String> {
    match store {
        Store::Sqlite => {
            let conn = rusqlite::Connection::open(location).unwrap();
            let mut statement = conn.prepare(sql).unwrap();
            let columns = statement.column_count();
            statement
                .query_row([], |row| {
                    (0..columns)
                        .map(|i| row.get::<_, String>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .unwrap()
        }
        Store::Postgres => {
            let row = pg_client(location).query_one(sql, &[]).unwrap();
            (0..row.len()).map(|i| row.get::<_, String>(i)).collect()
        }
    }
}

/// See [`Fixture::query_i64`].
pub fn raw_query_i64(store: Store, location: &str, sql: &str) -> i64 {
    match store {
        Store::Sqlite => rusqlite::Connection::open(location)
            .unwrap()
            .query_row(sql, [], |row| row.get(0))
            .unwrap(),
        Store::Postgres => pg_client(location).query_one(sql, &[]).unwrap().get(0),
    }
}

/// Where a test's ledger lives, nothing opened yet: a temporary folder for
/// the SQLite file (and anything else the test writes), and on PostgreSQL a
/// schema of its own, dropped with the place.
pub struct Place {
    pub dir: tempfile::TempDir,
    /// The ledger's name for [`Ledger::builder`] and for workers.
    pub location: String,
    pub store: Store,
    pub schema: Option<SchemaGuard>,
}

impl Place {
    pub fn new(store: Store) -> Place {
        let dir = tempfile::tempdir().unwrap();
        let (location, schema) = match store {
            Store::Sqlite => (
                dir.path().join("ledger.db").to_str().unwrap().to_owned(),
                None,
            ),
            Store::Postgres => {
                let guard = SchemaGuard::new();
                (format!("{}#{}", guard.url, guard.name), Some(guard))
            }
        };
        Place {
            dir,
            location,
            store,
            schema,
        }
    }

    /// Settings for a ledger here, with the system clock (as the workers
    /// have).
    pub fn builder(&self) -> runledger::Builder {
        Ledger::builder(&self.location)
    }

    /// A ledger here with default settings.
    pub fn open(&self) -> Ledger {
        self.builder().open().unwrap()
    }
}

/// A PostgreSQL schema of one test, with a name no other test (of any test
/// process) uses; dropped with everything in it on drop.
pub struct SchemaGuard {
    pub url: String,
    pub name: String,
}

impl SchemaGuard {
    pub fn new() -> SchemaGuard {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let url = pg_url().expect("RUNLEDGER_PG_URL names the PostgreSQL server of the tests");
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "test_{}_{}_{nanos:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        SchemaGuard { url, name }
    }
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        match postgres::Client::connect(&self.url, postgres::NoTls) {
            Ok(mut client) => {
                let _ =
                    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
            }
            Err(e) => eprintln!("could not drop schema {}: {e}", self.name),
        }
    }
}

/// The `worker` example: a real process that does one ledger operation.
///
/// `cargo test` builds the examples before it runs the tests; when a test is
/// run alone (`cargo test --test NAME`) they may be missing or stale, so the
/// first call builds it once.
pub fn worker() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // With the features of this test build: the PostgreSQL store's
        // included, so that workers open the same kind of ledger.
        let features = [
            cfg!(feature = "cli").then_some("cli"),
            cfg!(feature = "postgres").then_some("postgres"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(",");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--example",
                "worker",
                "--features",
                &features,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the worker example failed");
        // tests run from target/<profile>/deps/; examples live beside deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let path = profile_dir
            .join("examples")
            .join(format!("worker{}", std::env::consts::EXE_SUFFIX));
        assert!(path.exists(), "{} missing", path.display());
        path
    })
}

/// Starts the worker on the ledger at `db` (a path, or a
/// [`Fixture::location`]) with `args`, stdout piped.
pub fn spawn_worker(db: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Child {
    Command::new(worker())
        .arg(db)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts")
}

/// A child process killed (SIGKILL) and reaped when dropped, so that a test
/// that fails midway never leaves a worker running.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for a worker and returns its stdout lines, asserting it exited 0.
pub fn finish(child: Child) -> Vec<String> {
    let out: Output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "worker failed: {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// A Unix time in milliseconds `ms` from now: an instant for several
/// processes to act at together.
pub fn instant_in(ms: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (now + Duration::from_millis(ms)).as_millis().to_string()
}

/// The bytes of a file, to prove it was not modified.
pub fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Reads the next line a worker prints.
pub fn next_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_owned()
}

/// Waits until the ledger shows `n` waiting requests.
pub fn wait_for_waiters(ledger: &runledger::Ledger, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ledger
        .locks()
        .unwrap()
        .iter()
        .filter(|l| l.state == LockState::Waiting)
        .count()
        < n
    {
        assert!(
            Instant::now() < deadline,
            "waiters never queued: {:?}",
            ledger.locks().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Makes `path` immutable with `chattr +i`, which binds root too (plain
/// permissions do not); undone on drop. `None` when the file system or the
/// sandbox does not allow it.
pub fn immutable(path: &Path) -> Option<impl Drop> {
    struct Undo(PathBuf);
    impl Drop for Undo {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let ok = Command::new("chattr")
        .arg("+i")
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Undo(path.to_owned()))
}

/// Sends `signal` (such as `-STOP`, `-CONT`) to a process, asserting that
/// `kill` accepted it.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Checks a witness file (lines `enter|exit KEY TOKEN PID MODE`, in the
/// order they were appended): per key, an exclusive holder is alone, shared
/// holders never meet an exclusive one, `slots(n)` holders are at most n,
/// and exclusive tokens strictly grow. Returns how many entries it read.
pub fn check_witness(path: &Path) -> usize {
    use std::collections::HashMap;
    let text = std::fs::read_to_string(path).unwrap();
    let mut inside: HashMap<&str, Vec<(u64, &str)>> = HashMap::new();
    let mut last_exclusive: HashMap<&str, u64> = HashMap::new();
    let mut entries = 0;
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [event, key, token, _pid, mode] = parts[..] else {
            panic!("bad witness line {line:?}")
        };
        let token: u64 = token.parse().unwrap();
        let holders = inside.entry(key).or_default();
        match event {
            "enter" => {
                entries += 1;
                holders.push((token, mode));
                let exclusive = holders.iter().filter(|(_, m)| *m == "exclusive").count();
                assert!(
                    exclusive == 0 || holders.len() == 1,
                    "{key}: exclusive holder not alone: {holders:?}"
                );
                if let Some(n) = mode
                    .strip_prefix("slots(")
                    .and_then(|m| m.strip_suffix(')'))
                {
                    let n: usize = n.parse().unwrap();
                    assert!(
                        holders.len() <= n,
                        "{key}: {} holders of {n} slots",
                        holders.len()
                    );
                }
                if mode == "exclusive" {
                    let last = last_exclusive.entry(key).or_insert(0);
                    assert!(token > *last, "{key}: token {token} after {last}");
                    *last = token;
                }
            }
            "exit" => holders.retain(|(t, _)| *t != token),
            other => panic!("bad witness event {other:?}"),
        }
    }
    entries
}

/// Nine runs, one second apart on the fixture's clock: `job-0`, `job-1`,
/// `job-2` in turn, from `terminal` and `worker` in turn, succeeded, failed
/// and left running in turn.
pub fn seed_nine_runs(f: &Fixture) -> Vec<runledger::RunId> {
    let mut ids = Vec::new();
    for i in 0..9 {
        let source = if i % 2 == 0 { "terminal" } else { "worker" };
        let run = f
            .ledger
            .begin_run(runledger::RunSpec::new(format!("job-{}", i % 3)).source(source))
            .unwrap();
        ids.push(run.id());
        match i % 3 {
            0 => drop(run.succeed().unwrap()),
            1 => drop(run.fail("x").unwrap()),
            _ => std::mem::forget(run), // stays running
        }
        f.clock.advance(Duration::from_secs(1));
    }
    ids
}
