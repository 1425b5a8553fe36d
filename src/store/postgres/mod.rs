//! The PostgreSQL store: one schema of a PostgreSQL database, shared by the
//! processes of many hosts.
//!
//! It keeps the SQLite store's model, so that the two give the same
//! guarantees from the same domain code:
//!
//! - **Writers in parallel, each claiming what it changes.** A write
//!   transaction runs at `READ COMMITTED` and first takes transaction-level
//!   advisory locks ([`Claim`]s, `pg_advisory_xact_lock`) on exactly the
//!   things whose state it reads to decide and then changes: the instance
//!   that asks (shared; exclusive for the reaper that closes it), the run
//!   (exclusive for a change of the run, shared for a lock request made for
//!   it), an idempotency key, and each lock key. Held until its `COMMIT`, a
//!   claim makes the writers of one run or one key take turns, as SQLite's
//!   `BEGIN IMMEDIATE` makes all writers, while the writers of unrelated
//!   runs and keys (on every host) commit side by side. At `READ
//!   COMMITTED` each statement sees everything committed before it
//!   started, so once a claim is held every read of what it covers sees the
//!   latest state, and no other writer changes it before the commit: the
//!   check of a lock grant and its insert are atomic, fencing tokens and
//!   queue tickets of a key grow in commit order. Compare-and-set updates
//!   and constraints (the unique index of active idempotency keys) stay as
//!   backstops.
//!
//!   Claims are taken in one order, instances, then idempotency keys, then
//!   runs, then lock keys, each class by its hash, so that two writers
//!   never wait for each other in a circle. A writer that finds, midway,
//!   that it needs a claim below one it holds (a release hands a key on to
//!   a waiter that also asks for another key) only tries it
//!   (`pg_try_advisory_xact_lock`): a waiter it cannot claim is woken to
//!   take its grant itself, and a claim the transaction cannot do without
//!   rolls it back and runs it again with that claim taken first. Ids of
//!   the event feed no longer follow commit order: see migration 7 and
//!   the feed's reads in `runs.rs`. `SERIALIZABLE` would give the same
//!   atomicity but abort a conflicting transaction instead of queueing it,
//!   and every caller would have to retry; one ledger's writes are short
//!   (a few statements), so queueing them costs less than aborts under
//!   contention. Reads take no lock.
//! - **Waiting for a claim** is bounded by the busy timeout (`SET LOCAL
//!   lock_timeout`): past it the call fails with
//!   [`Error::Busy`](crate::Error::Busy), as on SQLite.
//! - **At most two round trips per call that does not wait.** The claims
//!   go in the batch of `BEGIN` (one call of `runledger_begin`), and with
//!   them the call's work where one function of the schema does it
//!   (migrations 10 and 11: the rules of a run's calls live there, in
//!   plpgsql); the second round trip is the `COMMIT`, with the
//!   notifications ([`Store::write_first`]). A transition of a run reads
//!   its state with `BEGIN`, decides in Rust, and sends its write with
//!   the `COMMIT` ([`Tx::at_commit`]). A grant of free keys and a release
//!   nobody waits for are one round trip: one function that takes the
//!   claims, writes and tells the watchers, called as a transaction of
//!   its own ([`Store::write_alone`]). Anything else goes on statement by
//!   statement in a transaction.
//! - **Few statements for the server to parse and plan.** A batch's
//!   statements are parsed and planned at each call; a function's are
//!   planned once per connection (plpgsql keeps its plans, generic ones:
//!   `plan_cache_mode = force_generic_plan` on each function that writes,
//!   inherited by those it calls), and a
//!   prepared statement's once per connection. So the work of a call is
//!   in functions, its batch is a few short statements, and a lock call
//!   is one prepared statement (a batch of text through a transaction
//!   pooler).
//! - **Wake-ups cross hosts.** A transaction that frees keys (or appends
//!   events) sends, before its `COMMIT`, one `NOTIFY` on the schema's
//!   channel with the wake-up addresses of the waiters (or watchers). The
//!   notification is delivered on commit only. Each process that opened the
//!   ledger listens on the channel ([`listen`]) and wakes the addresses that
//!   live on its host; the writer also wakes its own host's at once, so a
//!   same-host hand-off does not wait for the round trip. Waiters still
//!   re-read on a capped timer: a wake-up is never relied upon.
//! - **Time is the server's.** See [`ServerClock`].
//! - **Liveness.** Instances record the same identity as on SQLite; a
//!   process on the same host (same boot id and pid namespace) is judged by
//!   its pid and start time, any other by its heartbeat lease. There are no
//!   instance lock files or per-key gates: those are files beside a SQLite
//!   database.

mod instances;
mod listen;
mod locks;
mod pooler;
mod runs;
mod schema;
mod tls;

pub(crate) use pooler::Route;
pub(crate) use schema::LATEST as SCHEMA_VERSION;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, Config, Row, SimpleQueryMessage, SimpleQueryRow, Statement};
use r2d2::{ManageConnection, Pool};
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreConfig;
use crate::clock::{Clock, Timestamp};
use crate::error::{Error, Result, StorageError};
use crate::location::Location;
use crate::wake::wake;

/// The schema a ledger uses unless told otherwise.
pub(crate) const DEFAULT_SCHEMA: &str = "runledger";

/// The PostgreSQL store of one open ledger.
pub(crate) struct Store {
    /// Always there but while the store drops (see its `Drop`).
    pool: Option<Pool<Manager>>,
    /// Where the ledger lives: the URL without its password, and the
    /// schema.
    location: Location,
    /// How errors and logs name the ledger: `location` as a path.
    name: PathBuf,
    /// `BEGIN` of every write transaction, with the timeout of its claims.
    begin: String,
    /// What makes this schema's claims its own (see [`Claim`]).
    seed: u64,
    /// How long a call waits for the server (a lock, a connection lost in a
    /// restart) before it fails.
    busy_timeout: Duration,
    /// The channel of the schema's wake-ups.
    channel: String,
    /// The ledger's clock: the server's time ([`ServerClock`]), unless the
    /// builder was given a clock.
    clock: Arc<dyn Clock>,
    /// The server's clock as this process follows it, when it is the
    /// ledger's clock.
    server_clock: Option<Arc<ServerClock>>,
    /// Through a transaction pooler (see [`pooler`]).
    pooler: Option<pooler::Pooler>,
    /// The last number given to a grant in one round trip (see
    /// [`Store::next_nonce`]).
    nonces: AtomicI64,
    /// Grants of one round trip whose outcome a lost reply left unknown,
    /// and that could not be settled then (the server stayed out of
    /// reach). Each may hold a lock nobody has a guard of; the next lock
    /// call or heartbeat of this store releases it (see
    /// `Store::settle_unknown_grants`).
    unknown_grants: parking_lot::Mutex<Vec<locks::UnknownGrant>>,
    /// Stops this store's listener when the store is dropped; none through
    /// a transaction pooler without a direct URL to listen on.
    _listener: Option<listen::Listener>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Store {
    /// The pool's connections close through the client's own runtime, which
    /// cannot run inside another runtime's context: off it, as every call.
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            super::off_runtime(move || drop(pool));
        }
    }
}

impl Store {
    fn pool(&self) -> &Pool<Manager> {
        self.pool
            .as_ref()
            .expect("the pool is there until the store drops")
    }

    /// Connects to the database at `url`, creates `schema` if needed and
    /// applies pending migrations under a session advisory lock.
    ///
    /// With `follow_server`, the store's clock ([`Store::clock`]) is the
    /// server's, followed with the system clock; else it is `clock`, the
    /// one the builder was given.
    pub(crate) fn open(
        url: &str,
        schema: &str,
        config: &StoreConfig,
        clock: Arc<dyn Clock>,
        follow_server: bool,
        route: &Route,
    ) -> Result<Store> {
        let not_a_url = |reason: String| Error::Open {
            path: PathBuf::from(redacted(url)),
            reason,
            source: None,
        };
        let (url, tls) =
            tls::split(url).map_err(|e| not_a_url(format!("not a PostgreSQL URL: {e}")))?;
        // The driver's error says "invalid connection string"; what is wrong
        // with it (`unknown option `foo``) is its source.
        let mut pg = Config::from_str(&url).map_err(|e| {
            let cause =
                std::error::Error::source(&e).map_or_else(String::new, |c| format!(": {c}"));
            not_a_url(format!("not a PostgreSQL URL: {e}{cause}"))
        })?;
        pg.ssl_mode(tls.client_mode());
        dead_link_timeouts(&mut pg, config.busy_timeout);
        let location = Location::Postgres {
            url: display_url(&pg),
            schema: schema.to_owned(),
        };
        let name = PathBuf::from(location.to_string());
        let connector = tls.connector().map_err(|reason| Error::Open {
            path: name.clone(),
            reason,
            source: None,
        })?;
        // The server's own words (no such role, no such database,
        // authentication failed) or the cause (connection refused), never
        // a bare "db error".
        let connect_error = |e: ConnectError| {
            let e = StorageError::from(e);
            Error::Open {
                path: name.clone(),
                reason: format!("cannot connect to PostgreSQL: {e}"),
                source: Some(Box::new(e)),
            }
        };
        let mut setup =
            connect_within(&pg, &connector, config.busy_timeout).map_err(connect_error)?;
        schema::prepare(
            &mut setup,
            schema,
            &name,
            config.busy_timeout,
            config.create,
        )?;
        let server_clock = if follow_server {
            Some(Arc::new(ServerClock::anchored(
                &mut setup,
                Arc::new(crate::clock::SystemClock),
            )?))
        } else {
            None
        };
        let clock: Arc<dyn Clock> = match &server_clock {
            Some(server) => server.clone(),
            None => clock,
        };
        drop(setup);

        let manager = Manager {
            inner: PostgresConnectionManager::new(pg.clone(), connector.clone()),
            session: (!route.transaction_pooler).then(|| {
                format!(
                    "SET search_path TO {}; \
                     SET default_transaction_isolation TO 'read committed'",
                    quote_ident(schema)
                )
            }),
            answer_within: config.busy_timeout,
            failed_at: std::sync::Mutex::new(None),
        };
        let pool = Pool::builder()
            .error_handler(Box::new(QuietErrors))
            .max_size(config.pool_size)
            .min_idle(Some(0))
            .idle_timeout(None)
            // Only a connection idle for a while is checked (see
            // `Manager::is_valid`): one in steady use costs nothing.
            .test_on_check_out(true)
            .max_lifetime(None)
            .connection_timeout(config.busy_timeout.max(Duration::from_secs(1)))
            .thread_pool(super::sqlite::shared_thread_pool())
            .build(manager)
            .map_err(|e| Error::Open {
                path: name.clone(),
                reason: format!("cannot open the connection pool: {e}"),
                source: None,
            })?;
        let channel = channel_of(schema);
        // One listening connection per server, for the whole process: per
        // connection string (and TLS setting), so that ledgers opened with
        // other settings (a role, an application_name) keep their own.
        let listener = match pooler::listen_config(route, &url, &tls, pg, connector, &name)? {
            Some((config, connector, server)) => Some(listen::Listener::start(
                config,
                connector,
                server,
                channel.clone(),
                name.clone(),
            )?),
            None => None,
        };
        let pooler = route
            .transaction_pooler
            .then(|| pooler::Pooler::new(schema));
        let lock_timeout = config.busy_timeout.as_millis().clamp(1, i32::MAX as u128);
        Ok(Store {
            pool: Some(pool),
            begin: format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; \
                 SET LOCAL lock_timeout = {lock_timeout};{}",
                pooler.as_ref().map_or("", |p| p.set_local())
            ),
            pooler,
            seed: claim_seed(schema),
            busy_timeout: config.busy_timeout,
            channel,
            clock,
            server_clock,
            location,
            name,
            nonces: AtomicI64::new(0),
            unknown_grants: parking_lot::Mutex::new(Vec::new()),
            _listener: listener,
        })
    }

    /// How long a call waits for the server before it fails.
    /// A number for a grant in one round trip, unique among this
    /// process's (with its instance's id, among all): how the grant is
    /// found again when the reply to its batch is lost (see
    /// [`Store::write_alone`]).
    pub(super) fn next_nonce(&self) -> i64 {
        self.nonces.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(super) fn busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// How errors name this ledger (and the key of its keeper thread).
    pub(crate) fn path(&self) -> &Path {
        &self.name
    }

    /// Where the ledger lives.
    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    /// The clock of this ledger: the server's time as this process follows
    /// it, or the clock the builder was given.
    pub(crate) fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Runs `f` in one write transaction, and commits it. The transaction
    /// first takes `claims` (see [`Claim`]); `f` takes any others it finds
    /// it needs with [`Tx::claim`]. An error from `f` (or from the commit)
    /// rolls everything back.
    ///
    /// `f` gets the transaction, whose [`Tx::now`] is read once the first
    /// claims are held: the timestamps of one run's or one key's writes
    /// follow their commit order, whatever the wait. Before the commit, the
    /// transaction notifies the addresses given to [`Tx::wake`] (and the
    /// watchers, if it appended events) on the schema's channel; after it,
    /// it wakes them on this host.
    ///
    /// **A claim out of order** that could not be had at once (see
    /// [`Tx::claim`]), or a deadlock the server broke, rolls the
    /// transaction back and runs it again, `f` included, with the claims
    /// it met taken first, in order.
    ///
    /// **A lost connection** (a restart of the server, a failover, a
    /// connection cut) is waited out, up to the busy timeout: a
    /// transaction that lost its connection before its commit was sent
    /// wrote nothing and runs again, `f` included, on a new connection. One
    /// that lost it while committing is settled, not guessed: the server
    /// says (`pg_xact_status`) whether that transaction committed; if it
    /// did, the call returns what `f` made, else it runs again. So a write
    /// is never applied twice, and a restart shorter than the busy timeout
    /// reaches no caller.
    fn write<T>(&self, claims: &[Claim], f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.write_with(claims, false, None, f)
    }

    /// [`write`](Store::write), with `first`, a call of a function of the
    /// schema ([`First::call`]) run with its values in the batch of
    /// `BEGIN`: its rows are [`Tx::first_rows`]. So a call whose work is
    /// that function costs two round trips, this batch and the commit's;
    /// `f` goes on with more statements where it needs to.
    fn write_first<T>(
        &self,
        claims: &[Claim],
        first: First,
        f: impl FnMut(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.write_with(claims, false, Some(first), f)
    }

    /// A write that one function of the schema may do alone, in one round
    /// trip, as a transaction of its own. The function (see migration 11)
    /// sets `lock_timeout`, tries `claims` itself, in order (never waits
    /// for one), then does the write and tells the watchers, or does
    /// nothing; it is called with
    /// the claims' keys and modes (`bigint[]`, `boolean[]`), the busy
    /// timeout (ms), then `values`, then the watchers' channel, this
    /// process's origin and the most addresses a notice holds, and answers
    /// one row whose last two columns are the watchers' count and
    /// addresses (see `runledger_notify_watchers`). `done` reads that row:
    /// `Some` when the function did the write, `None` when it did nothing
    /// (a key in use, waiters to hand on to): the transaction then
    /// committed nothing, and this returns `None` for the caller to write
    /// statement by statement (so a write the function cannot do costs
    /// one round trip more).
    ///
    /// **How it is sent.** On a direct connection, as one statement,
    /// prepared once per connection, its values bound: the statement is
    /// its own transaction, so nothing goes with it, and the server
    /// neither parses nor plans it again (a fifth of its work for a lock
    /// pair, when the values were text in a batch). That transaction
    /// takes the session's default isolation, which the connection set to
    /// read committed as it opened (see `Manager`); should it be another,
    /// the function does nothing (see migration 11) and the call goes on
    /// statement by statement, in a transaction of read committed.
    /// Through a transaction pooler, which may not carry a
    /// prepared statement, as one batch of text: `BEGIN`, the schema (`SET
    /// LOCAL search_path`), the call with its values as literals
    /// ([`First::call`]) and `COMMIT`.
    ///
    /// **A lost reply** (a restart, a cut connection) leaves the outcome
    /// unknown, and no transaction id to settle it by (it was to come in
    /// the reply): `settle` looks for the write's effect instead (a grant's
    /// row by its number, a release's row gone), in a transaction of its
    /// own on another connection that takes the same claims first. So it
    /// waits for the lost call's transaction, if the server has it, to
    /// end (committed, or rolled back as its backend finds the connection
    /// gone) before it looks; a call the server never had never runs (its
    /// connection is closed, or was reset by TCP giving it up). `settle`
    /// says what the write made if it committed, else `None`: the call is
    /// sent again, up to the busy timeout, as a [`write`](Store::write)
    /// is. So the write is never applied twice. Should `settle` itself
    /// fail (the server out of reach for longer), the outcome stays
    /// unknown: `unknown` is called, for the caller to settle it later, and
    /// this returns the error.
    fn write_alone<T>(
        &self,
        claims: &[Claim],
        function: &'static str,
        values: &[Lit<'_>],
        done: impl Fn(&Answer) -> Result<Option<T>>,
        settle: impl Fn(&mut Tx<'_>) -> Result<Option<T>>,
        unknown: impl Fn(),
    ) -> Result<Option<T>> {
        let mut claims = claims.to_vec();
        claims.sort_unstable();
        claims.dedup();
        let keys: Vec<i64> = claims.iter().map(|c| c.key_in(self.seed)).collect();
        let shared: Vec<bool> = claims.iter().map(|c| c.shared).collect();
        let max = i64::try_from(listen::ADDRESSES_PER_PAYLOAD).unwrap_or(i64::MAX);
        // As `SET LOCAL lock_timeout` is in `begin`.
        let timeout = self.busy_timeout.as_millis().clamp(1, i32::MAX as u128) as i64;
        let mut args = vec![Lit::Ints(&keys), Lit::Bools(&shared), Lit::Int(timeout)];
        args.extend_from_slice(values);
        args.extend([
            Lit::Text(&self.channel),
            Lit::Text(listen::origin()),
            Lit::Int(max),
        ]);
        // Through a pooler, the batch of text; else the prepared call.
        let batch = match self.pooler {
            Some(_) => Some(First::call(function, &args)?),
            None => None,
        };
        let sql = call_sql(function, args.len());
        // The statements before the call in the batch: BEGIN, SET LOCAL
        // lock_timeout and search_path.
        let before = 3;
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        // A connection the server closed while it sat in the pool shows it
        // only when used: as many tries as the pool holds connections (and
        // one more, for a fresh one) go at once, the next ones after a
        // pause that grows, as in `begin`.
        let mut quick = self.pool().max_size();
        let mut again = || {
            if quick > 0 {
                quick -= 1;
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        };
        loop {
            let mut conn = self
                .pool()
                .get()
                .map_err(|e| Error::from(e).in_ledger(&self.name))?;
            // The time is read last before the call is sent (after the
            // statement's preparation, a round trip on a fresh connection).
            let answer = match &batch {
                Some(first) => conn
                    .client
                    .simple_query(&format!(
                        "{}{};COMMIT",
                        self.begin,
                        first.execute(self.clock.now())
                    ))
                    .map(|replies| {
                        let row = by_statement(replies)
                            .into_iter()
                            .nth(before)
                            .and_then(|rows| rows.into_iter().next());
                        Ok(row.map(|row| Answer::of_text(&row)))
                    }),
                None => conn.prepared(sql).and_then(|statement| {
                    let now = self.clock.now();
                    let params: Vec<Box<dyn ToSql + Sync>> = args
                        .iter()
                        .zip(statement.params())
                        .map(|(value, ty)| value.param(ty, now))
                        .collect();
                    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p).collect();
                    conn.client
                        .query_opt(&statement, &refs)
                        .map(|row| row.as_ref().map(Answer::of_row).transpose())
                }),
            };
            conn.used = Instant::now();
            match answer {
                Ok(answer) => {
                    let row = answer?.ok_or_else(|| {
                        crate::store::bad_data(format!("{function} answered no row"))
                    })?;
                    let count = match row.len().checked_sub(2).map(|i| row.get(i)) {
                        Some(n @ Some(_)) => usize::try_from(locks::text_i64(n)?).unwrap_or(0),
                        _ => 0,
                    };
                    let addresses = row.get(row.len().saturating_sub(1)).unwrap_or("");
                    self.watchers_told(&mut conn.client, count, addresses);
                    return done(&row);
                }
                Err(e) if lost(&e) => {
                    drop(conn);
                    let settled = self.write(&claims, &settle).inspect_err(|_| unknown())?;
                    match settled {
                        Some(value) => return Ok(Some(value)),
                        None if started.elapsed() < self.busy_timeout => {
                            log::debug!(
                                "runledger: a write lost its connection ({e}); trying again"
                            );
                            again();
                        }
                        None => return Err(Error::from(e).in_ledger(&self.name)),
                    }
                }
                Err(e) => {
                    // Rolled back (a claim past its timeout, a deadlock the
                    // server broke): nothing was written. A batch's
                    // transaction stays open on the connection until
                    // rolled back; a lone statement's ended with it.
                    if batch.is_some() {
                        let _ = conn.client.batch_execute("ROLLBACK");
                    }
                    let e = Error::from(e);
                    if deadlocked_in(&e) {
                        return Ok(None);
                    }
                    return Err(e.in_ledger(&self.name));
                }
            }
        }
    }

    /// [`write`](Store::write), for a transaction that finds claims it
    /// needs only once it has read (the keys of a run that ends, the runs
    /// of an instance reaped): it may wait for them until its first write.
    ///
    /// **Why only until then:** an event's id follows its transaction's
    /// id, which the server assigns at the first write. A transaction that
    /// waited for the claim of a run or a key after its id was assigned
    /// could write an event of that run or key numbered below the events of
    /// a younger transaction that held the claim meanwhile: the feed would
    /// show them out of their real order. So every claim is taken before
    /// the transaction's id: [`write`](Store::write) takes its claims and
    /// the id with `BEGIN`, and a transaction of `write_later` lets its
    /// first write assign the id, reads it back before the commit, and
    /// after that first write treats a claim it lacks as one out of order.
    fn write_later<T>(
        &self,
        claims: &[Claim],
        f: impl FnMut(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.write_with(claims, true, None, f)
    }

    fn write_with<T>(
        &self,
        claims: &[Claim],
        later: bool,
        first: Option<First>,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        let mut claims = claims.to_vec();
        loop {
            match self.write_once(&claims, later, first.as_ref(), &mut f) {
                Ok(value) => return Ok(value),
                Err(Failed::Conflict(more)) if started.elapsed() < self.busy_timeout => {
                    claims.extend(more);
                }
                Err(Failed::Lost(e)) if started.elapsed() < self.busy_timeout => {
                    log::debug!("runledger: a write lost its connection ({e}); trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                Err(Failed::Conflict(_)) => {
                    return Err(Error::Busy {
                        path: self.name.clone(),
                        source: StorageError::other(
                            "a write kept meeting other writers of the same runs and keys",
                        ),
                    });
                }
                Err(Failed::Lost(e) | Failed::Other(e)) => return Err(e.in_ledger(&self.name)),
            }
        }
    }

    /// One try of [`write`](Store::write).
    fn write_once<T>(
        &self,
        claims: &[Claim],
        later: bool,
        first: Option<&First>,
        f: &mut impl FnMut(&mut Tx<'_>) -> Result<T>,
    ) -> std::result::Result<T, Failed> {
        let mut claims = claims.to_vec();
        claims.sort_unstable();
        claims.dedup();
        let (mut conn, xact, first_rows, sent) =
            self.begin(&claims, !later, first).map_err(Failed::from)?;
        let mut tx = Tx {
            conn: &mut conn,
            now: self.clock.now(),
            open: true,
            events_written: false,
            wakes: Vec::new(),
            seed: self.seed,
            claimed: claims,
            conflict: None,
            sealed: !later,
            xact: None,
            first: first_rows,
            sent,
            at_commit: Vec::new(),
            pooler: self.pooler.as_ref(),
        };
        // Nothing is committed before the batch below: a lost connection
        // here lost nothing.
        let value = match f(&mut tx) {
            Ok(value) => value,
            Err(_) if tx.conflict.is_some() => {
                return Err(Failed::Conflict(tx.conflict.take().unwrap_or_default()));
            }
            Err(e) => return Err(Failed::from(e)),
        };
        // A change may be noted twice (a helper such as `apply_change`
        // notes the waiters it frees, and its caller may too): one wake-up
        // per address is enough.
        tx.wakes.sort_unstable();
        tx.wakes.dedup();
        // One round trip ends the transaction: the notifications of the
        // waiters it freed, those of the feed's watchers (read and notified
        // by the server, and returned to wake this host's) and the COMMIT,
        // as one batch.
        let mut batch: String = tx.at_commit.concat();
        for payload in listen::payloads(&tx.wakes) {
            batch.push_str(&format!(
                "SELECT pg_notify({}, {});",
                literal(&self.channel),
                literal(&payload)
            ));
        }
        if tx.events_written {
            batch.push_str(&self.notify_watchers());
        }
        batch.push_str("COMMIT");
        // The id the first write assigned (see `write_later`), if it wrote:
        // from an event it wrote, else asked for (one more round trip),
        // and assigned now if only the commit's batch writes.
        let ask = if tx.at_commit.is_empty() {
            "SELECT pg_current_xact_id_if_assigned()::text"
        } else {
            "SELECT pg_current_xact_id()::text"
        };
        let xact = match xact.or_else(|| tx.xact.map(|x| x.to_string())) {
            Some(xact) => Some(xact),
            None => tx
                .conn
                .client
                .simple_query(ask)
                .map_err(|e| Failed::from(Error::from(e)))?
                .iter()
                .find_map(|reply| match reply {
                    SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                }),
        };
        let replies = match tx.conn.client.simple_query(&batch) {
            Ok(replies) => replies,
            Err(e) if lost(&e) => {
                tx.open = false;
                // The commit may have happened: ask the server. A
                // transaction that wrote nothing has nothing to settle.
                let Some(xact) = &xact else {
                    return Ok(value);
                };
                return match self.settle(xact) {
                    Ok(true) => Ok(value),
                    Ok(false) => Err(Failed::Lost(e.into())),
                    Err(unknown) => Err(Failed::Other(unknown)),
                };
            }
            Err(e) => return Err(Failed::from(Error::from(e))),
        };
        tx.open = false;
        self.watchers_notified(&mut tx.conn.client, &replies);
        Ok(value)
    }

    /// The statement that tells the feed's watchers of the events of its
    /// transaction (`runledger_notify_watchers`, migration 11): one row of
    /// three columns, the watchers' count, their addresses, and `true`
    /// (see [`Store::watchers_notified`]).
    fn notify_watchers(&self) -> String {
        format!(
            "SELECT o_watchers, o_addresses, true \
             FROM runledger_notify_watchers({chan}, {origin}, {max});",
            max = listen::ADDRESSES_PER_PAYLOAD,
            chan = literal(&self.channel),
            origin = literal(listen::origin()),
        )
    }

    /// Once a batch with [`Store::notify_watchers`] has committed: notifies
    /// the watchers it could not (more than one payload holds), and wakes
    /// this host's at once. Its lock waiters are woken by the caller, with
    /// the addresses the method returned.
    fn watchers_notified(&self, client: &mut Client, replies: &[SimpleQueryMessage]) {
        for reply in replies {
            // The watchers' row, of three columns (the waiters'
            // `pg_notify`s answer rows of one).
            if let SimpleQueryMessage::Row(row) = reply
                && row.len() == 3
            {
                let count = row.try_get(0).ok().flatten().and_then(|n| n.parse().ok());
                let addresses = row.try_get(1).ok().flatten().unwrap_or("");
                self.watchers_told(client, count.unwrap_or(0), addresses);
                return;
            }
        }
        wake(&[]);
    }

    /// Once a write that told its `count` watchers (at `addresses`, one a
    /// line) has committed: notifies them if the server could not (more
    /// than one payload holds), and wakes this host's at once.
    fn watchers_told(&self, client: &mut Client, count: usize, addresses: &str) {
        let watchers: Vec<String> = addresses.lines().map(str::to_owned).collect();
        if count > listen::ADDRESSES_PER_PAYLOAD {
            // Committed already: the other hosts' watchers learn of it a
            // round trip later (or at their next re-read if this fails).
            for payload in listen::payloads(&watchers) {
                let mut sql = format!("SELECT pg_notify({}, ", literal(&self.channel));
                let sent = Lit::Text(&payload).write_sql(&mut sql).and_then(|()| {
                    sql.push(')');
                    Ok(client.simple_query(&sql)?)
                });
                if let Err(e) = sent {
                    log::debug!("runledger: could not notify the watchers: {e}");
                    break;
                }
            }
        }
        wake(&watchers);
    }

    /// Whether the write transaction `xact`, whose commit lost its
    /// connection, committed: asked of the server on another connection,
    /// waiting for it up to the busy timeout. An error when the server
    /// cannot tell (or cannot be reached in time): the write's outcome is
    /// then unknown.
    fn settle(&self, xact: &str) -> Result<bool> {
        let started = Instant::now();
        let unknown = |why: String| {
            Error::from(std::io::Error::other(format!(
                "the commit of a write lost its connection and its outcome is unknown: {why}"
            )))
        };
        loop {
            // A simple query: one round trip, and no prepared statement (a
            // transaction pooler keeps none; see `pooler`).
            let status = self.pool().get().map_err(Error::from).and_then(|mut conn| {
                let sql = format!("SELECT pg_xact_status({}::xid8)", literal(xact));
                Ok(conn
                    .client
                    .simple_query(&sql)?
                    .iter()
                    .find_map(|reply| match reply {
                        SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
                        _ => None,
                    })
                    .flatten())
            });
            match status {
                Ok(Some(status)) if status == "committed" => return Ok(true),
                Ok(Some(status)) if status == "aborted" => return Ok(false),
                Ok(None) => return Err(unknown(format!("the server forgot transaction {xact}"))),
                // In progress (its backend not yet gone), or no server yet.
                Ok(Some(_)) | Err(_) if started.elapsed() < self.busy_timeout => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Some(status)) => return Err(unknown(format!("transaction {xact} is {status}"))),
                Err(e) => return Err(unknown(e.to_string())),
            }
        }
    }

    /// A pooled connection inside a new write transaction that holds
    /// `claims` (sorted), and the transaction's id (to settle a commit
    /// whose reply was lost): one round trip.
    ///
    /// A connection the server closed while it sat in the pool (a restart,
    /// a failover, an idle timeout, an operator) only shows it when used:
    /// its `BEGIN` fails, nothing was written, and the next connection is
    /// tried, as many times as the pool may hold connections (and once
    /// more, for a fresh one).
    ///
    /// With `assign`, the transaction's id is assigned (after the claims)
    /// and returned; else `None`, and its first write assigns it.
    ///
    /// With `first` (see [`Store::write_first`]), that statement runs in
    /// the same batch, after the claims; its rows are returned too.
    #[allow(clippy::type_complexity)]
    fn begin(
        &self,
        claims: &[Claim],
        assign: bool,
        first: Option<&First>,
    ) -> Result<(
        r2d2::PooledConnection<Manager>,
        Option<String>,
        Option<Vec<SimpleQueryRow>>,
        Sent,
    )> {
        let mut batch = self.begin.clone();
        if claims.is_empty() {
            batch.push_str(if assign {
                "SELECT pg_current_xact_id()::text;"
            } else {
                "SELECT 'no id yet';"
            });
        } else {
            // The claims in order, then the id: one statement
            // (`runledger_begin`, migration 11), for the server to parse
            // and plan once.
            let keys: Vec<i64> = claims.iter().map(|c| c.key_in(self.seed)).collect();
            let shared: Vec<bool> = claims.iter().map(|c| c.shared).collect();
            let call = Lit::call(
                "SELECT runledger_begin(",
                &[Lit::Ints(&keys), Lit::Bools(&shared), Lit::Bool(assign)],
            )?;
            batch.push_str(&call);
            batch.push(';');
        }
        // The statements before the id's: BEGIN, SET LOCAL lock_timeout
        // (and search_path, through a pooler).
        let before_id = 2 + usize::from(self.pooler.is_some());
        let mut tries = self.pool().max_size();
        loop {
            let mut conn = self.pool().get()?;
            // Prepared in a transaction of its own, so that the locks its
            // parse takes on the tables wait no longer than the busy
            // timeout (behind a migration, say).
            let batch = match first {
                Some(first) => format!("{batch}{}", first.execute(self.clock.now())),
                None => batch.clone(),
            };
            let sent = Sent::now(self.server_clock.as_deref());
            match conn.client.simple_query(&batch) {
                Ok(replies) => {
                    let sent = sent.answered();
                    let mut statements = by_statement(replies).into_iter().skip(before_id);
                    let xact = statements.next().and_then(|rows| {
                        rows.first().and_then(|row| row.get(0).map(str::to_owned))
                    });
                    let Some(xact) = xact else {
                        let _ = conn.client.batch_execute("ROLLBACK");
                        return Err(crate::store::bad_data(
                            "BEGIN did not return the transaction's id".to_owned(),
                        ));
                    };
                    let first_rows = first.map(|_| statements.next().unwrap_or_default());
                    return Ok((conn, assign.then_some(xact), first_rows, sent));
                }
                Err(e) if tries > 0 && lost(&e) => {
                    // Dropped, the broken connection leaves the pool.
                    tries -= 1;
                }
                Err(e) => {
                    // A claim timed out (or the server refused): the
                    // transaction, if it began, is aborted.
                    let _ = conn.client.batch_execute("ROLLBACK");
                    return Err(e.into());
                }
            }
        }
    }

    /// [`write`](Store::write), and `on_commit` once the write has committed
    /// (dropped, not called, if it failed).
    fn write_then<T>(
        &self,
        claims: &[Claim],
        later: bool,
        f: impl FnMut(&mut Tx<'_>) -> Result<T>,
        on_commit: impl FnOnce(),
    ) -> Result<T> {
        let value = self.write_with(claims, later, None, f)?;
        on_commit();
        Ok(value)
    }

    /// Runs `f` on a pooled connection, outside any explicit transaction:
    /// each statement sees what was committed when it started.
    ///
    /// A read writes nothing, so one that finds its connection closed by the
    /// server (see [`Store::begin`]) runs again on the next, waiting for the
    /// server up to the busy timeout.
    fn read<T>(&self, f: impl Fn(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut tries = self.pool().max_size();
        let on_connection = || {
            let mut conn = self.pool().get()?;
            // Through a transaction pooler, in a transaction of its own
            // (see `pooler`), rolled back on drop if `f` fails.
            if let Some(pooler) = &self.pooler {
                pooler.begin_read(&mut conn.client)?;
            }
            let mut tx = Tx {
                conn: &mut conn,
                now: self.clock.now(),
                open: self.pooler.is_some(),
                events_written: false,
                wakes: Vec::new(),
                seed: self.seed,
                claimed: Vec::new(),
                conflict: None,
                sealed: false,
                xact: None,
                first: None,
                sent: Sent::default(),
                at_commit: Vec::new(),
                pooler: self.pooler.as_ref(),
            };
            let value = f(&mut tx)?;
            if tx.open {
                tx.open = false;
                pooler::Pooler::end_read(&mut tx.conn.client)?;
            }
            Ok(value)
        };
        // Past the pooled connections, a server that went away (a restart)
        // is waited for, up to the busy timeout.
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            match on_connection() {
                Err(e) if tries > 0 && lost_in(&e) => tries -= 1,
                Err(e) if lost_in(&e) && started.elapsed() < self.busy_timeout => {
                    log::debug!("runledger: a read lost its connection ({e}); trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                other => return other.map_err(|e: Error| e.in_ledger(&self.name)),
            }
        }
    }
}

/// How long a pooled connection may sit unused before its next use first
/// checks, with a deadline, that the server still answers on it (see
/// [`Manager::is_valid`]).
const IDLE_BEFORE_CHECK: Duration = Duration::from_secs(1);

/// The longest a check of an idle connection waits for the server: an
/// empty query that takes longer is a server in trouble.
const CHECK_AT_MOST: Duration = Duration::from_secs(5);

/// A connection of the pool: the client and its prepared statements.
pub(super) struct Conn {
    client: Closing,
    statements: HashMap<&'static str, Statement>,
    /// When a call last ended on it (or it was last checked).
    used: Instant,
}

impl Conn {
    /// The prepared statement of `sql` on this connection, prepared at its
    /// first use (a round trip), then cached.
    fn prepared(&mut self, sql: &'static str) -> std::result::Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// A client that, stuck, is closed on a thread of its own.
///
/// A check that ran out of time (see [`Manager::is_valid`]) leaves a reply
/// owed on the connection, and the client's close waits for the replies
/// it is owed, which a dead link delivers late or never (until TCP gives
/// up, see [`dead_link_timeouts`]). Nobody waits for that thread.
struct Closing {
    client: Option<Client>,
    stuck: bool,
}

impl std::ops::Deref for Closing {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the client is there until dropped")
    }
}

impl std::ops::DerefMut for Closing {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("the client is there until dropped")
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(client) = self.client.take().filter(|_| self.stuck) {
            let _ = std::thread::Builder::new()
                .name("runledger-close".into())
                .spawn(move || drop(client));
        }
    }
}

/// What r2d2 does with a failed connect or check: a debug line. The call
/// that waited gets the error (r2d2 keeps its text), so logging it at
/// r2d2's default level would say it twice, once per pooled connection
/// after a restart.
#[derive(Debug)]
struct QuietErrors;

impl r2d2::HandleError<StorageError> for QuietErrors {
    fn handle_error(&self, error: StorageError) {
        log::debug!("runledger: a pooled connection: {error}");
    }
}

/// Opens pooled connections in the ledger's schema.
struct Manager {
    inner: PostgresConnectionManager<MakeRustlsConnect>,
    /// The session's settings, sent once as a connection opens: its
    /// `search_path`, and `default_transaction_isolation` at read
    /// committed, whatever the server, the database or the role default
    /// to, so that a lock call of one statement (see
    /// [`Store::write_alone`]), its own transaction, runs at the level its
    /// function needs and stays one round trip, and a read of one
    /// statement never meets a serialization failure. None through a
    /// transaction pooler, where each transaction sets its schema and its
    /// level (see [`pooler`]).
    session: Option<String>,
    /// How long a check of an idle connection waits for the server: the
    /// busy timeout (at most [`CHECK_AT_MOST`]).
    answer_within: Duration,
    /// When a check last failed, until one succeeds (see
    /// [`Manager::is_valid`]).
    failed_at: std::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl ManageConnection for Manager {
    type Connection = Conn;
    // r2d2 keeps only the text of a failed connect: this one says what the
    // server said, not "db error".
    type Error = StorageError;

    fn connect(&self) -> std::result::Result<Conn, StorageError> {
        let mut client = self.inner.connect().map_err(StorageError::postgres)?;
        if let Some(session) = &self.session {
            client
                .batch_execute(session)
                .map_err(StorageError::postgres)?;
        }
        Ok(Conn {
            client: Closing {
                client: Some(client),
                stuck: false,
            },
            statements: HashMap::new(),
            used: Instant::now(),
        })
    }

    /// A connection used within the last [`IDLE_BEFORE_CHECK`] is taken as
    /// it is; one idle for longer is first checked with an empty query
    /// that must answer within the busy timeout, at most
    /// [`CHECK_AT_MOST`] (one round trip).
    ///
    /// **Why:** a server gone without a word (a link down, a host lost, a
    /// failover behind a NAT) leaves a pooled connection that looks open,
    /// and a call on it would wait for a reply as long as TCP keeps the
    /// connection, far past the busy timeout. The check's deadline is the
    /// client's own, so such a connection is dropped in time and the call
    /// waits for a new one, up to the busy timeout, then fails with
    /// [`Error::Busy`](crate::Error::Busy). A connection that dies under a
    /// call in steady use is left to TCP's timeouts (see
    /// [`dead_link_timeouts`]).
    ///
    /// r2d2 checks the idle connections one after another, with no
    /// deadline of its own: once a check has failed, every connection idle
    /// since before that failure is dropped without a check of its own,
    /// so that a checkout pays one check's wait, not one per pooled
    /// connection.
    fn is_valid(&self, conn: &mut Conn) -> std::result::Result<(), StorageError> {
        if conn.client.is_closed() {
            return Err(StorageError::other("the server closed the connection"));
        }
        if conn.used.elapsed() < IDLE_BEFORE_CHECK {
            return Ok(());
        }
        let failed = *self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(failed) = failed
            && conn.used < failed
        {
            conn.client.stuck = true;
            return Err(StorageError::other(
                "the server did not answer on another pooled connection idle as long",
            ));
        }
        let within = self.answer_within.min(CHECK_AT_MOST);
        match conn.client.is_valid(within) {
            Ok(()) => {
                conn.used = Instant::now();
                *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                conn.client.stuck = true;
                *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                Err(StorageError::other(&format!(
                    "the server did not answer on a pooled connection within {within:?} ({})",
                    StorageError::postgres(e)
                )))
            }
        }
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        self.inner.has_broken(&mut conn.client)
    }
}

/// A statement's parameters.
pub(super) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// One transaction (or, for reads, one connection outside a transaction)
/// of the store. Statements are prepared once per connection and cached
/// (through a transaction pooler, reads are transactions too and
/// statements run unnamed: see [`pooler`]).
pub(super) struct Tx<'c> {
    conn: &'c mut Conn,
    now: Timestamp,
    /// A write transaction not yet committed: rolled back on drop.
    open: bool,
    events_written: bool,
    wakes: Vec<String>,
    /// The store's [`Claim`] seed.
    seed: u64,
    /// The claims held, sorted.
    claimed: Vec<Claim>,
    /// Claims out of order that could not be had: the transaction is
    /// rolled back and runs again with them taken first.
    conflict: Option<Vec<Claim>>,
    /// The transaction has its id (it wrote, or `BEGIN` assigned it): no
    /// claim may be taken any more (see [`Store::write_later`]).
    sealed: bool,
    /// The transaction's id, once an event it wrote told it (an event id
    /// is its transaction's id shifted left 20 bits, see migration 7).
    xact: Option<i64>,
    /// The rows of the statement sent with `BEGIN` (see
    /// [`Store::write_first`]), until taken.
    first: Option<Vec<SimpleQueryRow>>,
    /// When the batch of `BEGIN` went and how long its answer took.
    sent: Sent,
    /// Writes sent with the commit ([`Tx::at_commit`]), in order.
    at_commit: Vec<String>,
    /// Through a transaction pooler: statements run unnamed (see
    /// [`pooler`]).
    pooler: Option<&'c pooler::Pooler>,
}

impl Tx<'_> {
    /// The time to stamp this transaction's writes with.
    pub(super) fn now(&self) -> Timestamp {
        self.now
    }

    /// Notes that the transaction appended events: its commit wakes the
    /// watchers of the feed.
    pub(super) fn events_written(&mut self) {
        self.events_written = true;
    }

    /// The rows of the statement sent with `BEGIN` ([`Store::write_first`]),
    /// once: `None` after they were taken, or without such a statement.
    pub(super) fn first_rows(&mut self) -> Option<Vec<SimpleQueryRow>> {
        self.first.take()
    }

    /// Follows the server's clock (see [`ServerClock`]) with its time in
    /// ms, `server`, read by the statement sent with `BEGIN`
    /// ([`Store::write_first`]): that batch's round trip is the
    /// measurement, and none of its own is needed.
    ///
    /// `waited` (ms) is how long the batch had been on the server when the
    /// clock was read (its claims' wait): it is taken out of the round
    /// trip, so that only the trips to and from the server are halved.
    pub(super) fn follow_server_clock(
        &self,
        clock: Option<&ServerClock>,
        server: i64,
        waited: f64,
    ) {
        if let (Some(clock), Some((before, took))) = (clock, self.sent.took) {
            let waited = Duration::from_secs_f64((waited / 1000.0).clamp(0.0, 3600.0)).min(took);
            clock.observe(
                before,
                took - waited,
                server - i64::try_from(waited.as_millis()).unwrap_or(0),
            );
        }
    }

    /// Calls `function` (one of the schema's, see migrations 10 and 11) with
    /// `values` in the batch of the commit, before it: a write whose
    /// rows the transaction does not need, so that it costs no round trip
    /// of its own. It must raise an error (rolling everything back) where
    /// it cannot do its work; it may write events.
    ///
    /// The transaction's id is known before that batch goes (assigned
    /// with `BEGIN`, by an earlier write, or asked for), so that a commit
    /// whose reply is lost is settled as any other.
    pub(super) fn at_commit(&mut self, function: &str, values: &[Lit<'_>]) -> Result<()> {
        self.at_commit
            .push(Lit::call(&format!("SELECT {function}("), values)? + ";");
        self.events_written = true;
        Ok(())
    }

    /// Calls `function` (one of the schema's, see migrations 10 and 11) with
    /// `values` now, as one simple query: its rows, as text. `writes`, if
    /// it may write (the transaction then has its id, see
    /// [`Store::write_later`]).
    pub(super) fn call(
        &mut self,
        function: &str,
        values: &[Lit<'_>],
        writes: bool,
    ) -> Result<Vec<SimpleQueryRow>> {
        if writes && self.open {
            self.sealed = true;
        }
        let sql = Lit::call(&format!("SELECT * FROM {function}("), values)?;
        let replies = self.conn.client.simple_query(&sql)?;
        Ok(by_statement(replies).into_iter().next().unwrap_or_default())
    }

    /// Notes the id of an event the transaction wrote, which tells the
    /// transaction's own id (see [`Store::write_later`]): its commit then
    /// needs no round trip to ask for it.
    pub(super) fn event_written(&mut self, id: i64) {
        self.events_written = true;
        self.xact = Some(id >> 20);
    }

    /// Wake-up addresses to notify with the commit, for the other hosts
    /// (the caller wakes this host's with the addresses it returns).
    ///
    /// An address given twice (a grant noted where it is made, and again by
    /// a caller that returns it) is notified once.
    pub(super) fn wake(&mut self, addresses: &[String]) {
        // Repeats are dropped once, before the commit.
        self.wakes.extend_from_slice(addresses);
    }

    /// Takes `claims`, held until the transaction ends (see [`Claim`]).
    ///
    /// Claims are only taken before the transaction has its id (see
    /// [`Store::write_later`]); after it, a claim lacking is one out of
    /// order. Claims above every one held are waited for, in order. One below a
    /// claim held would risk a circle of waits: it is only tried. When one
    /// of those is taken by another writer, the claims got stay held, and
    /// `required` decides: `true` marks the transaction to run again with
    /// them taken first (the error returned must then be passed up, and it
    /// rolls the transaction back); `false` returns `Ok(false)` and the
    /// caller does without (see `grant_waiters`). `Ok(true)` once every
    /// claim is held.
    pub(super) fn claim(&mut self, claims: &[Claim], required: bool) -> Result<bool> {
        let mut wanted: Vec<Claim> = claims.iter().filter(|c| !self.holds(c)).copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(true);
        }
        if self.sealed {
            // Too late for any claim: see `Store::write_later`.
            if required {
                self.conflict = Some(wanted);
                return Err(crate::store::bad_data(
                    "a claim after the transaction's first write: the write runs again".to_owned(),
                ));
            }
            return Ok(false);
        }
        let top = self.claimed.last().copied();
        let (tried, waited): (Vec<Claim>, Vec<Claim>) = wanted
            .iter()
            .partition(|c| top.is_some_and(|top| **c <= top));
        let mut missed = Vec::new();
        if !tried.is_empty() {
            let batch: String = tried.iter().map(|c| c.sql(self.seed, true)).collect();
            let replies = self.conn.client.simple_query(&batch)?;
            let answers = replies.iter().filter_map(|reply| match reply {
                SimpleQueryMessage::Row(row) => Some(row.get(0) == Some("t")),
                _ => None,
            });
            for (claim, got) in tried.iter().zip(answers) {
                if got {
                    self.claimed.push(*claim);
                } else {
                    missed.push(*claim);
                }
            }
        }
        if !waited.is_empty() && missed.is_empty() {
            let batch: String = waited.iter().map(|c| c.sql(self.seed, false)).collect();
            self.conn.client.simple_query(&batch)?;
            self.claimed.extend(waited.iter().copied());
        }
        self.claimed.sort_unstable();
        if missed.is_empty() {
            return Ok(true);
        }
        if required {
            missed.extend(waited);
            self.conflict = Some(missed);
            return Err(crate::store::bad_data(
                "a claim out of order was taken: the write runs again".to_owned(),
            ));
        }
        Ok(false)
    }

    /// Whether `claim` is held (an exclusive one, by an exclusive claim).
    fn holds(&self, claim: &Claim) -> bool {
        self.claimed
            .iter()
            .any(|c| c.class == claim.class && c.hash == claim.hash && (c.shared <= claim.shared))
    }

    /// The prepared statement of `sql`, cached; `None` through a
    /// transaction pooler, where it runs unnamed.
    fn statement(&mut self, sql: &'static str) -> Result<Option<Statement>> {
        if !self.sealed && self.open && writes(sql) {
            // This statement assigns the transaction's id.
            self.sealed = true;
        }
        if self.pooler.is_some() {
            return Ok(None);
        }
        Ok(Some(self.conn.prepared(sql)?))
    }

    /// Runs a query; returns its rows.
    pub(super) fn query(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>> {
        let Some(statement) = self.statement(sql)? else {
            let pooler = self.pooler.expect("no statement without a pooler");
            return pooler.query(&mut self.conn.client, sql, params, self.open);
        };
        Ok(self.conn.client.query(&statement, params)?)
    }

    /// Runs a query that returns at most one row.
    pub(super) fn query_opt(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<Row>> {
        let Some(statement) = self.statement(sql)? else {
            let pooler = self.pooler.expect("no statement without a pooler");
            return pooler.query_opt(&mut self.conn.client, sql, params, self.open);
        };
        Ok(self.conn.client.query_opt(&statement, params)?)
    }

    /// Runs a query that returns exactly one row.
    pub(super) fn query_one(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Row> {
        let Some(statement) = self.statement(sql)? else {
            let pooler = self.pooler.expect("no statement without a pooler");
            return pooler.query_one(&mut self.conn.client, sql, params, self.open);
        };
        Ok(self.conn.client.query_one(&statement, params)?)
    }

    /// Runs a statement; returns the number of rows it changed.
    pub(super) fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64> {
        let Some(statement) = self.statement(sql)? else {
            let pooler = self.pooler.expect("no statement without a pooler");
            return pooler.execute(&mut self.conn.client, sql, params, self.open);
        };
        Ok(self.conn.client.execute(&statement, params)?)
    }
}

impl Drop for Tx<'_> {
    /// Rolls back a write transaction that did not commit, so that an error
    /// (or a panic) never leaves a pooled connection inside a transaction.
    fn drop(&mut self) {
        if self.open
            && let Err(e) = self.conn.client.batch_execute("ROLLBACK")
        {
            log::error!("runledger: rollback failed: {e}");
        }
        self.conn.used = Instant::now();
    }
}

/// A batch's round trip, for [`Tx::follow_server_clock`]: the local time
/// it went (ms, by the [`ServerClock`]'s local clock) and, once answered,
/// how long it took. Nothing without a server clock.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Sent {
    at: Option<(i64, Instant)>,
    took: Option<(i64, Duration)>,
}

impl Sent {
    fn now(clock: Option<&ServerClock>) -> Sent {
        Sent {
            at: clock.map(|clock| (clock.local.now().as_millis(), Instant::now())),
            took: None,
        }
    }

    fn answered(self) -> Sent {
        Sent {
            at: None,
            took: self.at.map(|(before, sent)| (before, sent.elapsed())),
        }
    }
}

/// The ledger's time on PostgreSQL: the database server's clock, as this
/// process follows it.
///
/// Leases and staleness compare timestamps written by processes of many
/// hosts, so they must come from one clock: the server's. Reading it in
/// every transaction would cost a round trip (or tie every timestamp to SQL),
/// so each process measures its offset to the server instead: at open, it
/// reads `clock_timestamp()` and takes the middle of the round trip as the
/// moment the server read it (an error of at most half a round trip), then
/// stamps with its own clock plus that offset. The offset is measured again
/// at every instance heartbeat, so a host's clock that is wrong by hours, or
/// stepped meanwhile, never shifts its timestamps by more than its drift
/// between two heartbeats.
///
/// A clock given to the builder ([`Builder::clock`](crate::Builder::clock),
/// tests) replaces this one: the ledger then stamps and judges with it, as
/// on SQLite.
#[derive(Debug)]
pub(crate) struct ServerClock {
    local: Arc<dyn Clock>,
    /// Server time minus local time, in ms.
    offset: AtomicI64,
}

impl ServerClock {
    fn anchored(client: &mut Client, local: Arc<dyn Clock>) -> Result<ServerClock> {
        let clock = ServerClock {
            local,
            offset: AtomicI64::new(0),
        };
        clock.measure(client)?;
        Ok(clock)
    }

    /// Measures the offset to the server's clock.
    fn measure(&self, client: &mut Client) -> Result<()> {
        let sent = Instant::now();
        let before = self.local.now().as_millis();
        // A simple query: one round trip (the middle of which is the
        // moment measured), and no prepared statement (a transaction
        // pooler keeps none; see `pooler`).
        let replies =
            client.simple_query("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")?;
        let server: i64 = replies
            .iter()
            .find_map(|reply| match reply {
                SimpleQueryMessage::Row(row) => row.get(0).and_then(|ms| ms.parse().ok()),
                _ => None,
            })
            .ok_or_else(|| {
                crate::store::bad_data("the server's clock read as no number".to_owned())
            })?;
        self.observe(before, sent.elapsed(), server);
        Ok(())
    }

    /// Takes `server` (ms) as the server's time in the middle of a round
    /// trip that began at local time `before` (ms) and took `took`.
    fn observe(&self, before: i64, took: Duration, server: i64) {
        let half = i64::try_from(took.as_millis() / 2).unwrap_or(0);
        let at = before.saturating_add(half);
        self.offset
            .store(server.saturating_sub(at), Ordering::Relaxed);
    }
}

impl Clock for ServerClock {
    fn now(&self) -> Timestamp {
        let local = self.local.now().as_millis();
        Timestamp::from_millis(local.saturating_add(self.offset.load(Ordering::Relaxed)))
    }
}

/// Bounds, by about the busy timeout (10 s at least), how long TCP keeps a
/// connection to a server that stopped answering without closing it (a
/// link down, a host gone): unacknowledged data is given up after that
/// time (`tcp_user_timeout`), and an idle connection (a call waiting for a
/// reply) is probed after a quarter of it (keepalives). The floor keeps a
/// lossy link's retransmissions from cutting connections that are fine. Both are the
/// kernel's, so they cost nothing while the server answers. Settings the
/// URL gives (`tcp_user_timeout`, `keepalives_idle`, …) are kept.
fn dead_link_timeouts(pg: &mut Config, busy_timeout: Duration) {
    let busy_timeout = busy_timeout.max(Duration::from_secs(10));
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(busy_timeout);
    }
    // tokio-postgres' own default, two hours, means the URL left it alone.
    if pg.get_keepalives() && pg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        pg.keepalives_idle((busy_timeout / 4).max(Duration::from_secs(1)));
        if pg.get_keepalives_interval().is_none() {
            pg.keepalives_interval((busy_timeout / 8).max(Duration::from_secs(1)));
        }
        if pg.get_keepalives_retries().is_none() {
            pg.keepalives_retries(3);
        }
    }
}

/// Connects to the server of `pg`, failing if it has not answered within
/// `limit` (the busy timeout).
///
/// The driver bounds only the TCP connect (`connect_timeout`), not the
/// start-up exchange that follows, which waits as long as TCP keeps the
/// connection: a link that dies between the two would hold
/// [`Ledger::open`](crate::Ledger::open) for minutes. The connect runs on a
/// thread of its own; one that answers too late is dropped by that thread.
///
/// A server that is starting up or shutting down (SQLSTATE 57P03, as
/// during a restart) is asked again until `limit`. A refused connection
/// (no server there) fails at once, with its cause: waiting would only
/// delay the error of a wrong address.
fn connect_within(
    pg: &Config,
    tls: &MakeRustlsConnect,
    limit: Duration,
) -> std::result::Result<Client, ConnectError> {
    let started = Instant::now();
    loop {
        let (send, answer) = std::sync::mpsc::channel();
        let (config, connector) = (pg.clone(), tls.clone());
        std::thread::Builder::new()
            .name("runledger-connect".into())
            .spawn(move || {
                let _ = send.send(config.connect(connector));
            })
            .map_err(ConnectError::Thread)?;
        let left = limit.saturating_sub(started.elapsed());
        match answer.recv_timeout(left.max(Duration::from_millis(100))) {
            Ok(Err(e))
                if e.code() == Some(&postgres::error::SqlState::CANNOT_CONNECT_NOW)
                    && started.elapsed() < limit =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(answer) => return answer.map_err(ConnectError::Server),
            Err(_) => return Err(ConnectError::NoAnswer(limit)),
        }
    }
}

/// Why [`connect_within`] failed.
#[derive(Debug)]
enum ConnectError {
    /// The driver's error: the server's words, or the cause.
    Server(postgres::Error),
    /// The server did not answer in time.
    NoAnswer(Duration),
    /// No thread could be started to connect.
    Thread(std::io::Error),
}

impl From<ConnectError> for StorageError {
    fn from(e: ConnectError) -> StorageError {
        match e {
            ConnectError::Server(e) => StorageError::postgres(e),
            ConnectError::NoAnswer(limit) => StorageError::other(&format!(
                "the server did not answer within {limit:?} (the busy timeout)"
            )),
            ConnectError::Thread(e) => {
                StorageError::other(&format!("cannot start a thread to connect: {e}"))
            }
        }
    }
}

/// Whether a statement may write (and so assign its transaction's id): any
/// but a plain `SELECT`. A `SELECT` of a function that writes would be
/// missed: the schema's functions (migration 10) are called through
/// [`Tx::call`], which says whether they write, or with `BEGIN`, after
/// the claims.
fn writes(sql: &str) -> bool {
    let sql = sql.trim_start();
    let head = |word: &str| sql.len() >= word.len() && sql[..word.len()].eq_ignore_ascii_case(word);
    if head("SELECT") {
        return false;
    }
    if head("WITH") {
        let upper = sql.to_ascii_uppercase();
        return ["INSERT ", "UPDATE ", "DELETE "]
            .iter()
            .any(|w| upper.contains(w));
    }
    true
}

/// Whether an error means the connection is gone (closed, or being closed by
/// the server: SQLSTATE classes 08 and 57P), rather than that the statement
/// failed.
fn lost(e: &postgres::Error) -> bool {
    e.is_closed()
        // The connection broke under a statement (reset, refused, EOF).
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        || e.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57P")
        })
}

/// Why one try of a write failed: its connection was lost (nothing was
/// committed: try again), or anything else.
enum Failed {
    Lost(Error),
    /// Claims to take first next time (none, after a deadlock the server
    /// broke).
    Conflict(Vec<Claim>),
    Other(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        if lost_in(&e) {
            Failed::Lost(e)
        } else if deadlocked_in(&e) {
            Failed::Conflict(Vec::new())
        } else {
            Failed::Other(e)
        }
    }
}

/// Whether an error is the server breaking a deadlock (or a serialization
/// failure): the transaction was rolled back, and may simply run again.
fn deadlocked_in(e: &Error) -> bool {
    match e {
        Error::Storage { source, .. } | Error::Busy { source, .. } => {
            std::error::Error::source(source)
                .and_then(|s| s.downcast_ref::<postgres::Error>())
                .and_then(|e| e.code())
                .is_some_and(|code| matches!(code.code(), "40P01" | "40001"))
        }
        _ => false,
    }
}

/// [`lost`], for an error already wrapped in the crate's.
fn lost_in(e: &Error) -> bool {
    match e {
        Error::Storage { source, .. } | Error::Busy { source, .. } => {
            std::error::Error::source(source)
                .and_then(|s| s.downcast_ref::<postgres::Error>())
                .is_some_and(lost)
        }
        _ => false,
    }
}

/// Checks a schema name: PostgreSQL identifiers are at most 63 bytes, and
/// the wake-up channel adds a prefix; plain lower-case names need no
/// quoting anywhere (psql, other tools).
pub(crate) fn check_schema(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
        && !name.starts_with("pg_");
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            "schema name",
            name,
            "use 1 to 48 lower-case ASCII letters, digits and underscores, \
             not starting with a digit or pg_",
        ))
    }
}

/// The rows of a simple query's batch, statement by statement (each one
/// ends with its `CommandComplete`, rows or not).
fn by_statement(replies: Vec<SimpleQueryMessage>) -> Vec<Vec<SimpleQueryRow>> {
    let mut statements = Vec::new();
    let mut rows = Vec::new();
    for reply in replies {
        match reply {
            SimpleQueryMessage::Row(row) => rows.push(row),
            SimpleQueryMessage::CommandComplete(_) => statements.push(std::mem::take(&mut rows)),
            _ => {}
        }
    }
    statements
}

/// A call of a function of the schema, run with its values in a simple
/// query's batch (see [`Store::write_first`], [`Store::write_alone`]): the
/// function's statements are planned once per connection, and it needs no
/// `PREPARE`, so it runs through a transaction pooler too.
pub(super) struct First {
    /// `SELECT * FROM function(values…)`, cut where [`Lit::Now`] goes.
    execute: Vec<String>,
}

/// `SELECT * FROM function($1, …, $n)`, for a function of the schema
/// called with `n` values ([`Store::write_alone`]); made once per function
/// and process (a function is always called with as many), to be
/// prepared once per connection.
fn call_sql(function: &'static str, n: usize) -> &'static str {
    static MADE: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let mut made = MADE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    made.entry(function).or_insert_with(|| {
        let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        Box::leak(format!("SELECT * FROM {function}({})", params.join(", ")).into_boxed_str())
    })
}

/// The row a function of the schema answered ([`Store::write_alone`]),
/// its values as text: as the server sends them to a simple query, and so
/// alike whichever way the call was sent.
pub(super) struct Answer(Vec<Option<String>>);

impl Answer {
    /// A row of a simple query.
    fn of_text(row: &SimpleQueryRow) -> Answer {
        Answer(
            (0..row.len())
                .map(|i| row.get(i).map(str::to_owned))
                .collect(),
        )
    }

    /// A row of a prepared statement: its integers, booleans and texts
    /// (the types of the schema's functions' answers) as text.
    fn of_row(row: &Row) -> Result<Answer> {
        let mut values = Vec::with_capacity(row.len());
        for (i, column) in row.columns().iter().enumerate() {
            values.push(match *column.type_() {
                postgres::types::Type::INT8 => {
                    row.try_get::<_, Option<i64>>(i)?.map(|n| n.to_string())
                }
                postgres::types::Type::BOOL => row
                    .try_get::<_, Option<bool>>(i)?
                    .map(|b| if b { "t" } else { "f" }.to_owned()),
                _ => row.try_get::<_, Option<String>>(i)?,
            });
        }
        Ok(Answer(values))
    }

    /// The value of column `i`, `None` if NULL (or past the last).
    pub(super) fn get(&self, i: usize) -> Option<&str> {
        self.0.get(i).and_then(Option::as_deref)
    }

    /// How many columns.
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl First {
    /// A call of `function`, one of the schema's (see migrations 10 and 11), with
    /// `values`: `SELECT * FROM function(values…)`, its rows those of
    /// the function's `OUT` parameters.
    pub(super) fn call(function: &'static str, values: &[Lit<'_>]) -> Result<First> {
        Ok(First {
            execute: First::parts(&format!("SELECT * FROM {function}("), values)?,
        })
    }

    /// `head` and `values`, comma-separated, then `)`: cut where each
    /// [`Lit::Now`] goes.
    fn parts(head: &str, values: &[Lit<'_>]) -> Result<Vec<String>> {
        let mut execute = vec![head.to_owned()];
        for (i, value) in values.iter().enumerate() {
            let part = execute.last_mut().expect("one part at least");
            if i > 0 {
                part.push_str(", ");
            }
            match value {
                Lit::Now => execute.push(String::new()),
                value => value.write_sql(part)?,
            }
        }
        if let Some(part) = execute.last_mut() {
            part.push(')');
        }
        Ok(execute)
    }

    /// The call, with `now` for each [`Lit::Now`].
    fn execute(&self, now: Timestamp) -> String {
        let mut at = String::new();
        // An integer always renders.
        let _ = Lit::Int(now.as_millis()).write_sql(&mut at);
        self.execute.join(&at)
    }
}

/// A value of a statement sent as text ([`First`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Lit<'a> {
    Int(i64),
    Bool(bool),
    Text(&'a str),
    Texts(&'a [String]),
    Ints(&'a [i64]),
    Bools(&'a [bool]),
    Null,
    /// The ledger's time, in ms, read when the statement is sent (after
    /// the wait for a pooled connection, the last thing before the
    /// batch), and read again for each try of the write.
    Now,
}

impl From<i64> for Lit<'_> {
    fn from(n: i64) -> Self {
        Lit::Int(n)
    }
}

impl<'a> From<&'a str> for Lit<'a> {
    fn from(text: &'a str) -> Self {
        Lit::Text(text)
    }
}

impl<'a, T: Into<Lit<'a>>> From<Option<T>> for Lit<'a> {
    fn from(value: Option<T>) -> Self {
        value.map_or(Lit::Null, Into::into)
    }
}

impl<'a> Lit<'a> {
    /// The value bound to a parameter of type `ty` of a prepared
    /// statement, `now` for [`Lit::Now`]. A NULL takes the parameter's
    /// type, as a literal `NULL` would, for the types the schema's
    /// functions take NULL as (`bigint`, `boolean`, `text`); a NULL for a
    /// parameter of another type fails at bind time.
    fn param(&self, ty: &postgres::types::Type, now: Timestamp) -> Box<dyn ToSql + Sync + 'a> {
        use postgres::types::Type;
        match *self {
            Lit::Int(n) => Box::new(n),
            Lit::Bool(b) => Box::new(b),
            Lit::Text(text) => Box::new(text),
            Lit::Texts(texts) => Box::new(texts),
            Lit::Ints(ints) => Box::new(ints),
            Lit::Bools(bools) => Box::new(bools),
            Lit::Null => match *ty {
                Type::INT8 => Box::new(None::<i64>),
                Type::BOOL => Box::new(None::<bool>),
                _ => Box::new(None::<&str>),
            },
            Lit::Now => Box::new(now.as_millis()),
        }
    }
}

impl Lit<'_> {
    /// `head`, then `values` as SQL text, comma-separated, then `)`: a
    /// call with every value known ([`Lit::Now`] is refused).
    fn call(head: &str, values: &[Lit<'_>]) -> Result<String> {
        let mut sql = head.to_owned();
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            value.write_sql(&mut sql)?;
        }
        sql.push(')');
        Ok(sql)
    }

    /// Writes the value as SQL text.
    ///
    /// Strings become escape-string literals (`E'…'`, quotes and
    /// backslashes doubled), whatever the server's
    /// `standard_conforming_strings`; a NUL, which a query's text cannot
    /// carry, is refused (names and keys never hold one: they are checked
    /// for control characters first). A negative number is put in
    /// parentheses, so that a cast after it cannot overflow.
    fn write_sql(&self, out: &mut String) -> Result<()> {
        fn text(out: &mut String, value: &str) -> Result<()> {
            if value.contains('\0') {
                return Err(crate::store::bad_data(
                    "a NUL in a value sent as text".to_owned(),
                ));
            }
            out.push_str("E'");
            for c in value.chars() {
                match c {
                    '\'' => out.push_str("''"),
                    '\\' => out.push_str("\\\\"),
                    c => out.push(c),
                }
            }
            out.push('\'');
            Ok(())
        }
        match self {
            Lit::Int(v) if *v < 0 => out.push_str(&format!("({v})")),
            Lit::Int(v) => out.push_str(&v.to_string()),
            Lit::Bool(v) => out.push_str(if *v { "true" } else { "false" }),
            Lit::Null => out.push_str("NULL"),
            Lit::Now => {
                return Err(crate::store::bad_data(
                    "the time of a statement is put in when it is sent".to_owned(),
                ));
            }
            Lit::Text(v) => text(out, v)?,
            Lit::Texts(vs) => {
                out.push_str("ARRAY[");
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    text(out, v)?;
                }
                out.push_str("]::text[]");
            }
            Lit::Ints(vs) => {
                out.push_str("ARRAY[");
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    Lit::Int(*v).write_sql(out)?;
                }
                out.push_str("]::bigint[]");
            }
            Lit::Bools(vs) => {
                out.push_str("ARRAY[");
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    Lit::Bool(*v).write_sql(out)?;
                }
                out.push_str("]::boolean[]");
            }
        }
        Ok(())
    }
}

/// `text` as a SQL string literal (with `standard_conforming_strings`, on
/// since PostgreSQL 9.1: only quotes are doubled).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The channel of a schema's wake-ups.
fn channel_of(schema: &str) -> String {
    format!("runledger_wake_{schema}")
}

/// Something a write transaction claims before it reads its state and
/// changes it: an advisory lock of the transaction, exclusive unless
/// `shared` (see the module docs).
///
/// Claims sort by class (instances, idempotency keys, runs, lock keys),
/// then by hash: the one order in which every transaction takes them. The
/// hash of a claim is that of its class, its value and the schema, so that
/// two ledgers in one database never wait for each other. Two values of
/// equal hashes (one pair in 2^64) only make their writers take turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Claim {
    class: u8,
    hash: u64,
    shared: bool,
}

impl Claim {
    /// The instance `id`: shared by its own writes that need it open,
    /// exclusive for the reaper that closes it.
    pub(super) fn instance(id: i64, shared: bool) -> Claim {
        Claim::of(0, &id.to_le_bytes(), shared)
    }

    /// An idempotency key, for the check of its window and the insert.
    pub(super) fn idempotency(key: &str) -> Claim {
        Claim::of(1, key.as_bytes(), false)
    }

    /// A run: exclusive for any change of the run, shared for a lock
    /// request made for it (which must not outlive its run).
    pub(super) fn run(id: crate::run::RunId, shared: bool) -> Claim {
        Claim::of(2, &i64::from(id).to_le_bytes(), shared)
    }

    /// A lock key, for any change of its holders or its queue.
    pub(super) fn key(key: &str) -> Claim {
        Claim::of(3, key.as_bytes(), false)
    }

    fn of(class: u8, value: &[u8], shared: bool) -> Claim {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in [class].iter().chain(value) {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Claim {
            class,
            hash,
            shared,
        }
    }

    /// Its advisory lock key in the schema of `seed`.
    fn key_in(&self, seed: u64) -> i64 {
        i64::from_ne_bytes((self.hash ^ seed).to_ne_bytes())
    }

    /// The statement that takes it in the schema of `seed`; with `try_only`
    /// one that answers `t` or `f` at once.
    fn sql(&self, seed: u64, try_only: bool) -> String {
        let key = self.key_in(seed);
        let function = match (try_only, self.shared) {
            (false, false) => "pg_advisory_xact_lock",
            (false, true) => "pg_advisory_xact_lock_shared",
            (true, false) => "pg_try_advisory_xact_lock",
            (true, true) => "pg_try_advisory_xact_lock_shared",
        };
        format!("SELECT {function}({key});")
    }
}

/// What makes a schema's [`Claim`]s its own.
fn claim_seed(schema: &str) -> u64 {
    u64::from_ne_bytes(advisory_key("runledger claims", schema).to_ne_bytes())
}

/// A 64-bit advisory lock key for `what` in `schema` (FNV-1a).
fn advisory_key(what: &str, schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in what.bytes().chain([0]).chain(schema.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// How a ledger on PostgreSQL is named: `postgres://user@host:port/db`,
/// without the password (or any other option); [`Location`] adds
/// `#schema`. A URL that [`Ledger::builder`](crate::Ledger::builder) opens
/// again: a Unix socket's folder and an IPv6 address are written as a URL
/// needs them, and every host of a multi-host configuration is kept.
fn display_url(config: &Config) -> String {
    use postgres::config::Host;
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(host) if host.contains(':') => format!("[{host}]"),
                Host::Tcp(host) => host.clone(),
                #[cfg(unix)]
                Host::Unix(path) => percent_encode(&path.to_string_lossy()),
            };
            // One port for all hosts, or one each; PostgreSQL's own default
            // written out, so that one ledger has one name.
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(",")
    };
    let user = config.get_user().map(percent_encode).unwrap_or_default();
    let at = if user.is_empty() { "" } else { "@" };
    let db = config.get_dbname().or(config.get_user()).unwrap_or("");
    format!("postgres://{user}{at}{hosts}/{}", percent_encode(db))
}

/// `text` with everything but unreserved URL characters percent-encoded.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A location that did not parse, with anything that may be a password cut:
/// the user information of a URL, the value of `password=` in a key=value
/// string.
fn redacted(url: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let url = match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://…{}", &url[..scheme], &url[at..])
            }
            _ => url.to_owned(),
        };
        // A password may come as a parameter too: `?password=…`.
        return match url.split_once('?') {
            Some((base, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                            format!("{key}=…")
                        }
                        _ => pair.to_owned(),
                    })
                    .collect();
                format!("{base}?{}", query.join("&"))
            }
            None => url,
        };
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=…"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres::fallible_iterator::FallibleIterator;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["runledger", "app_2", "_x", &"a".repeat(48)] {
            check_schema(good).unwrap();
        }
        for bad in [
            "",
            "Runledger",
            "2nd",
            "a-b",
            "a b",
            "pg_x",
            "x\"y",
            &"a".repeat(49),
        ] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_never_show_a_password() {
        let config = Config::from_str("postgres://me:secret@db.example:6543/app").unwrap();
        let name = display_url(&config);
        assert_eq!(name, "postgres://me@db.example:6543/app");
        assert!(!redacted("postgres://me:secret@db.example/app").contains("secret"));
        assert_eq!(
            redacted("postgres://me@db.example/app?sslmode=require&password=secret&x=1#s"),
            "postgres://…@db.example/app?sslmode=require&password=…&x=1#s"
        );
        assert!(!redacted("host=db password=se#cret user=me").contains("cret"));
        let socket = Config::from_str("host=/var/run/postgresql user=me dbname=app").unwrap();
        assert_eq!(
            display_url(&socket),
            "postgres://me@%2Fvar%2Frun%2Fpostgresql:5432/app"
        );
        let v6 = Config::from_str("postgres://me@[::1]:6543/app").unwrap();
        assert_eq!(display_url(&v6), "postgres://me@[::1]:6543/app");
    }

    #[test]
    fn values_a_query_cannot_carry_are_refused() {
        assert!(First::call("x", &[Lit::Text("a\0b")]).is_err());
        assert!(First::call("x", &[Lit::Texts(&["\0".to_owned()])]).is_err());
        let first = First::call(
            "x",
            &[
                Lit::Int(-7),
                Lit::Null,
                Lit::Now,
                Lit::Texts(&[]),
                Lit::Ints(&[1, -2]),
                Lit::Bools(&[true, false]),
            ],
        )
        .unwrap();
        assert_eq!(
            first.execute(Timestamp::from_millis(42)),
            "SELECT * FROM x((-7), NULL, 42, ARRAY[]::text[], ARRAY[1,(-2)]::bigint[], \
             ARRAY[true,false]::boolean[])"
        );
    }

    /// Values sent as text reach the server as they were, whatever they
    /// hold (quotes, backslashes, a `$1` of their own), on a connection
    /// with `standard_conforming_strings` on and one with it off.
    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn values_sent_as_text_reach_the_server_unchanged() {
        let schema = TestSchema::new("literals");
        let mut client = schema.client();
        let tricky = [
            "plain",
            "it's",
            "back\\slash \\' end\\",
            "$1 and $2",
            "E'x'",
            "ünï — 🦀",
            "",
        ];
        let list: Vec<String> = tricky.iter().map(|s| (*s).to_owned()).collect();
        // The functions live in the test's own schema: in `public` they
        // would outlive the test and clash with the next run's.
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {0};
                 SET search_path = {0};
                 CREATE FUNCTION one(text, bigint, bigint, bigint[], boolean[])
                     RETURNS TABLE (t text, n bigint, null_given boolean, ns text, bs text)
                     LANGUAGE sql AS 'SELECT $1, $2, $3 IS NULL, $4::text, $5::text';
                 CREATE FUNCTION many(text[], text[]) RETURNS TABLE (t text, n integer)
                     LANGUAGE sql AS 'SELECT unnest($1), cardinality($2)';",
                schema.name
            ))
            .unwrap();
        for setting in ["on", "off"] {
            client
                .batch_execute(&format!("SET standard_conforming_strings = {setting}"))
                .unwrap();
            for value in tricky {
                let first = First::call(
                    "one",
                    &[
                        Lit::Text(value),
                        Lit::Int(i64::MIN),
                        Lit::Null,
                        Lit::Ints(&[i64::MIN, 0, 7]),
                        Lit::Bools(&[false, true]),
                    ],
                )
                .unwrap();
                let rows = by_statement(
                    client
                        .simple_query(&first.execute(Timestamp::from_millis(0)))
                        .unwrap(),
                );
                let row = &rows[0][0];
                assert_eq!(row.get(0), Some(value), "{setting}: {:?}", first.execute);
                assert_eq!(row.get(1), Some(i64::MIN.to_string().as_str()));
                assert_eq!(row.get(2), Some("t"));
                assert_eq!(row.get(3), Some(format!("{{{},0,7}}", i64::MIN).as_str()));
                assert_eq!(row.get(4), Some("{f,t}"));
            }
            let first = First::call("many", &[Lit::Texts(&list), Lit::Texts(&[])]).unwrap();
            let rows = by_statement(
                client
                    .simple_query(&first.execute(Timestamp::from_millis(0)))
                    .unwrap(),
            );
            let got: Vec<&str> = rows[0].iter().filter_map(|r| r.get(0)).collect();
            assert_eq!(got, tricky, "{setting}");
            assert_eq!(rows[0][0].get(1), Some("0"));
        }
    }

    /// The lock calls of one statement (`runledger_grant_alone`,
    /// `runledger_release_alone`) start with `runledger_claim_alone`, which
    /// gives way, so that the call goes statement by statement, in a
    /// transaction at a level other than read committed: their rules need
    /// each statement to see what committed before it. (The ledger's
    /// connections set read committed as they open; this is the guard
    /// should one not.)
    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn a_lock_call_of_one_statement_gives_way_at_another_isolation_level() {
        let schema = TestSchema::new("isolation");
        drop(schema.store());
        let mut client = schema.client();
        let call = format!(
            "SELECT {}.runledger_claim_alone(ARRAY[7]::bigint[], ARRAY[false], 1000)",
            quote_ident(&schema.name)
        );
        let mut at = |level: &str| -> bool {
            client
                .batch_execute(&format!("BEGIN ISOLATION LEVEL {level}"))
                .unwrap();
            let went_on: bool = client.query_one(call.as_str(), &[]).unwrap().get(0);
            client.batch_execute("ROLLBACK").unwrap();
            went_on
        };
        for level in ["REPEATABLE READ", "SERIALIZABLE"] {
            assert!(!at(level), "{level}");
        }
        // Its claims taken within a millisecond of the call's arrival,
        // which a busy machine may miss now and then.
        assert!((0..20).any(|_| at("READ COMMITTED")));
    }

    /// A function that turns sequential scans off also turns JIT off: a
    /// scan with no index to use (the watchers' count, in a function it
    /// calls) is otherwise priced past `jit_above_cost` and compiled at
    /// each call, tens of milliseconds for a lock call of a millisecond.
    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn no_function_that_prefers_indexes_compiles_its_statements() {
        let schema = TestSchema::new("settings");
        drop(schema.store());
        let rows = schema
            .client()
            .query(
                "SELECT p.proname::text, 'jit=off' = ANY(p.proconfig)
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = $1 AND 'enable_seqscan=off' = ANY(p.proconfig)",
                &[&schema.name],
            )
            .unwrap();
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert!(
            names.iter().any(|n| n == "runledger_grant_alone"),
            "{names:?}"
        );
        let compiled: Vec<&String> = rows
            .iter()
            .zip(&names)
            .filter(|(r, _)| !r.get::<_, bool>(1))
            .map(|(_, n)| n)
            .collect();
        assert!(compiled.is_empty(), "JIT left on in {compiled:?}");
    }

    /// A schema of the test server (`RUNLEDGER_PG_URL`), dropped on drop.
    pub(super) struct TestSchema {
        pub(super) url: String,
        pub(super) name: String,
    }

    impl TestSchema {
        pub(super) fn new(tag: &str) -> TestSchema {
            let url = std::env::var("RUNLEDGER_PG_URL").expect("RUNLEDGER_PG_URL");
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!("unit_{tag}_{}_{nanos:x}", std::process::id());
            TestSchema { url, name }
        }

        pub(super) fn store(&self) -> Store {
            let config = StoreConfig {
                synchronous: "NORMAL",
                busy_timeout: Duration::from_secs(5),
                pool_size: 2,
                group_commit: false,
                create: true,
            };
            Store::open(
                &self.url,
                &self.name,
                &config,
                Arc::new(crate::clock::SystemClock),
                true,
                &Route::default(),
            )
            .unwrap()
        }

        pub(super) fn client(&self) -> Client {
            Config::from_str(&self.url)
                .unwrap()
                .connect(postgres::NoTls)
                .unwrap()
        }
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            if let Ok(mut client) = Config::from_str(&self.url)
                .unwrap()
                .connect(postgres::NoTls)
            {
                let _ =
                    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
            }
        }
    }

    /// The payloads a listening client heard, until 2 s of silence.
    fn payloads_heard(listener: &mut Client) -> Vec<String> {
        let mut heard = Vec::new();
        let mut notifications = listener.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_secs(2));
        while let Ok(Some(note)) = iter.next() {
            heard.push(note.payload().to_owned());
        }
        heard
    }

    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn wake_ups_are_notified_on_commit_only() {
        let schema = TestSchema::new("notify");
        let store = schema.store();
        let mut listener = schema.client();
        listener
            .batch_execute(&format!("LISTEN \"{}\"", channel_of(&schema.name)))
            .unwrap();
        let failed: Result<()> = store.write(&[], |tx| {
            tx.wake(&["runledger/rolled-back".to_owned()]);
            Err(Error::invalid("test", "x", "rolled back"))
        });
        assert!(failed.is_err());
        store
            .write(&[], |tx| {
                tx.wake(&["runledger/a".to_owned(), "runledger/b".to_owned()]);
                Ok(())
            })
            .unwrap();
        let heard = payloads_heard(&mut listener);
        assert_eq!(heard.len(), 1, "{heard:?}");
        assert!(
            heard[0].ends_with("\nrunledger/a\nrunledger/b"),
            "{heard:?}"
        );
    }

    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn every_watcher_is_notified_in_payloads_under_the_limit() {
        let schema = TestSchema::new("watchers");
        let store = schema.store();
        let mut listener = schema.client();
        listener
            .batch_execute(&format!("LISTEN \"{}\"", channel_of(&schema.name)))
            .unwrap();
        let add = |from: i64, to: i64| {
            store
                .write(&[], |tx| {
                    for i in from..to {
                        let address = format!("runledger/{}/{}/{i}", u32::MAX, u64::MAX);
                        tx.execute(
                            "INSERT INTO watchers (instance_id, address) VALUES (1, $1)",
                            &[&address],
                        )?;
                    }
                    Ok(())
                })
                .unwrap();
        };
        let heard = |listener: &mut Client| {
            store
                .write(&[], |tx| {
                    tx.events_written();
                    Ok(())
                })
                .unwrap();
            payloads_heard(listener)
        };
        // A few: one notification, with the commit.
        add(0, 5);
        let few = heard(&mut listener);
        assert_eq!(few.len(), 1, "{few:?}");
        assert_eq!(few[0].lines().count(), 6);
        // More than one payload holds: every one, in payloads under the
        // limit.
        add(5, 250);
        let many = heard(&mut listener);
        assert!(many.len() >= 2, "{many:?}");
        assert!(many.iter().all(|p| p.len() < 8000));
        let addresses: usize = many.iter().map(|p| p.lines().count() - 1).sum();
        assert_eq!(addresses, 250);
    }

    #[cfg(target_os = "linux")]
    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn the_listener_wakes_this_hosts_waiters_named_by_other_processes() {
        let schema = TestSchema::new("listen");
        let _store = schema.store();
        let socket = crate::wake::WakeSocket::bind().unwrap();
        let mut other = schema.client();
        // Another process's origin: the listener wakes its addresses.
        let payload = format!("someone-else\n{}", socket.address());
        other
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&channel_of(&schema.name), &payload],
            )
            .unwrap();
        assert!(socket.wait(Duration::from_secs(5)), "never woken");
        // This process's own notifications are left alone: the writer woke
        // them itself.
        let own = listen::payloads(&[socket.address().to_owned()]);
        other
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&channel_of(&schema.name), &own[0]],
            )
            .unwrap();
        assert!(!socket.wait(Duration::from_millis(500)), "woken by our own");
    }

    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn a_host_clock_hours_off_still_stamps_the_servers_time() {
        let schema = TestSchema::new("clock");
        let mut client = schema.client();
        let server_now = |client: &mut Client| -> i64 {
            client
                .query_one(
                    "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                    &[],
                )
                .unwrap()
                .get(0)
        };
        // This host's clock is an hour fast.
        let local = crate::clock::ManualClock::new(Timestamp::from_millis(
            crate::clock::SystemClock.now().as_millis() + 3_600_000,
        ));
        let clock = ServerClock::anchored(&mut client, Arc::new(local.clone())).unwrap();
        let off = clock.now().as_millis() - server_now(&mut client);
        assert!(off.abs() < 2_000, "{off} ms from the server's clock");
        // Its time moves as the local clock moves...
        local.advance(Duration::from_secs(10));
        let moved = clock.now().as_millis() - server_now(&mut client);
        assert!((moved - 10_000).abs() < 2_000, "{moved}");
        // ... until the next measure (every heartbeat) brings it back.
        clock.measure(&mut client).unwrap();
        let back = clock.now().as_millis() - server_now(&mut client);
        assert!(back.abs() < 2_000, "{back} ms from the server's clock");
    }

    /// A prepared statement met twice (or missing), as through a
    /// transaction pooler without the setting: the error says what to do.
    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn a_prepared_statement_error_names_the_pooler_setting() {
        let schema = TestSchema::new("prepared_hint");
        let mut client = schema.client();
        let e = client
            .batch_execute("PREPARE twice AS SELECT 1; PREPARE twice AS SELECT 1")
            .unwrap_err();
        let e = Error::from(e);
        let text = std::error::Error::source(&e).map(ToString::to_string);
        let text = text.unwrap_or_default();
        assert!(text.contains("42P05"), "{text}");
        assert!(text.contains("transaction_pooler(true)"), "{text}");
    }

    #[test]
    fn claims_differ_by_schema_and_sort_by_class() {
        assert_ne!(claim_seed("a"), claim_seed("b"));
        assert_eq!(claim_seed("a"), claim_seed("a"));
        let a = Claim::key("a").sql(claim_seed("s"), false);
        assert_ne!(a, Claim::key("a").sql(claim_seed("t"), false));
        assert_ne!(a, Claim::key("b").sql(claim_seed("s"), false));
        let run = Claim::run(crate::run::RunId::from(1), false);
        assert!(Claim::instance(1, true) < Claim::idempotency("k"));
        assert!(Claim::idempotency("k") < run);
        assert!(run < Claim::key("a"));
        assert!(
            Claim::run(crate::run::RunId::from(1), true)
                .sql(0, true)
                .contains("try")
        );
    }
}
