//! The one process launcher: start a binary that prints `listening on ADDR` first,
//! wait for it to be ready, find a free port, and kill what was started when its
//! handle drops, so that no test or run leaves a process behind.

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::http;

/// How long a binary may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then up to `grace` for the process to exit; whether it did. A process
    /// still running is killed when the handle drops. (nginx's master stops its workers
    /// on SIGTERM; SIGKILL would orphan them.)
    pub fn terminate(&mut self, grace: Duration) -> bool {
        if let Ok(Some(_)) = self.0.try_wait() {
            return true;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid()) else {
            return false;
        };
        // SAFETY: kill(2) on our own child, which has not been reaped yet (so its pid
        // cannot have been reused), with a valid signal number.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM)
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with its stdout piped and reads the address from the
/// `listening on [http[s]://]ADDR` line it prints first; the rest of its stdout is
/// drained so that it never blocks on a full pipe. stdin and stderr are the caller's
/// to set.
pub fn spawn_listening(mut cmd: Command, what: &str) -> Result<(Proc, SocketAddr), String> {
    cmd.stdout(Stdio::piped());
    let program = Path::new(cmd.get_program()).display().to_string();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what} ({program}): {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(START_TIMEOUT)
        .map_err(|_| format!("{what} printed no 'listening on' line"))?;
    let addr = listening_addr(&line)
        .ok_or_else(|| format!("{what} printed {line:?}, not a listening address"))?;
    Ok((proc, addr))
}

/// The address of a `... listening on [http[s]://]ADDR` line.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, addr) = line.rsplit_once("listening on ")?;
    let addr = addr.trim();
    let addr = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    addr.parse().ok()
}

/// Polls `cond` every 10 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for: {what}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until the router at `addr` answers `/readyz` with 200 (a backend is routable).
pub fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    wait_until(timeout, "/readyz answers 200", || {
        http::fetch(addr, "GET", "/readyz", &[], b"", Duration::from_secs(2))
            .is_ok_and(|r| r.status == 200)
    })
}

/// A port on 127.0.0.1 that was free a moment ago: nothing listens there (yet).
pub fn free_port() -> io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

/// The directory of the running binary, where cargo puts its sibling binaries
/// (`vllm-router`, `mock-vllm`) of the same build.
pub fn bin_dir() -> Result<PathBuf, String> {
    std::env::current_exe()
        .map_err(|e| format!("cannot find this binary: {e}"))?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "this binary has no directory".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_give_their_address() {
        let want: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        assert_eq!(
            listening_addr("mock-vllm listening on 127.0.0.1:8081"),
            Some(want)
        );
        assert_eq!(
            listening_addr("listening on http://127.0.0.1:8081\n"),
            Some(want)
        );
        assert_eq!(
            listening_addr("x listening on https://127.0.0.1:8081"),
            Some(want)
        );
        assert_eq!(listening_addr("listening on nowhere"), None);
        assert_eq!(listening_addr("hello"), None);
    }
}
