//! Watchers that sample /proc and the router while a load runs: CPU time per
//! process group, peak memory and threads, and the queue length.

use crate::*;

/// Resident memory and thread count of a process.
#[derive(Serialize, Default, Clone, Copy)]
pub(crate) struct ProcSample {
    pub(crate) rss_kib: u64,
    pub(crate) threads: u64,
}

impl ProcSample {
    /// The figures of `pid`, zeros when it is gone.
    pub(crate) fn of(pid: u32) -> ProcSample {
        let status = procfs::status(pid).unwrap_or_default();
        ProcSample {
            rss_kib: status.rss_kib,
            threads: status.threads,
        }
    }
}

/// CPU time spent by groups of processes between two instants, measured on a
/// thread of its own while the load runs.
pub(crate) struct CpuWatch(pub(crate) JoinHandle<Vec<f64>>);

impl CpuWatch {
    pub(crate) fn spawn(groups: Vec<Vec<u32>>, from: Instant, until: Instant) -> CpuWatch {
        CpuWatch(thread::spawn(move || {
            let total = |g: &Vec<u32>| g.iter().map(|&p| procfs::cpu_us(p)).sum::<u64>();
            thread::sleep(from.saturating_duration_since(Instant::now()));
            let before: Vec<u64> = groups.iter().map(total).collect();
            thread::sleep(until.saturating_duration_since(Instant::now()));
            groups
                .iter()
                .zip(before)
                .map(|(g, b)| total(g).saturating_sub(b) as f64)
                .collect()
        }))
    }

    pub(crate) fn join(self) -> Result<Vec<f64>, String> {
        self.0
            .join()
            .map_err(|_| "the CPU watch thread panicked".to_owned())
    }
}

/// The highest RSS and thread count of a process while it runs.
pub(crate) struct PeakWatch {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: JoinHandle<ProcSample>,
}

impl PeakWatch {
    pub(crate) fn spawn(pid: u32) -> PeakWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak = ProcSample::default();
            while !flag.load(Ordering::Relaxed) {
                let s = ProcSample::of(pid);
                peak.rss_kib = peak.rss_kib.max(s.rss_kib);
                peak.threads = peak.threads.max(s.threads);
                thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        PeakWatch { stop, handle }
    }

    pub(crate) fn stop(self) -> ProcSample {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The longest queue the router's `/load-stats` showed while a run went on.
pub(crate) struct QueueWatch {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: JoinHandle<u64>,
}

impl QueueWatch {
    pub(crate) fn spawn(addr: SocketAddr) -> QueueWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                let stats = get_json(addr, "/load-stats").unwrap_or_default();
                peak = stats["summary"]["queue_length"]
                    .as_u64()
                    .unwrap_or(0)
                    .max(peak);
                thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        QueueWatch { stop, handle }
    }

    pub(crate) fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}
