//! Opens a ledger file, records a run with a few steps under a lock, then
//! prints every run of the ledger as a table.
//!
//! ```text
//! cargo run --example quickstart                 # ledger in target/quickstart/
//! cargo run --example quickstart -- runs/ledger.db
//! ```
//!
//! Run it twice: the second table also shows the first run, because the
//! ledger is a file that every process shares.

use runledger::{Ledger, RunFilter, RunRecord, RunSpec};

fn main() -> Result<(), runledger::Error> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/quickstart/ledger.db".to_owned());
    let ledger = Ledger::open(&path)?;

    let run = ledger.begin_run(
        RunSpec::new("backfill")
            .source("terminal")
            .metadata(serde_json::json!({"symbol": "AAPL", "days": 3})),
    )?;
    // Only one process at a time backfills this symbol; the lock is released
    // when the guard drops, and at the latest when the run ends.
    let lock = run.lock("backfill:symbol=AAPL")?;
    println!(
        "holding {:?} with fencing token {}",
        lock.keys(),
        lock.token()
    );
    for day in ["2026-11-18", "2026-11-19", "2026-11-20"] {
        let step = run.step(day)?;
        // … the day's work would go here …
        step.succeed()?;
    }
    let status = run.succeed()?;
    println!("run finished as {status}; ledger: {}\n", ledger.location());

    print_table(&ledger.runs(RunFilter::default())?);
    Ok(())
}

fn print_table(runs: &[RunRecord]) {
    let header = ["ID", "NAME", "SOURCE", "STATUS", "STEPS", "STARTED", "TOOK"];
    let rows: Vec<[String; 7]> = runs
        .iter()
        .map(|r| {
            let took = r
                .finished_at
                .map(|end| {
                    format!(
                        "{} ms",
                        end.saturating_duration_since(r.created_at).as_millis()
                    )
                })
                .unwrap_or_else(|| "-".to_owned());
            [
                r.id.to_string(),
                r.name.clone(),
                r.source.clone(),
                r.status.to_string(),
                format!("{}/{}", r.progress.done(), r.progress.total),
                r.created_at.to_string(),
                took,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
}
