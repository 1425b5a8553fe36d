//! A process that does one ledger operation, for trying runledger across
//! processes by hand (and for the crate's cross-process tests, which spawn
//! it).
//!
//! ```text
//! cargo run --example worker -- DB open
//! cargo run --example worker -- DB begin NAME [--key KEY] [--at MS] [--hold-ms N]
//! cargo run --example worker -- DB race-succeed NAME --at MS
//! cargo run --example worker -- DB cancel ID [--at MS]
//! cargo run --example worker -- DB panic NAME
//! ```
//!
//! `--at MS` waits until that Unix time in milliseconds before acting, so that
//! several processes act at the same instant. Each command prints one line
//! saying what happened (`opened`, `started 7`, `duplicate 7`, `status
//! succeeded`…) and exits 0, or prints the error and exits 1.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runledger::{Error, Ledger, RunId, RunSpec};

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

fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (db, command) = match args {
        [db, command, ..] => (db, command.as_str()),
        _ => return Err("usage: worker DB open|begin|race-succeed|cancel|panic ...".into()),
    };
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or("missing argument");
    match command {
        "open" => {
            wait_until(args);
            let ledger = Ledger::open(db)?;
            say(format_args!("opened {}", ledger.instance_id()));
        }
        "begin" => {
            let ledger = Ledger::open(db)?;
            let mut spec = RunSpec::new(arg(2)?).source("worker");
            if let Some(key) = flag(args, "--key") {
                spec = spec.idempotency_key(key);
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
            let ledger = Ledger::open(db)?;
            let run = ledger.begin_run(RunSpec::new(arg(2)?).source("worker"))?;
            say(format_args!("started {}", run.id()));
            wait_until(args);
            say(format_args!("status {}", run.succeed()?));
        }
        "cancel" => {
            let ledger = Ledger::open(db)?;
            let id: RunId = arg(2)?.parse()?;
            wait_until(args);
            say(format_args!("status {}", ledger.cancel(id)?));
        }
        "panic" => {
            let ledger = Ledger::open(db)?;
            let run = ledger.begin_run(RunSpec::new(arg(2)?).source("worker"))?;
            say(format_args!("started {}", run.id()));
            panic!(
                "worker panicked on purpose while run {} was active",
                run.id()
            );
        }
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}
