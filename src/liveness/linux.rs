//! Linux: identity from `/proc`.

use std::fs;

pub(crate) fn hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

pub(crate) fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned())
}

/// The pid namespace of this process, such as `pid:[4026531836]`.
pub(crate) fn pid_namespace() -> Option<String> {
    let link = fs::read_link("/proc/self/ns/pid").ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// Field 22 of `/proc/PID/stat`: the start time in clock ticks since boot.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    process_status(pid).map(|s| s.start_time)
}

/// The start time and state of a process, from `/proc/PID/stat`; `None` if
/// there is no such process.
pub(crate) fn process_status(pid: u32) -> Option<super::ProcessStatus> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// The command name (field 2) is in parentheses and may itself contain spaces
/// and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<super::ProcessStatus> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // After the name come field 3 (state) onwards; the start time is field 22.
    let state = fields.next()?;
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(super::ProcessStatus {
        start_time,
        zombie: state == "Z" || state == "X",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50";
        let status = parse_stat(stat).unwrap();
        assert_eq!((status.start_time, status.zombie), (987654, false));
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat(&stat.replace(") S ", ") Z ")).unwrap().zombie);
    }
}
