//! Unix process plumbing for the supervisor: `/proc`, process groups,
//! signals. Every function refuses to signal pid 0, 1, the agent itself or
//! the agent's own process group, whatever a state file says.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: R, S, D, Z, T, X, ...
    pub state: char,
    /// Field 5: the process group.
    pub pgrp: i32,
    /// Field 22: clock ticks after boot when the process started.
    pub start_time: u64,
}

impl Stat {
    /// A zombie or dead process: it no longer runs.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let close = text.rfind(')')?;
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgrp = rest.next()?.parse().ok()?;
    // Fields 3, 4 and 5 are read; field 22 is 17 further on.
    let start_time = rest.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        pgrp,
        start_time,
    })
}

/// `/proc/<pid>/stat` of a process, if it exists.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| parse_stat(&text))
}

fn have_proc() -> bool {
    Path::new("/proc/self/stat").exists()
}

/// Whether a pid (or process group id) may be signalled at all.
pub(crate) fn valid_target(pid: u32) -> bool {
    if pid <= 1 || pid > i32::MAX as u32 {
        return false;
    }
    let pid = pid as i32;
    // SAFETY: getpid and getpgrp cannot fail.
    let (own, own_group) = unsafe { (libc::getpid(), libc::getpgrp()) };
    pid != own && pid != own_group
}

/// Whether `pid` still runs and is the process that started at
/// `start_time` (0: unknown, then only liveness is checked).
pub(crate) fn same_process_alive(pid: u32, start_time: u64) -> bool {
    if !valid_target(pid) {
        return false;
    }
    match stat(pid) {
        Some(s) => !s.is_dead() && (start_time == 0 || s.start_time == start_time),
        None if have_proc() => false,
        // SAFETY: signal 0 only checks that the process exists.
        None => start_time == 0 && unsafe { libc::kill(pid as i32, 0) } == 0,
    }
}

/// Reaps `pid` if it is a zombie of the process that started at
/// `start_time` and a child of ours (an adopted process the same agent
/// process started, as in tests). Harmless otherwise.
pub(crate) fn reap_if_zombie(pid: u32, start_time: u64) {
    if !valid_target(pid) {
        return;
    }
    if let Some(s) = stat(pid) {
        if s.is_dead() && (start_time == 0 || s.start_time == start_time) {
            let mut status = 0;
            // SAFETY: WNOHANG never blocks; ECHILD (not our child) is ignored.
            unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        }
    }
}

/// Sends `signal` to the process group `pgid`. False if refused or failed.
pub(crate) fn signal_group(pgid: u32, signal: libc::c_int) -> bool {
    if !valid_target(pgid) {
        return false;
    }
    // SAFETY: a negative pid addresses a process group; it is > 1 here.
    unsafe { libc::kill(-(pgid as i32), signal) == 0 }
}

/// Sends `signal` to the process `pid`. False if refused or failed.
pub(crate) fn signal_process(pid: u32, signal: libc::c_int) -> bool {
    if !valid_target(pid) {
        return false;
    }
    // SAFETY: plain kill of a validated pid.
    unsafe { libc::kill(pid as i32, signal) == 0 }
}

/// The numeric entries of `/proc`.
pub(crate) fn list_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The live (not zombie) processes of group `pgid`.
pub(crate) fn group_members(pgid: u32) -> Vec<u32> {
    if !valid_target(pgid) {
        return Vec::new();
    }
    // SAFETY: signal 0 only checks that some member exists.
    if unsafe { libc::kill(-(pgid as i32), 0) } != 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    {
        return Vec::new();
    }
    if !have_proc() {
        // Cannot tell zombies apart; a member exists.
        return vec![pgid];
    }
    list_pids()
        .into_iter()
        .filter(|&pid| {
            stat(pid).is_some_and(|s| !s.is_dead() && s.pgrp >= 0 && s.pgrp as u32 == pgid)
        })
        .collect()
}

/// Whether the group `pgid` has a live member.
pub(crate) fn group_alive(pgid: u32) -> bool {
    !group_members(pgid).is_empty()
}

/// Whether the initial environment of `pid` holds exactly `entry`
/// (`KEY=value`). False when it cannot be read.
pub(crate) fn environ_has(pid: u32, entry: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|e| e == entry))
        .unwrap_or(false)
}

/// Whether some live member of group `pgid` carries `entry` in its
/// environment: proof that the group is one the supervisor started, even
/// after its leader is gone.
pub(crate) fn group_carries(pgid: u32, entry: &[u8]) -> bool {
    group_members(pgid)
        .into_iter()
        .any(|pid| environ_has(pid, entry))
}

/// How long ago a process that started at `start_time` (clock ticks after
/// boot) started.
pub(crate) fn age(start_time: u64) -> Option<Duration> {
    if start_time == 0 {
        return None;
    }
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    let secs = uptime - start_time as f64 / hz;
    if secs.is_finite() && secs >= 0.0 {
        Some(Duration::from_secs_f64(secs))
    } else {
        Some(Duration::ZERO)
    }
}

/// `KEY=value` as bytes.
pub(crate) fn env_entry(key: &str, value: &OsStr) -> Vec<u8> {
    let mut entry = key.as_bytes().to_vec();
    entry.push(b'=');
    entry.extend_from_slice(value.as_bytes());
    entry
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting up to
/// `wait` for another holder to let go. The file descriptor is close-on-exec,
/// so children never inherit the lock.
pub(crate) fn lock_file(path: &Path, wait: Duration) -> io::Result<File> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let deadline = Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {}
            _ => return Err(err),
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is locked: another supervisor uses this data directory",
                    path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (a b) (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.start_time, 987654);
        assert!(parse_stat("12 (x) S 1").is_none());
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("").is_none());
    }

    #[test]
    fn own_process_is_readable_and_never_a_target() {
        let own = std::process::id();
        let s = stat(own).unwrap();
        assert!(!s.is_dead());
        assert!(s.start_time > 0);
        assert!(!valid_target(own));
        assert!(!valid_target(0));
        assert!(!valid_target(1));
        assert!(!valid_target(u32::MAX));
        assert!(!signal_group(0, 0));
        assert!(!same_process_alive(own, s.start_time));
        assert!(age(s.start_time).is_some());
    }
}
