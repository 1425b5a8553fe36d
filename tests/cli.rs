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
    fn new() -> Cli {
        Cli {
            dir: tempfile::tempdir().unwrap(),
        }
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
    // The refused one is recorded too, with why.
    let refused_run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "true" && r["status"] == "failed")
        .unwrap();
    assert!(
        refused_run["error"]
            .as_str()
            .unwrap()
            .contains("did not get its locks")
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
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn sigterm_to_exec_reaches_the_command_and_is_recorded() {
    let cli = Cli::new();
    let exec = cli.spawn(&[
        "exec",
        "--name",
        "trapper",
        "--",
        "sh",
        "-c",
        "trap 'echo got-term; exit 3' TERM; sleep 30 & wait",
    ]);
    cli.running("trapper");
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
    kill(exec.id(), "-KILL");
    exec.wait().unwrap();
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
    // The orphaned command is the test's to stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
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
