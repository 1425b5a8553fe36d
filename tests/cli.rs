//! The `runledger` binary, run as a user would: exit codes, locks between
//! two `exec`s, signals, logs, `--json` shapes, bad input.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Cli {
    dir: tempfile::TempDir,
}

impl Cli {
    /// A folder with an empty ledger in it.
    fn new() -> Cli {
        let cli = Cli {
            dir: tempfile::tempdir().unwrap(),
        };
        drop(runledger::Ledger::open(cli.db()).unwrap());
        cli
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_runledger"));
        command
            .arg("--db")
            .arg(self.db())
            .args(args)
            .env_remove("RUNLEDGER_DB")
            .env_remove("RUNLEDGER_RUN_ID")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs a reading command with `--json` and parses its output.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", text(&out.stdout)))
    }

    /// Waits until a run with this name is running; returns its record.
    fn running(&self, name: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let runs = self.json(&["ps"]);
            if let Some(run) = runs
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == name && r["status"] == "running")
            {
                return run.clone();
            }
            assert!(Instant::now() < deadline, "{name} never ran: {runs}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

/// One line on stderr, no backtrace.
fn one_line_error(out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    err
}

fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn exec_exits_with_the_commands_code_and_records_it() {
    let cli = Cli::new();
    for (script, expected, status) in [
        ("exit 0", 0, "succeeded"),
        ("exit 1", 1, "failed"),
        ("exit 42", 42, "failed"),
        ("kill -9 $$", 128 + 9, "failed"),
    ] {
        let out = cli.run(&["exec", "--name", "job", "--", "sh", "-c", script]);
        assert_eq!(code(&out), expected, "{script}: {}", text(&out.stderr));
        let run = &cli.json(&["runs", "--limit", "1"])[0];
        assert_eq!(run["status"], status, "{script}: {run}");
        if expected == 137 {
            assert_eq!(run["error"], "killed by signal 9 (SIGKILL)");
        } else {
            assert_eq!(run["exit_code"], expected);
        }
    }
}

#[test]
fn help_never_shows_a_password_from_the_environment() {
    for args in [&["--help"][..], &["ps", "--help"], &["serve", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(args)
            .env("RUNLEDGER_DB", "postgres://app:hunter2@127.0.0.1/db#s")
            .env(
                "RUNLEDGER_LISTEN_URL",
                "postgres://app:hunter3@127.0.0.1/db",
            )
            .env("RUNLEDGER_TOKEN", "hunter4")
            .output()
            .unwrap();
        let help = text(&out.stdout);
        assert!(
            out.status.success() && help.contains("RUNLEDGER_DB"),
            "{args:?}: {help}"
        );
        assert!(!help.contains("hunter"), "{args:?}: {help}");
    }
}

#[test]
fn a_leftover_run_id_in_the_environment_is_named_as_the_cause() {
    let cli = Cli::new();
    let out = cli.run(&["exec", "--name", "first", "--", "false"]);
    assert_eq!(code(&out), 1);
    let id = cli.json(&["runs", "--limit", "1"])[0]["id"].to_string();
    // The shell still has the variable of that run.
    let out = cli
        .command(&["exec", "--", "true"])
        .env("RUNLEDGER_RUN_ID", &id)
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let err = one_line_error(&out);
    assert!(
        err.contains("RUNLEDGER_RUN_ID")
            && err.contains("already finished")
            && err.contains("unset"),
        "{err}"
    );
}

#[test]
fn the_pooler_switch_reads_as_a_shell_sets_it_and_is_refused_for_a_file() {
    let cli = Cli::new();
    let with = |value: &str| {
        cli.command(&["ps"])
            .env("RUNLEDGER_TRANSACTION_POOLER", value)
            .output()
            .unwrap()
    };
    for off in ["0", "no", "off", "false"] {
        let out = with(off);
        assert_eq!(code(&out), 0, "{off}: {}", text(&out.stderr));
    }
    for on in ["1", "yes", "on", "true"] {
        let out = with(on);
        assert_eq!(code(&out), 2, "{on}");
        let err = one_line_error(&out);
        assert!(
            err.contains("--transaction-pooler") && err.contains("postgres://"),
            "{err}"
        );
    }
    assert_eq!(code(&with("maybe")), 2);
}

#[test]
fn exec_closes_its_instance_as_it_exits() {
    // Not left open for the next process's reaper to close as dead: with
    // locks or without, after a command that succeeded or failed.
    let cli = Cli::new();
    for args in [
        &["exec", "--", "true"][..],
        &["exec", "--", "false"],
        &["exec", "--lock", "a", "--", "true"],
    ] {
        let out = cli.run(args);
        assert!(code(&out) <= 1, "{args:?}: {}", text(&out.stderr));
        let conn = rusqlite::Connection::open(cli.db()).unwrap();
        let (label, reason): (String, Option<String>) = conn
            .query_row(
                "SELECT label, closed_reason FROM instances ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(label, "runledger exec", "{args:?}");
        assert_eq!(
            reason.as_deref(),
            Some("its process closed the ledger"),
            "{args:?}"
        );
    }
}

#[test]
fn the_command_sees_its_run_and_its_output_is_logged() {
    let cli = Cli::new();
    let out = cli.run(&[
        "exec",
        "--meta",
        "ticket=OPS-7",
        "--",
        "sh",
        "-c",
        "echo \"run=$RUNLEDGER_RUN_ID db=$RUNLEDGER_DB\"; echo to-stderr >&2",
    ]);
    assert_eq!(code(&out), 0);
    let run = &cli.json(&["runs"])[0];
    let id = run["id"].as_i64().unwrap();
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(&format!("run={id} db=")), "{stdout}");
    assert!(text(&out.stderr).contains("to-stderr"));
    assert_eq!(run["source"], "terminal");
    assert_eq!(run["name"], "sh");
    assert_eq!(run["metadata"]["ticket"], "OPS-7");
    assert_eq!(run["metadata"]["command"][0], "sh");
    let log = std::fs::read_to_string(run["log_path"].as_str().unwrap()).unwrap();
    assert!(
        log.contains(&format!("run={id}")) && log.contains("to-stderr"),
        "{log}"
    );
    let logs = cli.run(&["logs", &id.to_string()]);
    assert_eq!(text(&logs.stdout), log);
    let followed = cli.run(&["logs", "-f", &id.to_string()]);
    assert_eq!(text(&followed.stdout), log);
}

#[test]
fn a_second_exec_of_a_held_lock_refuses_or_waits() {
    let cli = Cli::new();
    let mut first = cli.spawn(&[
        "exec", "--name", "first", "--lock", "deploy", "--", "sleep", "1",
    ]);
    let holder = cli.running("first");

    let refused = cli.run(&["exec", "--no-wait", "--lock", "deploy", "--", "true"]);
    assert_eq!(code(&refused), 75);
    let err = one_line_error(&refused);
    assert!(
        err.contains("\"deploy\" is held by run") && err.contains(&format!("run {}", holder["id"])),
        "{err}"
    );

    let waited = cli.run(&[
        "exec", "--name", "second", "--wait", "30s", "--lock", "deploy", "--", "true",
    ]);
    assert_eq!(code(&waited), 0, "{}", text(&waited.stderr));
    assert!(text(&waited.stderr).contains("waits"), "says it waits");
    assert!(first.wait().unwrap().success());
    let runs = cli.json(&["runs"]);
    let find = |name: &str| {
        runs.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone()
    };
    let (first, second) = (find("first"), find("second"));
    assert_eq!(second["status"], "succeeded");
    // The second started only once the first had finished.
    let at = |r: &Value, field: &str| r[field].as_str().unwrap().to_owned();
    assert!(
        at(&second, "started_at") >= at(&first, "finished_at"),
        "{first} {second}"
    );
    // The waiter said when its wait ended.
    assert!(
        text(&waited.stderr).contains("got \"deploy\" after waiting"),
        "{}",
        text(&waited.stderr)
    );
    // Regression (issue 19): the refused turn is recorded, with why, but
    // as cancelled: `runs --status failed` lists only what failed.
    let refused_run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "true")
        .unwrap();
    assert_eq!(refused_run["status"], "cancelled", "{refused_run}");
    assert_eq!(refused_run["started_at"], Value::Null, "{refused_run}");
    let why = refused_run["error"].as_str().unwrap();
    assert!(
        why.starts_with("did not start: ") && why.contains("\"deploy\" is held by run"),
        "{why}"
    );
    assert_eq!(
        cli.json(&["runs", "--status", "failed"]),
        serde_json::json!([])
    );
}

#[test]
fn a_wait_that_runs_out_exits_75() {
    let cli = Cli::new();
    let mut holder = cli.spawn(&[
        "exec", "--name", "holder", "--shared", "data", "--", "sleep", "3",
    ]);
    cli.running("holder");
    let out = cli.run(&["exec", "--wait", "300ms", "--lock", "data", "--", "true"]);
    assert_eq!(code(&out), 75);
    assert!(
        text(&out.stderr).contains("gave up after waiting"),
        "{}",
        text(&out.stderr)
    );
    // Recorded as a turn that did not come, not as a failure.
    let run = &cli.json(&["runs", "--name", "true"])[0];
    assert_eq!(run["status"], "cancelled", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .starts_with("did not start: gave up after waiting"),
        "{run}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn sigterm_to_exec_reaches_the_command_and_is_recorded() {
    let cli = Cli::new();
    let ready = cli.dir.path().join("ready");
    let script = format!(
        "trap 'echo got-term; exit 3' TERM; touch {}; sleep 30 & wait",
        ready.display()
    );
    let exec = cli.spawn(&["exec", "--name", "trapper", "--", "sh", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the trap was never set");
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(exec.id(), "-TERM");
    let out = exec.wait_with_output().unwrap();
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("got-term"));
    let run = &cli.json(&["runs"])[0];
    assert_eq!(
        (run["status"].as_str(), run["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );

    // Without a trap, the command dies of it: 128 + 15.
    let mut exec = cli.spawn(&["exec", "--name", "plain", "--", "sleep", "30"]);
    cli.running("plain");
    kill(exec.id(), "-TERM");
    assert_eq!(exec.wait().unwrap().code(), Some(128 + 15));
    let run = &cli.json(&["runs"])[0];
    assert_eq!(run["error"], "killed by signal 15 (SIGTERM)");
}

#[test]
fn a_killed_exec_is_reaped_with_the_reason() {
    let cli = Cli::new();
    let pidfile = cli.dir.path().join("child.pid");
    let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    let mut exec = cli.spawn(&[
        "exec", "--name", "orphan", "--lock", "k", "--", "sh", "-c", &script,
    ]);
    let run = cli.running("orphan");
    // Regression: the file exists as soon as the shell opened it, and was
    // read empty under load (then `/proc/` "outlived" the exec).
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let written = std::fs::read_to_string(&pidfile).unwrap_or_default();
        if written.ends_with('\n') && written.trim().parse::<u32>().is_ok() {
            break written;
        }
        assert!(Instant::now() < deadline, "no pid written: {written:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    kill(exec.id(), "-KILL");
    exec.wait().unwrap();
    // The command dies with its `exec`: it must not go on without the lock.
    let deadline = Instant::now() + Duration::from_secs(20);
    let proc_dir = Path::new("/proc").join(pid.trim());
    while proc_dir.exists()
        && !std::fs::read_to_string(proc_dir.join("stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(Instant::now() < deadline, "the command outlived its exec");
        std::thread::sleep(Duration::from_millis(10));
    }
    let reap = cli.run(&["reap"]);
    assert_eq!(code(&reap), 0, "{}", text(&reap.stderr));
    assert!(
        text(&reap.stdout).contains("process exited"),
        "{}",
        text(&reap.stdout)
    );
    let shown = cli.json(&["show", &run["id"].to_string()]);
    assert_eq!(shown["run"]["status"], "failed");
    assert!(
        shown["run"]["error"]
            .as_str()
            .unwrap()
            .contains("owner gone: process exited")
    );
    assert_eq!(shown["locks"], serde_json::json!([]));
}

/// Issue 20: `exec --idempotency-key K --idempotency-window W` starts a
/// command once per window; a repeat starts nothing, names the run, and
/// exits as that run did.
#[test]
fn exec_with_an_idempotency_window_runs_a_command_once() {
    let cli = Cli::new();
    let once = |cmd: &str| {
        cli.run(&[
            "exec",
            "--name",
            "nightly",
            "--idempotency-key",
            &format!("nightly:{cmd}"),
            "--idempotency-window",
            "24h",
            "--",
            cmd,
        ])
    };
    assert_eq!(code(&once("true")), 0);
    let again = once("true");
    assert_eq!(code(&again), 0, "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains(
            "not started: run 1 (nightly, succeeded) holds idempotency key \"nightly:true\""
        ),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(code(&once("false")), 1);
    let failed_again = once("false");
    assert_eq!(code(&failed_again), 1);
    assert!(text(&failed_again.stderr).contains("(nightly, failed)"));
    // Two runs recorded, one per key; nothing for the refused starts.
    let runs = cli.json(&["runs"]);
    assert_eq!(runs.as_array().unwrap().len(), 2, "{runs}");
    // Without a window, a finished run does not hold its key.
    let plain = |key: &str| {
        cli.run(&[
            "exec",
            "--name",
            "plain",
            "--idempotency-key",
            key,
            "--",
            "true",
        ])
    };
    assert_eq!(code(&plain("p")), 0);
    assert_eq!(code(&plain("p")), 0);
    assert_eq!(
        cli.json(&["runs", "--name", "plain"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // A window needs a key.
    let usage = cli.run(&["exec", "--idempotency-window", "1h", "--", "true"]);
    assert_eq!(code(&usage), 2);
}

#[test]
fn cancel_stops_an_exec_run() {
    let cli = Cli::new();
    let exec = cli.spawn(&["exec", "--name", "long", "--", "sleep", "30"]);
    let run = cli.running("long");
    let id = run["id"].to_string();
    let cancel = cli.json(&["cancel", &id]);
    assert_eq!(cancel["status"], "running", "asked, not yet stopped");
    let out = exec.wait_with_output().unwrap();
    assert_eq!(code(&out), 128 + 15);
    assert_eq!(cli.json(&["show", &id])["run"]["status"], "cancelled");
}

#[test]
fn every_json_output_parses_with_the_documented_fields() {
    let cli = Cli::new();
    let mut holder = cli.spawn(&[
        "exec", "--name", "holder", "--lock", "a", "--", "sleep", "30",
    ]);
    let run = cli.running("holder");
    for field in [
        "id",
        "name",
        "source",
        "status",
        "pid",
        "host",
        "exit_code",
        "error",
        "metadata",
        "log_path",
        "created_at",
        "started_at",
        "finished_at",
        "progress",
    ] {
        assert!(run.get(field).is_some(), "ps lacks {field}: {run}");
    }
    let id = run["id"].to_string();
    let locks = cli.json(&["locks"]);
    let lock = &locks[0];
    for field in [
        "key", "mode", "state", "token", "ticket", "keys", "run", "run_name", "pid", "host",
    ] {
        assert!(lock.get(field).is_some(), "locks lacks {field}: {lock}");
    }
    assert_eq!(
        (lock["key"].as_str(), lock["state"].as_str()),
        (Some("a"), Some("held"))
    );
    let shown = cli.json(&["show", &id]);
    for field in ["run", "steps", "events", "locks"] {
        assert!(shown.get(field).is_some(), "show lacks {field}");
    }
    assert_eq!(shown["locks"][0]["key"], "a");
    let unlock = cli.json(&["unlock", "a", "--force", "--reason", "test"]);
    assert_eq!(unlock, serde_json::json!({"key": "a", "released": 1}));
    let cancel = cli.json(&["cancel", &id]);
    assert_eq!(cancel["id"].to_string(), id);
    holder.wait().unwrap();
    let reports = cli.json(&["reap"]);
    assert_eq!(reports[0]["reaper"], "dead-owners");
    assert!(reports[0]["reaped"].is_array() && reports[0].get("error").is_some());
    assert!(reports[0]["took_ms"].is_f64(), "{}", reports[0]);
    assert_eq!(
        cli.json(&["prune", "--older-than", "1d"]),
        serde_json::json!({"pruned": 0})
    );
    let runs = cli.json(&[
        "runs",
        "--status",
        "cancelled",
        "--since",
        "1h",
        "--limit",
        "5",
    ]);
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    let _ = holder.kill();
}

#[test]
fn bad_input_gets_one_line_and_the_documented_code() {
    let cli = Cli::new();
    let out = cli.run(&["show", "999"]);
    assert_eq!(code(&out), 1);
    assert!(one_line_error(&out).contains("999"));
    let out = cli.run(&["show", "abc"]);
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let out = cli.run(&["prune", "--older-than", "soon"]);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("duration"));
    let out = cli.run(&["exec", "--lock", "k"]);
    assert_eq!(code(&out), 2, "a missing command is a usage error");
    let out = cli.run(&["exec", "--", "/no/such/command"]);
    assert_eq!(code(&out), 127);
    assert!(one_line_error(&out).contains("command not found"));
    let out = cli.run(&["unlock", "k", "--reason", "r"]);
    assert_eq!(code(&out), 2, "--force is required");
    // A file that is not a ledger.
    let notes = cli.dir.path().join("notes.txt");
    std::fs::write(
        &notes,
        "not a database at all, just some notes\n".repeat(50),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .env("RUNLEDGER_DB", &notes)
        .arg("ps")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(one_line_error(&out).contains("not a SQLite database"));
    // Help with examples on every subcommand.
    for sub in [
        "exec", "ps", "runs", "show", "logs", "locks", "cancel", "reap", "prune", "unlock",
    ] {
        let out = cli.run(&[sub, "--help"]);
        assert_eq!(code(&out), 0);
        assert!(
            text(&out.stdout).contains("runledger "),
            "{sub} --help shows no example"
        );
    }
}

#[test]
fn a_closed_reader_stops_the_command_as_it_would_without_exec() {
    use std::io::Read;
    let cli = Cli::new();
    let mut exec = cli.spawn(&["exec", "--name", "yes", "--", "yes"]);
    let mut first = [0u8; 2];
    exec.stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"y\n");
    drop(exec.stdout.take()); // `| head -1`
    let started = Instant::now();
    let status = exec.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 13), "yes dies of SIGPIPE");
    let run = &cli.json(&["runs"])[0];
    assert_eq!(run["error"], "killed by signal 13 (SIGPIPE)");
}

#[test]
fn a_slow_reader_still_gets_every_byte() {
    use std::io::Read;
    let cli = Cli::new();
    let mut exec = cli.spawn(&["exec", "--name", "seq", "--", "seq", "1", "60000"]);
    let mut stdout = exec.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(exec.wait().unwrap().success());
    let expected: String = (1..=60000).map(|i| format!("{i}\n")).collect();
    assert_eq!(got.len(), expected.len());
    let run = &cli.json(&["runs"])[0];
    let log = std::fs::read_to_string(run["log_path"].as_str().unwrap()).unwrap();
    assert_eq!(log, expected);
}

#[test]
fn a_signal_to_the_whole_group_reaches_the_command_once() {
    use std::os::unix::process::CommandExt;
    let cli = Cli::new();
    let seen = cli.dir.path().join("seen");
    let stop = cli.dir.path().join("stop");
    let script = format!(
        "trap 'echo term >> {seen}' TERM; i=0; \
         while [ ! -e {stop} ] && [ $i -lt 1000 ]; do sleep 0.02; i=$((i+1)); done",
        seen = seen.display(),
        stop = stop.display()
    );
    // `exec` leads a process group of its own, as under `timeout` or a
    // shell's job control; the group is signalled as a whole.
    let exec = cli
        .command(&["exec", "--name", "group", "--", "sh", "-c", &script])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cli.running("group");
    let count = || {
        std::fs::read_to_string(&seen)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while count() < n {
            assert!(
                Instant::now() < deadline,
                "only {} signals arrived",
                count()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Time for a second copy to arrive, if one were sent.
        std::thread::sleep(Duration::from_millis(300));
    };
    // Until the trap is set, a TERM would kill the command: repeat the
    // first signal until one is seen.
    let group = format!("-{}", exec.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() == 0 {
        assert!(Instant::now() < deadline, "the trap never ran");
        let status = Command::new("kill")
            .args(["-TERM", "--", &group])
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), 1, "one signal to the group, one received");
    kill(exec.id(), "-TERM"); // to `exec` alone: forwarded once
    wait_for(2);
    assert_eq!(count(), 2);
    std::fs::write(&stop, "").unwrap();
    let out = exec.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
}

#[test]
fn a_signal_while_waiting_for_locks_cancels_the_run() {
    let cli = Cli::new();
    let mut holder = cli.spawn(&[
        "exec", "--name", "holder", "--lock", "k", "--", "sleep", "30",
    ]);
    cli.running("holder");
    let waiter = cli.spawn(&["exec", "--name", "waiter", "--lock", "k", "--", "true"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli.json(&["locks"]).as_array().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the waiter never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(waiter.id(), "-INT");
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(code(&out), 128 + 2, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.trim_end().lines().last().unwrap().contains("cancelled"),
        "{err}"
    );
    let runs = cli.json(&["runs"]);
    let waiter_run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "waiter")
        .unwrap();
    assert_eq!(waiter_run["status"], "cancelled");
    assert_eq!(cli.json(&["locks"]).as_array().unwrap().len(), 1);
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn a_lock_taken_away_is_reported_by_exec() {
    let cli = Cli::new();
    let exec = cli.spawn(&["exec", "--name", "u", "--lock", "u", "--", "sleep", "2"]);
    cli.running("u");
    let unlock = cli.run(&["unlock", "u", "--force", "--reason", "stuck"]);
    assert_eq!(code(&unlock), 0);
    let out = exec.wait_with_output().unwrap();
    assert_eq!(code(&out), 0);
    assert!(
        text(&out.stderr).contains("was taken away"),
        "{}",
        text(&out.stderr)
    );
    // Recorded as an event of the run, with the reason.
    let id = cli.json(&["runs"])[0]["id"].to_string();
    let events = cli.json(&["show", &id])["events"].clone();
    let forced = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "lock_forced")
        .unwrap_or_else(|| panic!("{events}"));
    assert_eq!(forced["keys"], serde_json::json!(["u"]));
    assert!(
        forced["message"]
            .as_str()
            .unwrap()
            .starts_with("stuck (by pid")
    );
    let shown = text(&cli.run(&["show", &id]).stdout);
    assert!(shown.contains("lock [\"u\"] released by force"), "{shown}");
}

#[test]
fn reading_commands_survive_a_closed_pipe_and_never_create_a_ledger() {
    use std::io::Read;
    let cli = Cli::new();
    let typo = cli.dir.path().join("typo/ledger.db");
    let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .arg("--db")
        .arg(&typo)
        .arg("ps")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(one_line_error(&out).contains("no ledger at"));
    assert!(!typo.exists(), "a reading command created a ledger");
    // Enough runs to overflow a pipe, through the library itself.
    let ledger = runledger::Ledger::open(cli.db()).unwrap();
    for i in 0..400 {
        let run = ledger
            .begin_run(runledger::RunSpec::new(format!("run-{i}")))
            .unwrap();
        run.succeed().unwrap();
    }
    for args in [
        &["runs", "--json", "--limit", "1000"][..],
        &["runs", "--limit", "1000"],
        &["reap"],
    ] {
        let mut child = cli.spawn(args);
        let mut one = [0u8; 1];
        child.stdout.as_mut().unwrap().read_exact(&mut one).unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            !text(&out.stderr).contains("panicked"),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_ne!(out.status.code(), Some(101), "{args:?}");
    }
}

#[test]
fn exec_refuses_a_key_asked_in_two_modes_before_registering() {
    let cli = Cli::new();
    let out = cli.run(&["exec", "--lock", "same", "--shared", "same", "--", "true"]);
    assert_eq!(code(&out), 2);
    assert!(one_line_error(&out).contains("asked twice"));
    let out = cli.run(&["exec", "--slots", "g=2", "--slots", "g=3", "--", "true"]);
    assert_eq!(code(&out), 2);
    assert_eq!(
        cli.json(&["runs"]),
        serde_json::json!([]),
        "nothing was recorded"
    );
}

#[test]
fn a_relative_log_folder_is_recorded_whole() {
    let cli = Cli::new();
    let out = cli
        .command(&["exec", "--log-dir", "rel-logs", "--", "echo", "hi"])
        .current_dir(cli.dir.path())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0);
    let run = &cli.json(&["runs"])[0];
    let path = Path::new(run["log_path"].as_str().unwrap());
    assert!(path.is_absolute(), "{path:?}");
    assert_eq!(std::fs::read_to_string(path).unwrap(), "hi\n");
}

#[test]
fn the_default_ledger_lives_in_the_users_data_folder() {
    let cli = Cli::new();
    let home = cli.dir.path().join("home");
    let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .env_remove("RUNLEDGER_DB")
        .env_remove("XDG_DATA_HOME")
        .env("HOME", &home)
        .args(["exec", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        Path::new(&home)
            .join(".local/share/runledger/ledger.db")
            .exists()
    );
}

#[test]
fn exec_adopts_the_run_its_parent_created_and_takes_its_locks_for_it() {
    let cli = Cli::new();
    let ledger = runledger::Ledger::open(cli.db()).unwrap();
    let id = ledger
        .create_run(runledger::RunSpec::new("nightly").source("dashboard"))
        .unwrap();
    let worker = cli
        .command(&[
            "exec",
            "--lock",
            "report",
            "--",
            "sh",
            "-c",
            "echo \"adopted=$RUNLEDGER_RUN_ID\"; sleep 1; exit 4",
        ])
        .env("RUNLEDGER_RUN_ID", id.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, its lock is the run's.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let locks = cli.json(&["locks"]);
        if locks
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["key"] == "report")
        {
            assert_eq!(locks[0]["run"], i64::from(id), "{locks}");
            break;
        }
        assert!(Instant::now() < deadline, "never locked: {locks}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second worker handed the same run is refused, naming the first.
    let second = cli
        .command(&["exec", "--", "true"])
        .env("RUNLEDGER_RUN_ID", id.to_string())
        .output()
        .unwrap();
    assert_eq!(code(&second), 1);
    let err = one_line_error(&second);
    assert!(
        err.contains(&format!("run {id} is already owned by pid {}", worker.id())),
        "{err}"
    );

    let out = worker.wait_with_output().unwrap();
    assert_eq!(code(&out), 4);
    assert!(text(&out.stdout).starts_with(&format!("adopted={id}")));
    let runs = cli.json(&["runs"]);
    assert_eq!(
        runs.as_array().unwrap().len(),
        1,
        "no run of its own: {runs}"
    );
    let run = &runs[0];
    assert_eq!(run["id"], i64::from(id));
    assert_eq!(run["name"], "nightly", "the creator's spec");
    assert_eq!(
        (&run["status"], &run["exit_code"]),
        (&"failed".into(), &4.into())
    );
    let log = std::fs::read_to_string(run["log_path"].as_str().unwrap()).unwrap();
    assert!(log.contains(&format!("adopted={id}")), "{log}");
    let shown = cli.json(&["show", &id.to_string()]);
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["status", "adopted", "custom", "status", "status"],
        "{shown}"
    );
}

#[test]
fn an_exec_under_an_exec_records_a_child_run_and_a_bad_id_is_refused() {
    let cli = Cli::new();
    let out = cli
        .command(&[
            "exec",
            "--name",
            "outer",
            "--",
            "sh",
            "-c",
            "\"$RUNLEDGER_BIN\" exec --name inner -- true",
        ])
        .env("RUNLEDGER_BIN", env!("CARGO_BIN_EXE_runledger"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let runs = cli.json(&["runs"]);
    let (inner, outer) = (&runs[0], &runs[1]);
    assert_eq!(
        (&inner["name"], &outer["name"]),
        (&"inner".into(), &"outer".into())
    );
    assert_eq!(inner["parent"], outer["id"]);
    assert_eq!(inner["status"], "succeeded");

    for bad in ["seven", "999"] {
        let out = cli
            .command(&["exec", "--", "true"])
            .env("RUNLEDGER_RUN_ID", bad)
            .output()
            .unwrap();
        assert_eq!(code(&out), 2, "{bad}");
        let err = one_line_error(&out);
        assert!(err.contains("RUNLEDGER_RUN_ID"), "{err}");
    }
}

#[test]
fn watch_prints_the_feed_live_as_text_or_json_lines() {
    let cli = Cli::new();
    let ledger = runledger::Ledger::open(cli.db()).unwrap();
    ledger
        .begin_run(runledger::RunSpec::new("earlier"))
        .unwrap()
        .succeed()
        .unwrap();
    // From the start of the history, as text.
    let out = cli.run(&["watch", "--from", "0", "--count", "2"]);
    assert_eq!(code(&out), 0);
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].contains("run 1 earlier  registered running"),
        "{lines:?}"
    );
    assert!(lines[1].contains("running → succeeded"), "{lines:?}");

    // Live, as JSON lines: only what comes after it started.
    let watcher = cli.spawn(&["watch", "--json", "--count", "3"]);
    // Its start is not observable from here; a run that begins before it
    // reads the feed's end would be missed, so wait until it is registered.
    let deadline = Instant::now() + Duration::from_secs(20);
    let conn = rusqlite::Connection::open(cli.db()).unwrap();
    while conn
        .query_row("SELECT count(*) FROM watchers", [], |r| r.get::<_, i64>(0))
        .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "the watch never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let run = ledger.begin_run(runledger::RunSpec::new("later")).unwrap();
    run.event("progress", serde_json::json!({"pct": 50}))
        .unwrap();
    run.succeed().unwrap();
    let out = watcher.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let events: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["status", "custom", "status"]);
    assert!(events.iter().all(|e| e["run"] == 2));
    assert_eq!(events[1]["name"], "progress");
    assert_eq!(events[1]["data"]["pct"], 50);
}

/// An `exec` whose command runs an `exec` on another ledger: the inner one
/// inherits the outer run's id, which names nothing of its own ledger (here
/// a run awaiting its adopter, with the same number). It must neither take
/// that run nor refuse to work.
#[test]
fn an_exec_on_another_ledger_under_an_exec_neither_hijacks_nor_refuses() {
    let outer = Cli::new();
    let inner = Cli::new();
    let dashboard = runledger::Ledger::open(inner.db()).unwrap();
    let theirs = dashboard
        .create_run(runledger::RunSpec::new("nightly-report"))
        .unwrap();
    let out = outer
        .command(&["exec", "--name", "outer", "--", "sh", "-c"])
        .arg(format!(
            "\"$RUNLEDGER_BIN\" --db \"{}\" exec --name inner -- echo inner-ran",
            inner.db().display()
        ))
        .env("RUNLEDGER_BIN", env!("CARGO_BIN_EXE_runledger"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("inner-ran"));
    let record = dashboard.run(theirs).unwrap();
    assert_eq!(record.status, runledger::RunStatus::Queued, "{record:?}");
    assert!(record.adopt_by.is_some(), "still awaiting its worker");
    let runs = inner.json(&["runs"]);
    let own = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "inner")
        .unwrap_or_else(|| panic!("{runs}"));
    assert_eq!(own["parent"], Value::Null, "no parent from another ledger");
}

/// An `exec` left in the background by another `exec`'s command starts
/// after that run ended: it records a run of its own, as before.
#[test]
fn an_exec_left_in_the_background_by_an_exec_still_runs_its_command() {
    let cli = Cli::new();
    let marker = cli.dir.path().join("inner-ran");
    let out = cli
        .command(&["exec", "--name", "outer", "--", "sh", "-c"])
        .arg(format!(
            "(sleep 1; \"$RUNLEDGER_BIN\" exec --name inner -- touch \"{}\") >/dev/null 2>&1 &",
            marker.display()
        ))
        .env("RUNLEDGER_BIN", env!("CARGO_BIN_EXE_runledger"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the inner exec never ran: {}",
            cli.json(&["runs"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A creator that recorded a log path in a folder not made yet: `exec`
/// makes the folder and appends to the file.
#[test]
fn exec_writes_the_log_where_the_creator_of_its_run_said() {
    let cli = Cli::new();
    let ledger = runledger::Ledger::open(cli.db()).unwrap();
    let log = cli.dir.path().join("runs/nightly/out.log");
    let id = ledger
        .create_run(runledger::RunSpec::new("nightly").log_path(&log))
        .unwrap();
    let out = cli
        .command(&["exec", "--meta", "ticket=OPS-9", "--", "echo", "worked"])
        .env("RUNLEDGER_RUN_ID", id.to_string())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(std::fs::read_to_string(&log).unwrap().contains("worked"));
    // What exec ran is recorded beside the creator's metadata.
    let shown = cli.json(&["show", &id.to_string()]);
    let exec_event = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "custom" && e["name"] == "exec")
        .unwrap_or_else(|| panic!("{shown}"))
        .clone();
    assert_eq!(exec_event["data"]["command"][0], "echo");
    assert_eq!(exec_event["data"]["ticket"], "OPS-9");
}

/// Locks are in the feed: `watch` shows a lock of no run with its keys and
/// token.
#[test]
fn watch_shows_lock_grants_and_releases() {
    let cli = Cli::new();
    let ledger = runledger::Ledger::open(cli.db()).unwrap();
    let from = ledger.events_cursor().unwrap().to_string();
    ledger.try_lock("cli-key").unwrap().release().unwrap();
    let out = cli.run(&["watch", "--from", &from, "--count", "2"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    let pid = std::process::id();
    assert!(
        lines[0].contains(&format!(
            "no run  lock granted: cli-key (exclusive, token 1, pid {pid} on"
        )),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("no run  lock released: cli-key"),
        "{lines:?}"
    );
}

/// `runledger watch | head -1`: once the reader is gone, watch exits even
/// when no further event comes to write.
#[test]
fn watch_exits_when_its_reader_goes_away_on_a_quiet_ledger() {
    use std::io::{BufRead, BufReader};
    let cli = Cli::new();
    let ledger = runledger::Ledger::open(cli.db()).unwrap();
    ledger
        .begin_run(runledger::RunSpec::new("only"))
        .unwrap()
        .succeed()
        .unwrap();
    let mut watch = cli.spawn(&["watch", "--from", "1"]);
    let mut line = String::new();
    BufReader::new(watch.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap(); // and the reader is dropped
    assert!(line.contains("succeeded"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while watch.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("watch still runs 20 s after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A cursor past the end is refused, not silently waited from.
    let out = cli.run(&["watch", "--from", "1000"]);
    assert_eq!(code(&out), 2, "bad input is a usage error");
    assert!(one_line_error(&out).contains("past the end"));
}

/// Regression (issue 19): `exec --lock "" -- true` exited 1 and recorded a
/// failed run ("did not get its locks: invalid lock key"); `--meta
/// command=x` replaced the recorded command line and `--meta k=1 --meta
/// k=2` kept the last. Every argument is checked first: exit 2, no run.
#[test]
fn exec_checks_every_argument_before_registering_a_run() {
    let cli = Cli::new();
    for (args, says) in [
        (&["--lock", ""][..], "invalid lock key"),
        (&["--shared", " padded"][..], "invalid lock key"),
        (&["--slots", "=2"][..], "invalid lock key"),
        (
            &["--lock", "ok", "--lock", "bad\u{7}"][..],
            "invalid lock key",
        ),
        (&["--name", ""][..], "invalid run name"),
        (&["--source", "a\nb"][..], "invalid run source"),
        (&["--meta", "command=x"][..], "reserved"),
        (&["--meta", "cwd=/"][..], "reserved"),
        (&["--meta", "k=1", "--meta", "k=2"][..], "given twice"),
    ] {
        let mut all = vec!["exec"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "true"]);
        let out = cli.run(&all);
        assert_eq!(code(&out), 2, "{args:?}: {}", text(&out.stderr));
        let err = one_line_error(&out);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(
        cli.json(&["runs"]),
        serde_json::json!([]),
        "nothing was recorded"
    );
    // Distinct keys are kept, each with its value.
    let out = cli.run(&["exec", "--meta", "a=1", "--meta", "b=2", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let run = &cli.json(&["runs"])[0];
    assert_eq!(
        (&run["metadata"]["a"], &run["metadata"]["b"]),
        (&Value::from("1"), &Value::from("2"))
    );
    assert_eq!(run["metadata"]["command"][0], "true");
}

/// Regression (issue 19): `runledger cancel 2` printed `run 2: running`,
/// which reads as if the cancel had failed.
#[test]
fn cancel_says_what_it_did() {
    let cli = Cli::new();
    let ledger = runledger::Ledger::open(cli.db()).unwrap();
    let running = ledger.begin_run(runledger::RunSpec::new("long")).unwrap();
    let queued = ledger
        .begin_run(runledger::RunSpec::new("later").queued())
        .unwrap();
    let cancel = |id: runledger::RunId| {
        let out = cli.run(&["cancel", &id.to_string()]);
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let said = cancel(running.id());
    assert!(
        said.contains("cancel requested") && said.contains("still running"),
        "{said}"
    );
    let said = cancel(running.id());
    assert!(said.contains("already requested"), "{said}");
    let said = cancel(queued.id());
    assert!(
        said.contains(&format!("run {} cancelled", queued.id())) && said.contains("never started"),
        "{said}"
    );
    let id = running.id();
    running.succeed().unwrap();
    let said = cancel(id);
    assert!(
        said.contains("already finished as succeeded") && said.contains("nothing to cancel"),
        "{said}"
    );
    let json = cli.json(&["cancel", &id.to_string()]);
    assert_eq!(
        json,
        serde_json::json!({"id": i64::from(id), "status": "succeeded", "result": "already finished"})
    );
    drop(queued);
}

/// Regression (issue 19): `locks` showed a ticket (`waiting (#5)`) where a
/// reader expects a place in line, and `ps` said nothing of what a queued
/// run waits for.
#[test]
fn locks_show_places_in_line_and_ps_says_what_a_queued_run_waits_for() {
    let cli = Cli::new();
    let mut holder = cli.spawn(&[
        "exec", "--name", "holder", "--lock", "k", "--", "sleep", "30",
    ]);
    let holder_id = cli.running("holder")["id"].clone();
    let mut first = cli.spawn(&["exec", "--name", "first", "--lock", "k", "--", "true"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli.json(&["locks"]).as_array().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the first waiter never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = cli.spawn(&["exec", "--name", "second", "--lock", "k", "--", "true"]);
    while cli.json(&["locks"]).as_array().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the second waiter never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let locks = text(&cli.run(&["locks"]).stdout);
    let line = |name: &str| {
        locks
            .lines()
            .find(|l| l.contains(&format!("({name})")))
            .unwrap_or_else(|| panic!("{name}: {locks}"))
            .to_owned()
    };
    assert!(
        line("first").contains("waiting (1 of 2 in line)"),
        "{locks}"
    );
    assert!(
        line("second").contains("waiting (2 of 2 in line)"),
        "{locks}"
    );
    assert!(!locks.contains('#'), "no ticket numbers: {locks}");
    let ps = text(&cli.run(&["ps"]).stdout);
    let row = ps.lines().find(|l| l.contains("first")).unwrap();
    assert!(
        row.contains("queued")
            && row.contains(&format!(
                "waits for \"k\", held by run {holder_id} (holder, pid"
            )),
        "{ps}"
    );
    for child in [&mut first, &mut second, &mut holder] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Regression (issue 19): `exec --help` listed three of the four signals
/// it forwards, and `--db` said "(created if missing)" for commands that
/// refuse a missing ledger.
#[test]
fn help_says_what_is_true() {
    let cli = Cli::new();
    let exec = text(&cli.run(&["exec", "--help"]).stdout);
    for signal in ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"] {
        assert!(exec.contains(signal), "{signal}: {exec}");
    }
    assert!(exec.contains("parent-death signal"), "{exec}");
    assert!(exec.contains("cancelled"), "{exec}");
    for sub in ["ps", "exec"] {
        let help = text(&cli.run(&[sub, "--help"]).stdout);
        assert!(
            !help.contains("The ledger file (created if missing)"),
            "{sub}: {help}"
        );
        assert!(help.contains("refuse"), "{sub}: {help}");
    }
}

/// `runledger ps` on the ledger at `url`, which fails (exit 1) with one line:
/// that line.
#[cfg(feature = "postgres")]
fn ps_fails_at(url: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(["--db", url, "ps"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    one_line_error(&out)
}

/// Regression (issue 19): a PostgreSQL ledger that cannot be reached said
/// only "error connecting to server".
#[cfg(feature = "postgres")]
#[test]
fn an_unreachable_postgres_ledger_says_why_without_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://someone:s3cret@127.0.0.1:{port}/jobs");
    let err = ps_fails_at(&url);
    assert!(
        err.contains(&format!("postgres://someone@127.0.0.1:{port}/jobs"))
            && err.to_lowercase().contains("refused"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

/// A database that does not exist: the server's words, once (they came a
/// second time, as "db error: FATAL: …", from the error's own causes).
#[cfg(feature = "postgres")]
#[cfg_attr(
    not(runledger_pg),
    ignore = "set RUNLEDGER_PG_URL to run the tests of the PostgreSQL store"
)]
#[test]
fn a_missing_database_is_said_once() {
    let server = std::env::var("RUNLEDGER_PG_URL").unwrap();
    let at = server.rfind('/').unwrap();
    let url = format!("{}/runledger_no_such_db#s", &server[..at]);
    let err = ps_fails_at(&url);
    assert_eq!(err.matches("does not exist").count(), 1, "{err}");
    assert!(
        err.contains("runledger_no_such_db") && !err.contains("db error"),
        "{err}"
    );
}
