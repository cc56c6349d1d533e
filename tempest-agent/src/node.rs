//! The node's figures: host name, cores, memory, load and the free space of
//! the data directory, read from `/proc` and `statvfs` on every call (they
//! are cheap to read and a cached figure would only be stale).

use std::path::Path;

use tempest_control::NodeInfo;

/// The node's figures now. A figure that cannot be read is 0.
pub fn info(data_dir: &Path) -> NodeInfo {
    let (memory_total, memory_available) = std::fs::read_to_string("/proc/meminfo")
        .map(|t| meminfo(&t))
        .unwrap_or_default();
    NodeInfo {
        hostname: tempest_core::metrics::hostname(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        cores: std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        memory_total,
        memory_available,
        load: std::fs::read_to_string("/proc/loadavg")
            .map(|t| loadavg(&t))
            .unwrap_or_default(),
        disk_free: disk_free(data_dir).unwrap_or(0),
    }
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo`, in bytes.
fn meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| {
                let mut parts = rest.split_whitespace();
                let n: u64 = parts.next()?.parse().ok()?;
                Some(match parts.next() {
                    Some("kB") => n.saturating_mul(1024),
                    _ => n,
                })
            })
            .unwrap_or(0)
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// The three load averages of a `/proc/loadavg`.
fn loadavg(text: &str) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (slot, part) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = part.parse().unwrap_or(0.0);
    }
    out
}

/// Bytes available to an unprivileged user on `path`'s file system.
fn disk_free(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: `c` is a valid NUL-terminated path and `stat` a writable
        // statvfs the call fills in.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stat) };
        if rc != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)]
        Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let m =
            "MemTotal:       16314588 kB\nMemFree:         1000 kB\nMemAvailable:   8000000 kB\n";
        assert_eq!(meminfo(m), (16314588 * 1024, 8000000 * 1024));
        assert_eq!(loadavg("0.52 1.05 2.00 2/1234 5678\n"), [0.52, 1.05, 2.0]);
    }

    #[test]
    fn reads_this_node() {
        let dir = tempfile::tempdir().unwrap();
        let n = info(dir.path());
        assert!(!n.hostname.is_empty());
        assert!(n.cores >= 1);
        assert!(n.disk_free > 0);
        if Path::new("/proc/meminfo").exists() {
            assert!(n.memory_total >= n.memory_available && n.memory_available > 0);
        }
    }
}
