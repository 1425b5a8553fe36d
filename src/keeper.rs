//! The background keeper: one thread per process and database that
//! heartbeats the instances open on that database, and beside it one thread
//! that runs their reapers, so that a slow pass (a long prune, a host's own
//! reaper) never delays a heartbeat into a stale lease.
//!
//! The keeper holds only weak references: it never keeps a ledger open, and
//! it ends once the last instance of its database in this process closed.
//! A reap pass in progress holds its ledger until the pass ends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Weak, mpsc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// What the keeper does for one instance.
pub(crate) trait Kept: Send + Sync + 'static {
    /// Renews the instance's heartbeat lease.
    fn heartbeat(self: Arc<Self>);
    /// Runs every reaper once.
    fn reap(self: Arc<Self>);
}

/// The keeper of one database in this process.
pub(crate) struct Keeper {
    members: Mutex<Vec<Member>>,
    changed: Condvar,
}

struct Member {
    kept: Weak<dyn Kept>,
    heartbeat_every: Duration,
    reap_every: Duration,
    next_heartbeat: Instant,
    next_reap: Instant,
    /// A pass of this instance is queued or running: the next one waits.
    reaping: Arc<AtomicBool>,
}

/// `now + d`, for any `d` (a year at most, so that huge settings never
/// overflow).
fn after(now: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now.checked_add(d.min(YEAR)).unwrap_or(now)
}

/// The keepers running, by canonical database path.
static KEEPERS: LazyLock<Mutex<HashMap<PathBuf, Arc<Keeper>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl Keeper {
    /// Adds an instance to the keeper of `path`, starting that keeper's
    /// thread if none runs. Returns the keeper, to [`Keeper::wake`] when the
    /// instance closes.
    pub(crate) fn join(
        path: &Path,
        kept: Weak<dyn Kept>,
        heartbeat_every: Duration,
        reap_every: Duration,
    ) -> std::io::Result<Arc<Keeper>> {
        let now = Instant::now();
        let member = Member {
            kept,
            heartbeat_every,
            reap_every,
            next_heartbeat: after(now, heartbeat_every),
            next_reap: after(now, reap_every),
            reaping: Arc::new(AtomicBool::new(false)),
        };
        let mut keepers = KEEPERS.lock();
        if let Some(keeper) = keepers.get(path) {
            keeper.members.lock().push(member);
            keeper.changed.notify_all();
            return Ok(keeper.clone());
        }
        let keeper = Arc::new(Keeper {
            members: Mutex::new(vec![member]),
            changed: Condvar::new(),
        });
        let (thread_keeper, thread_path) = (keeper.clone(), path.to_owned());
        std::thread::Builder::new()
            .name("runledger-keeper".into())
            .spawn(move || thread_keeper.run(&thread_path))?;
        keepers.insert(path.to_owned(), keeper.clone());
        Ok(keeper)
    }

    /// Makes the thread look again at its instances (one closed).
    pub(crate) fn wake(&self) {
        self.changed.notify_all();
    }

    /// Whether a keeper thread serves `path` in this process.
    #[cfg(test)]
    pub(crate) fn is_running(path: &Path) -> bool {
        KEEPERS.lock().contains_key(path)
    }

    fn run(self: Arc<Keeper>, path: &Path) {
        log::debug!("runledger: keeper of {} started", path.display());
        // Weak references here too: a ledger dropped while its pass waits
        // behind another one's is not kept open for it.
        let (passes, queued) = mpsc::channel::<(Weak<dyn Kept>, Arc<AtomicBool>)>();
        // Ends when `passes` is dropped, as this thread returns.
        let reaper = std::thread::Builder::new()
            .name("runledger-reaper".into())
            .spawn(move || {
                for (kept, reaping) in queued {
                    if let Some(kept) = kept.upgrade() {
                        kept.reap();
                    }
                    reaping.store(false, Ordering::Release);
                }
            });
        if let Err(e) = &reaper {
            log::error!("runledger: no reaper thread, passes run beside heartbeats: {e}");
        }
        loop {
            let mut due = Vec::new();
            {
                let mut members = self.members.lock();
                members.retain(|m| m.kept.strong_count() > 0);
                if members.is_empty() {
                    drop(members);
                    // Lock order: the registry, then the members (as join).
                    let mut keepers = KEEPERS.lock();
                    if self.members.lock().is_empty() {
                        keepers.remove(path);
                        log::debug!("runledger: keeper of {} stopped", path.display());
                        return;
                    }
                    continue;
                }
                let now = Instant::now();
                for m in members.iter_mut() {
                    let beat = m.next_heartbeat <= now;
                    let reap_due = m.next_reap <= now;
                    if beat {
                        m.next_heartbeat = after(now, m.heartbeat_every);
                    }
                    if reap_due {
                        m.next_reap = after(now, m.reap_every);
                    }
                    // A pass still running: this one is skipped, not queued.
                    let reap = reap_due && !m.reaping.load(Ordering::Acquire);
                    if (beat || reap)
                        && let Some(kept) = m.kept.upgrade()
                    {
                        due.push((kept, beat, reap.then(|| m.reaping.clone())));
                    }
                }
                if due.is_empty() {
                    let next = members
                        .iter()
                        .map(|m| m.next_heartbeat.min(m.next_reap))
                        .min()
                        .unwrap_or(now);
                    self.changed.wait_until(&mut members, next);
                    continue;
                }
            }
            for (kept, beat, reap) in due {
                if beat {
                    kept.clone().heartbeat();
                }
                if let Some(reaping) = reap {
                    reaping.store(true, Ordering::Release);
                    if reaper.is_ok() {
                        let _ = passes.send((Arc::downgrade(&kept), reaping));
                    } else {
                        kept.reap();
                        reaping.store(false, Ordering::Release);
                    }
                }
            }
        }
    }
}
