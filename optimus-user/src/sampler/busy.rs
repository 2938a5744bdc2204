//! Per-CPU busy time from the kernel's own idle accounting (`/proc/stat`), for
//! attribution's active/idle split.
//!
//! Busy is the time elapsed since the agent started less the CPU's idle and iowait time.
//! The kernel keeps those two exactly (nohz accounting in nanoseconds, shown in USER_HZ
//! ticks, so a reading is late by under one tick and never drifts), while its user and
//! system fields are sampled at ticks and are not used here. The `sched_switch` program
//! used to count busy stretches itself: that cost a clock read at every switch to or from
//! idle (most switches of a wake-up-heavy host), and a switch that this kernel makes
//! without the tracepoint stretched a busy stretch.

use std::path::{Path, PathBuf};

use crate::energy::estimate::parse_proc_stat;

/// Reads `/proc/stat` and turns idle time into busy nanoseconds since the first reading.
pub struct BusyClock {
    path: PathBuf,
    /// Nanoseconds per USER_HZ tick.
    tick_ns: u64,
    /// Per CPU id: (monotonic ns, idle + iowait ns) when it was first seen.
    base: Vec<Option<(u64, u64)>>,
}

impl BusyClock {
    /// For the procfs at `proc` (normally `/proc`).
    pub fn new(proc: &Path) -> Self {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self::with_tick(
            proc,
            u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100),
        )
    }

    fn with_tick(proc: &Path, hz: u64) -> Self {
        Self {
            path: proc.join("stat"),
            tick_ns: 1_000_000_000 / hz,
            base: Vec::new(),
        }
    }

    /// Per CPU (index = CPU id): nanoseconds busy since this clock first saw it, as of
    /// `at_ns` (CLOCK_MONOTONIC, read just before). Empty when `/proc/stat` cannot be read
    /// or lists no CPU: busy time is then unknown, not zero.
    pub fn read(&mut self, at_ns: u64) -> Vec<u64> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Vec::new();
        };
        self.update(&text, at_ns)
    }

    fn update(&mut self, text: &str, at_ns: u64) -> Vec<u64> {
        let cpus = parse_proc_stat(text);
        let Some(last) = cpus.keys().next_back() else {
            return Vec::new();
        };
        let n = usize::try_from(*last).map_or(0, |l| l + 1);
        if self.base.len() < n {
            self.base.resize(n, None);
        }
        let mut busy = vec![0; n];
        for (cpu, times) in cpus {
            let Ok(cpu) = usize::try_from(cpu) else {
                continue;
            };
            let idle_ns = times
                .total
                .saturating_sub(times.busy)
                .saturating_mul(self.tick_ns);
            let (since, idle_then) = *self.base[cpu].get_or_insert((at_ns, idle_ns));
            // Saturating: the idle counter is truncated to a tick, so right after the base
            // it can run ahead of the clock by that much.
            busy[cpu] = at_ns
                .saturating_sub(since)
                .saturating_sub(idle_ns.saturating_sub(idle_then));
        }
        busy
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `cpuN user nice system idle iowait irq softirq steal guest guest_nice`.
    fn stat(lines: &[(u32, u64, u64)]) -> String {
        let mut s = String::from("cpu  1 2 3 4 5 6 7 0 0 0\n");
        for (cpu, idle, iowait) in lines {
            s += &format!("cpu{cpu} 50 0 30 {idle} {iowait} 1 1 0 0 0\n");
        }
        s + "intr 12345\nctxt 999\n"
    }

    #[test]
    fn busy_is_elapsed_less_idle_and_iowait() {
        let mut clock = BusyClock::with_tick(Path::new("/nonexistent"), 100);
        let s = 1_000_000_000;
        assert_eq!(
            clock.update(&stat(&[(0, 1000, 10), (1, 500, 0)]), 5 * s),
            [0, 0]
        );
        // Two seconds later: CPU 0 idled 0.5 s + 0.1 s iowait, CPU 1 idled 2 s.
        let busy = clock.update(&stat(&[(0, 1050, 20), (1, 700, 0)]), 7 * s);
        assert_eq!(busy, [2 * s - 600_000_000, 0]);
    }

    #[test]
    fn a_cpu_seen_later_counts_from_then_and_gaps_are_zero() {
        let mut clock = BusyClock::with_tick(Path::new("/nonexistent"), 100);
        let s = 1_000_000_000;
        clock.update(&stat(&[(0, 0, 0)]), s);
        let busy = clock.update(&stat(&[(0, 0, 0), (2, 100, 0)]), 3 * s);
        assert_eq!(busy, [2 * s, 0, 0]);
        let busy = clock.update(&stat(&[(0, 0, 0), (2, 150, 0)]), 4 * s);
        assert_eq!(busy, [3 * s, 0, s / 2]);
    }

    #[test]
    fn unreadable_or_empty_is_unknown() {
        let mut clock = BusyClock::new(Path::new("/nonexistent"));
        assert!(clock.read(1).is_empty());
        assert!(clock.update("intr 1\n", 1).is_empty());
    }
}
