//! `runledger exec`: a command run as a recorded run, under the ledger's
//! locks.

use std::ffi::OsString;
use std::fs::File;
use std::io::IsTerminal;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use runledger::{Ledger, LockGuard, LockMode, LockRequest, LockState, Run, RunId, RunSpec};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Cause;

use crate::{Failure, parse_duration};

/// How long `exec` waits for the rest of the output once the command
/// exited.
const TEE_GRACE: Duration = Duration::from_millis(500);

/// How often a waiting `exec` says again who holds what it waits for.
const WAIT_REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// The run's name. Defaults to the command's file name.
    #[arg(long)]
    name: Option<String>,

    /// An exclusive lock to hold while the command runs (repeatable).
    #[arg(long = "lock", value_name = "KEY")]
    locks: Vec<String>,

    /// A shared lock (many holders, no exclusive one; repeatable).
    #[arg(long = "shared", value_name = "KEY")]
    shared: Vec<String>,

    /// A counted lock: at most N holders of KEY (repeatable).
    #[arg(long = "slots", value_name = "KEY=N", value_parser = parse_slots)]
    slots: Vec<(String, u32)>,

    /// Wait at most this long for the locks (such as 30s, 10m); waits
    /// forever by default. A wait that runs out exits 75, the run recorded
    /// as cancelled ("did not start: gave up after waiting …").
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "no_wait")]
    wait: Option<Duration>,

    /// Do not wait: exit 75 at once, naming the holder, if a lock is taken.
    /// The run is recorded as cancelled ("did not start: …"), not failed.
    #[arg(long)]
    no_wait: bool,

    /// Where to write the log file (created if missing). Defaults to the
    /// `logs` folder beside the ledger file (for a ledger on PostgreSQL,
    /// `$XDG_DATA_HOME/runledger/logs`).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,

    /// Who started the run.
    #[arg(long, default_value = "terminal")]
    source: String,

    /// A metadata field recorded on the run (repeatable, one value per
    /// key). The command line and working folder are recorded as `command`
    /// and `cwd`: those keys are refused.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    meta: Vec<(String, String)>,

    /// Start nothing while a run with this key is active: exit 75 naming it
    /// (with --idempotency-window, see there). Nothing is recorded for the
    /// refused start.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,

    /// With --idempotency-key: a run of the key created less than this long
    /// ago (such as 24h) holds it even after it finished. Then nothing
    /// starts, and exec exits 0 if that run succeeded, 75 while it is
    /// active, 1 if it ended otherwise, naming it on stderr.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "idempotency_key")]
    idempotency_window: Option<Duration>,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn parse_slots(text: &str) -> Result<(String, u32), String> {
    let (key, n) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=N (such as gpu=2)"))?;
    let n: u32 = n
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{n:?} is not a count of at least 1 (such as gpu=2)"))?;
    Ok((key.to_owned(), n))
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{text:?} has an empty key"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

impl ExecArgs {
    /// The lock requests, in the order to take them. One mode: one request,
    /// all or nothing. Several modes: one request per key in key order, so
    /// that two `exec`s that share keys always take them in the same order.
    /// A key asked in two modes is a usage error.
    fn requests(&self) -> Result<Vec<LockRequest>, Failure> {
        let mut keyed: Vec<(String, LockMode)> = self
            .locks
            .iter()
            .map(|k| (k.clone(), LockMode::Exclusive))
            .chain(self.shared.iter().map(|k| (k.clone(), LockMode::Shared)))
            .chain(
                self.slots
                    .iter()
                    .map(|(k, n)| (k.clone(), LockMode::Slots(*n))),
            )
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        keyed.dedup();
        if let Some(pair) = keyed.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Failure {
                message: format!(
                    "the lock {:?} is asked twice, as {} and as {}",
                    pair[0].0, pair[0].1, pair[1].1
                ),
                code: 2,
            });
        }
        let Some(first) = keyed.first().map(|k| k.1) else {
            return Ok(Vec::new());
        };
        let requests = if keyed.iter().all(|k| k.1 == first) {
            vec![LockRequest::new(keyed.into_iter().map(|k| k.0)).mode(first)]
        } else {
            keyed
                .into_iter()
                .map(|(key, mode)| LockRequest::new([key]).mode(mode))
                .collect()
        };
        // Checked now, before a run is registered: a bad key is a usage
        // error, not a run that failed to get its locks.
        for request in &requests {
            request.check().map_err(crate::usage)?;
        }
        Ok(requests)
    }

    /// The `--meta` fields, refusing a key given twice or one `exec`
    /// records itself (which it would silently replace).
    fn meta(&self) -> Result<serde_json::Map<String, serde_json::Value>, Failure> {
        let mut fields = serde_json::Map::new();
        for (key, value) in &self.meta {
            if RESERVED_META.contains(&key.as_str()) {
                return Err(crate::usage(format!(
                    "--meta {key}=…: the key {key:?} is reserved: exec records the command line \
                     as `command` and the working folder as `cwd`"
                )));
            }
            if fields.insert(key.clone(), value.clone().into()).is_some() {
                return Err(crate::usage(format!(
                    "--meta {key}=…: the key {key:?} is given twice"
                )));
            }
        }
        Ok(fields)
    }
}

/// The metadata keys `exec` fills in itself.
const RESERVED_META: [&str; 2] = ["command", "cwd"];

/// The default name of a run: the command's file name, cut to the 256
/// bytes a name may have.
fn command_name(command: &[OsString]) -> String {
    let name = Path::new(&command[0])
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = name.trim().chars().filter(|c| !c.is_control()).collect();
    while name.len() > 256 {
        name.pop();
    }
    let name = name.trim().to_owned();
    if name.is_empty() {
        "command".to_owned()
    } else {
        name
    }
}

fn log_file_path(dir: &Path, name: &str) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    dir.join(format!("{stamp}-{}-{safe}.log", std::process::id()))
}

/// What `exec` shares with its signal thread.
struct Shared {
    /// The ledger's location as the command gets it in `RUNLEDGER_DB`.
    location: std::path::PathBuf,
    ledger: Ledger,
    /// The run, once registered (0 before).
    run: AtomicI64,
    /// The command's pid, once started (0 before).
    child: AtomicI32,
    /// The command has exited (its pid may be reused: never signal it).
    exited: AtomicBool,
    /// A signal that came before the command started.
    interrupted: AtomicI32,
    /// The command runs in a process group of its own (no terminal): every
    /// signal for it comes through `exec`.
    own_group: bool,
}

pub(crate) fn exec(db: &Path, args: ExecArgs) -> Result<u8, Failure> {
    // Every argument is checked before anything is recorded: bad input is a
    // usage error (exit 2), never a failed run.
    let requests = args.requests()?;
    let meta = args.meta()?;
    let ledger = crate::builder(db).label("runledger exec").open()?;
    let shared = Arc::new(Shared {
        // What the command is told: a file by its canonical path; a
        // PostgreSQL ledger by the URL as given (`Ledger::location` drops
        // the password).
        location: match ledger.location().as_path() {
            Some(file) if !crate::is_url(db) => file.to_owned(),
            _ => db.to_owned(),
        },
        ledger: ledger.clone(),
        run: AtomicI64::new(0),
        child: AtomicI32::new(0),
        exited: AtomicBool::new(false),
        interrupted: AtomicI32::new(0),
        own_group: !std::io::stdin().is_terminal(),
    });
    // Watched from the start: a signal while waiting for locks ends the
    // wait (the run is cancelled), one after the start goes to the command.
    let forwarder = forward_signals(shared.clone())?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| command_name(&args.command));

    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "command".into(),
        args.command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
    );
    if let Ok(cwd) = std::env::current_dir() {
        metadata.insert("cwd".into(), cwd.to_string_lossy().into_owned().into());
    }
    metadata.extend(meta);
    let handed = handed_run(&ledger, db)?;
    // A run handed over keeps the log path its creator recorded, if any.
    let recorded_log = match handed {
        Handed::Adopt(id) => {
            ledger
                .run(id)
                .map_err(|e| crate::usage(format!("RUNLEDGER_RUN_ID names run {id}: {e}")))?
                .log_path
        }
        _ => None,
    };
    let log_path = match recorded_log.clone() {
        Some(path) => path,
        None => {
            let log_dir = match &args.log_dir {
                Some(dir) => std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
                // Beside a file; in the user's data folder for a server.
                None => match ledger.location().as_path() {
                    Some(file) => file.with_file_name("logs"),
                    None => crate::data_home()
                        .ok_or_else(|| {
                            "no log folder: pass --log-dir (HOME is not set)".to_owned()
                        })?
                        .join("runledger")
                        .join("logs"),
                },
            };
            log_file_path(&log_dir, &name)
        }
    };
    let mut spec = RunSpec::new(name)
        .source(args.source.clone())
        .metadata(metadata.clone().into())
        .log_path(&log_path);
    if let Some(key) = &args.idempotency_key {
        spec = spec.idempotency_key(key.clone());
    }
    if let Some(window) = args.idempotency_window {
        spec = spec.idempotency_window(window);
    }
    // Name, source, metadata (the `exec` event of an adopted run has the
    // same limits) and log path, as the run would be recorded.
    ledger.check_run_spec(&spec).map_err(crate::usage)?;
    let log = open_log(&log_path)?;
    let spec = if requests.is_empty() {
        spec
    } else {
        spec.queued()
    };
    let begun = match handed {
        Handed::None => ledger.begin_run(spec),
        Handed::Outer(parent) => ledger.begin_run(spec.parent(parent)),
        Handed::Adopt(id) => {
            if requests.is_empty() {
                ledger.adopt_run(id)
            } else {
                ledger.adopt_run_queued(id)
            }
        }
    };
    let run = match begun {
        Err(runledger::Error::Duplicate { key, existing }) => {
            return already_held(&ledger, &key, existing, &log_path);
        }
        // Most often a variable left over in the shell from an earlier run:
        // say where the id came from, and how to go without it.
        Err(e) if matches!(handed, Handed::Adopt(_)) && e.is_invalid_transition() => {
            return Err(crate::usage(format!(
                "RUNLEDGER_RUN_ID names a run for this command to adopt, but {e} \
                 (unset RUNLEDGER_RUN_ID to record a new run)"
            )));
        }
        begun => begun?,
    };
    if let Handed::Adopt(_) = handed {
        // The run keeps its creator's name, source and metadata; what this
        // exec runs is recorded beside them.
        run.event("exec", metadata.clone().into())?;
        if recorded_log.is_none() {
            run.set_log_path(&log_path)?;
        }
    }
    shared.run.store(i64::from(run.id()), Ordering::SeqCst);
    // A signal that came before the run had an id cancelled nothing yet.
    if shared.interrupted.load(Ordering::SeqCst) != 0 {
        let _ = ledger.cancel(run.id());
    }

    let guards = match take_locks(&ledger, &run, requests, &args) {
        Ok(guards) => guards,
        Err(e) => {
            let signal = shared.interrupted.load(Ordering::SeqCst);
            if signal != 0 {
                // Cancelled by the signal thread, which ended the wait.
                return Err(Failure {
                    message: format!(
                        "run {} cancelled: signal {signal}{} while it waited for its locks",
                        run.id(),
                        signal_name(signal)
                    ),
                    code: (128 + signal).clamp(0, 255) as u8,
                });
            }
            let id = run.id();
            if e.is_conflict() || e.is_timeout() {
                // A turn refused (--no-wait) or a wait that ran out is not a
                // failure of the command, which never ran: the run is
                // recorded as cancelled, with why, and `exec` exits 75.
                let failure = Failure::from(e);
                let _ = run.cancelled_because(format!("did not start: {}", failure.message));
                return Err(Failure {
                    message: format!(
                        "run {id} did not start (recorded as cancelled): {}",
                        failure.message
                    ),
                    code: failure.code,
                });
            }
            let failure = Failure::from(e);
            let _ = run.fail(format!("did not get its locks: {}", failure.message));
            return Err(failure);
        }
    };
    if !guards.is_empty() {
        run.start()?;
    }
    let code = supervise(&shared, run, &args.command, log, &guards)?;
    drop(forwarder);
    drop(guards); // released with the run already; this only drops the handles
    Ok(code)
}

/// Opens the log file for appending (a creator may have written to the file
/// it recorded), creating it and its folder if missing.
/// The start refused for an idempotency key that `existing` holds: says
/// so, and exits as that run did (0 if it succeeded, 75 while it is
/// active, else 1). The log file opened for the run that did not start is
/// removed if nothing was written to it.
fn already_held(
    ledger: &runledger::Ledger,
    key: &str,
    existing: runledger::RunId,
    log_path: &Path,
) -> Result<u8, Failure> {
    if std::fs::metadata(log_path).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(log_path);
    }
    let run = ledger.run(existing)?;
    eprintln!(
        "runledger: not started: run {existing} ({}, {}) holds idempotency key {key:?}",
        run.name, run.status
    );
    Ok(match run.status {
        runledger::RunStatus::Succeeded => 0,
        runledger::RunStatus::Queued | runledger::RunStatus::Running => 75,
        _ => 1,
    })
}

fn open_log(path: &Path) -> Result<File, Failure> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the log folder {}: {e}", dir.display()))?;
    }
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot create the log file {}: {e}", path.display()).into())
}

/// Set by `exec` for its command to the id of its run, beside
/// `RUNLEDGER_RUN_ID`: an `exec` that finds both equal runs under another
/// `exec` rather than being handed a run.
const EXEC_RUN_VAR: &str = "RUNLEDGER_EXEC_RUN_ID";

/// What `RUNLEDGER_RUN_ID` asks of this `exec`.
#[derive(Clone, Copy, Debug)]
enum Handed {
    /// Nothing: a run of its own.
    None,
    /// A run made for it to adopt (by `Ledger::create_run`).
    Adopt(RunId),
    /// The run of the `exec` whose command runs this one, on this ledger:
    /// a run of its own, as that run's child.
    Outer(RunId),
}

/// Reads `RUNLEDGER_RUN_ID`. A parent that hands a run sets it; an outer
/// `exec` sets it too, for its command to know its run, and marks it as its
/// own with `RUNLEDGER_EXEC_RUN_ID`: that id is a parent (when it is a run
/// of this very ledger, as `RUNLEDGER_DB` says), never a run to take.
fn handed_run(ledger: &Ledger, db_given: &Path) -> Result<Handed, Failure> {
    let Some(text) = std::env::var_os("RUNLEDGER_RUN_ID").filter(|t| !t.is_empty()) else {
        return Ok(Handed::None);
    };
    let id = text
        .to_str()
        .and_then(|t| t.trim().parse::<i64>().ok())
        .map(RunId::from)
        .ok_or_else(|| Failure {
            message: format!("RUNLEDGER_RUN_ID is not a run id: {text:?}"),
            code: 2,
        })?;
    if std::env::var_os(EXEC_RUN_VAR).as_ref() != Some(&text) {
        return Ok(Handed::Adopt(id));
    }
    // A file by its canonical path; a PostgreSQL ledger by the URL this
    // exec was given, which the outer one passed on as it was.
    let same_ledger = std::env::var_os("RUNLEDGER_DB").is_some_and(|db| {
        if crate::is_url(Path::new(&db)) {
            Path::new(&db) == db_given
        } else {
            std::fs::canonicalize(db).is_ok_and(|db| Some(&*db) == ledger.location().as_path())
        }
    });
    Ok(if same_ledger && ledger.run(id).is_ok() {
        Handed::Outer(id)
    } else {
        Handed::None
    })
}

/// Takes the locks for the run, saying on stderr what it waits for.
fn take_locks(
    ledger: &Ledger,
    run: &Run,
    requests: Vec<LockRequest>,
    args: &ExecArgs,
) -> runledger::Result<Vec<LockGuard>> {
    // A wait too long to add to a clock is a wait forever.
    let deadline = args.wait.and_then(|w| Instant::now().checked_add(w));
    let mut guards = Vec::new();
    for request in requests {
        let keys: Vec<String> = request.keys().to_vec();
        let asked = Instant::now();
        match run.acquire(request.clone().no_wait()) {
            Ok(guard) => {
                guards.push(guard);
                continue;
            }
            Err(e) if e.is_conflict() && !args.no_wait => {
                eprintln!("runledger: run {} waits: {e}", run.id());
            }
            Err(e) => return Err(e),
        }
        let request = match deadline {
            Some(deadline) => request.wait(deadline.saturating_duration_since(Instant::now())),
            None => request.wait_forever(),
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let reporter = {
            let keys = keys.clone();
            let ledger = ledger.clone();
            let id = run.id();
            std::thread::spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(WAIT_REPORT_EVERY) {
                    let Ok(locks) = ledger.locks() else { continue };
                    for lock in locks.iter().filter(|l| {
                        l.state == LockState::Held && keys.contains(&l.key) && l.run != Some(id)
                    }) {
                        let holder = match (&lock.run, &lock.run_name) {
                            (Some(r), Some(n)) => {
                                format!("run {r} ({n}, pid {} on {})", lock.pid, lock.host)
                            }
                            _ => format!("pid {} on {}", lock.pid, lock.host),
                        };
                        eprintln!(
                            "runledger: run {id} still waits for {:?}, held by {holder}",
                            lock.key
                        );
                    }
                }
            })
        };
        let got = run.acquire(request);
        drop(stop);
        let _ = reporter.join();
        guards.push(got?);
        // The wait is over: said as plainly as that it began.
        eprintln!(
            "runledger: run {} got {} after waiting {}",
            run.id(),
            keys.iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            crate::output::duration(asked.elapsed())
        );
    }
    Ok(guards)
}

/// Makes the kernel kill the command if `exec` dies (SIGKILL included):
/// a command that outlived its `exec` would go on without the locks, which
/// the reaper then hands to someone else.
///
/// Only where rustix offers a parent-death signal: `prctl(PR_SET_PDEATHSIG)`
/// on Linux and Android, `procctl(PROC_PDEATHSIG_CTL)` on FreeBSD and
/// DragonFly BSD. Elsewhere see the version below.
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "dragonfly"
))]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe work is allowed. It makes two raw system calls
    // (prctl, getppid) through rustix and builds errors without
    // allocating; it touches no lock and no memory shared with the parent.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
            // exec died between fork and prctl: the signal will never come.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::ErrorKind::Other.into());
            }
            Ok(())
        });
    }
}

/// Other Unix systems (macOS, NetBSD, OpenBSD, illumos…) have no
/// parent-death signal: the command outlives an `exec` killed with SIGKILL
/// (the `exec` help says so). Signals `exec` receives are still forwarded.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "dragonfly"
)))]
fn die_with_parent(_command: &mut Command) {}

/// What one output copy is doing, for the drain after the command exits.
#[derive(Default)]
struct TeeState {
    /// Blocked reading the command's output (not writing it out).
    reading: AtomicBool,
    /// When it last got data, in ms since `exec` started supervising.
    last_data_ms: AtomicU64,
    done: AtomicBool,
}

/// Runs the command, tees its output, forwards signals, records how it
/// ended. Returns the exit code for `exec`.
fn supervise(
    shared: &Shared,
    run: Run,
    command: &[OsString],
    log: File,
    guards: &[LockGuard],
) -> Result<u8, Failure> {
    let signal = shared.interrupted.load(Ordering::SeqCst);
    if signal != 0 {
        run.cancelled()?;
        return Ok((128 + signal).clamp(0, 255) as u8);
    }
    let mut builder = Command::new(&command[0]);
    builder
        .args(&command[1..])
        .env("RUNLEDGER_DB", &shared.location)
        .env("RUNLEDGER_RUN_ID", run.id().to_string())
        // The same id, marked as this exec's own: an exec in the command sees
        // it is not a run handed to it (see `handed_run`).
        .env(EXEC_RUN_VAR, run.id().to_string())
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if shared.own_group {
        builder.process_group(0);
    }
    die_with_parent(&mut builder);
    let mut child = match builder.spawn() {
        Ok(child) => child,
        Err(e) => {
            let what = command[0].to_string_lossy();
            let (code, reason) = match e.kind() {
                std::io::ErrorKind::NotFound => (127, format!("command not found: {what}")),
                std::io::ErrorKind::PermissionDenied => {
                    (126, format!("cannot execute {what}: {e}"))
                }
                _ => (1, format!("cannot start {what}: {e}")),
            };
            let _ = run.fail(&reason);
            return Err(Failure {
                message: reason,
                code,
            });
        }
    };
    let pid = rustix::process::Pid::from_child(&child);
    shared
        .child
        .store(pid.as_raw_nonzero().get(), Ordering::SeqCst);

    let started = Instant::now();
    let log = Arc::new(Mutex::new(log));
    let (tees_running, tees_done) = mpsc::channel::<()>();
    let mut states = Vec::new();
    for (source, to_stderr) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            false,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            true,
        ),
    ] {
        let state = Arc::new(TeeState::default());
        states.push(state.clone());
        tee(
            source,
            to_stderr,
            log.clone(),
            tees_running.clone(),
            state,
            started,
        );
    }

    // Wait in a thread, so that this one can watch for a cancel request
    // and for locks taken away.
    let (done_tx, done) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = done_tx.send(());
        status
    });
    let mut cancelled = false;
    let mut lost = vec![false; guards.len()];
    while let Err(RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_millis(500)) {
        if !cancelled && run.is_cancel_requested().unwrap_or(false) {
            eprintln!(
                "runledger: run {} was cancelled; stopping the command",
                run.id()
            );
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            cancelled = true;
        }
        for (guard, lost) in guards.iter().zip(lost.iter_mut()) {
            if !*lost && guard.is_held().ok() == Some(false) {
                *lost = true;
                eprintln!(
                    "runledger: run {}: its lock on {:?} was taken away (released by force, or \
                     its holder judged dead); the command goes on without it",
                    run.id(),
                    guard.keys()
                );
            }
        }
    }
    let status = waiter
        .join()
        .map_err(|_| "the waiting thread panicked".to_owned())?
        .map_err(|e| format!("waiting for the command failed: {e}"))?;
    shared.exited.store(true, Ordering::SeqCst);
    drain(&tees_done, tees_running, &states, started);

    if cancelled {
        run.cancelled()?;
        return Ok(status
            .code()
            .map_or_else(|| signal_code(&status), |c| c as u8));
    }
    if let Some(code) = status.code() {
        run.exit(code)?;
        // An exit status is 0–255 on Unix.
        return Ok(code as u8);
    }
    let signal = status.signal().unwrap_or(0);
    run.fail(format!("killed by signal {signal}{}", signal_name(signal)))?;
    Ok(signal_code(&status))
}

/// Waits for the command's output to be copied out: as long as it keeps
/// coming, or is being written to a slow reader. A pipe that a process the
/// command left behind holds open, silent for [`TEE_GRACE`], is not waited
/// for.
fn drain(
    done: &mpsc::Receiver<()>,
    running: mpsc::Sender<()>,
    states: &[Arc<TeeState>],
    started: Instant,
) {
    drop(running);
    // Every copy holds a sender: the channel disconnects when all are done.
    while let Err(RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_millis(50)) {
        let now = started.elapsed().as_millis() as u64;
        let grace = TEE_GRACE.as_millis() as u64;
        let idle = states.iter().all(|s| {
            s.done.load(Ordering::SeqCst)
                || (s.reading.load(Ordering::SeqCst)
                    && now.saturating_sub(s.last_data_ms.load(Ordering::SeqCst)) >= grace)
        });
        if idle {
            return;
        }
    }
}

/// 128 + the signal that killed a process, as shells report it.
fn signal_code(status: &std::process::ExitStatus) -> u8 {
    (128 + status.signal().unwrap_or(0)).clamp(0, 255) as u8
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGHUP => " (SIGHUP)",
        SIGINT => " (SIGINT)",
        SIGQUIT => " (SIGQUIT)",
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        13 => " (SIGPIPE)",
        SIGTERM => " (SIGTERM)",
        _ => "",
    }
}

/// Copies a command's output to the log and to ours, as it comes. When our
/// side is closed (`| head`), it stops reading, so that the command meets
/// the closed pipe as it would without `exec`. `running` is dropped when the
/// copy ends.
fn tee(
    source: Option<Box<dyn Read + Send>>,
    to_stderr: bool,
    log: Arc<Mutex<File>>,
    running: mpsc::Sender<()>,
    state: Arc<TeeState>,
    started: Instant,
) {
    std::thread::spawn(move || {
        let _running = running;
        let _done = Finished(&state.done);
        let Some(mut source) = source else { return };
        let mut buf = [0u8; 16 * 1024];
        loop {
            state.reading.store(true, Ordering::SeqCst);
            let read = source.read(&mut buf);
            state
                .last_data_ms
                .store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
            state.reading.store(false, Ordering::SeqCst);
            let n = match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The log first: what reached the terminal is always logged.
            if let Ok(mut log) = log.lock() {
                let _ = log.write_all(&buf[..n]);
            }
            let written = if to_stderr {
                let mut err = std::io::stderr().lock();
                err.write_all(&buf[..n]).and_then(|()| err.flush())
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf[..n]).and_then(|()| out.flush())
            };
            if written.is_err() {
                return;
            }
        }
    });
}

/// Sets a flag when dropped: a thread's end, however it ends.
struct Finished<'a>(&'a AtomicBool);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Whether this process leads its session (`ssh -t host runledger exec`,
/// a container's entry point): a hang-up then reaches it alone.
fn leads_its_session() -> bool {
    rustix::process::getsid(None).is_ok_and(|sid| sid == rustix::process::getpid())
}

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the command.
///
/// Without a terminal the command has a process group of its own, so every
/// signal for it comes through here, once. With a terminal it shares
/// `exec`'s group, as it must to read the terminal: the terminal's own
/// signals (Ctrl-C, Ctrl-\, a hang-up) already reach it and are not sent a
/// second time, except a hang-up to a session leader, which reaches the
/// leader alone. Before the command starts, a signal cancels the run (which
/// ends a wait for locks).
fn forward_signals(shared: Arc<Shared>) -> Result<Forwarder, Failure> {
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    let handle = signals.handle();
    let thread = std::thread::spawn(move || {
        for origin in signals.forever() {
            let signal = origin.signal;
            let pid = shared.child.load(Ordering::SeqCst);
            if pid == 0 {
                shared.interrupted.store(signal, Ordering::SeqCst);
                let run = shared.run.load(Ordering::SeqCst);
                if run != 0 {
                    let _ = shared.ledger.cancel(RunId::from(run));
                }
                continue;
            }
            if shared.exited.load(Ordering::SeqCst) {
                continue;
            }
            let reached_it = origin.cause == Cause::Kernel
                && !shared.own_group
                && !(signal == SIGHUP && leads_its_session());
            if reached_it {
                continue;
            }
            if let (Some(pid), Some(signal)) = (
                rustix::process::Pid::from_raw(pid),
                rustix::process::Signal::from_named_raw(signal),
            ) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    });
    Ok(Forwarder {
        handle,
        thread: Some(thread),
    })
}

/// The signal thread of [`forward_signals`], stopped and joined when
/// dropped, on every way out of `exec`: its handle of the ledger then goes
/// before `exec` returns, so that the ledger's last handle drops and its
/// instance is closed by this process, not left open for a reaper to close
/// as its process died.
struct Forwarder {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
