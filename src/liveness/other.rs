//! Platforms without `/proc`: the host name from the environment, no boot id
//! and no process start time (liveness then falls back to heartbeats).

pub(crate) fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .ok()
        .filter(|name| !name.is_empty())
}

pub(crate) fn boot_id() -> Option<String> {
    None
}

pub(crate) fn process_start_time(_pid: u32) -> Option<u64> {
    None
}

pub(crate) fn process_status(_pid: u32) -> Option<super::ProcessStatus> {
    None
}

pub(crate) fn pid_namespace() -> Option<String> {
    None
}
