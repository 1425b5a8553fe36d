//! Through a transaction pooler: PgBouncer in `pool_mode = transaction`
//! (or any pooler that hands a server connection to a client for one
//! transaction at a time), set with
//! [`Builder::transaction_pooler`](crate::Builder::transaction_pooler).
//!
//! Between two transactions of one client connection, the pooler may give
//! its server connection to another client, and give it another one. So in
//! this mode the store relies on nothing that outlives a transaction:
//!
//! - **No session settings.** A direct connection sets `search_path` once,
//!   when it opens; here every transaction sets it with `SET LOCAL`
//!   instead, in the batch that begins it (a write's `BEGIN` batch already
//!   is one round trip: no extra one). A `SET` of the session would both
//!   be lost for this client and leak to the pooler's other clients
//!   (another ledger's schema, another application).
//! - **Reads are transactions too**, for that `SET LOCAL`: a read begins
//!   with one batch (`BEGIN`, `SET LOCAL search_path`) and ends with a
//!   `COMMIT`, two round trips more than on a direct connection, where a
//!   read runs outside any transaction. Each statement still sees what was
//!   committed when it started (`READ COMMITTED`), as outside one.
//! - **No named prepared statements.** PgBouncer before 1.21 does not
//!   follow protocol-level prepared statements, nor does a later one with
//!   `max_prepared_statements = 0`, a setting the ledger cannot see from
//!   its side (and tokio-postgres names them `s0`, `s1`, … per process, so
//!   two processes sharing a server connection would meet). Every statement
//!   runs unnamed instead (`Parse`, `Bind`, `Execute` and `Sync` in one
//!   message, the extended protocol's one-shot form, which every pooler
//!   supports): one round trip, as a cached prepared statement costs, but
//!   parsed and planned by the server each time. Unnamed statements need
//!   their parameters' types; this module learns them once per process
//!   and statement, in one round trip inside a transaction: a SQL
//!   `PREPARE` under a name of this process's own, its types read back
//!   from `pg_prepared_statements`, and its `DEALLOCATE`, in one batch, so
//!   the name never outlives the transaction on the server connection,
//!   and no other client can meet it. The store's statements only use
//!   built-in types, so no type lookup (tokio-postgres' own `typeinfo`
//!   statement, cached per client) is ever prepared.
//! - **Advisory locks of transactions only.** Claims already are
//!   (`pg_advisory_xact_lock`), and so is the migrations' lock at open
//!   (`schema::prepare`), in both modes: a session lock taken through the
//!   pooler would stay with a server connection another client gets next.
//!   Event ids use a setting local to the transaction (migration 7).
//! - **`LISTEN` needs a session.** A pooler cannot forward notifications
//!   to a client that holds no server connection, so the store listens
//!   only over a direct connection, given with
//!   [`Builder::listen_url`](crate::Builder::listen_url). Without one it
//!   does not listen at all: waiters of other hosts fall back to their
//!   timed re-read (see [`Builder::transaction_pooler`]
//!   (crate::Builder::transaction_pooler) for the latency). `NOTIFY`
//!   (`pg_notify`, sent inside the writing transaction) goes through the
//!   pooler like any statement.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use postgres::types::{ToSql, Type};
use postgres::{Client, Row, SimpleQueryMessage};

use super::{Params, quote_ident};
use crate::error::Result;

/// The parameters' types of each statement (see [`Pooler::types`]).
type ParamTypes = HashMap<&'static str, Arc<[Type]>>;

/// How a ledger on PostgreSQL reaches its server, beside its URL: what the
/// builder was told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Route {
    /// The URL goes through a transaction pooler (see the module docs).
    pub transaction_pooler: bool,
    /// Where the listening connection goes, if not to the URL: a direct
    /// connection to the same server.
    pub listen_url: Option<String>,
}

/// The store's way through a transaction pooler: the `SET LOCAL` of its
/// schema, and the unnamed statements.
#[derive(Debug)]
pub(super) struct Pooler {
    /// `SET LOCAL search_path TO "schema";`
    set_local: String,
}

impl Pooler {
    pub(super) fn new(schema: &str) -> Pooler {
        Pooler {
            set_local: format!("SET LOCAL search_path TO {};", quote_ident(schema)),
        }
    }

    /// What every transaction's first batch adds, after its `BEGIN`.
    pub(super) fn set_local(&self) -> &str {
        &self.set_local
    }

    /// Begins the transaction of a read (one round trip).
    pub(super) fn begin_read(&self, client: &mut Client) -> Result<()> {
        client.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; {}",
            self.set_local
        ))?;
        Ok(())
    }

    /// Ends the transaction of a read (one round trip).
    pub(super) fn end_read(client: &mut Client) -> Result<()> {
        client.batch_execute("COMMIT")?;
        Ok(())
    }

    /// The types of the parameters of `sql`, learned once per process (see
    /// the module docs), in one round trip: a `PREPARE` of a name of this
    /// process's own (never one of tokio-postgres', which another client
    /// may have left on the server connection), its types read from
    /// `pg_prepared_statements`, and its `DEALLOCATE`, in one batch inside
    /// a transaction, so that the name never outlives it.
    /// `in_transaction` says whether the client is inside a transaction of
    /// the store (whose `SET LOCAL` names the schema); else the batch is
    /// one of its own.
    fn types(
        &self,
        client: &mut Client,
        sql: &'static str,
        in_transaction: bool,
    ) -> Result<Arc<[Type]>> {
        static TYPES: OnceLock<Mutex<ParamTypes>> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let types = TYPES.get_or_init(Mutex::default);
        if let Some(known) = types.lock().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return Ok(known.clone());
        }
        let name = format!(
            "runledger_types_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let probe = format!(
            "PREPARE {name} AS {sql}; \
             SELECT coalesce(array_to_string(parameter_types::oid[], ','), '') \
             FROM pg_prepared_statements WHERE name = '{name}'; \
             DEALLOCATE {name};"
        );
        let batch = if in_transaction {
            probe
        } else {
            format!("BEGIN; {} {probe} COMMIT", self.set_local)
        };
        let replies = match client.simple_query(&batch) {
            Ok(replies) => replies,
            Err(e) => {
                if !in_transaction {
                    let _ = client.batch_execute("ROLLBACK");
                }
                return Err(e.into());
            }
        };
        let oids = replies
            .iter()
            .find_map(|reply| match reply {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .ok_or_else(|| {
                crate::store::bad_data(format!("no parameter types for the statement {sql}"))
            })?;
        let learned: Vec<Type> = oids
            .split(',')
            .filter(|oid| !oid.is_empty())
            .map(|oid| {
                oid.parse().ok().and_then(Type::from_oid).ok_or_else(|| {
                    crate::store::bad_data(format!(
                        "a parameter of type {oid}, not a built-in one, in {sql}"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let learned: Arc<[Type]> = learned.into();
        types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql, learned.clone());
        Ok(learned)
    }

    /// `params` beside their types, for an unnamed statement.
    fn typed<'a>(
        &self,
        client: &mut Client,
        sql: &'static str,
        params: &Params<'a>,
        in_transaction: bool,
    ) -> Result<Vec<(&'a (dyn ToSql + Sync), Type)>> {
        let types = self.types(client, sql, in_transaction)?;
        if types.len() != params.len() {
            return Err(crate::store::bad_data(format!(
                "a statement takes {} parameters, given {}",
                types.len(),
                params.len()
            )));
        }
        Ok(params.iter().copied().zip(types.iter().cloned()).collect())
    }

    /// Runs a query as an unnamed statement; returns its rows.
    pub(super) fn query(
        &self,
        client: &mut Client,
        sql: &'static str,
        params: &Params<'_>,
        in_transaction: bool,
    ) -> Result<Vec<Row>> {
        let typed = self.typed(client, sql, params, in_transaction)?;
        Ok(client.query_typed(sql, &typed)?)
    }

    /// Runs a query that returns at most one row, as an unnamed statement.
    pub(super) fn query_opt(
        &self,
        client: &mut Client,
        sql: &'static str,
        params: &Params<'_>,
        in_transaction: bool,
    ) -> Result<Option<Row>> {
        let typed = self.typed(client, sql, params, in_transaction)?;
        Ok(client.query_typed_opt(sql, &typed)?)
    }

    /// Runs a query that returns exactly one row, as an unnamed statement.
    pub(super) fn query_one(
        &self,
        client: &mut Client,
        sql: &'static str,
        params: &Params<'_>,
        in_transaction: bool,
    ) -> Result<Row> {
        let typed = self.typed(client, sql, params, in_transaction)?;
        Ok(client.query_typed_one(sql, &typed)?)
    }

    /// Runs a statement as an unnamed one; returns the number of rows it
    /// changed.
    pub(super) fn execute(
        &self,
        client: &mut Client,
        sql: &'static str,
        params: &Params<'_>,
        in_transaction: bool,
    ) -> Result<u64> {
        let typed = self.typed(client, sql, params, in_transaction)?;
        Ok(client.execute_typed(sql, &typed)?)
    }
}

/// Where the store's listening connection goes, and the key that names
/// that server among the process's listening connections (see `listen`):
/// the listen URL if one was given, else the ledger's own connection
/// (`url` with its `tls`, already parsed as `config` and `connector`),
/// but none through a transaction pooler.
pub(super) fn listen_config(
    route: &Route,
    url: &str,
    tls: &super::tls::Tls,
    config: postgres::Config,
    connector: tokio_postgres_rustls::MakeRustlsConnect,
    name: &std::path::Path,
) -> Result<
    Option<(
        postgres::Config,
        tokio_postgres_rustls::MakeRustlsConnect,
        String,
    )>,
> {
    let Some(listen_url) = &route.listen_url else {
        if route.transaction_pooler {
            return Ok(None);
        }
        // Per connection string (and TLS setting), so that ledgers opened
        // with other settings (a role, an application_name) keep their own.
        return Ok(Some((config, connector, format!("{url} {tls:?}"))));
    };
    let refused = |reason: String| crate::error::Error::Open {
        path: name.to_owned(),
        reason,
        source: None,
    };
    let not_a_url = |e: String| {
        refused(format!(
            "the listen URL {} is not a PostgreSQL URL: {e}",
            super::redacted(listen_url)
        ))
    };
    let (listen_url, tls) = super::tls::split(listen_url).map_err(not_a_url)?;
    let mut config: postgres::Config = listen_url
        .parse()
        .map_err(|e: postgres::Error| not_a_url(e.to_string()))?;
    config.ssl_mode(tls.client_mode());
    let connector = tls
        .connector()
        .map_err(|e| refused(format!("the listen URL's TLS settings: {e}")))?;
    Ok(Some((config, connector, format!("{listen_url} {tls:?}"))))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::StoreConfig;
    use crate::store::postgres::tests::TestSchema;
    use crate::store::postgres::{Store, channel_of};

    /// A store of `schema` in transaction pooler mode (on a direct
    /// connection: the mode relies on less, so it works there too), with
    /// `listen_url`.
    fn store(schema: &TestSchema, listen_url: Option<String>) -> Store {
        let config = StoreConfig {
            synchronous: "NORMAL",
            busy_timeout: Duration::from_secs(5),
            pool_size: 2,
            group_commit: false,
            create: true,
        };
        let route = Route {
            transaction_pooler: true,
            listen_url,
        };
        Store::open(
            &schema.url,
            &schema.name,
            &config,
            Arc::new(crate::clock::SystemClock),
            true,
            &route,
        )
        .unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn other_hosts_wake_ups_arrive_over_the_listen_url_only() {
        // Another process's notification, as a writer of another host
        // sends it.
        let notify = |schema: &TestSchema, socket: &crate::wake::WakeSocket| {
            let payload = format!("someone-else\n{}", socket.address());
            schema
                .client()
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&channel_of(&schema.name), &payload],
                )
                .unwrap();
        };
        let heard = TestSchema::new("pooler_listen");
        let _store = store(&heard, Some(heard.url.clone()));
        let socket = crate::wake::WakeSocket::bind().unwrap();
        notify(&heard, &socket);
        assert!(socket.wait(Duration::from_secs(5)), "never woken");

        // Without a listen URL, nothing listens: the waiter's timer is all
        // there is.
        let deaf = TestSchema::new("pooler_deaf");
        let _store = store(&deaf, None);
        let socket = crate::wake::WakeSocket::bind().unwrap();
        notify(&deaf, &socket);
        assert!(
            !socket.wait(Duration::from_millis(500)),
            "woken without a listener"
        );
    }

    #[test]
    #[cfg_attr(
        not(runledger_pg),
        ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
    )]
    fn statements_run_unnamed_and_leave_no_session_state() {
        let schema = TestSchema::new("pooler_unnamed");
        let store = store(&schema, None);
        let inserted = store
            .write(&[], |tx| {
                tx.execute(
                    "INSERT INTO watchers (instance_id, address) VALUES ($1, $2)",
                    &[&1_i64, &"runledger/test"],
                )
            })
            .unwrap();
        assert_eq!(inserted, 1);
        // A read, as the second statement of its kind: the types are known.
        for _ in 0..2 {
            let addresses: Vec<String> = store
                .read(|tx| {
                    Ok(tx
                        .query(
                            "SELECT address FROM watchers WHERE instance_id = $1",
                            &[&1_i64],
                        )?
                        .iter()
                        .map(|row| row.get(0))
                        .collect())
                })
                .unwrap();
            assert_eq!(addresses, ["runledger/test"]);
        }
        // Every pooled connection: no prepared statement, no search_path of
        // the session.
        let pool = store.pool();
        let mut conns: Vec<_> = (0..pool.max_size()).map(|_| pool.get().unwrap()).collect();
        for conn in &mut conns {
            let replies = conn
                .client
                .simple_query(
                    "SELECT (SELECT count(*) FROM pg_prepared_statements)::text
                         || ' ' || current_setting('search_path')",
                )
                .unwrap();
            let row = replies
                .iter()
                .find_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap();
            assert_eq!(row, "0 \"$user\", public");
        }
    }
}
