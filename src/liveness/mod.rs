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
    pub host: String,
    pub boot_id: Option<String>,
    pub pid: u32,
    pub pid_ns: Option<String>,
    pub start_time: Option<u64>,
    /// The process closed the ledger (dropped its last handle).
    pub closed: bool,
}

/// Whether an instance is alive, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Alive,
    /// Dead, with the reason shown to people (`process exited`, `pid reused`…).
    Dead(String),
    /// Cannot be judged from here (another host, or no process start time):
    /// treated as alive.
    Unknown,
}

/// Judges `other` from the process `me`. Same host and boot only: the
/// process is looked up by pid *and* start time, so a recycled pid is not
/// mistaken for the owner, and a zombie counts as exited. Never reads the
/// wall clock.
pub(crate) fn judge(me: &ProcessIdentity, other: &InstanceRecord) -> Verdict {
    if other.closed {
        return Verdict::Dead("its process closed the ledger".to_owned());
    }
    if other.host != me.host {
        return Verdict::Unknown;
    }
    match (&me.boot_id, &other.boot_id) {
        (Some(mine), Some(theirs)) if mine != theirs => {
            return Verdict::Dead("the host rebooted".to_owned());
        }
        (Some(_), Some(_)) => {}
        _ => return Verdict::Unknown,
    }
    // Another pid namespace (a container sharing the host name and the
    // file): its pids mean nothing here.
    if other.pid_ns.is_none() || other.pid_ns != me.pid_ns {
        return Verdict::Unknown;
    }
    if other.pid == me.pid && other.start_time == me.start_time {
        return Verdict::Alive;
    }
    match (sys::process_status(other.pid), other.start_time) {
        (None, _) => Verdict::Dead("process exited".to_owned()),
        (Some(status), _) if status.zombie => Verdict::Dead("process exited".to_owned()),
        (Some(status), Some(start)) if status.start_time != start => {
            Verdict::Dead(format!("process exited (pid {} reused)", other.pid))
        }
        (Some(_), Some(_)) => Verdict::Alive,
        (Some(_), None) => Verdict::Unknown,
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

    fn record_of(me: &ProcessIdentity) -> InstanceRecord {
        InstanceRecord {
            host: me.host.clone(),
            boot_id: me.boot_id.clone(),
            pid: me.pid,
            pid_ns: me.pid_ns.clone(),
            start_time: me.start_time,
            closed: false,
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn verdicts_for_this_process_and_impostors() {
        let me = ProcessIdentity::current();
        assert_eq!(judge(&me, &record_of(&me)), Verdict::Alive);
        // The parent process (alive, other start time of its own).
        let parent = std::os::unix::process::parent_id();
        let mut other = record_of(&me);
        other.pid = parent;
        other.start_time = sys::process_status(parent).map(|s| s.start_time);
        assert_eq!(judge(&me, &other), Verdict::Alive);
        // Same pid, another start time: the pid was reused.
        other.start_time = Some(other.start_time.unwrap() + 1);
        assert!(matches!(judge(&me, &other), Verdict::Dead(r) if r.contains("reused")));
        // A pid that does not exist.
        other.pid = u32::MAX - 7;
        assert_eq!(judge(&me, &other), Verdict::Dead("process exited".into()));
        // Another host: only a heartbeat lease can tell.
        let mut remote = record_of(&me);
        remote.host.push_str("-elsewhere");
        remote.pid = u32::MAX - 7;
        assert_eq!(judge(&me, &remote), Verdict::Unknown);
        let mut closed = record_of(&me);
        closed.closed = true;
        assert!(matches!(judge(&me, &closed), Verdict::Dead(_)));
        // Another pid namespace: pids cannot be compared.
        let mut contained = record_of(&me);
        contained.pid = u32::MAX - 7;
        contained.pid_ns = Some("pid:[1]".into());
        assert_eq!(judge(&me, &contained), Verdict::Unknown);
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
        let me = ProcessIdentity::current();
        let record = InstanceRecord {
            pid,
            start_time: status.map(|s| s.start_time),
            ..record_of(&me)
        };
        assert!(
            matches!(judge(&me, &record), Verdict::Dead(_)),
            "{status:?}"
        );
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
