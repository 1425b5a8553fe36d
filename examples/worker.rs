//! A process that does one ledger operation, for trying runledger across
//! processes by hand (and for the crate's cross-process tests, which spawn
//! it).
//!
//! ```text
//! cargo run --example worker -- DB open
//! cargo run --example worker -- DB begin NAME [--key KEY] [--window-ms N] [--at MS] [--hold-ms N]
//! cargo run --example worker -- DB race-succeed NAME --at MS
//! cargo run --example worker -- DB cancel ID [--at MS]
//! cargo run --example worker -- DB panic NAME
//! cargo run --example worker -- DB hold KEY [--also KEY] [--mode M] [--hold-ms N] [--wait-ms N] [--forever]
//!     [--host NAME --stale-ms N] [--queue-after-ms N] [--busy-ms N] [--no-keeper]
//!     [--stdin] [--report] [--transaction-pooler] [--listen-url URL]
//! cargo run --example worker -- DB occupy NAME --lock KEY --wait-for KEY [--host NAME]
//! cargo run --example worker -- DB torture --dir DIR --seed N [--host NAME] [--threads N]
//! cargo run --example worker -- DB writers --threads N
//! cargo run --example worker -- DB burst-runs N [--at MS]
//! cargo run --example worker -- DB critical KEY --mode M --times N --witness FILE [--counter FILE] [--threads N]
//!     [--flock-witness FILE] [--run NAME]
//! cargo run --example worker -- DB sweep-gates [--times N | --until FILE]
//! cargo run --example worker -- DB pingpong KEY --times N --hold-us N
//! cargo run --example worker -- DB load --keys K --ops N --impl ledger|bare --out FILE
//! cargo run --example worker -- DB fill NAME --bytes N
//! cargo run --example worker -- DB dispatch NAME [--linger] [ADOPT-FLAGS…]
//! cargo run --example worker -- DB adopt ID [--hold-ms N] [--exit CODE] [--forever]
//! cargo run --example worker -- DB watch-latency --count N
//! ```
//!
//! `dispatch` creates a run for another process to adopt, prints `created
//! ID`, starts `worker DB adopt ID` with the flags it was given (its output
//! goes to the same place), prints `spawned PID`, and exits at once, or
//! with `--linger` waits to be killed. `adopt` adopts the run, prints
//! `adopted ID`, waits `--hold-ms` (or forever), ends the run with
//! `run.exit(--exit)` and prints `status S`. `watch-latency` prints
//! `watching`, then for each of the next `--count` custom events whose data
//! has `sent_ns` (Unix nanoseconds), its `i` and the nanoseconds from then
//! to its arrival through `Ledger::watch`.
//!
//! `pingpong` takes and releases `KEY` `--times` times, holding it
//! `--hold-us` each time, and prints `acquired NS` and `released NS` (Unix
//! nanoseconds) for each: two of them hand the key back and forth. `load`
//! loops acquire/release on `--keys` keys, with the ledger or with a bare
//! SQLite row lock (the baseline: `INSERT` to take, `DELETE` to release,
//! retried, `busy_timeout` alone), and writes each acquire's latency in
//! microseconds to `--out`.
//!
//! `--mode` is `exclusive` (the default), `shared` or `slots:N`. `hold` takes
//! the lock, with `--also` a second key in the same request (an exclusive
//! request waits outside the queue up to `--queue-after-ms`, see
//! `Builder::queue_after`), prints `held TOKEN` (or `timeout`/`conflict` and
//! the error), keeps it `--hold-ms` (with `--stdin`, after a line on its
//! standard input; a line `probe` asks `is_held` first and prints `probe
//! BOOL MS`, or `probe error MS` and the error) or until killed with
//! `--forever`, then releases it; with `--report` it first prints `still
//! held BOOL` (`is_held`) and then `released`, or `lost` and the error if
//! the lock was lost. `--no-keeper` opens the ledger without its background
//! keeper (no heartbeat). `--transaction-pooler` and `--listen-url` are
//! `Builder::transaction_pooler(true)` and `Builder::listen_url` (feature
//! `postgres`).
//! `occupy` begins a run, starts a step it never finishes, takes `--lock`
//! for the run, prints `occupying RUN TOKEN`, then waits forever in the
//! queue of `--wait-for`: a process to kill with everything a process can
//! own in the ledger. With `--host`, it plays a process of another host,
//! which others judge by its heartbeat lease only.
//! `torture` loops until killed: a run with one to three steps, each step
//! taking a random request (exclusive or shared on one or two of the keys
//! `k0`…`k3`, or a slot of `gpu` with 2) and holding it through a short
//! critical section. In `--dir` it appends `ready PID` to `ready` once its
//! ledger is open (dead owners reaped), `begun RUN` to `begun` once a run
//! is registered, `enter|exit KEY TOKEN PID MODE` to `witness` around each
//! section, and `error KIND MESSAGE` to `errors` for any error (`busy` for
//! `database is locked`). With `--threads N` (default 1), N threads run that
//! loop at once, each with a ledger of its own (so that their locks exclude
//! each other); their writes share transactions (group commit).
//! `burst-runs` begins and finishes N runs and prints `done N` (or the first
//! error).
//!
//! `writers` loops until killed on `--threads` threads sharing one ledger:
//! each begins a run, prints `begun RUN`, gives it a step, then ends it and
//! prints `succeeded RUN` (or `failed RUN` for every third run, failed on
//! purpose), each line printed and flushed as soon as the call returned: a
//! process to kill in the middle of a group commit.
//! `sweep-gates` runs `prune` (which removes the gate files of idle keys)
//! `--times` times in a row, or until the file `--until` exists, and prints
//! `done N`: how many passes left fewer files than they found.
//! `critical` takes the lock `--times` times (on each of `--threads`
//! threads sharing one ledger, default 1); with `--flock-witness`, inside
//! each section it also takes a non-blocking flock of that file and fails
//! if someone else holds it; with `--run`, each turn is a run of that
//! name, which takes the lock and succeeds; each time it appends
//! `enter KEY TOKEN PID MODE` and `exit KEY TOKEN PID MODE` to the witness file (opened
//! in append mode) around a critical section that, with `--counter`, reads a
//! number from a plain file and writes it back plus one.
//!
//! `fill` begins and succeeds runs carrying `--bytes` of metadata each,
//! printing `begun ID` once a run's begin committed, until a write fails: it
//! then prints `failed` and the error's `Debug` form and exits 1. Run under
//! a file size limit (`ulimit -f`, with SIGXFSZ ignored), it shows what a
//! full disk does to a writer.
//!
//! `--at MS` waits until that Unix time in milliseconds before acting, so that
//! several processes act at the same instant. Each command prints one line
//! saying what happened (`opened`, `started 7`, `duplicate 7`, `status
//! succeeded`…) and exits 0, or prints the error and exits 1.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::io::Write;

use runledger::{Error, Ledger, LockMode, LockRequest, RunId, RunSpec};

fn mode(args: &[String]) -> Result<LockMode, String> {
    match flag(args, "--mode").unwrap_or("exclusive") {
        "exclusive" => Ok(LockMode::Exclusive),
        "shared" => Ok(LockMode::Shared),
        other => other
            .strip_prefix("slots:")
            .and_then(|n| n.parse().ok())
            .map(LockMode::Slots)
            .ok_or_else(|| format!("unknown mode {other:?}")),
    }
}

fn number(args: &[String], name: &str, default: u64) -> u64 {
    flag(args, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        println!("error {e}");
        std::process::exit(1);
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

fn wait_until(args: &[String]) {
    if let Some(at) = flag(args, "--at").and_then(|v| v.parse::<u128>().ok()) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        if at > now {
            std::thread::sleep(Duration::from_millis((at - now) as u64));
        }
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (db, command) = match args {
        [db, command, ..] => (db, command.as_str()),
        _ => {
            return Err(
                "usage: worker DB open|begin|race-succeed|cancel|panic|hold|critical ...".into(),
            );
        }
    };
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or("missing argument");
    match command {
        "open" => {
            wait_until(args);
            let ledger = Ledger::builder(db).open()?;
            say(format_args!("opened {}", ledger.instance_id()));
        }
        "dispatch" => {
            let ledger = Ledger::builder(db).open()?;
            let id = ledger.create_run(RunSpec::new(arg(2)?).source("dispatcher"))?;
            say(format_args!("created {id}"));
            let passed: Vec<&String> = args[3..].iter().filter(|a| *a != "--linger").collect();
            let child = std::process::Command::new(std::env::current_exe()?)
                .arg(db)
                .arg("adopt")
                .arg(id.to_string())
                .args(passed)
                .spawn()?;
            say(format_args!("spawned {}", child.id()));
            if args.iter().any(|a| a == "--linger") {
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                }
            }
        }
        "adopt" => {
            let ledger = Ledger::builder(db).open()?;
            let id: RunId = arg(2)?.parse()?;
            let run = ledger.adopt_run(id)?;
            say(format_args!("adopted {id}"));
            if args.iter().any(|a| a == "--forever") {
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                }
            }
            std::thread::sleep(Duration::from_millis(number(args, "--hold-ms", 0)));
            let code = flag(args, "--exit").map_or(Ok(0), str::parse)?;
            say(format_args!("status {}", run.exit(code)?));
        }
        "watch-latency" => {
            let ledger = Ledger::builder(db).open()?;
            let mut watch = ledger.watch(ledger.events_cursor()?)?;
            say("watching");
            let mut left = number(args, "--count", 1);
            while left > 0 {
                let event = watch.next().ok_or("the watch ended")??;
                let arrived = unix_nanos();
                if let runledger::EventKind::Custom { data, .. } = &event.kind
                    && let Some(sent) = data["sent_ns"].as_u64()
                {
                    say(format_args!(
                        "{} {}",
                        data["i"],
                        arrived.saturating_sub(u128::from(sent))
                    ));
                    left -= 1;
                }
            }
        }
        "begin" => {
            let ledger = Ledger::builder(db).open()?;
            let mut spec = RunSpec::new(arg(2)?).source("worker");
            if let Some(key) = flag(args, "--key") {
                spec = spec.idempotency_key(key);
            }
            if let Some(ms) = flag(args, "--window-ms") {
                spec = spec.idempotency_window(Duration::from_millis(ms.parse()?));
            }
            wait_until(args);
            match ledger.begin_run(spec) {
                Ok(run) => {
                    say(format_args!("started {}", run.id()));
                    let hold = flag(args, "--hold-ms")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    std::thread::sleep(Duration::from_millis(hold));
                    run.succeed()?;
                }
                Err(Error::Duplicate { existing, .. }) => say(format_args!("duplicate {existing}")),
                Err(e) => return Err(e.into()),
            }
        }
        "race-succeed" => {
            let ledger = Ledger::builder(db).open()?;
            let run = ledger.begin_run(RunSpec::new(arg(2)?).source("worker"))?;
            say(format_args!("started {}", run.id()));
            wait_until(args);
            say(format_args!("status {}", run.succeed()?));
        }
        "cancel" => {
            let ledger = Ledger::builder(db).open()?;
            let id: RunId = arg(2)?.parse()?;
            wait_until(args);
            say(format_args!("status {}", ledger.cancel(id)?));
        }
        "panic" => {
            let ledger = Ledger::builder(db).open()?;
            let run = ledger.begin_run(RunSpec::new(arg(2)?).source("worker"))?;
            say(format_args!("started {}", run.id()));
            panic!(
                "worker panicked on purpose while run {} was active",
                run.id()
            );
        }
        "hold" => {
            // --host NAME --stale-ms N: a host of its own, judged by a
            // lease of N ms (to be paused past it).
            let mut builder = Ledger::builder(db);
            if let Some(host) = flag(args, "--host") {
                builder = builder.host(host);
            }
            if let Some(ms) = flag(args, "--stale-ms") {
                builder = builder.stale_after(Duration::from_millis(ms.parse()?));
            }
            if let Some(ms) = flag(args, "--queue-after-ms") {
                builder = builder.queue_after(Duration::from_millis(ms.parse()?));
            }
            if args.iter().any(|a| a == "--no-keeper") {
                builder = builder.background(false);
            }
            if let Some(ms) = flag(args, "--busy-ms") {
                builder = builder.busy_timeout(Duration::from_millis(ms.parse()?));
            }
            // Through a transaction pooler, with a direct URL to listen on.
            #[cfg(feature = "postgres")]
            {
                if args.iter().any(|a| a == "--transaction-pooler") {
                    builder = builder.transaction_pooler(true);
                }
                if let Some(url) = flag(args, "--listen-url") {
                    builder = builder.listen_url(url);
                }
            }
            let ledger = builder.open()?;
            let mut keys = vec![arg(2)?];
            keys.extend(flag(args, "--also"));
            let mut request = LockRequest::new(keys).mode(mode(args)?);
            request = match flag(args, "--wait-ms") {
                Some(ms) => request.wait(Duration::from_millis(ms.parse()?)),
                None => request.wait_forever(),
            };
            wait_until(args);
            let guard = match ledger.acquire(request) {
                Ok(guard) => guard,
                Err(e @ (Error::Timeout { .. } | Error::Conflict { .. })) => {
                    let word = if e.is_timeout() {
                        "timeout"
                    } else {
                        "conflict"
                    };
                    say(format_args!("{word} {e}"));
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            say(format_args!("held {}", guard.token()));
            if args.iter().any(|a| a == "--forever") {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            if args.iter().any(|a| a == "--stdin") {
                // Until told to go on: a line on stdin (or its end).
                // `probe` first asks `is_held` and prints `probe BOOL MS`
                // (or `probe error MS` and the error), MS how long it took.
                loop {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    if line.trim() != "probe" {
                        break;
                    }
                    let started = std::time::Instant::now();
                    let held = guard.is_held();
                    let ms = started.elapsed().as_millis();
                    match held {
                        Ok(held) => say(format_args!("probe {held} {ms}")),
                        Err(e) => say(format_args!("probe error {ms} {e}")),
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(number(args, "--hold-ms", 0)));
            if args.iter().any(|a| a == "--report") {
                say(format_args!("still held {}", guard.is_held()?));
                match guard.release() {
                    Ok(()) => say("released"),
                    Err(e) if e.is_lock_lost() => say(format_args!("lost {e}")),
                    Err(e) => return Err(e.into()),
                }
                return Ok(());
            }
            guard.release()?;
            say("released");
        }
        "occupy" => {
            let mut builder = Ledger::builder(db);
            if let Some(host) = flag(args, "--host") {
                // Plays a process on another host: judged by its lease.
                builder = builder.host(host);
            }
            let ledger = builder.open()?;
            let run = ledger.begin_run(RunSpec::new(arg(2)?).source("worker"))?;
            let step = run.step("forever")?;
            let guard = run.lock(flag(args, "--lock").ok_or("missing --lock")?)?;
            say(format_args!("occupying {} {}", run.id(), guard.token()));
            let wait_for = flag(args, "--wait-for").ok_or("missing --wait-for")?;
            let queued = ledger.acquire(LockRequest::new([wait_for]).wait_forever());
            // Only reached if the key was free or the queue place vanished.
            say(format_args!("unexpected {:?}", queued.map(|g| g.token())));
            drop((step, guard));
        }
        "torture" => {
            let threads = number(args, "--threads", 1).max(1);
            let loops: Vec<_> = (0..threads)
                .map(|t| {
                    let (db, args) = (db.clone(), args.to_vec());
                    std::thread::spawn(move || torture(&db, &args, t).map_err(|e| e.to_string()))
                })
                .collect();
            for l in loops {
                l.join().map_err(|_| "a torture thread panicked")??;
            }
        }
        "writers" => {
            let ledger = Ledger::builder(db).open()?;
            let threads: Vec<_> = (0..number(args, "--threads", 8).max(1))
                .map(|_| {
                    let ledger = ledger.clone();
                    std::thread::spawn(move || -> Result<(), Error> {
                        for i in 0u64.. {
                            let run = ledger.begin_run(RunSpec::new("writers").source("worker"))?;
                            let id = run.id();
                            say(format_args!("begun {id}"));
                            run.step("only")?.succeed()?;
                            if i % 3 == 2 {
                                run.fail("failed on purpose")?;
                                say(format_args!("failed {id}"));
                            } else {
                                run.succeed()?;
                                say(format_args!("succeeded {id}"));
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for t in threads {
                t.join().map_err(|_| "a writer thread panicked")??;
            }
        }
        "burst-runs" => {
            let ledger = Ledger::builder(db).open()?;
            let n = arg(2)?.parse::<u64>()?;
            wait_until(args);
            for i in 0..n {
                let run = ledger.begin_run(RunSpec::new(format!("burst-{i}")).source("worker"))?;
                run.succeed()?;
            }
            say(format_args!("done {n}"));
        }
        "critical" => {
            let ledger = Ledger::builder(db).open()?;
            let key = arg(2)?;
            let mode = mode(args)?;
            let witness = flag(args, "--witness").ok_or("missing --witness")?;
            let witness = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(witness)?;
            let (times, threads) = (number(args, "--times", 1), number(args, "--threads", 1));
            let counter = flag(args, "--counter");
            let turns = Turns {
                key,
                mode,
                times,
                counter,
                flock_witness: flag(args, "--flock-witness"),
                run_name: flag(args, "--run"),
            };
            // Every thread shares the one ledger: their turns queue like
            // those of other processes.
            std::thread::scope(|s| {
                let turns: Vec<_> = (0..threads)
                    .map(|_| s.spawn(|| critical(&ledger, &turns, &witness)))
                    .collect();
                turns
                    .into_iter()
                    .map(|t| t.join().expect("a critical thread panicked"))
                    .collect::<Result<Vec<()>, _>>()
            })
            .map_err(|e| -> Box<dyn std::error::Error> { e })?;
            say("done");
        }
        "sweep-gates" => {
            // Removes the gate files of idle keys in a loop, as retention
            // does, until `--times` passes are done.
            let ledger = Ledger::builder(db).background(false).open()?;
            let keys = std::path::PathBuf::from(format!("{db}-runledger/keys"));
            let files = || std::fs::read_dir(&keys).map_or(0, |entries| entries.count());
            // How many times a pass found files and left fewer.
            let mut shrank = 0;
            let until = flag(args, "--until").map(std::path::Path::new);
            let mut passes = 0;
            loop {
                passes += 1;
                let done = match until {
                    Some(stop) => stop.exists(),
                    None => passes > number(args, "--times", 1),
                };
                if done {
                    break;
                }
                let before = files();
                ledger.prune(Duration::from_secs(100 * 365 * 24 * 3600))?;
                if files() < before {
                    shrank += 1;
                }
            }
            say(format_args!("done {shrank}"));
        }
        "pingpong" => {
            let ledger = Ledger::builder(db).open()?;
            let key = arg(2)?;
            let hold = Duration::from_micros(number(args, "--hold-us", 500));
            let mut out = String::new();
            for _ in 0..number(args, "--times", 100) {
                let guard = ledger.acquire(LockRequest::new([key]).wait_forever())?;
                out.push_str(&format!("acquired {}\n", unix_nanos()));
                std::thread::sleep(hold);
                out.push_str(&format!("released {}\n", unix_nanos()));
                guard.release()?;
            }
            print!("{out}");
        }
        "load" => {
            let keys = number(args, "--keys", 4);
            let ops = number(args, "--ops", 1000);
            let out = flag(args, "--out").ok_or("missing --out")?;
            let bare = flag(args, "--impl") == Some("bare");
            // Every process on a key of its own: writer contention without
            // lock contention.
            let own = args.iter().any(|a| a == "--own-key");
            let key_of = |i: u64| {
                if own {
                    format!("own-{}", std::process::id())
                } else {
                    format!("key-{}", (i + u64::from(std::process::id())) % keys)
                }
            };
            let mut latencies = String::new();
            let started = std::time::Instant::now();
            if bare {
                let conn = rusqlite::Connection::open(db)?;
                conn.busy_timeout(Duration::from_secs(60))?;
                conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
                for i in 0..ops {
                    let key = key_of(i);
                    let t = std::time::Instant::now();
                    loop {
                        conn.execute_batch("BEGIN IMMEDIATE")?;
                        let taken = conn.execute(
                            "INSERT OR IGNORE INTO bare_locks (key) VALUES (?1)",
                            [&key],
                        )?;
                        conn.execute_batch("COMMIT")?;
                        if taken == 1 {
                            break;
                        }
                        std::thread::yield_now();
                    }
                    latencies.push_str(&format!("{}\n", t.elapsed().as_micros()));
                    conn.execute_batch("BEGIN IMMEDIATE")?;
                    conn.execute("DELETE FROM bare_locks WHERE key = ?1", [&key])?;
                    conn.execute_batch("COMMIT")?;
                }
            } else {
                let ledger = Ledger::builder(db).open()?;
                for i in 0..ops {
                    let key = key_of(i);
                    let t = std::time::Instant::now();
                    let guard = ledger.acquire(LockRequest::new([key]).wait_forever())?;
                    latencies.push_str(&format!("{}\n", t.elapsed().as_micros()));
                    guard.release()?;
                }
            }
            std::fs::write(out, latencies)?;
            say(format_args!("done {}", started.elapsed().as_micros()));
        }
        "fill" => {
            let ledger = Ledger::builder(db).background(false).open()?;
            let blob = "x".repeat(usize::try_from(number(args, "--bytes", 4000))?);
            let outcome = (|| -> Result<(), Error> {
                loop {
                    let run = ledger.begin_run(
                        RunSpec::new(arg(2).unwrap_or("fill"))
                            .source("worker")
                            .metadata(serde_json::json!({ "blob": blob })),
                    )?;
                    say(format_args!("begun {}", run.id()));
                    run.succeed()?;
                }
            })();
            if let Err(e) = outcome {
                say(format_args!("failed {e:?}"));
                std::process::exit(1);
            }
        }
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}

/// A small deterministic generator (xorshift64*): the torture's choices are
/// reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Appends one line to a file opened in append mode: one `write`, so lines
/// of concurrent processes never interleave.
fn append(file: &std::fs::File, line: std::fmt::Arguments<'_>) {
    let mut file = file;
    let _ = file.write_all(format!("{line}\n").as_bytes());
}

/// What each thread of `critical` does.
struct Turns<'a> {
    key: &'a str,
    mode: LockMode,
    times: u64,
    counter: Option<&'a str>,
    flock_witness: Option<&'a str>,
    run_name: Option<&'a str>,
}

/// `times` critical sections under `key`, each witnessed (and counted).
fn critical(
    ledger: &Ledger,
    turns: &Turns<'_>,
    mut witness: &std::fs::File,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Turns {
        key,
        mode,
        times,
        counter,
        flock_witness,
        run_name,
    } = *turns;
    let pid = std::process::id();
    // Opened by each thread: an flock belongs to the open file, so threads
    // sharing one would not exclude each other.
    let flock_witness = match flock_witness {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)?,
        ),
        None => None,
    };
    for _ in 0..times {
        let request = LockRequest::new([key]).mode(mode).wait_forever();
        let run = match run_name {
            Some(name) => Some(ledger.begin_run(RunSpec::new(name).source("worker"))?),
            None => None,
        };
        let guard = match &run {
            Some(run) => run.acquire(request)?,
            None => ledger.acquire(request)?,
        };
        let token = guard.token();
        // An flock of a file of its own, independent of the ledger: taken
        // without waiting, it fails if anyone else is inside.
        if let Some(file) = &flock_witness
            && file.try_lock().is_err()
        {
            return Err(format!("flock witness: someone else is inside (token {token})").into());
        }
        witness.write_all(format!("enter {key} {token} {pid} {mode}\n").as_bytes())?;
        if let Some(counter) = counter {
            let n: u64 = std::fs::read_to_string(counter)?
                .trim()
                .parse()
                .unwrap_or(0);
            std::thread::sleep(Duration::from_micros(200));
            std::fs::write(counter, format!("{}\n", n + 1))?;
        }
        witness.write_all(format!("exit {key} {token} {pid} {mode}\n").as_bytes())?;
        if let Some(file) = &flock_witness {
            file.unlock()?;
        }
        guard.release()?;
        if let Some(run) = run {
            run.succeed()?;
        }
    }
    Ok(())
}

fn torture(db: &str, args: &[String], thread: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(flag(args, "--dir").ok_or("missing --dir")?);
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
    };
    let (begun, witness, errors) = (open("begun")?, open("witness")?, open("errors")?);
    let ready = open("ready")?;
    let mut builder = Ledger::builder(db).lock_wait(Duration::from_secs(60));
    if let Some(host) = flag(args, "--host") {
        builder = builder.host(host);
    }
    let ledger = builder.open()?;
    let pid = std::process::id();
    append(&ready, format_args!("ready {pid}"));
    let mut rng = Rng(number(args, "--seed", 1) ^ (u64::from(pid) << 20) ^ (thread << 52) | 1);
    let record = |e: &Error| {
        let kind = if e.is_busy() { "busy" } else { "other" };
        append(&errors, format_args!("error {kind} {pid} {e}"));
    };
    loop {
        let run = match ledger.begin_run(RunSpec::new("torture").source("worker")) {
            Ok(run) => run,
            Err(e) => {
                record(&e);
                continue;
            }
        };
        append(&begun, format_args!("begun {}", run.id()));
        for s in 0..=rng.below(3) {
            let step = match run.step(format!("step-{s}")) {
                Ok(step) => step,
                Err(e) => {
                    record(&e);
                    break;
                }
            };
            let (keys, mode) = match rng.below(5) {
                0 | 1 => (pick_keys(&mut rng), LockMode::Exclusive),
                2 | 3 => (pick_keys(&mut rng), LockMode::Shared),
                _ => (vec!["gpu".to_owned()], LockMode::Slots(2)),
            };
            match run.acquire(LockRequest::new(keys.clone()).mode(mode)) {
                Ok(guard) => {
                    let token = guard.token();
                    for key in &keys {
                        append(
                            &witness,
                            format_args!("enter {key} {token} {pid} {}", mode.as_str()),
                        );
                    }
                    std::thread::sleep(Duration::from_micros(rng.below(2000)));
                    for key in &keys {
                        append(
                            &witness,
                            format_args!("exit {key} {token} {pid} {}", mode.as_str()),
                        );
                    }
                    if let Err(e) = guard.release() {
                        record(&e);
                    }
                }
                Err(e) => record(&e),
            }
            if let Err(e) = step.succeed() {
                record(&e);
            }
        }
        if let Err(e) = run.succeed() {
            record(&e);
        }
    }
}

/// One or two distinct keys among k0…k3.
fn pick_keys(rng: &mut Rng) -> Vec<String> {
    let first = rng.below(4);
    let mut keys = vec![format!("k{first}")];
    if rng.below(2) == 0 {
        let second = (first + 1 + rng.below(3)) % 4;
        keys.push(format!("k{second}"));
    }
    keys
}
