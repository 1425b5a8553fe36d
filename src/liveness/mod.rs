//! Who this process is: the identity an instance records so that other
//! processes can later tell whether it is still alive.
//!
//! Platform code lives in the leaf files (`linux.rs`, `other.rs`).

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as sys;
#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
use other as sys;

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::clock::Timestamp;

/// The identifier of a ledger instance: one process's open ledger, the
/// owner of the runs it begins and the locks it takes. A positive integer,
/// never reused in one ledger; `0` in [`RunRecord::instance`](crate::RunRecord::instance)
/// means "owned by nobody" (a run waiting to be adopted).
///
/// `Display`s as its number, converts from and to `i64`, and serializes as
/// its number.
///
/// # Examples
///
/// ```
/// use runledger::{InstanceId, Ledger};
/// # let dir = tempfile::tempdir()?;
/// let ledger = Ledger::open(dir.path().join("ledger.db"))?;
/// let me: InstanceId = ledger.instance_id();
/// assert!(i64::from(me) > 0);
/// assert_eq!(me.to_string(), i64::from(me).to_string());
/// assert_eq!(InstanceId::from(7), InstanceId::from(7));
/// # Ok::<(), runledger::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct InstanceId(i64);

impl From<i64> for InstanceId {
    fn from(id: i64) -> InstanceId {
        InstanceId(id)
    }
}

impl From<InstanceId> for i64 {
    fn from(id: InstanceId) -> i64 {
        id.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The identity of the current process, as recorded on its instance row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcessIdentity {
    /// The host name.
    pub host: String,
    /// The kernel's boot id, when the platform has one: a pid and a start time
    /// only mean something within one boot.
    pub boot_id: Option<String>,
    /// The process id.
    pub pid: u32,
    /// The pid namespace the pid belongs to (Linux containers), if known:
    /// pids of different namespaces cannot be compared.
    pub pid_ns: Option<String>,
    /// When the process started, in the platform's own units (clock ticks
    /// since boot on Linux). Together with the pid and boot id it names one
    /// process, even after the pid is reused.
    pub start_time: Option<u64>,
}

impl ProcessIdentity {
    /// The start time of the calling process, if the platform tells it.
    pub fn current_start_time() -> Option<u64> {
        sys::process_start_time(std::process::id())
    }

    /// The identity of the calling process.
    pub fn current() -> ProcessIdentity {
        let pid = std::process::id();
        ProcessIdentity {
            host: sys::hostname().unwrap_or_else(|| "localhost".to_owned()),
            boot_id: sys::boot_id(),
            pid,
            pid_ns: sys::pid_namespace(),
            start_time: sys::process_start_time(pid),
        }
    }
}

/// What the ledger recorded about an instance: enough to judge whether its
/// process still lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InstanceRecord {
    pub id: i64,
    pub host: String,
    pub boot_id: Option<String>,
    pub pid: u32,
    pub pid_ns: Option<String>,
    pub start_time: Option<u64>,
    /// The name of the instance's lock file in the instances folder.
    pub lock_file: Option<String>,
    pub heartbeat_at: Timestamp,
    /// The lease it promised to renew (its `stale_after`), if recorded.
    pub lease: Option<Duration>,
    /// The process closed the ledger (dropped its last handle), or a reaper
    /// already judged it dead.
    pub closed: bool,
    /// Why it was closed.
    pub closed_reason: Option<String>,
}

/// Whether an instance is alive, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Alive,
    /// Dead, with the reason shown to people (`process exited`, `pid
    /// reused`…).
    Dead {
        reason: String,
        /// Set when only the heartbeat lease decided: the heartbeat judged
        /// stale. The reaper then writes only if the instance has not
        /// heartbeated since.
        stale_heartbeat: Option<Timestamp>,
    },
}

impl Verdict {
    fn dead(reason: impl Into<String>) -> Verdict {
        Verdict::Dead {
            reason: reason.into(),
            stale_heartbeat: None,
        }
    }
}

/// Judges instances from this process.
#[derive(Debug)]
pub(crate) struct Judge {
    pub me: ProcessIdentity,
    /// The folder of the instances' lock files.
    pub instances_dir: PathBuf,
    pub stale_after: Duration,
}

impl Judge {
    /// Whether `other` lives, as seen from this process at ledger time
    /// `now`.
    ///
    /// On the same kernel (same boot id) the process itself decides: it holds
    /// an OS lock on its lock file for its whole life, so a failed try-lock
    /// proves it alive, whatever its pid namespace (containers sharing the
    /// file); a free lock proves it gone. Without a lock file, the pid and
    /// the process start time decide within one pid namespace. None of this
    /// reads the clock. Everywhere else (another host, or this host when
    /// neither check can decide) the heartbeat lease decides: dead once the
    /// last heartbeat is older than its lease (its own `stale_after`, or
    /// ours when it recorded none).
    pub fn judge(&self, other: &InstanceRecord, now: Timestamp) -> Verdict {
        if other.closed {
            return Verdict::dead("its process closed the ledger");
        }
        if let Some(verdict) = self.process_verdict(other) {
            return verdict;
        }
        let age = now.saturating_duration_since(other.heartbeat_at);
        if age > other.lease.unwrap_or(self.stale_after) {
            Verdict::Dead {
                reason: format!("heartbeat stale for {}s", age.as_secs()),
                stale_heartbeat: Some(other.heartbeat_at),
            }
        } else {
            Verdict::Alive
        }
    }

    /// The verdict of the process checks, or `None` when they cannot decide.
    fn process_verdict(&self, other: &InstanceRecord) -> Option<Verdict> {
        let me = &self.me;
        // Another boot is another kernel: nothing here can check the
        // process. Not even under the same host name (a reboot, or another
        // machine named the same: cloned VMs, `localhost`): the lease
        // decides, and a host that rebooted has stopped heartbeating.
        match (&me.boot_id, &other.boot_id) {
            (Some(mine), Some(theirs)) if mine == theirs => {}
            _ => return None,
        }
        let pid_check = || {
            (other.pid_ns.is_some() && other.pid_ns == me.pid_ns)
                .then(|| pid_verdict(me, other))
                .flatten()
        };
        match other
            .lock_file
            .as_deref()
            .map(|f| probe(&self.instances_dir, f))
        {
            Some(Probe::Held) => Some(Verdict::Alive),
            // The kernel drops the lock when the process dies: dead. The pid
            // check only words the reason better.
            Some(Probe::Free) => Some(match pid_check() {
                Some(dead @ Verdict::Dead { .. }) => dead,
                // Killed processes drop their locks a moment before their
                // pid goes: the same words either way.
                _ => Verdict::dead("process exited"),
            }),
            Some(Probe::Unknown) | None => pid_check(),
        }
    }
}

/// Judges by pid and process start time (same host, boot and pid
/// namespace); `None` when the start time is unknown.
fn pid_verdict(me: &ProcessIdentity, other: &InstanceRecord) -> Option<Verdict> {
    if other.pid == me.pid && other.start_time == me.start_time {
        return Some(Verdict::Alive);
    }
    match (sys::process_status(other.pid), other.start_time) {
        (None, _) => Some(Verdict::dead("process exited")),
        (Some(status), _) if status.zombie => Some(Verdict::dead("process exited")),
        (Some(status), Some(start)) if status.start_time != start => Some(Verdict::dead(format!(
            "process exited (pid {} reused)",
            other.pid
        ))),
        (Some(_), Some(_)) => Some(Verdict::Alive),
        (Some(_), None) => None,
    }
}

/// What a try-lock on another instance's lock file found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// Another process holds it: the instance lives.
    Held,
    /// Nobody holds it: the instance's process is gone.
    Free,
    /// No such file, or it could not be read.
    Unknown,
}

/// Whether `name` is a plain file name (it is read back from the database,
/// so it must not lead anywhere else).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.starts_with('.')
}

fn probe(dir: &Path, name: &str) -> Probe {
    if !is_plain_name(name) {
        return Probe::Unknown;
    }
    // Never created here: a missing file proves nothing (and a file made by
    // the prober would be free).
    let Ok(file) = File::open(dir.join(name)) else {
        return Probe::Unknown;
    };
    match file.try_lock_shared() {
        Ok(()) => Probe::Free,
        Err(TryLockError::WouldBlock) => Probe::Held,
        Err(TryLockError::Error(_)) => Probe::Unknown,
    }
}

/// Removes the lock file of an instance judged dead (its lock is free).
pub(crate) fn remove_lock_file(dir: &Path, name: &str) {
    if is_plain_name(name) {
        let _ = fs::remove_file(dir.join(name));
    }
}

/// The OS lock an instance holds on its lock file for its whole life.
#[derive(Debug)]
pub(crate) struct InstanceLock {
    file: Option<File>,
    path: PathBuf,
    name: String,
}

impl InstanceLock {
    /// Creates a lock file of a name no other instance uses, in `dir`, and
    /// locks it.
    pub fn take(dir: &Path, me: &ProcessIdentity) -> io::Result<InstanceLock> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(dir)?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{nanos}-{n}.lock", me.pid);
        let path = dir.join(&name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.try_lock().map_err(io::Error::from)?;
        Ok(InstanceLock {
            file: Some(file),
            path,
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Unlink first: a prober that opens the file after this finds
        // nothing, one that opened it before finds the lock free once the
        // file closes, and the instance row is closed by then.
        let _ = fs::remove_file(&self.path);
        drop(self.file.take());
    }
}

/// What the platform tells of a live process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProcessStatus {
    pub start_time: u64,
    pub zombie: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_000_000_000);

    fn judge_in(dir: &Path) -> Judge {
        Judge {
            me: ProcessIdentity::current(),
            instances_dir: dir.to_owned(),
            stale_after: Duration::from_secs(60),
        }
    }

    fn record_of(me: &ProcessIdentity) -> InstanceRecord {
        InstanceRecord {
            id: 1,
            host: me.host.clone(),
            boot_id: me.boot_id.clone(),
            pid: me.pid,
            pid_ns: me.pid_ns.clone(),
            start_time: me.start_time,
            lock_file: None,
            heartbeat_at: NOW,
            lease: None,
            closed: false,
            closed_reason: None,
        }
    }

    fn is_dead(v: &Verdict, needle: &str) -> bool {
        matches!(v, Verdict::Dead { reason, .. } if reason.contains(needle))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn verdicts_by_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let judge = judge_in(dir.path());
        let me = &judge.me;
        assert_eq!(judge.judge(&record_of(me), NOW), Verdict::Alive);
        // The parent process (alive, other start time of its own).
        let parent = std::os::unix::process::parent_id();
        let mut other = record_of(me);
        other.pid = parent;
        other.start_time = sys::process_status(parent).map(|s| s.start_time);
        assert_eq!(judge.judge(&other, NOW), Verdict::Alive);
        // Same pid, another start time: the pid was reused.
        other.start_time = Some(other.start_time.unwrap() + 1);
        assert!(is_dead(&judge.judge(&other, NOW), "reused"));
        // A pid that does not exist.
        other.pid = u32::MAX - 7;
        assert!(is_dead(&judge.judge(&other, NOW), "process exited"));
        let mut closed = record_of(me);
        closed.closed = true;
        assert!(is_dead(&judge.judge(&closed, NOW), "closed"));
        // Same host name, another boot: a reboot, or another machine of the
        // same name; only the lease can tell.
        let mut rebooted = record_of(me);
        rebooted.boot_id = Some("another-boot".into());
        rebooted.pid = u32::MAX - 7;
        assert_eq!(judge.judge(&rebooted, NOW), Verdict::Alive);
        let late = NOW.saturating_add(Duration::from_secs(61));
        assert!(is_dead(&judge.judge(&rebooted, late), "stale for 61s"));
    }

    #[test]
    fn elsewhere_the_heartbeat_lease_decides() {
        let dir = tempfile::tempdir().unwrap();
        let judge = judge_in(dir.path());
        let mut remote = record_of(&judge.me);
        remote.host.push_str("-elsewhere");
        remote.boot_id = None;
        remote.pid = u32::MAX - 7;
        let beat = remote.heartbeat_at;
        assert_eq!(judge.judge(&remote, NOW), Verdict::Alive);
        let at_limit = NOW.saturating_add(Duration::from_secs(60));
        assert_eq!(judge.judge(&remote, at_limit), Verdict::Alive);
        let late = NOW.saturating_add(Duration::from_secs(93));
        assert_eq!(
            judge.judge(&remote, late),
            Verdict::Dead {
                reason: "heartbeat stale for 93s".into(),
                stale_heartbeat: Some(beat),
            }
        );
        // The owner's own lease decides, not the judge's.
        let mut quick = remote.clone();
        quick.lease = Some(Duration::from_secs(10));
        let eleven = NOW.saturating_add(Duration::from_secs(11));
        assert!(is_dead(&judge.judge(&quick, eleven), "stale for 11s"));
        assert_eq!(judge.judge(&remote, eleven), Verdict::Alive);
        // A clock that went back: a heartbeat from the future is fresh.
        let before = NOW.saturating_sub(Duration::from_secs(3600));
        assert_eq!(judge.judge(&remote, before), Verdict::Alive);
        // Another pid namespace on this kernel, without a lock file: pids
        // cannot be compared, so the lease decides there too.
        let mut contained = record_of(&judge.me);
        contained.pid = u32::MAX - 7;
        contained.pid_ns = Some("pid:[1]".into());
        if judge.me.boot_id.is_some() {
            assert_eq!(judge.judge(&contained, NOW), Verdict::Alive);
            assert!(is_dead(&judge.judge(&contained, late), "stale"));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_instance_lock_decides_across_pid_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let judge = judge_in(dir.path());
        let lock = InstanceLock::take(dir.path(), &judge.me).unwrap();
        // Pids that mean nothing here (another namespace, or recycled): the
        // lock alone decides, and it is held.
        let mut other = record_of(&judge.me);
        other.pid = u32::MAX - 7;
        other.pid_ns = Some("pid:[1]".into());
        other.lock_file = Some(lock.name().to_owned());
        let late = NOW.saturating_add(Duration::from_secs(3600));
        assert_eq!(judge.judge(&other, late), Verdict::Alive);
        // Released (the process died): dead at once, whatever the clock.
        let name = lock.name().to_owned();
        let file = dir.path().join(&name);
        drop(lock);
        assert!(!file.exists(), "the lock file goes with its lock");
        // A leftover file nobody holds (a process killed with SIGKILL).
        File::create(&file).unwrap();
        assert!(is_dead(&judge.judge(&other, NOW), "process exited"));
        remove_lock_file(dir.path(), &name);
        assert!(!file.exists());
        // No file: nothing proves anything, the lease decides.
        assert_eq!(judge.judge(&other, NOW), Verdict::Alive);
        // A name read back from the database never leads out of the folder.
        other.lock_file = Some("../escape.lock".into());
        assert_eq!(probe(dir.path(), "../escape.lock"), Probe::Unknown);
        assert_eq!(judge.judge(&other, NOW), Verdict::Alive);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_zombie_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it exits.
        let mut status = None;
        for _ in 0..200 {
            status = sys::process_status(pid);
            if status.is_some_and(|s| s.zombie) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let dir = tempfile::tempdir().unwrap();
        let judge = judge_in(dir.path());
        let record = InstanceRecord {
            pid,
            start_time: status.map(|s| s.start_time),
            ..record_of(&judge.me)
        };
        assert!(is_dead(&judge.judge(&record, NOW), "exited"), "{status:?}");
        child.wait().unwrap();
    }

    #[test]
    fn identity_of_this_process_is_stable() {
        let a = ProcessIdentity::current();
        let b = ProcessIdentity::current();
        assert_eq!(a, b);
        assert_eq!(a.pid, std::process::id());
        assert!(!a.host.is_empty());
        if cfg!(target_os = "linux") {
            assert!(a.start_time.is_some() && a.boot_id.is_some());
        }
    }
}
