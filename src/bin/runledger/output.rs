//! What the reading commands print: aligned tables for people, JSON for
//! programs.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use runledger::{
    EventCursor, EventRecord, Ledger, LockRecord, LockState, ReapReport, RunId, RunRecord,
    RunStatus, Timestamp,
};

use crate::Failure;

/// How to print.
pub(crate) struct Out {
    pub json: bool,
}

/// Prints a JSON value, indented.
fn print_json(value: &impl serde::Serialize) {
    // Serializing records cannot fail: they are plain data.
    let text =
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    outln!("{text}");
}

impl Out {
    /// A single result: JSON, or one line.
    pub fn value(&self, json: &serde_json::Value, human: fmt::Arguments<'_>) {
        if self.json {
            print_json(json);
        } else {
            outln!("{human}");
        }
    }

    pub fn runs(&self, ledger: &Ledger, runs: &[RunRecord]) {
        if self.json {
            return print_json(&runs);
        }
        if runs.is_empty() {
            outln!("no runs");
            return;
        }
        let now = ledger.now();
        // What queued runs wait for: one look at the locks, only if needed.
        let locks = if runs.iter().any(|r| r.status == RunStatus::Queued) {
            ledger.locks().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut table = Table::new([
            "ID", "STATUS", "NAME", "SOURCE", "PID", "HOST", "STARTED", "TOOK", "INFO",
        ]);
        for run in runs {
            let started = run.started_at.unwrap_or(run.created_at);
            let took = run.finished_at.unwrap_or(now);
            table.row([
                run.id.to_string(),
                run.status.to_string(),
                run.name.clone(),
                run.source.clone(),
                run.pid.to_string(),
                run.host.clone(),
                ago(now, started),
                duration(took.saturating_duration_since(started)),
                info(now, run, &locks),
            ]);
        }
        table.print();
    }

    pub fn show(&self, ledger: &Ledger, id: RunId) -> Result<(), Failure> {
        let run = ledger.run(id)?;
        let steps = ledger.steps(id)?;
        let events = ledger.events(id)?;
        let all_locks = ledger.locks()?;
        let locks: Vec<LockRecord> = all_locks
            .iter()
            .filter(|l| l.run == Some(id))
            .cloned()
            .collect();
        if self.json {
            print_json(&serde_json::json!({
                "run": run, "steps": steps, "events": events, "locks": locks,
            }));
            return Ok(());
        }
        let now = ledger.now();
        let field = |name: &str, value: &dyn fmt::Display| outln!("{name:<10} {value}");
        field("run", &run.id);
        field("name", &run.name);
        field("status", &run.status);
        field("source", &run.source);
        match run.adopt_by {
            Some(by) => field(
                "owner",
                &format_args!(
                    "nobody yet: created by pid {} on {}, to be adopted by {by} ({})",
                    run.pid,
                    run.host,
                    ago(now, by)
                ),
            ),
            None => field(
                "owner",
                &format_args!(
                    "pid {} on {} (instance {})",
                    run.pid, run.host, run.instance
                ),
            ),
        }
        field(
            "created",
            &format_args!("{} ({})", run.created_at, ago(now, run.created_at)),
        );
        if let Some(t) = run.started_at {
            field("started", &format_args!("{t} ({})", ago(now, t)));
        }
        if let Some(t) = run.finished_at {
            let took = t.saturating_duration_since(run.started_at.unwrap_or(run.created_at));
            field("finished", &format_args!("{t} (took {})", duration(took)));
        }
        if let Some(t) = run.heartbeat_at {
            field("heartbeat", &ago(now, t));
        }
        if let Some(code) = run.exit_code {
            field("exit code", &code);
        }
        if let Some(error) = &run.error {
            field("error", error);
        }
        if let Some(t) = run.cancel_requested_at {
            field("cancel", &format_args!("requested {}", ago(now, t)));
        }
        if let Some(path) = &run.log_path {
            field("log", &path.display());
        }
        if !run.metadata.is_null() {
            field("metadata", &run.metadata);
        }
        if run.progress.total > 0 {
            field(
                "progress",
                &format_args!(
                    "{}/{} steps done ({} failed)",
                    run.progress.done(),
                    run.progress.total,
                    run.progress.failed
                ),
            );
        }
        if !steps.is_empty() {
            outln!("\nsteps:");
            let mut table = Table::new(["STEP", "STATUS", "STARTED", "TOOK", "ERROR"]);
            for step in &steps {
                table.row([
                    step.name.clone(),
                    step.status.to_string(),
                    ago(now, step.started_at),
                    duration(
                        step.finished_at
                            .unwrap_or(now)
                            .saturating_duration_since(step.started_at),
                    ),
                    step.error.clone().unwrap_or_default(),
                ]);
            }
            table.print();
        }
        if !locks.is_empty() {
            outln!("\nlocks:");
            lock_table(now, &locks, &all_locks).print();
        }
        outln!("\nevents:");
        let mut table = Table::new(["AT", "EVENT", "MESSAGE"]);
        for event in &events {
            table.row([
                event.at.to_string(),
                event_text(event),
                event.message.clone().unwrap_or_default(),
            ]);
        }
        table.print();
        Ok(())
    }

    pub fn locks(&self, ledger: &Ledger, locks: &[LockRecord]) {
        if self.json {
            return print_json(&locks);
        }
        if locks.is_empty() {
            outln!("no locks held or awaited");
            return;
        }
        lock_table(ledger.now(), locks, locks).print();
    }

    pub fn reports(&self, reports: &[ReapReport]) {
        if self.json {
            return print_json(&reports);
        }
        for report in reports {
            outln!("{report}");
        }
    }
}

/// The table of `shown`, some of the ledger's locks (`all`, which places
/// a waiting request in its queue).
fn lock_table(now: Timestamp, shown: &[LockRecord], all: &[LockRecord]) -> Table<7> {
    let locks = all;
    let mut table = Table::new(["KEY", "MODE", "STATE", "TOKEN", "RUN", "OWNER", "SINCE"]);
    for lock in shown {
        let since = lock.granted_at.unwrap_or(lock.requested_at);
        let run = match (lock.run, &lock.run_name) {
            (Some(id), Some(name)) => format!("{id} ({name})"),
            (Some(id), None) => id.to_string(),
            _ => "-".to_owned(),
        };
        let state = match lock.state {
            LockState::Held => "held".to_owned(),
            LockState::Waiting => {
                let waiting = locks
                    .iter()
                    .filter(|l| l.state == LockState::Waiting && l.key == lock.key)
                    .count();
                format!(
                    "waiting ({} of {waiting} in line)",
                    queue_position(lock, locks)
                )
            }
        };
        table.row([
            lock.key.clone(),
            lock.mode.to_string(),
            state,
            lock.token.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            run,
            format!("pid {} on {}", lock.pid, lock.host),
            ago(now, since),
        ]);
    }
    table
}

/// What a run is doing or why it ended, in a few words. `locks` are the
/// ledger's locks, for what a queued run waits for.
fn info(now: Timestamp, run: &RunRecord, locks: &[LockRecord]) -> String {
    if let Some(error) = &run.error {
        return error.clone();
    }
    if run.cancel_requested_at.is_some() && run.status.is_active() {
        return "cancel requested".to_owned();
    }
    if run.status == RunStatus::Queued {
        return waits_for(now, run, locks);
    }
    match &run.progress.current {
        Some(step) => format!(
            "{}/{} steps, on {step}",
            run.progress.done(),
            run.progress.total
        ),
        None if run.progress.total > 0 => {
            format!("{}/{} steps", run.progress.done(), run.progress.total)
        }
        None => String::new(),
    }
}

/// What a queued run waits for: the keys it is queued on and who holds
/// them, or who is ahead of it; or a process to adopt it.
fn waits_for(now: Timestamp, run: &RunRecord, locks: &[LockRecord]) -> String {
    if let Some(by) = run.adopt_by {
        return format!("waits to be adopted (until {})", ago(now, by));
    }
    let mut parts = Vec::new();
    for wait in locks
        .iter()
        .filter(|l| l.state == LockState::Waiting && l.run == Some(run.id))
    {
        let holders: Vec<String> = locks
            .iter()
            .filter(|l| l.state == LockState::Held && l.key == wait.key)
            .map(holder_text)
            .collect();
        parts.push(if holders.is_empty() {
            let ahead = queue_position(wait, locks).saturating_sub(1);
            format!("waits for {:?} behind {ahead} earlier request(s)", wait.key)
        } else {
            format!("waits for {:?}, held by {}", wait.key, holders.join(", "))
        });
    }
    if parts.is_empty() {
        // Not (yet) in a lock queue: about to take its locks, or waiting for
        // whatever its owner waits for before `start`.
        "not started yet".to_owned()
    } else {
        parts.join("; ")
    }
}

/// "run 3 (build, pid 4121 on ci-3)", or the process alone for a lock held
/// outside a run.
fn holder_text(lock: &LockRecord) -> String {
    match (lock.run, &lock.run_name) {
        (Some(id), Some(name)) => format!("run {id} ({name}, pid {} on {})", lock.pid, lock.host),
        (Some(id), None) => format!("run {id} (pid {} on {})", lock.pid, lock.host),
        _ => format!("pid {} on {}", lock.pid, lock.host),
    }
}

/// A waiting request's place in its key's queue: 1 is the next to be
/// served. Tickets only order requests; their numbers mean nothing to a
/// reader.
fn queue_position(wait: &LockRecord, locks: &[LockRecord]) -> usize {
    1 + locks
        .iter()
        .filter(|l| l.state == LockState::Waiting && l.key == wait.key && l.ticket < wait.ticket)
        .count()
}

pub(crate) fn event_text(event: &EventRecord) -> String {
    event.kind.to_string()
}

/// Prints the event feed as it commits: `count` events, or until stdout
/// closes (`runledger watch | head`) or the process is interrupted.
pub(crate) fn watch(
    ledger: &Ledger,
    from: Option<EventCursor>,
    count: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let cursor = match from {
        Some(cursor) => cursor,
        None => ledger.events_cursor()?,
    };
    let mut names: HashMap<RunId, String> = HashMap::new();
    if count == Some(0) {
        return Ok(());
    }
    let mut watch = ledger.watch(cursor)?;
    let mut printed = 0;
    loop {
        // A reader that went away (`runledger watch | head -1`) is seen by
        // the next write, or, on a quiet ledger, by a look at stdout while
        // waiting.
        let Some(event) = watch.next_timeout(Duration::from_millis(500))? else {
            if stdout_closed() {
                break;
            }
            continue;
        };
        let line = if json {
            serde_json::to_string(&event).map_err(|e| e.to_string())?
        } else {
            let about = match event.run {
                Some(run) => {
                    let name = names
                        .entry(run)
                        .or_insert_with(|| ledger.run(run).map(|r| r.name).unwrap_or_default());
                    format!("run {run} {name}")
                }
                None => "no run".to_owned(),
            };
            let mut line = format!(
                "{}  #{}  {about}  {}",
                event.at,
                event.id,
                event_text(&event)
            );
            if let Some(message) = &event.message {
                line.push_str(": ");
                line.push_str(message);
            }
            line
        };
        if writeln!(std::io::stdout().lock(), "{line}").is_err() {
            break; // the reader went away
        }
        printed += 1;
        if count.is_some_and(|count| printed >= count) {
            break;
        }
    }
    Ok(())
}

/// Whether stdout is a pipe or socket whose reader has gone.
fn stdout_closed() -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let stdout = std::io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&zero)).is_ok()
        && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
}

/// "3m ago", "just now", "in 5s" (a clock behind the writer's).
pub(crate) fn ago(now: Timestamp, then: Timestamp) -> String {
    if then > now {
        return format!("in {}", duration(then.saturating_duration_since(now)));
    }
    let d = now.saturating_duration_since(then);
    if d < Duration::from_secs(1) {
        "just now".to_owned()
    } else {
        format!("{} ago", duration(d))
    }
}

/// "850ms", "42s", "3m10s", "2h5m", "3d4h": the same words as the
/// library's error messages.
pub(crate) fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs < 120 {
        // As the library's messages word it (up to 119s, then 2m0s).
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else if secs < 86_400 {
        format!("{}h{}m", secs / 3600, (secs / 60) % 60)
    } else {
        format!("{}d{}h", secs / 86_400, (secs / 3600) % 24)
    }
}

/// A table with aligned columns; the last column is not padded.
struct Table<const N: usize> {
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    fn new(header: [&str; N]) -> Table<N> {
        Table {
            rows: vec![header.map(str::to_owned)],
        }
    }

    fn row(&mut self, cells: [String; N]) {
        // One line per row: a newline in a cell (an error text) would break it.
        self.rows.push(cells.map(|c| c.replace(['\n', '\r'], " ")));
    }

    fn print(&self) {
        let mut widths = [0usize; N];
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = std::io::stdout().lock();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == N {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(
                        ' ',
                        widths[i] - cell.chars().count() + 2,
                    ));
                }
            }
            // A closed pipe (`| head`) ends the output quietly.
            if writeln!(out, "{}", line.trim_end()).is_err() {
                return;
            }
        }
    }
}

/// `logs`: prints the run's log file; with `follow`, keeps printing what is
/// appended until the run has ended and nothing more comes.
pub(crate) fn logs(ledger: &Ledger, id: RunId, follow: bool) -> Result<(), Failure> {
    let run = ledger.run(id)?;
    let path = run
        .log_path
        .ok_or_else(|| Failure::from(format!("run {id} has no log file")))?;
    let open = || std::fs::File::open(&path);
    let mut file = match open() {
        Ok(file) => Some(file),
        Err(e) if follow && e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(
                format!("cannot read the log of run {id} ({}): {e}", path.display()).into(),
            );
        }
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    loop {
        if file.is_none() {
            file = open().ok();
        }
        if let Some(f) = file.as_mut() {
            f.seek(SeekFrom::Start(pos))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if n == 0 {
                    break;
                }
                pos += n as u64;
                if out.write_all(&buf[..n]).is_err() {
                    return Ok(());
                }
            }
            let _ = out.flush();
        }
        if !follow {
            return Ok(());
        }
        // The run's end is checked *before* the last read: whatever it wrote
        // before ending is printed.
        let ended = !ledger.run(id)?.status.is_active();
        if ended {
            if let Some(f) = file.as_mut() {
                f.seek(SeekFrom::Start(pos))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let mut rest = Vec::new();
                let _ = f.read_to_end(&mut rest);
                let _ = out.write_all(&rest);
                let _ = out.flush();
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
