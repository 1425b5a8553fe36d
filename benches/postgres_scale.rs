//! How the PostgreSQL store scales with clients, beside the bare server, in
//! one run against the server of `RUNLEDGER_PG_URL`:
//!
//! - `disjoint`: at 1, 4, 16 and 32 clients (threads, each with a `Ledger`
//!   of its own, each on a key of its own), operations per second and the
//!   p50/p99 of one operation, for the lock pair (`try_lock` + `release`)
//!   and for `begin_run` + `succeed`, beside the bare durable baseline: an
//!   `INSERT` and a `DELETE` of a row, two autocommit statements, prepared,
//!   on a connection of each client's own;
//! - `contended`: one key, 8 clients looping `lock` + `release`: grants per
//!   second, and the hand-off from one holder's release to the next grant
//!   (p50/p99).
//! - `churn`: one key locked over and over by one client, in eight
//!   windows one after the other: whether a lock pair costs more the
//!   longer its key has been in use (a key's dead rows, until a vacuum),
//!   beside the bare pair on one row over and over, measured before them.
//! - `floor`: at 1 and 16 clients, the least a durable lock pair can cost
//!   on the ledger's own tables, beside the ledger's lock pair and the bare
//!   pair: two functions of the bench (`floor_grant`, `floor_release`), one
//!   statement each, that bump the key's fencing token, insert the lock's
//!   row and its event, then delete the row and insert its event, with no
//!   check at all (instance, run, queue, claims) and no key entries, key
//!   history or watchers. No design that keeps a lock's row, its token and
//!   its events in the feed does less; what lies between it and the
//!   ledger's pair is what the ledger's rules cost.
//!
//! ```text
//! RUNLEDGER_PG_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --features postgres --bench postgres_scale
//! RUNLEDGER_PG_URL=… cargo bench --features postgres --bench postgres_scale -- contended
//! RUNLEDGER_PG_URL=… cargo bench --features postgres --bench postgres_scale -- churn
//! RUNLEDGER_PG_URL=… cargo bench --features postgres --bench postgres_scale -- floor
//! RUNLEDGER_BENCH_SECS=5 …                       # seconds per cell (default 3)
//! ```
//!
//! Each run works in a schema of its own, dropped at the end.
//!
//! Both sides talk to the server the same way: the baseline's client has
//! no TLS, so the ledgers' URL gets `sslmode=disable` (unless it names an
//! `sslmode` of its own), and the ratios compare the work, not the
//! encryption.

#![allow(missing_docs)]

use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use runledger::{Ledger, LockRequest, RunSpec};

mod common;
use common::{percentile, wanted_parts};

/// One figure of a cell: operations per second, and the latencies (µs).
struct Cell {
    per_second: f64,
    latencies: Vec<u64>,
}

impl Cell {
    fn show(&self) -> String {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return "no operation".into();
        }
        format!(
            "{:>8.0}/s  p50 {:>6} µs  p99 {:>7} µs",
            self.per_second,
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99)
        )
    }
}

/// Runs `clients` threads for `secs`, each looping `op` (made by `make`
/// for its client number) and timing each call.
fn cell<S>(
    clients: usize,
    secs: f64,
    make: impl Fn(usize) -> S + Sync,
    op: impl Fn(&mut S) + Sync,
) -> Cell {
    let barrier = Barrier::new(clients);
    let all = Mutex::new(Vec::new());
    let started = Mutex::new(None::<Instant>);
    std::thread::scope(|s| {
        for i in 0..clients {
            let (barrier, all, started, make, op) = (&barrier, &all, &started, &make, &op);
            s.spawn(move || {
                let mut state = make(i);
                barrier.wait();
                let begin = Instant::now();
                started.lock().unwrap().get_or_insert(begin);
                let mut mine = Vec::new();
                while begin.elapsed().as_secs_f64() < secs {
                    let one = Instant::now();
                    op(&mut state);
                    mine.push(one.elapsed().as_micros() as u64);
                }
                all.lock().unwrap().extend(mine);
            });
        }
    });
    let latencies = all.into_inner().unwrap();
    Cell {
        per_second: latencies.len() as f64 / secs,
        latencies,
    }
}

/// The table of the bare baseline, in the ledger's schema.
fn bare_table(url: &str, schema: &str) {
    Client::connect(url, NoTls)
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.bare_pairs (key text PRIMARY KEY)"
        ))
        .unwrap();
}

/// A connection of the bare baseline, with its two statements prepared:
/// the insert and the delete of a row of `bare_pairs`.
fn bare_client(url: &str, schema: &str) -> (Client, postgres::Statement, postgres::Statement) {
    let mut client = Client::connect(url, NoTls).unwrap();
    let insert = client
        .prepare(&format!(
            "INSERT INTO {schema}.bare_pairs (key) VALUES ($1)"
        ))
        .unwrap();
    let delete = client
        .prepare(&format!("DELETE FROM {schema}.bare_pairs WHERE key = $1"))
        .unwrap();
    (client, insert, delete)
}

/// `clients` ledgers of `location` looping a lock pair (`try_lock` +
/// `release`), each on a key of its own, named after `prefix`.
fn lock_pairs(location: &str, clients: usize, secs: f64, prefix: &str) -> Cell {
    cell(
        clients,
        secs,
        |i| (Ledger::open(location).unwrap(), format!("{prefix}:{i}")),
        |(ledger, key)| ledger.try_lock(key.as_str()).unwrap().release().unwrap(),
    )
}

/// `clients` bare connections looping the bare pair (see [`bare_client`]),
/// each on a row of its own, named after `prefix`.
fn bare_pairs(url: &str, schema: &str, clients: usize, secs: f64, prefix: &str) -> Cell {
    cell(
        clients,
        secs,
        |i| {
            let (client, insert, delete) = bare_client(url, schema);
            (client, insert, delete, format!("{prefix}:{i}"))
        },
        |(client, insert, delete, key)| {
            client.execute(&*insert, &[key]).unwrap();
            client.execute(&*delete, &[key]).unwrap();
        },
    )
}

fn disjoint(url: &str, schema: &str, secs: f64) {
    let location = format!("{url}#{schema}");
    drop(Ledger::open(&location).unwrap());
    bare_table(url, schema);
    for clients in [1, 4, 16, 32] {
        let ledger_of = |_| Ledger::open(&location).unwrap();
        let pair = lock_pairs(&location, clients, secs, "scale");
        let runs = cell(clients, secs, ledger_of, |ledger| {
            ledger
                .begin_run(RunSpec::new("scale"))
                .unwrap()
                .succeed()
                .unwrap();
        });
        let bare = bare_pairs(url, schema, clients, secs, "bare");
        println!(
            "{clients:>2} clients  lock pair {}  ({:.2}× bare)",
            pair.show(),
            pair.per_second / bare.per_second
        );
        println!(
            "{clients:>2} clients  begin+succeed {}  ({:.2}× bare)",
            runs.show(),
            runs.per_second / bare.per_second
        );
        println!("{clients:>2} clients  bare insert+delete {}", bare.show());
    }
}

fn contended(url: &str, schema: &str, secs: f64) {
    let location = format!("{url}#{schema}");
    let epoch = Instant::now();
    let events = Mutex::new(Vec::new()); // (ns, acquired?, client)
    let grants = cell(
        8,
        secs,
        |i| (Ledger::open(&location).unwrap(), i),
        |(ledger, i)| {
            let guard = ledger
                .acquire(LockRequest::new(["contended"]).wait(Duration::from_secs(60)))
                .unwrap();
            let got = epoch.elapsed().as_nanos();
            guard.release().unwrap();
            let released = epoch.elapsed().as_nanos();
            events
                .lock()
                .unwrap()
                .extend([(got, true, *i), (released, false, *i)]);
        },
    );
    let mut events = events.into_inner().unwrap();
    events.sort();
    let mut handoffs: Vec<u64> = events
        .windows(2)
        .filter(|w| !w[0].1 && w[1].1 && w[0].2 != w[1].2)
        .map(|w| ((w[1].0 - w[0].0) / 1000) as u64)
        .collect();
    handoffs.sort_unstable();
    let shown = if handoffs.is_empty() {
        "no hand-off".to_owned()
    } else {
        format!(
            "hand-off p50 {} µs  p99 {} µs  (n={})",
            percentile(&handoffs, 0.5),
            percentile(&handoffs, 0.99),
            handoffs.len()
        )
    };
    println!(
        "one key, 8 clients: {:.0} grants/s  {shown}",
        grants.per_second
    );
}

fn churn(url: &str, schema: &str, secs: f64) {
    let location = format!("{url}#{schema}");
    let ledger = Ledger::open(&location).unwrap();
    bare_table(url, schema);
    let bare = cell(
        1,
        secs,
        |_| bare_client(url, schema),
        |(client, insert, delete)| {
            client.execute(&*insert, &[&"churn"]).unwrap();
            client.execute(&*delete, &[&"churn"]).unwrap();
        },
    );
    println!("one key over and over: bare insert+delete {}", bare.show());
    let mut pairs = 0;
    for window in 1..=8 {
        let pair = cell(
            1,
            secs,
            |_| (),
            |()| ledger.try_lock("churn").unwrap().release().unwrap(),
        );
        println!(
            "one key over and over: window {window} (after {pairs:>6} pairs)  lock pair {}  ({:.2}× bare)",
            pair.show(),
            pair.per_second / bare.per_second
        );
        pairs += pair.latencies.len();
    }
}

/// The two functions of the `floor` part, in `schema` (their tables named
/// in full: no `SET search_path` of their own to pay for), with the
/// settings the ledger's lock functions carry.
fn floor_functions(schema: &str) -> String {
    format!(
        r#"
        CREATE FUNCTION {schema}.floor_grant(p_key text, p_keys text, p_at bigint,
            OUT o_id bigint, OUT o_token bigint)
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
        SET jit = off AS $fn$
        BEGIN
            WITH k AS (UPDATE {schema}.lock_keys SET last_token = last_token + 1
                       WHERE key = p_key RETURNING last_token),
                 l AS (INSERT INTO {schema}.locks (state, mode, token, keys, instance_id,
                           pid, host, requested_at, granted_at)
                       SELECT 'held', 'exclusive', k.last_token, p_keys, 0, 0, 'floor',
                              p_at, p_at
                       FROM k RETURNING id, token),
                 e AS (INSERT INTO {schema}.events (run_id, at, kind, message)
                       SELECT 0, p_at, 'lock_granted',
                              '{{"ticket":' || l.id || ',"token":' || l.token || '}}'
                       FROM l RETURNING id)
            SELECT l.id, l.token INTO o_id, o_token FROM l, e;
        END
        $fn$;
        CREATE FUNCTION {schema}.floor_release(p_id bigint, p_token bigint, p_at bigint)
        RETURNS text
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
        SET jit = off AS $fn$
        DECLARE
            v_keys text;
        BEGIN
            WITH d AS (DELETE FROM {schema}.locks WHERE id = p_id AND token = p_token
                       RETURNING keys),
                 e AS (INSERT INTO {schema}.events (run_id, at, kind, message)
                       SELECT 0, p_at, 'lock_released', '{{"ticket":' || p_id || '}}'
                       FROM d RETURNING id)
            SELECT d.keys INTO v_keys FROM d, e;
            RETURN v_keys;
        END
        $fn$;
        "#
    )
}

/// A connection of the `floor` part, its two calls prepared, its key's
/// row in `lock_keys`.
fn floor_client(
    url: &str,
    schema: &str,
    key: &str,
) -> (Client, postgres::Statement, postgres::Statement) {
    let mut client = Client::connect(url, NoTls).unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.lock_keys (key, last_token) VALUES ($1, 0) \
                 ON CONFLICT DO NOTHING"
            ),
            &[&key],
        )
        .unwrap();
    let grant = client
        .prepare(&format!(
            "SELECT o_id, o_token FROM {schema}.floor_grant($1, $2, $3)"
        ))
        .unwrap();
    let release = client
        .prepare(&format!("SELECT {schema}.floor_release($1, $2, $3)"))
        .unwrap();
    (client, grant, release)
}

fn floor(url: &str, schema: &str, secs: f64) {
    let location = format!("{url}#{schema}");
    drop(Ledger::open(&location).unwrap());
    bare_table(url, schema);
    Client::connect(url, NoTls)
        .unwrap()
        .batch_execute(&floor_functions(schema))
        .unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    for clients in [1, 16] {
        let floor = cell(
            clients,
            secs,
            |i| {
                let key = format!("floor:{i}");
                let (client, grant, release) = floor_client(url, schema, &key);
                (client, grant, release, format!("[{key:?}]"), key)
            },
            |(client, grant, release, keys, key)| {
                let row = client.query_one(&*grant, &[key, keys, &now()]).unwrap();
                let (id, token): (i64, i64) = (row.get(0), row.get(1));
                let gone = client.query_one(&*release, &[&id, &token, &now()]).unwrap();
                assert!(gone.get::<_, Option<String>>(0).is_some());
            },
        );
        let pair = lock_pairs(&location, clients, secs, "floor-pair");
        let bare = bare_pairs(url, schema, clients, secs, "floor-bare");
        println!(
            "{clients:>2} clients  floor pair {}  ({:.2}× bare)",
            floor.show(),
            floor.per_second / bare.per_second
        );
        println!(
            "{clients:>2} clients  lock pair {}  ({:.2}× bare, {:.2}× floor)",
            pair.show(),
            pair.per_second / bare.per_second,
            pair.per_second / floor.per_second
        );
        println!("{clients:>2} clients  bare insert+delete {}", bare.show());
    }
}

fn main() {
    let Some(url) = std::env::var("RUNLEDGER_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("set RUNLEDGER_PG_URL to the server to measure");
        return;
    };
    let secs: f64 = std::env::var("RUNLEDGER_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let wants = wanted_parts();
    let schema = format!("bench_scale_{}", std::process::id());
    // As the baseline's `NoTls` client (see the module's docs).
    let url = if url.contains("sslmode") {
        url
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    };
    if wants("disjoint") {
        disjoint(&url, &schema, secs);
    }
    if wants("contended") {
        contended(&url, &schema, secs);
    }
    if wants("churn") {
        churn(&url, &schema, secs);
    }
    if wants("floor") {
        floor(&url, &schema, secs);
    }
    if let Ok(mut admin) = Client::connect(&url, NoTls) {
        let _ = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    }
}
