//! `runledger`: the command-line face of a ledger, for terminals and for
//! programs in any language. Everything goes through the library's public
//! API; this binary has no SQL of its own.
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 75 (`EX_TEMPFAIL`) a lock conflict or
//! a lock wait that timed out; `exec` exits with its command's code, or
//! 128 + the signal number when the command was killed by a signal.

/// `println!` that never panics: a closed stdout (`| head`) ends the output
/// quietly instead.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod exec;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use runledger::{Error, EventCursor, Ledger, RunFilter, RunId, RunStatus};

/// Exit code for a lock that was taken or did not come in time
/// (`EX_TEMPFAIL` of sysexits.h: try again later).
const EXIT_TEMPFAIL: u8 = 75;

/// The part of `--help` that holds for every build.
macro_rules! after_help {
    () => {
        "\
Exit codes: 0 ok, 1 error, 2 usage (bad arguments or input; nothing is
recorded), 75 lock conflict or wait timed out; `exec` exits with its
command's code (128 + N if a signal N killed it, 127 if the command does
not exist, 126 if it cannot be executed).

The ledger is --db, else $RUNLEDGER_DB, else
$XDG_DATA_HOME/runledger/ledger.db (~/.local/share/runledger/ledger.db).
`exec` creates a missing ledger; every other command refuses one.
"
    };
}

/// The end of `--help`, with what is true of PostgreSQL in this build.
#[cfg(feature = "postgres")]
const AFTER_HELP: &str = concat!(
    after_help!(),
    "\
A postgres:// URL names a ledger on PostgreSQL, in the schema after a #
(postgres://app@db.internal/jobs#nightly; default schema runledger)."
);
#[cfg(not(feature = "postgres"))]
const AFTER_HELP: &str = concat!(
    after_help!(),
    "\
This build has no PostgreSQL store: postgres:// URLs are refused
(install with `cargo install --path . --features cli,postgres`)."
);

/// A crash-safe registry of runs and strict cross-process locks.
///
/// Every command run through `runledger exec` is recorded as a run that
/// every process sharing the ledger sees, and respects the ledger's locks.
#[derive(Debug, Parser)]
#[command(name = "runledger", version, after_help = AFTER_HELP)]
struct Cli {
    /// The ledger: a file, or a postgres:// URL. `exec` creates it if
    /// missing; the other commands refuse a missing ledger.
    // The help never shows the variable's value: a URL may hold a password.
    #[arg(
        long,
        global = true,
        env = "RUNLEDGER_DB",
        value_name = "PATH",
        hide_env_values = true
    )]
    db: Option<PathBuf>,

    /// Print JSON instead of tables (reading commands; see each one's help).
    #[arg(long, global = true)]
    json: bool,

    /// The PostgreSQL URL of `--db` goes through a pooler in transaction
    /// mode, such as PgBouncer's `pool_mode = transaction`: keep nothing on
    /// a session beyond one transaction (required there; see the README's
    /// "Through PgBouncer").
    // The variable as a shell sets a switch: 1, yes, on, true (or 0, no,
    // off, false).
    #[arg(
        long,
        global = true,
        env = "RUNLEDGER_TRANSACTION_POOLER",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    transaction_pooler: bool,

    /// A direct PostgreSQL URL (not through the pooler) to listen for
    /// wake-ups on, with `--transaction-pooler`; without it, waiters of
    /// other hosts are found by their timed re-read.
    #[arg(
        long,
        global = true,
        env = "RUNLEDGER_LISTEN_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    listen_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command as a recorded run, under the ledger's locks.
    ///
    /// Registers the run (source `terminal` by default), takes the locks
    /// (the run is `queued` while it waits; stderr says who holds them, and
    /// when they came), runs the command with its output copied to the
    /// terminal and to a log file recorded on the run, forwards SIGINT,
    /// SIGTERM, SIGHUP and SIGQUIT to it, records its exit code or signal,
    /// releases the locks and exits with the command's code. The command
    /// sees `RUNLEDGER_DB` and `RUNLEDGER_RUN_ID` (also as
    /// `RUNLEDGER_EXEC_RUN_ID`).
    ///
    /// Arguments are checked before anything is recorded: a bad lock key,
    /// name or `--meta` exits 2 with no run. A turn refused by `--no-wait`,
    /// or a wait that ran out, exits 75 and records the run as `cancelled`
    /// with the reason ("did not start: …"), never as `failed`: `runs
    /// --status failed` lists commands that failed, `runs --status
    /// cancelled` also the turns skipped.
    ///
    /// If `exec` itself dies (kill -9 included), the kernel kills the
    /// command too on Linux, Android, FreeBSD and DragonFly BSD (a
    /// parent-death signal), so that it never goes on without its locks. On
    /// other systems there is no such signal: the command outlives a killed
    /// `exec`, and the next reap releases its locks while it may still run.
    /// Signals that `exec` receives are forwarded everywhere.
    ///
    /// With `RUNLEDGER_RUN_ID` set by a parent that created a run for this
    /// command (and no `RUNLEDGER_EXEC_RUN_ID` equal to it), `exec` adopts
    /// that run instead of registering one.
    ///
    /// Locks of one mode are taken together, all or nothing; with several
    /// modes, one key at a time in key order (so two `exec`s never
    /// deadlock).
    #[command(after_help = "\
Examples:
  runledger exec --lock build:symbol=AAPL -- make build SYMBOL=AAPL
  runledger exec --name nightly --shared dataset:raw --slots gpu=2 --wait 10m -- python train.py
  runledger exec --no-wait --lock deploy -- ./deploy.sh   # exits 75 if deploy is held")]
    Exec(exec::ExecArgs),

    /// List the active runs (queued and running).
    ///
    /// --json: an array of run objects (see `runs`).
    #[command(after_help = "Examples:\n  runledger ps\n  runledger ps --json | jq '.[].name'")]
    Ps,

    /// List past and present runs, newest first.
    ///
    /// --json: an array of run objects with the fields id, name, source,
    /// status, parent, idempotency_key, instance, pid, host, exit_code,
    /// error, metadata, log_path, created_at, started_at, heartbeat_at,
    /// finished_at, cancel_requested_at, progress {total, succeeded,
    /// failed, running, current}. Times are RFC 3339 in UTC.
    #[command(after_help = "\
Examples:
  runledger runs --status failed --since 1d
  runledger runs --name build --limit 5 --json")]
    Runs(RunsArgs),

    /// Show one run: its fields, steps, events, locks and what it waits on.
    ///
    /// --json: {"run": run, "steps": [...], "events": [...], "locks": [...]}.
    #[command(after_help = "Examples:\n  runledger show 42\n  runledger show 42 --json")]
    Show {
        /// The run's id.
        id: RunId,
    },

    /// Print a run's log file; with -f, follow it until the run ends.
    #[command(after_help = "Examples:\n  runledger logs 42\n  runledger logs -f 42")]
    Logs {
        /// The run's id.
        id: RunId,
        /// Keep printing what is appended until the run ends.
        #[arg(short, long)]
        follow: bool,
    },

    /// List held locks with their holders and tokens, and the queue.
    ///
    /// --json: an array of {key, mode, capacity, state, token, ticket, keys,
    /// run, run_name, instance, pid, host, requested_at, granted_at}; mode is
    /// "exclusive", "shared" or "slots" (with capacity N, only then); state
    /// "held" or "waiting".
    #[command(after_help = "Examples:\n  runledger locks\n  runledger locks --json")]
    Locks,

    /// Ask a run to stop (a queued run is cancelled at once).
    ///
    /// A running run gets a cancel request: it goes on until its owner
    /// stops it (`exec` stops its command). A run that has already finished
    /// is left as it is. Prints what happened. --json: {"id", "status",
    /// "result"}, where status is the run's status after the call and result
    /// one of "cancelled", "requested", "already requested", "already
    /// finished".
    #[command(after_help = "Example:\n  runledger cancel 42")]
    Cancel {
        /// The run's id.
        id: RunId,
    },

    /// Close what dead processes left behind, and hung runs, now.
    ///
    /// --json: an array of reports {reaper, reaped: [...], error, took_ms};
    /// each reaped item has a "kind" (run, lock, instance, pruned, other)
    /// and a "reason".
    #[command(after_help = "Example:\n  runledger reap")]
    Reap,

    /// Delete runs that finished longer ago than a duration.
    ///
    /// --json: {"pruned": N}.
    #[command(after_help = "Example:\n  runledger prune --older-than 30d")]
    Prune {
        /// Such as 30d, 12h, 90m.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        older_than: Duration,
    },

    /// Print every event of every run as it commits, until interrupted.
    ///
    /// One line per event: its time, id, run and what happened. Starts with
    /// the events still to come; --from N starts after event N (0: the whole
    /// history kept). --json: one event object per line, {id, run, at, kind,
    /// message, ...} with the fields of its kind (status: from, to; step:
    /// step, from, to; lock_granted, lock_released: ticket, keys, mode,
    /// token, pid, host; lock_forced: keys; adopted: instance, pid, host;
    /// custom: name, data).
    #[command(
        after_help = "Examples:\n  runledger watch\n  runledger watch --json --from 0 | jq .kind"
    )]
    Watch {
        /// Start after this event id instead of at the end.
        #[arg(long, value_name = "EVENT_ID")]
        from: Option<EventCursor>,
        /// Exit after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },

    /// Release a lock by force (for operators); recorded with the reason.
    ///
    /// Its holder finds out: its guard reports the lock lost. --json:
    /// {"key", "released"}.
    #[command(
        after_help = "Example:\n  runledger unlock build:symbol=AAPL --force --reason 'stuck since the outage'"
    )]
    Unlock {
        /// The key.
        key: String,
        /// Required: this takes a lock away from a holder that may be alive.
        #[arg(long, required = true)]
        force: bool,
        /// Why, recorded with the release.
        #[arg(long)]
        reason: String,
    },

    /// Serve the dashboard: pages, a JSON API and /metrics, read-only.
    ///
    /// Listens on loopback unless told otherwise. An address other
    /// machines can reach needs --token: every request must then carry it
    /// (`Authorization: Bearer TOKEN`, or once `?token=TOKEN` in the
    /// browser, which sets a cookie). Without a token, it answers only
    /// requests addressed to a loopback name (localhost, 127.0.0.1,
    /// [::1]), so that no web page of another site reaches it by DNS
    /// rebinding. With --allow-actions (which needs --token), the pages get
    /// cancel and force-unlock buttons. Stops on SIGINT or SIGTERM.
    #[cfg(feature = "web")]
    #[command(after_help = "\
Examples:
  runledger serve                       # http://127.0.0.1:8080/
  RUNLEDGER_TOKEN=\"$(openssl rand -hex 16)\" runledger serve --listen 0.0.0.0:8080
  RUNLEDGER_TOKEN=\"$T\" runledger serve --allow-actions   # then open /?token=$T")]
    Serve {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        /// A token every request must carry; required off loopback.
        #[arg(long, env = "RUNLEDGER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Cancel and force-unlock buttons on the pages, protected by the
        /// token and against cross-site requests, each recorded with who
        /// did it. Needs --token.
        #[arg(long)]
        allow_actions: bool,
        /// The folder of the runs' logs, as given to `exec --log-dir`: a
        /// run page tails a log only from inside it. Defaults to exec's
        /// default.
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct RunsArgs {
    /// Only runs with this status (repeatable): queued, running, succeeded,
    /// partial, failed, cancelled.
    #[arg(long)]
    status: Vec<RunStatus>,
    /// Only runs with this exact name.
    #[arg(long)]
    name: Option<String>,
    /// Only runs from this source (terminal, worker, …).
    #[arg(long)]
    source: Option<String>,
    /// Only runs created within this long (such as 2h, 1d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

/// Parses a duration such as `90s`, `5m`, `1h30m` or `2d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (try a duration such as 30s, 5m, 1h30m or 2d)"))
}

/// An error of a command, with the exit code it maps to.
pub(crate) struct Failure {
    pub message: String,
    pub code: u8,
}

/// A usage error (exit 2): bad input, refused before anything is recorded.
pub(crate) fn usage(message: impl std::fmt::Display) -> Failure {
    Failure {
        message: message.to_string(),
        code: 2,
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = if e.is_conflict() || e.is_timeout() {
            EXIT_TEMPFAIL
        } else if e.is_invalid_input() {
            // Bad input the library refused (a key, a name, a reason).
            2
        } else {
            1
        };
        // With its causes: "storage error in ledger …" alone says nothing
        // of what the server said.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !text.is_empty() && !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            // A storage error's message holds what its sources say (the
            // server's words, its SQLSTATE): they would say it again.
            if cause.is::<runledger::StorageError>() {
                break;
            }
            source = cause.source();
        }
        Failure { message, code }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { message, code: 1 }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = REACH.set((cli.transaction_pooler, cli.listen_url.clone()));
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("runledger: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// The ledger's path: `--db`/`RUNLEDGER_DB`, else the per-user default.
fn db_path(cli: &Cli) -> Result<PathBuf, Failure> {
    if let Some(db) = &cli.db {
        return Ok(db.clone());
    }
    let data = data_home().ok_or_else(|| {
        Failure::from("no ledger: pass --db PATH or set RUNLEDGER_DB (HOME is not set)".to_owned())
    })?;
    Ok(data.join("runledger").join("ledger.db"))
}

/// `$XDG_DATA_HOME`, else `~/.local/share`.
pub(crate) fn data_home() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
}

/// Opens an existing ledger for a reading or operator command: a path with
/// no ledger is an error, not a new empty ledger (a typo would look like one).
fn open(path: &std::path::Path) -> Result<Ledger, Failure> {
    open_with(path, |b| b)
}

/// Whether `--db` names a ledger on PostgreSQL rather than a file.
pub(crate) fn is_url(db: &std::path::Path) -> bool {
    db.to_str()
        .and_then(|s| s.split_once("://"))
        .is_some_and(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
        })
}

/// How `--db` is reached, from the global options: through a transaction
/// pooler, and the direct URL to listen on (set once, before any command).
static REACH: std::sync::OnceLock<(bool, Option<String>)> = std::sync::OnceLock::new();

/// Settings for the ledger `--db` names: a file, or a PostgreSQL URL.
#[cfg(feature = "postgres")]
pub(crate) fn builder(db: &std::path::Path) -> runledger::Builder {
    let builder = Ledger::builder(db);
    match REACH.get() {
        Some((pooler, listen)) => {
            let builder = if *pooler {
                builder.transaction_pooler(true)
            } else {
                builder
            };
            match listen {
                Some(url) => builder.listen_url(url.clone()),
                None => builder,
            }
        }
        None => builder,
    }
}

/// Settings for the ledger `--db` names. Built without the `postgres`
/// feature, the tool opens files only (a URL fails to open, saying so), and
/// how a server is reached has nothing to set.
#[cfg(not(feature = "postgres"))]
pub(crate) fn builder(db: &std::path::Path) -> runledger::Builder {
    Ledger::builder(db)
}

fn open_with(
    path: &std::path::Path,
    settings: impl FnOnce(runledger::Builder) -> runledger::Builder,
) -> Result<Ledger, Failure> {
    // A call that lives milliseconds needs no keeper thread. Opening still
    // registers this process and closes what dead processes left; it never
    // creates a ledger (a typo would look like an empty one).
    let builder = builder(path)
        .label("runledger-cli")
        .background(false)
        .create(false);
    match settings(builder).open() {
        Ok(ledger) => Ok(ledger),
        // The path the error names has no password.
        Err(Error::Open { path, reason, .. }) if reason.starts_with("there is no ledger") => {
            Err(format!(
                "no ledger at {} (check --db or RUNLEDGER_DB; `runledger exec` creates one)",
                path.display()
            )
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

/// What a cancel did, for `runledger cancel`: a word for programs and a
/// sentence for people. `before` is the run as read just before the call,
/// `after` the status the call returned.
fn cancel_result(
    id: RunId,
    before: &runledger::RunRecord,
    after: RunStatus,
) -> (&'static str, String) {
    match after {
        RunStatus::Cancelled if before.status == RunStatus::Queued => (
            "cancelled",
            format!("run {id} cancelled (it was queued and never started)"),
        ),
        RunStatus::Running if before.cancel_requested_at.is_some() => (
            "already requested",
            format!(
                "run {id}: a cancel was already requested; it is still running until its owner \
                 stops it"
            ),
        ),
        RunStatus::Running => (
            "requested",
            format!(
                "run {id}: cancel requested; it is still running until its owner stops it \
                 (a run of `runledger exec` stops its command within a second)"
            ),
        ),
        RunStatus::Queued => (
            "requested",
            format!("run {id}: cancel requested (it is queued)"),
        ),
        finished => (
            "already finished",
            format!("run {id} had already finished as {finished}: nothing to cancel"),
        ),
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    let path = db_path(&cli)?;
    if (cli.transaction_pooler || cli.listen_url.is_some()) && !is_url(&path) {
        return Err(usage(format!(
            "--transaction-pooler and --listen-url (RUNLEDGER_TRANSACTION_POOLER, \
             RUNLEDGER_LISTEN_URL) are for a postgres:// ledger, not the file {}",
            path.display()
        )));
    }
    let json = cli.json;
    let out = output::Out { json };
    match cli.command {
        Command::Exec(args) => exec::exec(&path, args),
        Command::Ps => {
            let ledger = open(&path)?;
            let runs = ledger.runs(RunFilter::default().active().limit(1000))?;
            out.runs(&ledger, &runs);
            Ok(0)
        }
        Command::Runs(args) => {
            let ledger = open(&path)?;
            let mut filter = RunFilter::default().statuses(args.status).limit(args.limit);
            if let Some(name) = args.name {
                filter = filter.name(name);
            }
            if let Some(source) = args.source {
                filter = filter.source(source);
            }
            if let Some(since) = args.since {
                filter = filter.since(ledger.now().saturating_sub(since));
            }
            let runs = ledger.runs(filter)?;
            out.runs(&ledger, &runs);
            Ok(0)
        }
        Command::Show { id } => {
            let ledger = open(&path)?;
            out.show(&ledger, id)?;
            Ok(0)
        }
        Command::Logs { id, follow } => {
            let ledger = open(&path)?;
            output::logs(&ledger, id, follow)?;
            Ok(0)
        }
        Command::Locks => {
            let ledger = open(&path)?;
            out.locks(&ledger, &ledger.locks()?);
            Ok(0)
        }
        Command::Cancel { id } => {
            let ledger = open(&path)?;
            let before = ledger.run(id)?;
            let status = ledger.cancel(id)?;
            let (result, human) = cancel_result(id, &before, status);
            out.value(
                &serde_json::json!({"id": id, "status": status, "result": result}),
                format_args!("{human}"),
            );
            Ok(0)
        }
        Command::Reap => {
            // Not reaped on open, so that this pass reports what it closes.
            let ledger = open_with(&path, |b| b.reap_on_open(false))?;
            let reports = ledger.reap()?;
            out.reports(&reports);
            Ok(if reports.iter().all(|r| r.is_ok()) {
                0
            } else {
                1
            })
        }
        Command::Prune { older_than } => {
            let ledger = open(&path)?;
            let pruned = ledger.prune(older_than)?;
            out.value(
                &serde_json::json!({"pruned": pruned}),
                format_args!("pruned {pruned} runs"),
            );
            Ok(0)
        }
        Command::Watch { from, count } => {
            // Long-lived: its instance heartbeats like any other.
            let ledger = open_with(&path, |b| b.background(true))?;
            output::watch(&ledger, from, count, json)?;
            Ok(0)
        }
        Command::Unlock {
            key,
            force: _,
            reason,
        } => {
            let ledger = open(&path)?;
            let released = ledger.force_unlock(&key, &reason)?;
            out.value(
                &serde_json::json!({"key": key, "released": released}),
                format_args!("released {released} holder(s) of {key:?}"),
            );
            Ok(0)
        }
        #[cfg(feature = "web")]
        Command::Serve {
            listen,
            token,
            allow_actions,
            log_dir,
        } => serve(&path, listen, token, allow_actions, log_dir),
    }
}

/// `serve`: the dashboard, until SIGINT or SIGTERM.
#[cfg(feature = "web")]
fn serve(
    path: &std::path::Path,
    listen: std::net::SocketAddr,
    token: Option<String>,
    allow_actions: bool,
    log_dir: Option<PathBuf>,
) -> Result<u8, Failure> {
    let token = token.filter(|t| !t.is_empty());
    runledger::web::check_listen(listen, token.is_some()).map_err(usage)?;
    if allow_actions && token.is_none() {
        return Err(usage(
            "refusing --allow-actions without --token: anything that can reach the address (any \
             local process, any web page open in a browser on this machine) could cancel runs \
             and unlock keys",
        ));
    }
    // A long-lived process: its keeper heartbeats and reaps.
    let ledger = open_with(path, |b| b.background(true).label("runledger-serve"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    // Exec's default for a ledger on PostgreSQL; the library's default
    // beside a file is exec's too.
    let log_dir = log_dir.or_else(|| {
        ledger
            .location()
            .as_path()
            .is_none()
            .then(|| data_home().map(|d| d.join("runledger").join("logs")))
            .flatten()
    });
    let mut dashboard = runledger::web::Dashboard::new(ledger).allow_actions(allow_actions);
    if let Some(dir) = log_dir {
        dashboard = dashboard.log_dir(dir);
    }
    if let Some(token) = token {
        dashboard = dashboard.token(token);
    }
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        eprintln!("runledger: serving the dashboard on http://{addr}/ (Ctrl-C stops it)");
        dashboard
            .serve(listener, stopped())
            .await
            .map_err(|e| Failure::from(format!("the dashboard stopped: {e}")))
    })?;
    Ok(0)
}

/// Completes on SIGINT or SIGTERM.
#[cfg(feature = "web")]
async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // No handlers: the default action (exit) stops the server.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
