//! The command-line tool's cost: `runledger exec -- true` against a bare
//! `true`, each a whole process spawned and waited for (an existing
//! ledger, as in everyday use).
//!
//! ```text
//! cargo bench --features cli --bench cli
//! ```

// criterion's group macros are not used: main runs the one group.
#![allow(missing_docs)]

use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::Criterion;

fn run(command: &mut Command) {
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let exe = env!("CARGO_BIN_EXE_runledger");
    let exec = || {
        let mut command = Command::new(exe);
        command.arg("--db").arg(&db).args(["exec", "--", "true"]);
        command
    };
    run(&mut exec()); // creates the ledger
    let mut group = c.benchmark_group("cli");
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("bare_true", |b| b.iter(|| run(&mut Command::new("true"))));
    group.bench_function("exec_true", |b| b.iter(|| run(&mut exec())));
    group.bench_function("exec_lock_true", |b| {
        b.iter(|| {
            run(Command::new(exe)
                .arg("--db")
                .arg(&db)
                .args(["exec", "--lock", "k", "--", "true"]))
        })
    });
    group.finish();
    c.final_summary();
}
