//! The torture harness: worker processes (the `worker` example's `torture`
//! loop) run runs with steps and locks on one ledger while this driver kills
//! them with SIGKILL at random instants and starts replacements. Then one
//! reap, and the checks: mutual exclusion and slot limits were never broken
//! (from the witness file every critical section appends to), fencing tokens
//! only grew, nothing active or held is left, every begun run is in the
//! ledger, the file passes `integrity_check`, no busy error reached a worker.
//!
//! Each worker process runs the loop on several threads at once, each with a
//! ledger of its own: their writes share transactions (group commit), so a
//! kill also lands in the middle of groups.
//!
//! Most kills go to a worker with a ledger open: opening reaps the dead
//! owners the kills leave behind, and on a loaded machine (two cores, two
//! dozen busy threads, the server beside them) that can take a second or
//! more on PostgreSQL, so kills drawn among all workers would mostly land
//! in opening and the run would prove little about runs and locks. One kill
//! in four still goes to any worker, opening or not. The two stores'
//! tortures take turns: each loads the machine to its limit on its own.
//!
//! Sized for CI (about a minute); scale it by hand with
//! `RUNLEDGER_TORTURE_WORKERS` (default 8), `RUNLEDGER_TORTURE_THREADS`
//! (threads per worker, default 3), `RUNLEDGER_TORTURE_KILLS` (default 1000)
//! and `RUNLEDGER_TORTURE_SEED` (default: from the clock, printed so that a
//! failing run can be replayed).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Place, Store, worker};
use runledger::{RunFilter, RunId, RunStatus};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*, as in the worker: the driver's choices follow the seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn spawn(db: &str, dir: &Path, seed: u64) -> Child {
    let threads = env_number("RUNLEDGER_TORTURE_THREADS", 3).max(1);
    Command::new(worker())
        .arg(db)
        .args(["torture", "--dir"])
        .arg(dir)
        .args(["--seed", &seed.to_string()])
        .args(["--threads", &threads.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts")
}

/// One critical section as the witness file tells it.
#[derive(Debug)]
struct Section {
    key: String,
    token: u64,
    pid: u32,
    mode: String,
    /// Line numbers of its enter and (if its process lived) exit.
    enter: usize,
    exit: Option<usize>,
}

/// What the witness file proves, or the violations it shows.
#[derive(Debug, Default)]
struct Verdict {
    sections: usize,
    completed: usize,
    violations: Vec<String>,
}

/// Checks the witness lines (`enter|exit KEY TOKEN PID MODE`, in the order
/// they were appended). A section whose process was killed has no exit: it
/// cannot be shown to overlap anything, so only sections proven to overlap
/// (B entered between A's enter and A's exit) count as violations.
fn check_witness(text: &str) -> Verdict {
    let mut sections: Vec<Section> = Vec::new();
    let mut open: HashMap<(String, u64, u32), usize> = HashMap::new();
    let mut verdict = Verdict::default();
    let mut max_token: HashMap<String, u64> = HashMap::new();
    for (line_no, line) in text.lines().enumerate() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [what, key, token, pid, mode] = parts[..] else {
            verdict
                .violations
                .push(format!("line {line_no} is malformed: {line:?}"));
            continue;
        };
        let (token, pid): (u64, u32) = (token.parse().unwrap(), pid.parse().unwrap());
        match what {
            "enter" => {
                // Tokens only grow: an exclusive grant is newer than every
                // grant of its key that entered before it.
                let seen = max_token.entry(key.to_owned()).or_insert(0);
                if mode == "exclusive" && token <= *seen {
                    verdict.violations.push(format!(
                        "line {line_no}: exclusive token {token} on {key} after token {seen}"
                    ));
                }
                *seen = (*seen).max(token);
                open.insert((key.to_owned(), token, pid), sections.len());
                sections.push(Section {
                    key: key.to_owned(),
                    token,
                    pid,
                    mode: mode.to_owned(),
                    enter: line_no,
                    exit: None,
                });
            }
            "exit" => match open.remove(&(key.to_owned(), token, pid)) {
                Some(i) => sections[i].exit = Some(line_no),
                None => verdict
                    .violations
                    .push(format!("line {line_no}: exit without enter: {line:?}")),
            },
            _ => verdict.violations.push(format!("line {line_no}: {line:?}")),
        }
    }
    verdict.sections = sections.len();
    let completed: Vec<&Section> = sections.iter().filter(|s| s.exit.is_some()).collect();
    verdict.completed = completed.len();
    let mut by_key: BTreeMap<&str, Vec<&Section>> = BTreeMap::new();
    for s in &completed {
        by_key.entry(&s.key).or_default().push(s);
    }
    for (key, list) in by_key {
        // Sweep the sections of this key in line order: at each enter, the
        // sections still inside are those that entered before and exit after.
        for (i, b) in list.iter().enumerate() {
            let inside: Vec<&&Section> = list[..i]
                .iter()
                .filter(|a| a.exit.unwrap() > b.enter)
                .collect();
            let conflict = match b.mode.as_str() {
                "exclusive" => !inside.is_empty(),
                "shared" => inside.iter().any(|a| a.mode != "shared"),
                // `gpu` holds at most 2 at once.
                _ => inside.len() >= 2 || inside.iter().any(|a| a.mode != b.mode),
            };
            if conflict {
                verdict.violations.push(format!(
                    "{key}: pid {} ({}, token {}) entered at line {} while {:?} were inside",
                    b.pid,
                    b.mode,
                    b.token,
                    b.enter,
                    inside
                        .iter()
                        .map(|a| (a.pid, a.mode.as_str(), a.token))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    verdict
}

#[test]
fn the_checker_sees_overlaps() {
    // The checker itself must be able to fail.
    let clean = "enter k0 1 10 exclusive\nexit k0 1 10 exclusive\nenter k0 2 11 shared\n\
                 enter k0 3 12 shared\nexit k0 3 12 shared\nexit k0 2 11 shared\n\
                 enter k0 4 13 exclusive\n";
    assert!(check_witness(clean).violations.is_empty());
    let overlap = "enter k0 1 10 exclusive\nenter k0 2 11 exclusive\n\
                   exit k0 2 11 exclusive\nexit k0 1 10 exclusive\n";
    assert_eq!(check_witness(overlap).violations.len(), 1);
    let reader_in = "enter k0 1 10 shared\nenter k0 2 11 exclusive\n\
                     exit k0 2 11 exclusive\nexit k0 1 10 shared\n";
    assert_eq!(check_witness(reader_in).violations.len(), 1);
    let three_slots = "enter gpu 1 1 slots\nenter gpu 2 2 slots\nenter gpu 3 3 slots\n\
                       exit gpu 3 3 slots\nexit gpu 2 2 slots\nexit gpu 1 1 slots\n";
    assert_eq!(check_witness(three_slots).violations.len(), 1);
    let old_token = "enter k1 5 10 exclusive\nexit k1 5 10 exclusive\n\
                     enter k1 4 11 exclusive\nexit k1 4 11 exclusive\n";
    assert_eq!(check_witness(old_token).violations.len(), 1);
    // A killed holder (no exit) proves nothing either way.
    let killed = "enter k0 1 10 exclusive\nenter k0 2 11 exclusive\nexit k0 2 11 exclusive\n";
    assert!(check_witness(killed).violations.is_empty());
}

/// The pids of the workers with a ledger open, from the `ready` file.
fn ready_pids(dir: &Path) -> HashSet<u32> {
    std::fs::read_to_string(dir.join("ready"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("ready ")?.parse().ok())
        .collect()
}

/// One torture at a time (see the module's docs).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn kill_nine_at_random_instants_breaks_no_guarantee(store: Store) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let workers = env_number("RUNLEDGER_TORTURE_WORKERS", 8).max(1) as usize;
    // A worker on PostgreSQL is slower to start (each of its ledgers
    // connects, and the server forks a backend per connection) and each of
    // its calls is a round trip: killed as often as on SQLite, most would
    // die before their first grant. Fewer kills, further apart.
    let (ci_kills, min_gap_ms, spread_ms) = match store {
        Store::Sqlite => (1000, 5, 40),
        Store::Postgres => (150, 50, 150),
    };
    let kills = env_number("RUNLEDGER_TORTURE_KILLS", ci_kills);
    let seed = env_number(
        "RUNLEDGER_TORTURE_SEED",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    ) | 1;
    let threads = env_number("RUNLEDGER_TORTURE_THREADS", 3).max(1);
    eprintln!(
        "torture ({store:?}): RUNLEDGER_TORTURE_SEED={seed} workers={workers} threads={threads} kills={kills}"
    );
    let place = Place::new(store);
    let (dir, db) = (&place.dir, place.location.as_str());
    drop(place.open());
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut running: Vec<Child> = (0..workers)
        .map(|i| spawn(db, dir.path(), seed.wrapping_add(i as u64)))
        .collect();
    let mut killed = 0u64;
    let mut killed_pids = HashSet::new();
    while killed < kills {
        std::thread::sleep(Duration::from_millis(min_gap_ms + rng.below(spread_ms)));
        let i = if rng.below(4) == 0 {
            rng.below(running.len() as u64) as usize
        } else {
            let ready = ready_pids(dir.path());
            let open: Vec<usize> = (0..running.len())
                .filter(|&i| ready.contains(&running[i].id()))
                .collect();
            // None open yet: the next draw (one in four goes to any worker,
            // so the kills always go on).
            if open.is_empty() {
                continue;
            }
            open[rng.below(open.len() as u64) as usize]
        };
        let mut victim = std::mem::replace(
            &mut running[i],
            spawn(db, dir.path(), seed.wrapping_add(1000 + killed)),
        );
        victim.kill().unwrap(); // SIGKILL
        let status = victim.wait().unwrap();
        // A worker that died on its own (it never returns) failed.
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "worker exited by itself: {status:?}, stderr: {}",
            {
                let mut s = String::new();
                std::io::Read::read_to_string(victim.stderr.as_mut().unwrap(), &mut s).ok();
                s
            }
        );
        killed_pids.insert(victim.id());
        killed += 1;
    }
    for mut child in running {
        child.kill().unwrap();
        child.wait().unwrap();
        killed_pids.insert(child.id());
    }
    let chaos = started.elapsed();

    // One reap, from a process that outlived them all.
    let ledger = place.builder().reap_on_open(false).open().unwrap();
    let reports = ledger.reap().unwrap();
    assert!(reports.iter().all(|r| r.is_ok()), "{reports:?}");

    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    let witness = check_witness(&read("witness"));
    let errors = read("errors");
    let busy: Vec<&str> = errors
        .lines()
        .filter(|l| l.starts_with("error busy"))
        .collect();
    let begun: Vec<RunId> = read("begun")
        .lines()
        .map(|l| l.strip_prefix("begun ").unwrap().parse().unwrap())
        .collect();
    let mut lost = Vec::new();
    for id in &begun {
        if ledger.run(*id).is_err() {
            lost.push(*id);
        }
    }
    let stuck = ledger
        .runs(RunFilter::default().active().limit(10_000))
        .unwrap();
    let all = ledger.runs(RunFilter::default().limit(1_000_000)).unwrap();
    let unexplained: Vec<_> = all
        .iter()
        .filter(|r| r.status == RunStatus::Failed && r.error.as_deref().unwrap_or("").is_empty())
        .map(|r| r.id)
        .collect();
    let reaped = all
        .iter()
        .filter(|r| {
            r.error
                .as_deref()
                .is_some_and(|e| e.starts_with("owner gone"))
        })
        .count();
    let locks = ledger.locks().unwrap();
    let integrity: String = match store {
        Store::Sqlite => rusqlite::Connection::open(db)
            .unwrap()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap(),
        Store::Postgres => "(PostgreSQL's own)".into(),
    };
    // On either store: no key entry outlives its request.
    let stray = common::raw_query_i64(
        store,
        db,
        "SELECT count(*) FROM lock_entries e WHERE NOT EXISTS (SELECT 1 FROM locks l WHERE l.id = e.lock_id)",
    );
    let killed_in_section = witness.sections - witness.completed;

    println!(
        "torture: seed {seed}, {workers} workers × {threads} threads, {killed} kills ({killed_in_section} inside a \
         critical section) in {:.1}s; {} runs ({} begun, {reaped} reaped), {} grants; \
         violations {}, stuck runs {}, lost runs {}, busy errors {}, other errors {}, \
         locks left {}, stray entries {stray}, integrity {integrity}",
        chaos.as_secs_f64(),
        all.len(),
        begun.len(),
        witness.sections,
        witness.violations.len(),
        stuck.len(),
        lost.len(),
        busy.len(),
        errors.lines().count() - busy.len(),
        locks.len(),
    );
    assert!(witness.violations.is_empty(), "{:#?}", witness.violations);
    assert!(witness.completed > 0, "no critical section ever completed");
    assert!(stuck.is_empty(), "runs left active: {stuck:#?}");
    assert!(lost.is_empty(), "begun runs missing: {lost:?}");
    assert!(
        unexplained.is_empty(),
        "failed runs without a reason: {unexplained:?}"
    );
    assert!(locks.is_empty(), "locks left behind: {locks:#?}");
    if store == Store::Sqlite {
        assert_eq!(integrity, "ok");
    }
    assert_eq!(stray, 0, "lock entries without their request");
    assert!(busy.is_empty(), "busy errors reached workers: {busy:#?}");
    // Other errors (a lock taken away from a run whose owner was reaped
    // while alive would be one) must not happen either.
    assert!(errors.is_empty(), "errors in workers:\n{errors}");
}

on_both_stores!(kill_nine_at_random_instants_breaks_no_guarantee);
