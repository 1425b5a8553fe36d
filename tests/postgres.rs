//! What only the PostgreSQL store has: schemas, migrations under an
//! advisory lock, the server's clock, URLs. (Everything both stores do is
//! in the conformance suites, `on_both_stores!`.)
//!
//! Needs `RUNLEDGER_PG_URL` when the tests are built; without it every test
//! here is listed as ignored, with a message saying so.
#![cfg(feature = "postgres")]

mod common;

use common::{Place, SchemaGuard, Store, finish, instant_in, spawn_worker};
use runledger::{Error, Ledger, Location, RunSpec, SCHEMA_VERSION};

/// The server's own certificate (self-signed on the test machines).
fn server_certificate(url: &str) -> String {
    client(url)
        .query_one("SHOW ssl_cert_file", &[])
        .unwrap()
        .get(0)
}

/// Whether every connection named `app` is encrypted (and there is one).
fn all_encrypted(url: &str, app: &str) -> Option<bool> {
    client(url)
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

fn sslmode_require_connects_encrypted_and_disable_in_the_clear() {
    for (mode, encrypted) in [("require", true), ("disable", false), ("prefer", true)] {
        let schema = SchemaGuard::new();
        let app = format!("rv_tls_{mode}_{}", std::process::id());
        let location = format!(
            "{}?application_name={app}&sslmode={mode}#{}",
            schema.url, schema.name
        );
        let ledger = Ledger::open(&location).unwrap();
        ledger.try_lock("k").unwrap().release().unwrap();
        assert_eq!(all_encrypted(&schema.url, &app), Some(encrypted), "{mode}");
        drop(ledger);
    }
}

fn sslmode_verify_full_against_a_self_signed_server_says_why_it_fails() {
    let schema = SchemaGuard::new();
    let cert = server_certificate(&schema.url);
    // The certificate itself as the root: not issued for 127.0.0.1 (or not a
    // CA), so the check fails, and says why.
    let location = format!(
        "{}?sslmode=verify-full&sslrootcert={cert}#{}",
        schema.url, schema.name
    );
    let err = Ledger::open(&location).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(text.contains("cannot connect to PostgreSQL"), "{text}");
    assert!(
        text.contains("certificate not valid for name \"127.0.0.1\""),
        "does not say why: {text}"
    );
    // Without root certificates, verify-full cannot start, and says so.
    let bare = format!("{}?sslmode=verify-full#{}", schema.url, schema.name);
    let text = Ledger::open(&bare).unwrap_err().to_string();
    assert!(text.contains("sslrootcert"), "{text}");
    // An unknown mode is refused before connecting.
    let odd = format!("{}?sslmode=sometimes#{}", schema.url, schema.name);
    let text = Ledger::open(&odd).unwrap_err().to_string();
    assert!(text.contains("unknown sslmode \"sometimes\""), "{text}");
}

fn sslmode_verify_ca_and_verify_full_connect_when_the_certificate_checks_out() {
    let schema = SchemaGuard::new();
    let cert = server_certificate(&schema.url);
    // The self-signed certificate is its own root, and names localhost.
    let ca = format!(
        "{}?sslmode=verify-ca&sslrootcert={cert}#{}",
        schema.url, schema.name
    );
    Ledger::open(&ca)
        .unwrap()
        .try_lock("k")
        .unwrap()
        .release()
        .unwrap();
    let full = format!(
        "postgres://postgres@localhost:5432/postgres?sslmode=verify-full&sslrootcert={cert}#{}",
        schema.name
    );
    Ledger::open(&full)
        .unwrap()
        .try_lock("k")
        .unwrap()
        .release()
        .unwrap();
}

fn sslmode_in_the_key_value_form_is_understood_too() {
    let schema = SchemaGuard::new();
    let app = format!("rv_tls_kv_{}", std::process::id());
    let ledger = Ledger::builder_postgres(format!(
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres sslmode=require application_name={app}"
    ))
    .schema(&schema.name)
    .open()
    .unwrap();
    ledger.try_lock("k").unwrap().release().unwrap();
    assert_eq!(all_encrypted(&schema.url, &app), Some(true));
}

fn client(url: &str) -> ::postgres::Client {
    ::postgres::Client::connect(url, ::postgres::NoTls).unwrap()
}

/// How many migrations the ledger at `place` recorded.
fn migrations(place: &Place) -> i64 {
    common::raw_query_i64(
        Store::Postgres,
        &place.location,
        "SELECT count(*) FROM schema_migrations",
    )
}

fn eight_processes_opening_a_fresh_schema_at_once_all_succeed() {
    let place = Place::new(Store::Postgres);
    let at = instant_in(300);
    let workers: Vec<_> = (0..8)
        .map(|_| spawn_worker(&place.location, &["open", "--at", &at]))
        .collect();
    for worker in workers {
        let lines = finish(worker);
        assert!(lines[0].starts_with("opened "), "{lines:?}");
    }
    assert_eq!(migrations(&place), i64::from(SCHEMA_VERSION));
}

fn a_newer_schema_is_refused_and_left_untouched() {
    let place = Place::new(Store::Postgres);
    drop(place.open());
    let schema = place.schema.as_ref().unwrap();
    let mut client = client(&schema.url);
    client
        .batch_execute(&format!(
            "INSERT INTO {}.schema_migrations VALUES (99, 0, 0)",
            schema.name
        ))
        .unwrap();
    let err = place.builder().open().unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 99, supported, .. } if supported == SCHEMA_VERSION),
        "{err:?}"
    );
    assert!(err.to_string().contains(&schema.name), "{err}");
    assert_eq!(migrations(&place), i64::from(SCHEMA_VERSION) + 1);
}

/// Opens a ledger in a schema that another application made with `ddl`
/// (`{0}` is the schema): refused as no ledger, and the schema keeps
/// exactly what it had (`kept` tables).
fn another_applications_schema_is_refused(ddl: &str, kept: i64) {
    let guard = SchemaGuard::new();
    let mut client = client(&guard.url);
    client
        .batch_execute(
            format!(
                "CREATE SCHEMA {0}; {1}",
                guard.name,
                ddl.replace("{0}", &guard.name)
            )
            .as_str(),
        )
        .unwrap();
    let result = Ledger::builder_postgres(&guard.url)
        .schema(&guard.name)
        .open();
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
            &[&guard.name],
        )
        .unwrap()
        .get(0);
    assert!(
        matches!(&result, Err(Error::NotALedger { reason, .. }) if reason.contains("another application")),
        "{:?}; the schema now holds {tables} tables",
        result.map(drop)
    );
    assert_eq!(tables, kept, "the application's schema was altered");
}

fn another_applications_schema_is_refused_and_left_untouched() {
    another_applications_schema_is_refused("CREATE TABLE {0}.users (id bigint)", 1);
}

fn two_schemas_of_one_database_are_two_ledgers() {
    let (a, b) = (Place::new(Store::Postgres), Place::new(Store::Postgres));
    let (a, b) = (a.open(), b.open());
    let guard = a.lock("shared-name").unwrap();
    let other = b.try_lock("shared-name").unwrap();
    assert_eq!((guard.token(), other.token()), (1, 1));
    let run = a.begin_run(RunSpec::new("only-in-a")).unwrap();
    assert!(b.run(run.id()).unwrap_err().is_not_found());
    run.succeed().unwrap();
}

fn bad_schema_names_are_refused() {
    let url = common::pg_url().unwrap();
    for bad in ["", "Upper", "has-dash", "1st", "pg_catalog", "x\"; DROP"] {
        let err = Ledger::builder_postgres(&url)
            .schema(bad)
            .open()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "schema name",
                    ..
                }
            ),
            "{bad:?}: {err:?}"
        );
    }
    // A schema is for PostgreSQL; a SQLite file refuses it.
    let dir = tempfile::tempdir().unwrap();
    let err = Ledger::builder(dir.path().join("ledger.db"))
        .schema("runs")
        .open()
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(!dir.path().join("ledger.db").exists());
}

fn an_unreachable_server_is_an_open_error_that_hides_the_password() {
    let err = Ledger::builder_postgres("postgres://someone:hunter2@127.0.0.1:1/nowhere")
        .open()
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(text.contains("cannot connect"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let err = Ledger::builder_postgres("postgres://someone:hunter2@[bad")
        .open()
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
    // The scheme in upper case is a URL all the same: the same error, the
    // password hidden, not a key=value string that fails to parse.
    for location in [
        "POSTGRES://someone:hunter2@127.0.0.1:1/nowhere",
        "PostgreSQL://someone:hunter2@127.0.0.1:1/nowhere",
    ] {
        let err = Ledger::builder(location).open().unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(text.contains("cannot connect"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}

/// A port on which nothing listens: bound, then let go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Regression (issue 19): a missing role, a missing database and a closed
/// port all said "cannot connect to PostgreSQL: db error" or "error
/// connecting to server", with no cause.
fn a_connection_error_says_what_the_server_said_and_why() {
    let url = common::pg_url().unwrap();
    let config: ::postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        ::postgres::config::Host::Tcp(host) => host.clone(),
        #[cfg(unix)]
        ::postgres::config::Host::Unix(_) => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let open_error = |url: &str| {
        let err = Ledger::builder_postgres(url).open().unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err:?}");
        assert!(
            std::error::Error::source(&err).is_some(),
            "no source: {err:?}"
        );
        let text = err.to_string();
        assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
        assert!(!text.contains("db error"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        text
    };
    let text = open_error(&format!(
        "postgres://nobody_{}:s3cret@{host}:{port}/postgres",
        std::process::id()
    ));
    assert!(
        text.contains(&format!("postgres://nobody_{}@", std::process::id()))
            && text.contains("role \"nobody_")
            && text.contains("does not exist"),
        "{text}"
    );
    let text = open_error(&format!(
        "postgres://{user}:s3cret@{host}:{port}/no_such_db_{}",
        std::process::id()
    ));
    assert!(
        text.contains("database \"no_such_db_") && text.contains("does not exist"),
        "{text}"
    );
    let closed = closed_port();
    let text = open_error(&format!("postgres://{user}:s3cret@127.0.0.1:{closed}/x"));
    assert!(
        text.contains(&format!("postgres://{user}@127.0.0.1:{closed}/x"))
            && text.to_lowercase().contains("refused"),
        "{text}"
    );
}

fn the_path_names_the_ledger_without_its_password_and_opens_it_again() {
    let place = Place::new(Store::Postgres);
    let ledger = place.open();
    let path = ledger.path().to_str().unwrap().to_owned();
    let schema = &place.schema.as_ref().unwrap().name;
    assert!(path.starts_with("postgres://"), "{path}");
    assert!(path.ends_with(&format!("#{schema}")), "{path}");
    let run = ledger.begin_run(RunSpec::new("seen")).unwrap();
    let again = Ledger::builder(&path).open().unwrap();
    assert_eq!(again.run(run.id()).unwrap().name, "seen");
    run.succeed().unwrap();
}

/// `Ledger::location` says the ledger is on PostgreSQL, with the URL and the
/// schema apart, displays as the string `Ledger::path` holds, and never
/// holds the password the ledger was opened with.
fn the_location_is_postgres_and_holds_no_password() {
    let place = Place::new(Store::Postgres);
    let schema = &place.schema.as_ref().unwrap().name;
    let url = &place.schema.as_ref().unwrap().url;
    // The test server trusts its clients, so a password is not checked.
    let with_password = match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}:hunter2{}#{schema}", &url[..at], &url[at..])
        }
        _ => place.location.clone(),
    };
    let ledger = Ledger::builder(&with_password).open().unwrap();
    let location = ledger.location();
    assert!(
        matches!(location, Location::Postgres { .. }),
        "{location:?}"
    );
    assert_eq!(location.as_path(), None);
    assert_eq!(location.schema(), Some(schema.as_str()));
    let bare = location.url().unwrap();
    assert!(
        bare.starts_with("postgres://") && !bare.contains('#'),
        "{bare}"
    );
    assert_eq!(location.to_string(), format!("{bare}#{schema}"));
    assert_eq!(ledger.path().to_str().unwrap(), location.to_string());
    for shown in [
        location.to_string(),
        format!("{location:?}"),
        format!("{ledger:?}"),
        serde_json::to_string(location).unwrap(),
    ] {
        assert!(!shown.contains("hunter2"), "{shown}");
    }
    let again = Ledger::open(location.to_string()).unwrap();
    assert_eq!(again.location(), location);
}

/// Without a clock of its own, a ledger stamps with the server's time (each
/// host's offset to it measured at open and at every heartbeat; the unit
/// tests of the store move a host's clock hours off).
fn a_ledger_stamps_with_the_servers_clock() {
    let place = Place::new(Store::Postgres);
    let ledger = place.open();
    let run = ledger.begin_run(RunSpec::new("stamped")).unwrap();
    let started = ledger.run(run.id()).unwrap().started_at.unwrap();
    let schema = place.schema.as_ref().unwrap();
    let server: i64 = client(&schema.url)
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        (server - started.as_millis()).abs() < 5_000,
        "{server} against {started:?}"
    );
    assert!((server - ledger.now().as_millis()).abs() < 5_000);
    run.succeed().unwrap();
}

/// `Place`'s location with an `application_name` of its own, so that the
/// ledger's connections can be counted (and killed) without touching those of
/// any other test or session on the server.
fn tagged_location(place: &Place, tag: &str) -> (String, String) {
    let schema = place.schema.as_ref().unwrap();
    let app = format!("rv_{tag}_{}", std::process::id());
    (
        format!("{}?application_name={app}#{}", schema.url, schema.name),
        app,
    )
}

fn connections_of(url: &str, app: &str) -> i64 {
    client(url)
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// The advisory key the store derives for `what` in `schema` (FNV-1a, as in
/// `src/store/postgres/mod.rs`).
fn advisory_key(what: &str, schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in what.bytes().chain([0]).chain(schema.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

fn dropped_ledgers_leave_no_connections_behind() {
    let place = Place::new(Store::Postgres);
    let url = place.schema.as_ref().unwrap().url.clone();
    let (location, app) = tagged_location(&place, "drop");
    for _ in 0..5 {
        let ledger = Ledger::builder(&location).open().unwrap();
        let run = ledger.begin_run(RunSpec::new("r")).unwrap();
        run.succeed().unwrap();
        drop(ledger);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left = connections_of(&url, &app);
    while left > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        left = connections_of(&url, &app);
    }
    assert_eq!(left, 0, "connections left behind by dropped ledgers");
}

/// Issue 17: one listening connection per process and server, whatever the
/// number of ledgers (schemas) open there; the last one closes it.
fn ledgers_of_one_process_share_one_listening_connection() {
    let (first, second) = (SchemaGuard::new(), SchemaGuard::new());
    let app = format!("rv_listen_{}", std::process::id());
    let open = |schema: &SchemaGuard| {
        Ledger::open(format!(
            "{}?application_name={app}#{}",
            schema.url, schema.name
        ))
        .unwrap()
    };
    let (a, b) = (open(&first), open(&second));
    let listening = || -> i64 {
        client(&first.url)
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                &[&app],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(listening(), 1, "one listening connection for both ledgers");
    // Both still hear of releases elsewhere: a waiter in each is served.
    for (ledger, schema) in [(&a, &first), (&b, &second)] {
        let other = Ledger::open(format!("{}#{}", schema.url, schema.name)).unwrap();
        let held = other.lock("k").unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                ledger.acquire(
                    runledger::LockRequest::new(["k"]).wait(std::time::Duration::from_secs(20)),
                )
            });
            common::wait_for_waiters(&other, 1);
            held.release().unwrap();
            waiter.join().unwrap().unwrap().release().unwrap();
        });
    }
    drop((a, b));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while connections_of(&first.url, &app) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener outlived its ledgers"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Issue 20: every connection of the ledgers cut again and again
/// (`pg_terminate_backend`), in the middle of write transactions, reaches no
/// caller: workers that treat any error as fatal finish, every run they
/// began is there and succeeded once, no lock is left, tokens only grew.
fn connections_cut_mid_transaction_reach_no_caller() {
    let place = Place::new(Store::Postgres);
    let url = place.schema.as_ref().unwrap().url.clone();
    let (location, app) = tagged_location(&place, "cut");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let cuts = std::sync::atomic::AtomicU64::new(0);
    let tokens = std::sync::Mutex::new(Vec::new());
    // Opened before the cuts begin: what is tested is the calls.
    let ledgers: Vec<Ledger> = (0..4)
        .map(|_| {
            Ledger::builder(&location)
                .busy_timeout(std::time::Duration::from_secs(20))
                .open()
                .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = ledgers
            .iter()
            .enumerate()
            .map(|(w, ledger)| {
                let tokens = &tokens;
                s.spawn(move || {
                    for i in 0..20 {
                        let run = ledger.begin_run(RunSpec::new("cut")).unwrap();
                        let step = run.step(format!("s{i}")).unwrap();
                        let key = format!("k{}", (w + i) % 2);
                        let guard = run
                            .acquire(
                                runledger::LockRequest::new([key.as_str()])
                                    .wait(std::time::Duration::from_secs(60)),
                            )
                            .unwrap();
                        tokens.lock().unwrap().push((key, guard.token()));
                        guard.release().unwrap();
                        step.succeed().unwrap();
                        run.succeed().unwrap();
                    }
                })
            })
            .collect();
        let (stop, cuts) = (&stop, &cuts);
        let killer = s.spawn(move || {
            let mut admin = client(&url);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                let cut: i64 = admin
                    .query_one(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&app],
                    )
                    .unwrap()
                    .get(0);
                cuts.fetch_add(cut as u64, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let finished: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        killer.join().unwrap();
        assert!(finished.iter().all(Result::is_ok), "a worker got an error");
    });
    drop(ledgers);
    assert!(cuts.into_inner() > 10, "the connections were hardly cut");
    let ledger = place.open();
    let runs = ledger
        .runs(runledger::RunFilter::default().name("cut").limit(1000))
        .unwrap();
    assert_eq!(runs.len(), 80, "a run was lost or made twice");
    assert!(
        runs.iter()
            .all(|r| r.status == runledger::RunStatus::Succeeded)
    );
    assert!(
        runs.iter()
            .all(|r| r.progress.succeeded == 1 && r.progress.total == 1)
    );
    assert!(ledger.locks().unwrap().is_empty());
    // Tokens of each key were handed out once each, growing.
    let mut tokens = tokens.into_inner().unwrap();
    tokens.sort();
    let before = tokens.len();
    tokens.dedup();
    assert_eq!(tokens.len(), before, "a token was handed out twice");
}

fn a_connection_the_server_closed_does_not_fail_the_next_call() {
    let place = Place::new(Store::Postgres);
    let url = place.schema.as_ref().unwrap().url.clone();
    let (location, app) = tagged_location(&place, "term");
    let ledger = Ledger::builder(&location).pool_size(2).open().unwrap();
    // Warm the pool.
    ledger.runs(runledger::RunFilter::default()).unwrap();
    ledger
        .begin_run(RunSpec::new("a"))
        .unwrap()
        .succeed()
        .unwrap();
    // The server (a restart, a failover, idle_session_timeout, an operator)
    // closes the ledger's connections.
    let killed: i64 = client(&url)
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1) t",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert!(killed > 0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The server is up: the next calls should get fresh connections.
    ledger
        .runs(runledger::RunFilter::default())
        .expect("a read after the server closed a pooled connection");
    ledger
        .begin_run(RunSpec::new("b"))
        .expect("a write after the server closed a pooled connection")
        .succeed()
        .unwrap();
}

fn open_waits_for_a_migrating_process_no_longer_than_the_busy_timeout() {
    // Another process is migrating (or hung while migrating): it holds the
    // schema's migration lock.
    let place = Place::new(Store::Postgres);
    let schema = place.schema.as_ref().unwrap();
    let mut other = client(&schema.url);
    other
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&advisory_key("runledger migrations", &schema.name)],
        )
        .unwrap();
    let open = |location: String| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result = Ledger::builder(&location)
                .busy_timeout(std::time::Duration::from_millis(300))
                .open()
                .map(drop);
            let _ = tx.send(result);
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("open still waiting 10 s with a busy timeout of 300 ms")
    };
    // A fresh schema must wait for the migration: busy, past the timeout.
    let err = open(place.location.clone()).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err:?}");
    // An up-to-date one has nothing to wait for.
    let other_place = Place::new(Store::Postgres);
    drop(other_place.open());
    let up_to_date = other_place.location.clone();
    let other_schema = &other_place.schema.as_ref().unwrap().name;
    other
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&advisory_key("runledger migrations", other_schema)],
        )
        .unwrap();
    open(up_to_date).unwrap();
    drop(other);
}

/// A ledger of `place` with one pooled connection that waits 300 ms at
/// most.
fn impatient(place: &Place) -> Ledger {
    place
        .builder()
        .pool_size(1)
        .busy_timeout(std::time::Duration::from_millis(300))
        .open()
        .unwrap()
}

fn a_write_kept_waiting_past_the_busy_timeout_is_busy_and_leaves_the_connection_usable() {
    let place = Place::new(Store::Postgres);
    let schema = place.schema.as_ref().unwrap();
    let ledger = impatient(&place);
    let mut other = client(&schema.url);
    let mut tx = other.transaction().unwrap();
    // Another session (a migration, an operator's maintenance) holds the
    // table a registration writes.
    tx.batch_execute(&format!(
        "LOCK TABLE {}.runs IN ACCESS EXCLUSIVE MODE",
        schema.name
    ))
    .unwrap();
    let err = ledger.begin_run(RunSpec::new("blocked")).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err:?}");
    tx.rollback().unwrap();
    ledger.runs(runledger::RunFilter::default()).unwrap();
    ledger
        .begin_run(RunSpec::new("free"))
        .unwrap()
        .succeed()
        .unwrap();
}

/// A lock call of one round trip (its function sets its own
/// `lock_timeout`) waits no longer than the busy timeout either, when
/// another session holds a table it reads: it fails `Busy` in time, not
/// after the other session is done.
fn a_lock_call_kept_waiting_past_the_busy_timeout_is_busy() {
    let place = Place::new(Store::Postgres);
    let schema = place.schema.as_ref().unwrap();
    let ledger = impatient(&place);
    // In steady use: the call's statement is prepared.
    ledger.try_lock("k").unwrap().release().unwrap();
    let mut other = client(&schema.url);
    let mut tx = other.transaction().unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE {}.lock_entries IN ACCESS EXCLUSIVE MODE",
        schema.name
    ))
    .unwrap();
    let (sent, got) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| sent.send(ledger.try_lock("k").map(drop)).unwrap());
        let outcome = got.recv_timeout(std::time::Duration::from_secs(20));
        // Let the call end either way, so that the scope does.
        tx.batch_execute("ROLLBACK").unwrap();
        match outcome {
            Ok(Err(Error::Busy { .. })) => {}
            other => panic!("a lock call blocked by a table lock: {other:?}"),
        }
    });
    ledger.try_lock("k").unwrap().release().unwrap();
}

fn a_schema_holding_only_another_applications_views_is_refused() {
    another_applications_schema_is_refused(
        "CREATE VIEW {0}.report AS SELECT 1 AS x; CREATE SEQUENCE {0}.invoice_numbers",
        0,
    );
}

#[cfg(feature = "cli")]
fn a_reading_cli_command_does_not_create_a_missing_ledger() {
    let guard = SchemaGuard::new();
    let location = format!("{}#{}", guard.url, guard.name);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(["--db", &location, "runs"])
        .output()
        .unwrap();
    let exists: bool = client(&guard.url)
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&guard.name],
        )
        .unwrap()
        .get(0);
    assert!(
        !exists && !out.status.success(),
        "`runledger runs` on a missing ledger: status {:?}, schema created: {exists}; {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

fn a_hash_in_a_key_value_password_is_neither_a_schema_nor_shown() {
    // A generated password often holds a `#`; a key=value string (which
    // `builder_postgres` documents) has no fragment, so nothing after a `#`
    // is a schema name, and no error may show any part of the password.
    let err = Ledger::builder_postgres(
        "host=127.0.0.1 port=1 user=postgres dbname=nowhere password=hunter2#Hunter2",
    )
    .open()
    .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains("Hunter2"),
        "the password's tail is shown: {text}"
    );
}

fn the_path_of_a_ledger_reached_by_its_unix_socket_opens_it_again() {
    let place = Place::new(Store::Postgres);
    let schema = &place.schema.as_ref().unwrap().name;
    let location = format!("postgres://postgres@%2Fvar%2Frun%2Fpostgresql/postgres#{schema}");
    let ledger = Ledger::builder(&location).open().unwrap();
    let run = ledger.begin_run(RunSpec::new("seen")).unwrap();
    let path = ledger.path().to_str().unwrap().to_owned();
    let again = Ledger::builder(&path)
        .open()
        .unwrap_or_else(|e| panic!("Ledger::path {path:?} does not open again: {e}"));
    assert_eq!(again.run(run.id()).unwrap().name, "seen");
    run.succeed().unwrap();
}

fn a_schema_holding_only_another_applications_types_is_refused() {
    another_applications_schema_is_refused(
        "CREATE TYPE {0}.mood AS ENUM ('happy', 'sad'); CREATE DOMAIN {0}.positive AS integer CHECK (VALUE > 0)",
        0,
    );
}

fn a_hash_in_a_url_password_is_not_shown() {
    // libpq (and the postgres crate) read a URL's password up to the `@`,
    // `#` included; `builder_postgres` cuts at the last `#` instead, takes
    // the password's tail (and the host) as a schema name, and the error
    // shows it.
    let err = Ledger::builder_postgres("postgres://postgres:hunter2#Hunter2@127.0.0.1:1/nowhere")
        .open()
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains("Hunter2"),
        "the password's tail is shown: {text}"
    );
}

pg_tests!(
    eight_processes_opening_a_fresh_schema_at_once_all_succeed,
    a_newer_schema_is_refused_and_left_untouched,
    another_applications_schema_is_refused_and_left_untouched,
    two_schemas_of_one_database_are_two_ledgers,
    bad_schema_names_are_refused,
    an_unreachable_server_is_an_open_error_that_hides_the_password,
    a_connection_error_says_what_the_server_said_and_why,
    the_path_names_the_ledger_without_its_password_and_opens_it_again,
    the_location_is_postgres_and_holds_no_password,
    a_ledger_stamps_with_the_servers_clock,
    dropped_ledgers_leave_no_connections_behind,
    a_connection_the_server_closed_does_not_fail_the_next_call,
    open_waits_for_a_migrating_process_no_longer_than_the_busy_timeout,
    a_write_kept_waiting_past_the_busy_timeout_is_busy_and_leaves_the_connection_usable,
    a_lock_call_kept_waiting_past_the_busy_timeout_is_busy,
    a_schema_holding_only_another_applications_views_is_refused,
    #[cfg(feature = "cli")]
    a_reading_cli_command_does_not_create_a_missing_ledger,
    a_hash_in_a_key_value_password_is_neither_a_schema_nor_shown,
    the_path_of_a_ledger_reached_by_its_unix_socket_opens_it_again,
    a_schema_holding_only_another_applications_types_is_refused,
    a_hash_in_a_url_password_is_not_shown,
    sslmode_require_connects_encrypted_and_disable_in_the_clear,
    ledgers_of_one_process_share_one_listening_connection,
    connections_cut_mid_transaction_reach_no_caller,
    sslmode_verify_full_against_a_self_signed_server_says_why_it_fails,
    sslmode_verify_ca_and_verify_full_connect_when_the_certificate_checks_out,
    sslmode_in_the_key_value_form_is_understood_too,
    the_feed_never_skips_an_event_that_commits_after_a_later_numbered_one,
    writers_of_many_ledgers_at_once_leave_a_complete_ordered_feed,
    a_server_out_of_connections_is_a_clear_error_not_a_hang,
    a_runs_history_never_goes_back_in_time,
);

/// A call's time is read as its batch is sent, before the run's claim is
/// held (migration 10): so that a call that waited behind another writer
/// of the run is never stamped before that writer's event, each event of
/// a run is stamped no earlier than the one before it. Shown with a clock
/// set back between two calls: the later events keep the earlier time,
/// and the chain's times never decrease.
fn a_runs_history_never_goes_back_in_time() {
    let start = runledger::Timestamp::from_millis(1_800_000_000_000);
    let clock = runledger::ManualClock::new(start);
    let f = common::Fixture::with_clock(Store::Postgres, clock.clone());
    let run = f
        .ledger
        .begin_run(runledger::RunSpec::new("clock"))
        .unwrap();
    run.event("first", serde_json::json!(1)).unwrap();
    clock.set(start.saturating_sub(std::time::Duration::from_secs(10)));
    run.event("second", serde_json::json!(2)).unwrap();
    run.step("s").unwrap().succeed().unwrap();
    let id = run.id();
    run.succeed().unwrap();
    let events = f.ledger.events(id).unwrap();
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at), "{events:?}");
    // The run's own times agree with its events'.
    let record = f.ledger.run(id).unwrap();
    assert_eq!(record.finished_at, Some(start), "{record:?}");
}

/// Two writers commit out of id order: the one whose transaction began
/// first commits last. Its event is numbered below the other's, so a reader
/// that had returned the other's would skip it: the feed holds the later
/// one back until the earlier transaction ends, then gives both in order.
fn the_feed_never_skips_an_event_that_commits_after_a_later_numbered_one() {
    let place = Place::new(Store::Postgres);
    let schema = place.schema.as_ref().unwrap();
    let ledger = place.open();
    let impatient = place
        .builder()
        .busy_timeout(std::time::Duration::from_millis(300))
        .open()
        .unwrap();
    let run = ledger.begin_run(RunSpec::new("first")).unwrap();
    let start = ledger.events_cursor().unwrap();
    // A writer whose transaction is under way (it has its id) ...
    let mut early = client(&schema.url);
    early
        .batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .unwrap();
    // ... while the ledger commits an event.
    run.event("later", serde_json::Value::Null).unwrap();
    // A reader waits for the writer before it, up to its busy timeout, then
    // returns what is below it: nothing.
    let held = impatient.events_since(start, 100).unwrap();
    assert!(
        held.events.is_empty(),
        "read past a writer still under way: {held:?}"
    );
    assert_eq!(impatient.events_cursor().unwrap(), start);
    // The early writer appends its event, numbered below, and commits last,
    // while a reader waits for it.
    let id = run.id();
    let name = schema.name.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        early
            .batch_execute(&format!(
                "INSERT INTO {name}.events (run_id, at, kind, step) VALUES ({id}, 0, 'custom', 'earlier')"
            ))
            .unwrap();
        early.batch_execute("COMMIT").unwrap();
    });
    let page = ledger.events_since(start, 100).unwrap();
    writer.join().unwrap();
    let names: Vec<String> = page.events.iter().map(|e| e.kind.to_string()).collect();
    assert_eq!(names, ["earlier", "later"], "{page:?}");
    assert!(page.events[0].id < page.events[1].id);
    assert_eq!(ledger.events_cursor().unwrap(), page.next);
}

/// Writers on many connections, each committing events of its own runs,
/// while a reader follows the feed: it reads every event exactly once, in
/// ascending ids, however the commits interleave.
fn writers_of_many_ledgers_at_once_leave_a_complete_ordered_feed() {
    const WRITERS: usize = 6;
    const RUNS: usize = 15;
    let place = Place::new(Store::Postgres);
    let reader = place.open();
    let start = reader.events_cursor().unwrap();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let ledger = place.open();
            std::thread::spawn(move || {
                for i in 0..RUNS {
                    let run = ledger.begin_run(RunSpec::new(format!("w{w}-{i}"))).unwrap();
                    run.event("tick", serde_json::Value::Null).unwrap();
                    run.succeed().unwrap();
                }
            })
        })
        .collect();
    let mut cursor = start;
    let mut seen = Vec::new();
    // Each run: registered running, the tick, succeeded.
    let expected = WRITERS * RUNS * 3;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.len() < expected && std::time::Instant::now() < deadline {
        let page = reader.events_since(cursor, 7).unwrap();
        seen.extend(page.events.iter().map(|e| e.id));
        cursor = page.next;
    }
    // Nothing more comes: none was read twice.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(reader.events_since(cursor, 7).unwrap().events.is_empty());
    for writer in writers {
        writer.join().unwrap();
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seen:?}"
    );
    assert_eq!(seen.len(), expected);
}

/// A server that refuses more connections (here a role's `CONNECTION
/// LIMIT`; `max_connections` answers the same way, for the whole server):
/// a call that needs one more fails once the busy timeout has passed,
/// with the server's words, and never hangs.
fn a_server_out_of_connections_is_a_clear_error_not_a_hang() {
    let schema = SchemaGuard::new();
    let role = format!("rl_limited_{}", std::process::id());
    let mut admin = client(&schema.url);
    // Not a superuser: superusers are exempt from connection limits.
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; \
             GRANT CREATE ON DATABASE postgres TO {role}"
        ))
        .unwrap();
    let config: ::postgres::Config = schema.url.parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let url = format!("postgres://{role}@127.0.0.1:{port}/postgres");
    let ledger = Ledger::builder_postgres(&url)
        .schema(&schema.name)
        .busy_timeout(std::time::Duration::from_millis(1500))
        .open()
        .unwrap();
    ledger.try_lock("k").unwrap().release().unwrap();
    // The server takes no more connections of the role, and the pooled
    // ones go (an operator, a restart): the next call needs a new one.
    admin
        .batch_execute(&format!(
            "ALTER ROLE {role} CONNECTION LIMIT 0; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = '{role}' AND query NOT ILIKE 'LISTEN%'"
        ))
        .unwrap();
    let started = std::time::Instant::now();
    let err = ledger.try_lock("j").map(|g| g.token()).unwrap_err();
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    assert!(err.is_busy(), "{err:?}");
    let why = std::error::Error::source(&err).map(|s| s.to_string());
    assert!(
        why.as_deref()
            .is_some_and(|why| why.contains("too many connections for role")),
        "{err:?}"
    );
    drop(ledger);
    let _ = admin.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}
