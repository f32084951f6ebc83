//! The one /proc reader: what the kernel says of a process (its resident and peak
//! resident memory, threads, CPU time, parent) and of a TCP connection, for the
//! tests' and the soak's bounds and the benchmark's figures. Linux only.

use std::fs;
use std::net::SocketAddr;

/// The figures of `/proc/PID/status` the tools bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident set, KiB.
    pub hwm_kib: u64,
    /// `Threads`.
    pub threads: u64,
}

/// Reads `VmRSS`, `VmHWM` and `Threads` of process `pid`.
pub fn status(pid: u32) -> Result<Status, String> {
    let text = read_status(pid)?;
    Ok(Status {
        rss_kib: status_field(&text, "VmRSS").ok_or_else(|| missing(pid, "VmRSS"))?,
        hwm_kib: status_field(&text, "VmHWM").ok_or_else(|| missing(pid, "VmHWM"))?,
        threads: status_field(&text, "Threads").ok_or_else(|| missing(pid, "Threads"))?,
    })
}

/// One number of `/proc/PID/status` (`Threads`, `VmRSS`, `VmHWM`, ...; sizes in KiB).
pub fn field(pid: u32, name: &str) -> Result<u64, String> {
    status_field(&read_status(pid)?, name).ok_or_else(|| missing(pid, name))
}

fn read_status(pid: u32) -> Result<String, String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))
}

fn missing(pid: u32, name: &str) -> String {
    format!("no {name} in /proc/{pid}/status")
}

fn status_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
pub fn stat_field(pid: u32, n: usize) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow its ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(n.checked_sub(3)?)?.parse().ok()
}

/// Clock ticks per second of `/proc` CPU times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a constant.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100).max(1)
}

/// CPU time (user + system) of a process, in microseconds; 0 when it is gone.
pub fn cpu_us(pid: u32) -> u64 {
    let ticks = stat_field(pid, 14).unwrap_or(0) + stat_field(pid, 15).unwrap_or(0);
    ticks * 1_000_000 / clock_ticks()
}

/// CPU time of a process's live threads, in nanoseconds, from `/proc/PID/task/*/schedstat`:
/// finer than `cpu_us` (whose clock ticks are 10 ms), for costs of microseconds. A thread
/// that has ended is not counted; 0 when the process is gone.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The processes whose parent is `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat_field(pid, 4) == Some(u64::from(parent)))
        .collect()
}

/// Whether the TCP connection from `local` to `remote` is established on this host,
/// as `/proc/net/tcp` lists it (IPv4 only). Sees a server's end of a connection whose
/// FIN the client has not read yet.
pub fn tcp_established(local: SocketAddr, remote: SocketAddr) -> Result<bool, String> {
    let kernel = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Ok(format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        )),
        SocketAddr::V6(_) => Err(format!("{a}: IPv4 only")),
    };
    let (local, remote) = (kernel(local)?, kernel(remote)?);
    let table = fs::read_to_string("/proc/net/tcp")
        .map_err(|e| format!("cannot read /proc/net/tcp: {e}"))?;
    Ok(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().take(4).collect();
        fields.get(1) == Some(&local.as_str())
            && fields.get(2) == Some(&remote.as_str())
            && fields.get(3) == Some(&"01")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_figures() {
        let me = status(std::process::id()).expect("own status");
        assert!(
            me.rss_kib > 0 && me.hwm_kib >= me.rss_kib && me.threads >= 1,
            "{me:?}"
        );
        assert_eq!(field(std::process::id(), "NoSuchField").ok(), None);
        assert_eq!(stat_field(std::process::id(), 1), None);
    }
}
