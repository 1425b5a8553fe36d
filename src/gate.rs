//! Per-key gates: an OS file lock per key that exclusive requests take before
//! their grant transaction and keep until their release has committed.
//!
//! The lock rows in the database stay the truth about who holds what; a gate
//! only decides who *tries* next. Under contention for a key, its would-be
//! holders wait in the kernel, on the flock of the key's file, instead of
//! each taking a place in the queue (a write transaction), being woken and
//! reading its grant: the next one reaches SQLite only when the key is free,
//! with one transaction. A process killed while holding a gate loses it at
//! once (the kernel drops the lock), so its waiters are woken at once and
//! reclaim its row in their grant transaction.
//!
//! Waiting on a gate is bounded by [`Builder::queue_after`] (20 ms by
//! default): a request still blocked after that takes a visible place in
//! the queue and is served first come, first served from then on. Gates are
//! taken in key order and no gate is waited on past that bound, so gates can
//! never cause a deadlock.
//!
//! [`Builder::queue_after`]: crate::Builder::queue_after
//!
//! A key's file is `<sidecar>/keys/<hash of the key>.lock`, created on first
//! use. Two keys whose names hash alike (a 64-bit hash: practically never)
//! would only share a gate, never a lock.
//!
//! **Idle gates are removed** ([`Gates::sweep`]): by every
//! [`Ledger::prune`](crate::Ledger::prune) (and so with
//! [`Builder::retention`](crate::Builder::retention)), and by the reap pass
//! whenever the folder holds more than [`KEEP_FILES`] of them, so that the
//! folder stays bounded by the keys in use, not by every key ever locked
//! (one key per job makes one file per job). A file is removed only by a
//! process that holds its flock, so no one holds that gate then; a process
//! that opened the file before it was removed and gets its flock afterwards
//! finds that the path no longer names the file it locked (another inode,
//! or none) and starts over with the path's file. So two processes never
//! both hold a gate of one key on two different files.
//!
//! The flock belongs to the open file: each request has a file of its own
//! (close-on-exec, so a command started meanwhile does not inherit it),
//! opened anew or taken from the ledger's unlocked ones, and unlocks it
//! explicitly when done, so that a child forked without exec cannot keep it.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// The gates of one database: the folder of their files, and the ones this
/// ledger opened and no one here holds, kept open for the next request
/// (opening the file is most of what an uncontended gate costs).
#[derive(Debug)]
pub(crate) struct Gates {
    /// `None` for a ledger with no sidecar folder (PostgreSQL): requests go
    /// without gates.
    dir: Option<PathBuf>,
    idle: Idle,
}

/// Open gate files, unlocked, by the hash of their key.
type Idle = Arc<Mutex<Vec<Gate>>>;

/// How many unlocked gate files a ledger keeps open.
const MAX_IDLE: usize = 64;

/// How many gate files the reap pass leaves alone: above that, it removes
/// the idle ones.
pub(crate) const KEEP_FILES: usize = 1024;

/// How many times a request opens a key's file anew when the one it locked
/// was removed meanwhile, before it goes without that gate.
const REOPENS: usize = 8;

/// One key's gate file, open.
#[derive(Debug)]
struct Gate {
    hash: u64,
    file: File,
}

/// Gates held, one per key, released (unlocked, then kept for reuse or
/// closed) on drop.
#[derive(Debug, Default)]
pub(crate) struct Held {
    gates: Vec<Gate>,
    idle: Option<Idle>,
}

impl Held {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.gates.is_empty()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for gate in &self.gates {
            // Explicitly: a child forked without exec may share the file.
            let _ = gate.file.unlock();
        }
        if let Some(idle) = &self.idle {
            keep_idle(idle, self.gates.drain(..));
        }
    }
}

fn keep_idle(idle: &Idle, gates: impl Iterator<Item = Gate>) {
    let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
    for gate in gates {
        if idle.len() >= MAX_IDLE {
            break;
        }
        idle.push(gate);
    }
}

/// A key's gate, opened but not locked (someone else holds it).
#[derive(Debug)]
pub(crate) struct Busy(Gate);

/// What trying the gates of a request's keys gave.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// The gates taken.
    held: Held,
    /// The gates others hold, in key order.
    busy: Vec<Busy>,
    /// The folder of the gate files.
    dir: PathBuf,
}

impl Gates {
    /// The gates of the database whose sidecar folder is `sidecar`.
    pub(crate) fn new(sidecar: &Path) -> Gates {
        Gates {
            dir: Some(sidecar.join("keys")),
            idle: Idle::default(),
        }
    }

    /// No gates: every request goes straight to the rows.
    pub(crate) fn none() -> Gates {
        Gates {
            dir: None,
            idle: Idle::default(),
        }
    }

    #[cfg(test)]
    fn path(&self, dir: &Path, hash: u64) -> PathBuf {
        gate_path(dir, hash)
    }

    /// The gate file of `key`: one this ledger keeps open, else the path's.
    fn open(&self, key: &str) -> io::Result<Gate> {
        let Some(dir) = &self.dir else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let hash = fnv1a(key.as_bytes());
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = idle.iter().position(|g| g.hash == hash) {
                return Ok(idle.swap_remove(i));
            }
        }
        open_gate(dir, hash)
    }

    /// Removes the gate files of idle keys (no one holds their flock) if
    /// the folder holds more than `keep` files; returns how many went. The
    /// files this ledger kept open go too (they may be among them).
    pub(crate) fn sweep(&self, keep: usize) -> usize {
        let Some(dir) = &self.dir else { return 0 };
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        let files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|x| x == "lock"))
            .collect();
        if files.len() <= keep {
            return 0;
        }
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let mut removed = 0;
        for path in files {
            // Never created here: a file gone meanwhile is skipped.
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue; // held: its key is in use
            }
            // The flock is ours, so no one holds this gate; removed only if
            // the path still names this very file.
            if is_linked(&file, &path) && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
            let _ = file.unlock();
        }
        if removed > 0 {
            log::debug!("runledger: removed {removed} gate files of idle keys");
        }
        removed
    }

    /// Tries the gate of each of `keys` (sorted), without waiting. `None` if
    /// a gate file cannot be opened or locked (a read-only folder, a file
    /// system without locks): the request then goes without gates.
    pub(crate) fn try_take(&self, keys: &[String]) -> Option<Taken> {
        let dir = self.dir.as_ref()?;
        let mut taken = Taken {
            held: Held {
                gates: Vec::with_capacity(keys.len()),
                idle: Some(self.idle.clone()),
            },
            busy: Vec::new(),
            dir: dir.clone(),
        };
        let no_gate = |key: &str, e: &dyn std::fmt::Display| {
            log::debug!("runledger: no gate for {key:?}: {e}");
        };
        'keys: for key in keys {
            for _ in 0..REOPENS {
                let gate = self.open(key).map_err(|e| no_gate(key, &e)).ok()?;
                match gate.file.try_lock() {
                    Ok(()) if taken.linked(gate.hash, &gate.file) => {
                        taken.held.gates.push(gate);
                        continue 'keys;
                    }
                    // Removed by a sweep since it was opened: the path's
                    // file is the gate now.
                    Ok(()) => {
                        let _ = gate.file.unlock();
                    }
                    Err(TryLockError::WouldBlock) => {
                        taken.busy.push(Busy(gate));
                        continue 'keys;
                    }
                    Err(TryLockError::Error(e)) => {
                        no_gate(key, &e);
                        return None;
                    }
                }
            }
            no_gate(key, &"its file keeps being removed");
            return None;
        }
        Some(taken)
    }
}

impl Taken {
    /// Waits for the busy gates, in key order, until `deadline`. Returns
    /// true once every gate is held; false if the deadline passed first (the
    /// gates taken meanwhile are kept, the others stay busy).
    pub(crate) fn wait(&mut self, deadline: Instant) -> bool {
        while !self.busy.is_empty() {
            let Busy(Gate { hash, file }) = self.busy.remove(0);
            match wait_for(file, deadline) {
                Ok(file) if self.linked(hash, &file) => self.held.gates.push(Gate { hash, file }),
                Ok(stale) => {
                    // Removed by a sweep while this waited: wait on the
                    // path's file instead.
                    let _ = stale.unlock();
                    match open_gate(&self.dir, hash) {
                        Ok(gate) => self.busy.insert(0, Busy(gate)),
                        Err(e) => {
                            log::debug!("runledger: cannot open a gate again: {e}");
                            return false;
                        }
                    }
                }
                Err(file) => {
                    if let Some(file) = file {
                        self.busy.insert(0, Busy(Gate { hash, file }));
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Takes the busy gates that are free by now, without waiting.
    pub(crate) fn retry(&mut self) {
        let mut busy = Vec::new();
        for Busy(gate) in std::mem::take(&mut self.busy) {
            match gate.file.try_lock() {
                Ok(()) if self.linked(gate.hash, &gate.file) => self.held.gates.push(gate),
                Ok(()) => {
                    // Removed meanwhile: not a gate any more.
                    let _ = gate.file.unlock();
                }
                Err(_) => busy.push(Busy(gate)),
            }
        }
        self.busy = busy;
    }

    /// Whether `file`, the gate file of the key hashed `hash`, is still the
    /// one its path names (a sweep removes idle ones).
    fn linked(&self, hash: u64, file: &File) -> bool {
        is_linked(file, &gate_path(&self.dir, hash))
    }

    /// Every gate is held.
    pub(crate) fn complete(&self) -> bool {
        self.busy.is_empty()
    }

    /// The gates held; the busy ones are let go.
    pub(crate) fn into_held(mut self) -> Held {
        if let Some(idle) = &self.held.idle {
            keep_idle(idle, self.busy.drain(..).map(|Busy(gate)| gate));
        }
        std::mem::take(&mut self.held)
    }
}

/// The path of the gate file of the key hashed `hash`.
fn gate_path(dir: &Path, hash: u64) -> PathBuf {
    dir.join(format!("{hash:016x}.lock"))
}

/// Opens (creating it, and its folder, if missing) the gate file of the key
/// hashed `hash`.
fn open_gate(dir: &Path, hash: u64) -> io::Result<Gate> {
    let path = gate_path(dir, hash);
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
    };
    let file = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)?;
            open()
        }
        other => other,
    }?;
    Ok(Gate { hash, file })
}

/// Whether `path` still names the open `file` (the same inode).
#[cfg(unix)]
fn is_linked(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Elsewhere an open file cannot be removed: it is always its path's.
#[cfg(not(unix))]
fn is_linked(_file: &File, path: &Path) -> bool {
    path.exists()
}

/// FNV-1a, 64 bits: a stable hash (the same in every process and version)
/// to name a key's file.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How many helper threads one waiting thread may keep: one waits for the
/// caller, the others may still be blocked on gates it gave up on.
const HELPERS_PER_THREAD: usize = 3;

/// Blocks until `file` is locked, or until `deadline`.
///
/// flock has no timeout, so the blocking call runs on a helper thread (kept
/// for the waiting thread's life) while the caller waits on a condition
/// variable. If the caller gives up first, the helper unlocks the file as
/// soon as its lock is granted, and the next wait uses another helper
/// meanwhile. `Err(Some(file))` gives the file back when the wait could not
/// start (every helper is still busy with an abandoned wait, or none could
/// be started); `Err(None)` when it timed out.
fn wait_for(file: File, deadline: Instant) -> Result<File, Option<File>> {
    thread_local! {
        static HELPERS: std::cell::RefCell<Vec<Helper>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    HELPERS.with(|helpers| {
        let mut helpers = helpers.borrow_mut();
        let idle = match helpers.iter().position(Helper::is_idle) {
            Some(i) => i,
            None if helpers.len() < HELPERS_PER_THREAD => {
                helpers.push(Helper::spawn());
                helpers.len() - 1
            }
            None => return Err(Some(file)),
        };
        helpers[idle].wait(file, deadline)
    })
}

enum State {
    /// The helper has nothing to do.
    Idle,
    /// The helper blocks on the flock for the caller.
    Waiting,
    /// The lock was granted; the caller takes the file.
    Granted(File),
    /// The caller gave up; the helper unlocks the file when it gets it.
    Abandoned,
    /// The helper could not start or failed: waits fail at once.
    Broken,
}

struct Helper {
    shared: Arc<(Mutex<State>, Condvar)>,
    tasks: Option<mpsc::Sender<File>>,
}

impl Helper {
    fn spawn() -> Helper {
        let shared = Arc::new((Mutex::new(State::Idle), Condvar::new()));
        let (tasks, inbox) = mpsc::channel::<File>();
        let theirs = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("runledger-gate".into())
            .spawn(move || {
                // Ends when the waiting thread (the sender) is gone.
                for file in inbox {
                    let locked = file.lock();
                    let (state, granted) = &*theirs;
                    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                    *state = match (&*state, locked) {
                        (State::Waiting, Ok(())) => State::Granted(file),
                        (State::Waiting, Err(e)) => {
                            log::debug!("runledger: waiting for a gate failed: {e}");
                            State::Idle
                        }
                        // Abandoned: let it go at once (closing would do,
                        // unless a forked child shares the file).
                        _ => {
                            let _ = file.unlock();
                            State::Idle
                        }
                    };
                    granted.notify_all();
                }
            });
        let tasks = match spawned {
            Ok(_) => Some(tasks),
            Err(e) => {
                log::debug!("runledger: no gate helper thread: {e}");
                *shared.0.lock().unwrap_or_else(|e| e.into_inner()) = State::Broken;
                None
            }
        };
        Helper { shared, tasks }
    }

    fn is_idle(&self) -> bool {
        matches!(
            *self.shared.0.lock().unwrap_or_else(|e| e.into_inner()),
            State::Idle
        )
    }

    fn wait(&self, file: File, deadline: Instant) -> Result<File, Option<File>> {
        let (state, granted) = &*self.shared;
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, State::Idle) {
            return Err(Some(file));
        }
        let Some(tasks) = &self.tasks else {
            return Err(Some(file));
        };
        *state = State::Waiting;
        if let Err(mpsc::SendError(file)) = tasks.send(file) {
            *state = State::Broken;
            return Err(Some(file));
        }
        loop {
            match std::mem::replace(&mut *state, State::Idle) {
                State::Granted(file) => return Ok(file),
                State::Waiting => {}
                // The helper failed to lock: treated as a timeout.
                other => {
                    *state = other;
                    return Err(None);
                }
            }
            *state = State::Waiting;
            let now = Instant::now();
            if now >= deadline {
                *state = State::Abandoned;
                return Err(None);
            }
            state = granted
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_gate_excludes_other_open_files_and_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let gates = Gates::new(dir.path());
        let keys = vec!["a".to_owned(), "b".to_owned()];
        let first = gates.try_take(&keys).unwrap();
        assert!(first.complete());
        let second = gates.try_take(&keys).unwrap();
        assert_eq!((second.held.gates.len(), second.busy.len()), (0, 2));
        drop(second);
        let held = first.into_held();
        let mut third = gates.try_take(&keys[..1]).unwrap();
        let started = Instant::now();
        assert!(!third.wait(started + Duration::from_millis(30)));
        assert!(started.elapsed() >= Duration::from_millis(30));
        drop(held);
        // The helper unlocks what it gets for an abandoned wait at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gates.try_take(&keys).unwrap().complete() {
            assert!(
                Instant::now() < deadline,
                "the abandoned wait kept the gate"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(third);
    }

    #[test]
    fn a_waiter_gets_the_gate_when_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let gates = Gates::new(dir.path());
        let keys = vec!["k".to_owned()];
        let held = gates.try_take(&keys).unwrap().into_held();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        let mut waiting = gates.try_take(&keys).unwrap();
        assert!(!waiting.complete());
        assert!(waiting.wait(Instant::now() + Duration::from_secs(5)));
        assert!(!waiting.into_held().is_empty());
        releaser.join().unwrap();
    }

    fn files_in(dir: &Path) -> usize {
        fs::read_dir(dir.join("keys")).map_or(0, |entries| entries.count())
    }

    #[test]
    fn a_sweep_removes_idle_gates_only_and_keeps_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let gates = Gates::new(dir.path());
        let keys: Vec<String> = (0..5).map(|i| format!("job:{i}")).collect();
        let held = gates.try_take(&keys[..1]).unwrap().into_held();
        for key in &keys[1..] {
            drop(
                gates
                    .try_take(std::slice::from_ref(key))
                    .unwrap()
                    .into_held(),
            );
        }
        assert_eq!(files_in(dir.path()), 5);
        // Within the bound, nothing goes.
        assert_eq!(gates.sweep(5), 0);
        // Past it, every idle one goes; the held one stays.
        let other = Gates::new(dir.path());
        assert_eq!(other.sweep(0), 4);
        assert_eq!(files_in(dir.path()), 1);
        drop(held);
        assert_eq!(other.sweep(0), 1);
        assert_eq!(files_in(dir.path()), 0);
        // A key locked again gets a file again.
        assert!(gates.try_take(&keys[..1]).unwrap().complete());
        assert_eq!(files_in(dir.path()), 1);
    }

    /// A request that opened a key's file, then waited on it while a sweep
    /// removed it, must not hold that file as the gate: someone opening the
    /// path now gets another file.
    #[test]
    fn a_gate_removed_while_waited_on_is_taken_on_the_paths_file() {
        let dir = tempfile::tempdir().unwrap();
        let (holder, waiter, sweeper) = (
            Gates::new(dir.path()),
            Gates::new(dir.path()),
            Gates::new(dir.path()),
        );
        let keys = vec!["k".to_owned()];
        let held = holder.try_take(&keys).unwrap().into_held();
        let mut waiting = waiter.try_take(&keys).unwrap();
        assert!(!waiting.complete(), "busy on the file it opened");
        // Held: a sweep leaves it.
        assert_eq!(sweeper.sweep(0), 0);
        drop(held);
        // Idle now: removed, while the waiter still has the old file open.
        assert_eq!(sweeper.sweep(0), 1);
        assert!(waiting.wait(Instant::now() + Duration::from_secs(5)));
        let mine = waiting.into_held();
        // The waiter holds the path's (new) file: nobody else gets it.
        let third = Gates::new(dir.path()).try_take(&keys).unwrap();
        assert!(!third.complete(), "two holders of one key's gate");
        drop(third);
        drop(mine);
        assert!(Gates::new(dir.path()).try_take(&keys).unwrap().complete());
    }

    /// The same for a request that only tries: a stale file it finds free
    /// is left for the path's.
    #[test]
    fn a_kept_open_file_that_was_removed_is_not_a_gate() {
        let dir = tempfile::tempdir().unwrap();
        let gates = Gates::new(dir.path());
        let keys = vec!["k".to_owned()];
        // Kept open by this ledger after use.
        drop(gates.try_take(&keys).unwrap().into_held());
        assert_eq!(Gates::new(dir.path()).sweep(0), 1);
        let mine = gates.try_take(&keys).unwrap();
        assert!(mine.complete());
        assert_eq!(files_in(dir.path()), 1, "the path's file was made anew");
        let other = Gates::new(dir.path()).try_take(&keys).unwrap();
        assert!(!other.complete(), "two holders of one key's gate");
    }

    #[test]
    fn key_files_have_stable_distinct_names() {
        let gates = Gates::new(Path::new("/db-runledger"));
        let path = |key: &str| gates.path(gates.dir.as_deref().unwrap(), fnv1a(key.as_bytes()));
        assert_eq!(
            path("build:symbol=AAPL"),
            Path::new("/db-runledger/keys/c1456366f71375ec.lock")
        );
        assert_ne!(path("a"), path("b"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
