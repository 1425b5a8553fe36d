//! The PostgreSQL store through PgBouncer in transaction pooling mode
//! (`Builder::transaction_pooler`): each test starts a PgBouncer of its
//! own (`/usr/sbin/pgbouncer`, Debian's package, which `.ci/run`
//! installs) on a free port, in front of the server of
//! `RUNLEDGER_PG_URL`, with 2 server connections for all its clients, so
//! that the clients of a test share them and any session state one left
//! behind would reach another.
//!
//! The PgBouncer on the test machines is 1.18, which does not follow
//! protocol-level prepared statements at all: a named statement used
//! outside the transaction that prepared it fails there.
//!
//! Needs `RUNLEDGER_PG_URL` when the tests are built; without it every test
//! here is listed as ignored. With it, a missing `pgbouncer` fails them.
#![cfg(feature = "postgres")]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::proxy::{Counter, best_of_three};
use common::{KillOnDrop, SchemaGuard, next_line, pg_url, signal, wait_for_waiters, worker};
use runledger::{Builder, EventKind, Ledger, LockRequest, RunFilter, RunSpec, RunStatus};

/// Where Debian's package puts it.
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A PgBouncer of one test, in transaction pooling mode, stopped on drop.
struct Bouncer {
    port: u16,
    user: String,
    dbname: String,
    log: PathBuf,
    _process: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Bouncer {
    /// Starts one with `server_connections` connections to the test server
    /// (per database and user), on a free port.
    fn start(server_connections: u32) -> Bouncer {
        assert!(
            Path::new(PGBOUNCER).exists(),
            "{PGBOUNCER} is missing: the tests of the PostgreSQL store through \
             PgBouncer need Debian's `pgbouncer` package (`.ci/run` installs it)"
        );
        let upstream = ::postgres::Config::from_str(&pg_url().expect("RUNLEDGER_PG_URL")).unwrap();
        let host = match upstream.get_hosts().first() {
            Some(::postgres::config::Host::Tcp(host)) => host.clone(),
            other => panic!("RUNLEDGER_PG_URL names no TCP host: {other:?}"),
        };
        let server_port = upstream.get_ports().first().copied().unwrap_or(5432);
        let user = upstream.get_user().unwrap_or("postgres").to_owned();
        let dbname = upstream.get_dbname().unwrap_or(&user).to_owned();
        // A port another test may take between our probe and PgBouncer's
        // bind: then PgBouncer exits, and another port is tried.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let users = dir.path().join("users.txt");
            std::fs::write(&users, format!("\"{user}\" \"\"\n")).unwrap();
            // PgBouncer refuses to run as root; told a user, it becomes it.
            let root = Command::new("id")
                .arg("-u")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
            let config = dir.path().join("pgbouncer.ini");
            std::fs::write(
                &config,
                format!(
                    "[databases]\n\
                     * = host={host} port={server_port}\n\
                     [pgbouncer]\n\
                     listen_addr = 127.0.0.1\n\
                     listen_port = {port}\n\
                     unix_socket_dir =\n\
                     auth_type = trust\n\
                     auth_file = {users}\n\
                     pool_mode = transaction\n\
                     default_pool_size = {server_connections}\n\
                     min_pool_size = 0\n\
                     reserve_pool_size = 0\n\
                     max_client_conn = 500\n\
                     server_tls_sslmode = disable\n\
                     {user_line}",
                    users = users.display(),
                    user_line = if root { "user = postgres\n" } else { "" },
                ),
            )
            .unwrap();
            for file in [dir.path(), &users, &config] {
                use std::os::unix::fs::PermissionsExt;
                let mode = if file.is_dir() { 0o755 } else { 0o644 };
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            let log = dir.path().join("pgbouncer.log");
            let process = Command::new(PGBOUNCER)
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("pgbouncer starts");
            let mut process = KillOnDrop(process);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if process.try_wait().unwrap().is_some() {
                    break; // the port was taken: another one
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Bouncer {
                        port,
                        user,
                        dbname,
                        log,
                        _process: process,
                        _dir: dir,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "pgbouncer did not listen: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("pgbouncer found no free port");
    }

    /// The URL of the test database through this PgBouncer.
    fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            self.user, self.port, self.dbname
        )
    }

    /// Settings for a ledger in `schema` through this PgBouncer, without a
    /// direct URL to listen on.
    fn builder(&self, schema: &str) -> Builder {
        Ledger::builder_postgres(self.url())
            .schema(schema)
            .transaction_pooler(true)
    }

    /// [`builder`](Bouncer::builder), with `application_name` set to
    /// `app`: PgBouncer sets it on the server connection that serves each
    /// transaction, so that the test can find those connections.
    fn builder_named(&self, schema: &str, app: &str) -> Builder {
        Ledger::builder_postgres(format!("{}?application_name={app}", self.url()))
            .schema(schema)
            .transaction_pooler(true)
    }

    /// A plain client through this PgBouncer.
    fn client(&self) -> ::postgres::Client {
        ::postgres::Client::connect(&self.url(), ::postgres::NoTls).unwrap()
    }

    /// What PgBouncer logged, for a failure's message.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A direct connection to the test server, beside PgBouncer.
fn direct() -> ::postgres::Client {
    ::postgres::Client::connect(&pg_url().unwrap(), ::postgres::NoTls).unwrap()
}

/// The test server's URL with `application_name` set to `app`: a direct
/// URL to listen on whose connection the test can find.
fn direct_url_named(app: &str) -> String {
    let url = pg_url().unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
}

/// The one text value of a simple query (through a pooler: no prepared
/// statement).
fn simple_text(client: &mut ::postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            ::postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

/// Checks that no server connection behind `bouncer` keeps anything of a
/// ledger's sessions: asked several times, so that both server
/// connections answer, none has a prepared statement or a `search_path`
/// other than the server's default.
fn assert_no_session_state_left(bouncer: &Bouncer) {
    let mut client = bouncer.client();
    for _ in 0..10 {
        let statements = simple_text(&mut client, "SELECT count(*) FROM pg_prepared_statements");
        assert_eq!(
            statements, "0",
            "a prepared statement outlived its transaction"
        );
        let path = simple_text(&mut client, "SHOW search_path");
        assert_eq!(path, "\"$user\", public", "a session search_path leaked");
    }
}

fn runs_and_steps_go_through_the_pooler() {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    let ledger = bouncer.builder(&schema.name).open().unwrap();
    for i in 0..3 {
        let run = ledger
            .begin_run(RunSpec::new("nightly").source("pooler"))
            .unwrap();
        let step = run.step(format!("day-{i}")).unwrap();
        step.succeed().unwrap();
        let id = run.id();
        assert_eq!(run.succeed().unwrap(), RunStatus::Succeeded);
        let record = ledger.run(id).unwrap();
        assert_eq!(record.status, RunStatus::Succeeded);
        assert_eq!(ledger.steps(id).unwrap().len(), 1);
    }
    let runs = ledger.runs(RunFilter::default().name("nightly")).unwrap();
    assert_eq!(runs.len(), 3);
    assert_no_session_state_left(&bouncer);
}

/// Through the pooler, a grant of free keys and a release nobody waits for
/// are one round trip each, as on a direct connection
/// (`tests/pg_round_trips.rs`): their batch needs no prepared statement.
/// Counted by a proxy between the ledger and PgBouncer, in steady use, at
/// best of three.
fn a_lock_call_is_one_round_trip_through_the_pooler() {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    drop(bouncer.builder(&schema.name).open().unwrap());
    let counter = Counter::start(format!("127.0.0.1:{}", bouncer.port));
    let url = format!(
        "postgres://{}@{}/{}",
        bouncer.user, counter.addr, bouncer.dbname
    );
    let ledger = Ledger::builder_postgres(url)
        .schema(&schema.name)
        .transaction_pooler(true)
        .background(false)
        .pool_size(1)
        .open()
        .unwrap();
    let grant = best_of_three(&mut || {
        let (n, guard) = counter.count(|| ledger.try_lock("counted").unwrap());
        guard.release().unwrap();
        n
    });
    let release = best_of_three(&mut || {
        let guard = ledger.try_lock("counted").unwrap();
        counter.count(|| guard.release().unwrap()).0
    });
    assert_eq!(
        (grant, release),
        (1, 1),
        "round trips of a grant, a release"
    );
    assert_no_session_state_left(&bouncer);
}

/// Regression: opening took a session advisory lock for the migrations
/// and set `lock_timeout` for the session. Through the pooler, the unlock
/// could reach another server connection than the lock, which then stayed
/// held, and the setting stayed with a connection other clients got.
fn opening_at_once_migrates_once_through_the_pooler() {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    let app = format!("rl_migrate_{}", std::process::id());
    let opened: Vec<_> = std::thread::scope(|s| {
        let opens: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    bouncer
                        .builder_named(&schema.name, &app)
                        .busy_timeout(Duration::from_secs(20))
                        .open()
                })
            })
            .collect();
        opens.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for ledger in &opened {
        let ledger = ledger
            .as_ref()
            .unwrap_or_else(|e| panic!("{e}\n{}", bouncer.log()));
        ledger.try_lock("k").unwrap().release().unwrap();
    }
    let version = simple_text(
        &mut direct(),
        &format!("SELECT max(version) FROM {}.schema_migrations", schema.name),
    );
    assert_eq!(version, runledger::SCHEMA_VERSION.to_string());
    // No advisory lock is left on a server connection that served them.
    let locks = simple_text(
        &mut direct(),
        &format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
             WHERE l.locktype = 'advisory' AND a.application_name = '{app}'"
        ),
    );
    assert_eq!(locks, "0");
    drop(opened);
    let mut client = bouncer.client();
    for _ in 0..4 {
        assert_eq!(simple_text(&mut client, "SHOW lock_timeout"), "0");
    }
    assert_no_session_state_left(&bouncer);
}

fn locks_hand_off_in_order_through_the_pooler() {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    let open = || bouncer.builder(&schema.name).open().unwrap();
    let holder = open();
    let first = holder.lock("k").unwrap();
    // Another ledger is refused at once, and told who holds it.
    let other = open();
    let refused = other.try_lock("k").unwrap_err();
    assert!(refused.is_conflict(), "{refused:?}");
    drop(other);

    let (granted, order) = mpsc::channel();
    let waiter = |name: &'static str| {
        let ledger = open();
        let granted = granted.clone();
        std::thread::spawn(move || {
            let guard = ledger
                .acquire(LockRequest::new(["k"]).wait(Duration::from_secs(20)))
                .unwrap();
            granted.send((name, guard.token())).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            guard.release().unwrap();
        })
    };
    let second = waiter("second");
    wait_for_waiters(&holder, 1);
    let third = waiter("third");
    wait_for_waiters(&holder, 2);
    let token = first.token();
    first.release().unwrap();
    second.join().unwrap();
    third.join().unwrap();
    let order: Vec<_> = order.try_iter().collect();
    assert_eq!(order.len(), 2);
    assert_eq!(order[0].0, "second", "{order:?}");
    assert_eq!(order[1].0, "third", "{order:?}");
    assert!(token < order[0].1 && order[0].1 < order[1].1, "{order:?}");
    assert_no_session_state_left(&bouncer);
}

fn the_event_feed_goes_through_the_pooler() {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    let reader = bouncer.builder(&schema.name).open().unwrap();
    let writer = bouncer.builder(&schema.name).open().unwrap();
    let cursor = reader.events_cursor().unwrap();
    let mut watch = reader.watch(cursor).unwrap();
    let run = writer.begin_run(RunSpec::new("fed")).unwrap();
    let id = run.id();
    run.step("one").unwrap().succeed().unwrap();
    run.succeed().unwrap();
    let page = reader.events_since(cursor, 100).unwrap();
    let ours: Vec<_> = page.events.iter().filter(|e| e.run == Some(id)).collect();
    assert!(ours.len() >= 4, "{ours:?}");
    assert!(page.events.windows(2).all(|w| w[0].id < w[1].id));
    assert!(matches!(
        ours.last().unwrap().kind,
        EventKind::Status {
            to: RunStatus::Succeeded,
            ..
        }
    ));
    // The watch sees the same events, in the same order.
    for event in &page.events {
        let seen = watch.next_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(seen.map(|e| e.id), Some(event.id));
    }
    assert_no_session_state_left(&bouncer);
}

/// Six ledgers on six threads, three on each of two schemas, all through
/// one PgBouncer with two server connections: every ledger's statements
/// and schema share those two connections. A named statement kept across
/// transactions would meet another client's of the same name (or be
/// missing), and a `search_path` of a session would send one schema's
/// writes to the other's tables.
fn ledgers_of_two_schemas_share_two_server_connections() {
    let bouncer = Bouncer::start(2);
    let schemas = [SchemaGuard::new(), SchemaGuard::new()];
    const RUNS: usize = 8;
    std::thread::scope(|s| {
        for thread in 0..6 {
            let schema = &schemas[thread % 2].name;
            let bouncer = &bouncer;
            s.spawn(move || {
                let ledger = bouncer.builder(schema).pool_size(2).open().unwrap();
                for i in 0..RUNS {
                    let run = ledger
                        .begin_run(RunSpec::new(format!("{schema}-{thread}-{i}")))
                        .unwrap();
                    run.step("work").unwrap().succeed().unwrap();
                    let guard = ledger.lock(format!("key-{}", i % 2)).unwrap();
                    guard.release().unwrap();
                    run.succeed().unwrap();
                    assert!(
                        !ledger
                            .runs(RunFilter::default().limit(5))
                            .unwrap()
                            .is_empty()
                    );
                }
            });
        }
    });
    for schema in &schemas {
        let ledger = bouncer.builder(&schema.name).open().unwrap();
        let runs = ledger.runs(RunFilter::default().limit(1000)).unwrap();
        assert_eq!(runs.len(), 3 * RUNS, "{}", schema.name);
        assert!(
            runs.iter()
                .all(|r| r.name.starts_with(&format!("{}-", schema.name))
                    && r.status == RunStatus::Succeeded),
            "{runs:?}"
        );
    }
    assert_no_session_state_left(&bouncer);
}

/// Regression: the parameters' types of a statement were learned with
/// tokio-postgres' own prepare, named `sN` by a per-process counter,
/// inside a transaction, and the migrations at open prepared statements
/// the same way. A client that left statements of those names on the
/// pooler's server connections (another process not told of the pooler)
/// made them fail with "prepared statement sN already exists".
fn statements_left_on_the_server_connections_by_another_client_are_never_met() {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    let leak: String = (0..2000)
        .map(|i| format!("PREPARE s{i} AS SELECT 1;"))
        .collect();
    // Both server connections: one held in a transaction by the first
    // client while the second leaks on the other.
    let mut first = bouncer.client();
    let mut second = bouncer.client();
    first.batch_execute("BEGIN").unwrap();
    second.batch_execute(&leak).unwrap();
    first.batch_execute(&leak).unwrap();
    first.batch_execute("COMMIT").unwrap();
    drop((first, second));
    let ledger = bouncer.builder(&schema.name).open().unwrap();
    let run = ledger.begin_run(RunSpec::new("after-a-leak")).unwrap();
    run.step("one").unwrap().succeed().unwrap();
    ledger.try_lock("k").unwrap().release().unwrap();
    run.succeed().unwrap();
    assert_eq!(ledger.runs(RunFilter::default()).unwrap().len(), 1);
}

/// The backends that `LISTEN` on the wake-up channel of `schema`, by
/// their `application_name`.
fn listeners_of(schema: &str) -> Vec<String> {
    direct()
        .query(
            "SELECT application_name FROM pg_stat_activity
             WHERE query LIKE 'LISTEN%' AND query LIKE '%' || $1 || '%'",
            &[&format!("runledger_wake_{schema}")],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn listen_goes_over_the_direct_url_only() {
    let bouncer = Bouncer::start(2);
    let with = SchemaGuard::new();
    let without = SchemaGuard::new();
    let app = format!("rl_listen_{}", std::process::id());
    let listening = bouncer
        .builder(&with.name)
        .listen_url(direct_url_named(&app))
        .open()
        .unwrap();
    let deaf = bouncer.builder(&without.name).open().unwrap();
    assert_eq!(listeners_of(&with.name), [app]);
    assert!(listeners_of(&without.name).is_empty());
    drop((listening, deaf));
}

/// A holder in another process (through the pooler as well), and a waiter
/// here that gets the lock once the holder is done with it: released by
/// the holder (with a direct URL to listen on), or left by a holder killed
/// with SIGKILL, which wakes no one (without one: the waiter's timed
/// re-read finds the holder dead).
fn a_waiter_gets_the_lock_from_another_process(listen: bool) {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    let location = format!("{}#{}", bouncer.url(), schema.name);
    let listen_url = direct_url_named(&format!("rl_hold_{}", std::process::id()));
    let mut args = vec!["hold", "k", "--transaction-pooler"];
    if listen {
        args.extend(["--listen-url", &listen_url, "--stdin"]);
    } else {
        args.push("--forever");
    }
    let mut holder = KillOnDrop(
        Command::new(worker())
            .arg(&location)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("worker starts"),
    );
    let held = next_line(&mut holder);
    let token: u64 = held
        .strip_prefix("held ")
        .unwrap_or_else(|| panic!("{held:?}\n{}", bouncer.log()))
        .parse()
        .unwrap();
    let mut builder = bouncer.builder(&schema.name);
    if listen {
        builder = builder.listen_url(pg_url().unwrap());
    }
    let ledger = builder.open().unwrap();
    let waiting = std::thread::spawn(move || {
        let started = Instant::now();
        let guard = ledger
            .acquire(LockRequest::new(["k"]).wait(Duration::from_secs(20)))
            .unwrap();
        (guard.token(), started.elapsed(), ledger)
    });
    let observer = bouncer.builder(&schema.name).open().unwrap();
    wait_for_waiters(&observer, 1);
    if listen {
        // A line on its stdin: the holder releases.
        writeln!(holder.stdin.as_mut().unwrap()).unwrap();
        assert_eq!(next_line(&mut holder), "released");
    } else {
        signal(holder.id(), "-KILL");
    }
    let (granted, waited, _ledger) = waiting.join().unwrap();
    assert!(granted > token, "{granted} after {token}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_no_session_state_left(&bouncer);
}

fn a_waiter_is_handed_the_lock_by_another_process_with_a_listen_url() {
    a_waiter_gets_the_lock_from_another_process(true);
}

fn a_waiter_without_a_listen_url_finds_a_killed_holder_by_its_re_read() {
    a_waiter_gets_the_lock_from_another_process(false);
}

/// The command line through the pooler: `--transaction-pooler` (or its
/// variable) reaches every command, `exec` with a lock included, and a
/// run recorded through it is listed by another command.
#[cfg(feature = "cli")]
fn the_command_line_goes_through_the_pooler() {
    let bouncer = Bouncer::start(2);
    let schema = SchemaGuard::new();
    let db = format!("{}#{}", bouncer.url(), schema.name);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(args)
            .env("RUNLEDGER_DB", &db)
            .env("RUNLEDGER_TRANSACTION_POOLER", "true")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["exec", "--name", "pooled", "--lock", "deploy", "--", "true"]);
    cli(&["exec", "--name", "pooled", "--lock", "deploy", "--", "true"]);
    let listed: serde_json::Value = serde_json::from_str(&cli(&["--json", "runs"])).unwrap();
    let runs = listed.as_array().expect("a JSON array of runs");
    assert_eq!(runs.len(), 2, "{listed}");
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{listed}");
    assert_no_session_state_left(&bouncer);
}

pg_tests!(
    #[cfg(feature = "cli")]
    the_command_line_goes_through_the_pooler,
    runs_and_steps_go_through_the_pooler,
    a_lock_call_is_one_round_trip_through_the_pooler,
    opening_at_once_migrates_once_through_the_pooler,
    locks_hand_off_in_order_through_the_pooler,
    the_event_feed_goes_through_the_pooler,
    ledgers_of_two_schemas_share_two_server_connections,
    statements_left_on_the_server_connections_by_another_client_are_never_met,
    listen_goes_over_the_direct_url_only,
    a_waiter_is_handed_the_lock_by_another_process_with_a_listen_url,
    a_waiter_without_a_listen_url_finds_a_killed_holder_by_its_re_read,
);

#[test]
fn a_sqlite_file_refuses_the_pooler_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let err = Ledger::builder(&path)
        .transaction_pooler(true)
        .open()
        .unwrap_err();
    assert!(
        matches!(err, runledger::Error::InvalidInput { .. }),
        "{err:?}"
    );
    let err = Ledger::builder(&path)
        .listen_url("postgres://postgres@127.0.0.1/postgres")
        .open()
        .unwrap_err();
    assert!(
        matches!(err, runledger::Error::InvalidInput { .. }),
        "{err:?}"
    );
    assert!(!path.exists());
}
