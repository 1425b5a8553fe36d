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
    /// When the process started, in the platform's own units (clock ticks
    /// since boot on Linux). Together with the pid and boot id it names one
    /// process, even after the pid is reused.
    pub start_time: Option<u64>,
}

impl ProcessIdentity {
    /// The identity of the calling process.
    pub fn current() -> ProcessIdentity {
        let pid = std::process::id();
        ProcessIdentity {
            host: sys::hostname().unwrap_or_else(|| "localhost".to_owned()),
            boot_id: sys::boot_id(),
            pid,
            start_time: sys::process_start_time(pid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
