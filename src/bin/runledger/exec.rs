//! `runledger exec`: a command run as a recorded run, under the ledger's
//! locks.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use runledger::{Ledger, LockGuard, LockMode, LockRequest, LockState, Run, RunSpec};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
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
    /// forever by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "no_wait")]
    wait: Option<Duration>,

    /// Do not wait: exit 75 at once, naming the holder, if a lock is taken.
    #[arg(long)]
    no_wait: bool,

    /// Where to write the log file (created if missing). Defaults to the
    /// `logs` folder beside the ledger.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,

    /// Who started the run.
    #[arg(long, default_value = "terminal")]
    source: String,

    /// A metadata field recorded on the run (repeatable). The command line
    /// and working folder are recorded as `command` and `cwd`.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    meta: Vec<(String, String)>,

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
    fn requests(&self) -> Vec<LockRequest> {
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
        keyed.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let Some(first) = keyed.first().map(|k| k.1) else {
            return Vec::new();
        };
        if keyed.iter().all(|k| k.1 == first) {
            vec![LockRequest::new(keyed.into_iter().map(|k| k.0)).mode(first)]
        } else {
            keyed
                .into_iter()
                .map(|(key, mode)| LockRequest::new([key]).mode(mode))
                .collect()
        }
    }
}

/// The default name of a run: the command's file name.
fn command_name(command: &[OsString]) -> String {
    let name = Path::new(&command[0])
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.trim().is_empty() {
        "command".to_owned()
    } else {
        name.trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect()
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

pub(crate) fn exec(db: &Path, args: ExecArgs) -> Result<u8, Failure> {
    let ledger = Ledger::builder(db).label("runledger exec").open()?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| command_name(&args.command));
    let log_dir = match &args.log_dir {
        Some(dir) => dir.clone(),
        None => ledger.path().with_file_name("logs"),
    };
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| format!("cannot create the log folder {}: {e}", log_dir.display()))?;
    let log_path = log_file_path(&log_dir, &name);
    let log = File::create(&log_path)
        .map_err(|e| format!("cannot create the log file {}: {e}", log_path.display()))?;

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
    for (key, value) in &args.meta {
        metadata.insert(key.clone(), value.clone().into());
    }
    let requests = args.requests();
    let mut spec = RunSpec::new(name)
        .source(args.source.clone())
        .metadata(metadata.into())
        .log_path(&log_path);
    if !requests.is_empty() {
        spec = spec.queued();
    }
    let run = ledger.begin_run(spec)?;

    let guards = match take_locks(&ledger, &run, requests, &args) {
        Ok(guards) => guards,
        Err(e) => {
            let failure = Failure::from(e);
            let _ = run.fail(format!("did not get its locks: {}", failure.message));
            return Err(failure);
        }
    };
    if !guards.is_empty() {
        run.start()?;
    }
    let code = supervise(&ledger, run, &args.command, log)?;
    drop(guards); // released with the run already; this only drops the handles
    Ok(code)
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
    }
    Ok(guards)
}

/// Runs the command, tees its output, forwards signals, records how it
/// ended. Returns the exit code for `exec`.
fn supervise(ledger: &Ledger, run: Run, command: &[OsString], log: File) -> Result<u8, Failure> {
    let spawned = Command::new(&command[0])
        .args(&command[1..])
        .env("RUNLEDGER_DB", ledger.path())
        .env("RUNLEDGER_RUN_ID", run.id().to_string())
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
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
    let exited = Arc::new(AtomicBool::new(false));
    let forwarder = forward_signals(pid, exited.clone())?;

    let log = Arc::new(Mutex::new(log));
    let (tees_running, tees_done) = mpsc::channel::<()>();
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
        tee(source, to_stderr, log.clone(), tees_running.clone());
    }

    // Wait in a thread, so that this one can watch for a cancel request.
    let (done_tx, done) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        exited.store(true, Ordering::SeqCst);
        let _ = done_tx.send(());
        status
    });
    let mut cancelled = false;
    while let Err(RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_millis(500)) {
        if !cancelled && run.is_cancel_requested().unwrap_or(false) {
            eprintln!(
                "runledger: run {} was cancelled; stopping the command",
                run.id()
            );
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            cancelled = true;
        }
    }
    let status = waiter
        .join()
        .map_err(|_| "the waiting thread panicked".to_owned())?
        .map_err(|e| format!("waiting for the command failed: {e}"))?;
    // The output still in the pipes comes at once; a process the command
    // left behind may hold them open for much longer, and is not waited for.
    drop(tees_running);
    // Every tee holds a sender: the channel disconnects when both are done.
    let _ = tees_done.recv_timeout(TEE_GRACE);
    forwarder.close();

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

/// 128 + the signal that killed a process, as shells report it.
fn signal_code(status: &std::process::ExitStatus) -> u8 {
    (128 + status.signal().unwrap_or(0)).clamp(0, 255) as u8
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGHUP => " (SIGHUP)",
        SIGINT => " (SIGINT)",
        9 => " (SIGKILL)",
        SIGTERM => " (SIGTERM)",
        6 => " (SIGABRT)",
        11 => " (SIGSEGV)",
        _ => "",
    }
}

/// Copies a child's output to ours and to the log, as it comes.
/// `running` is dropped when the copy ends (end of output, or an error).
fn tee(
    source: Option<Box<dyn Read + Send>>,
    to_stderr: bool,
    log: Arc<Mutex<File>>,
    running: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let _running = running;
        let Some(mut source) = source else { return };
        let mut buf = [0u8; 16 * 1024];
        let mut terminal_open = true;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if terminal_open {
                // A closed terminal (`| head`) must not stop the log.
                terminal_open = if to_stderr {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&buf[..n]).and_then(|()| err.flush()).is_ok()
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&buf[..n]).and_then(|()| out.flush()).is_ok()
                };
            }
            if let Ok(mut log) = log.lock() {
                let _ = log.write_all(&buf[..n]);
            }
        }
    });
}

/// Forwards SIGINT, SIGTERM and SIGHUP sent to `exec` by another process to
/// the command. A terminal's own signals (Ctrl-C, hang-up) already reach
/// the command, which shares `exec`'s process group: those are not sent a
/// second time.
fn forward_signals(
    child: rustix::process::Pid,
    exited: Arc<AtomicBool>,
) -> Result<signal_hook::iterator::Handle, Failure> {
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for origin in signals.forever() {
            if exited.load(Ordering::SeqCst) || origin.cause == Cause::Kernel {
                continue;
            }
            if let Some(signal) = rustix::process::Signal::from_named_raw(origin.signal) {
                let _ = rustix::process::kill_process(child, signal);
            }
        }
    });
    Ok(handle)
}
