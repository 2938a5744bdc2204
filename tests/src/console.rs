//! Polling a guest's serial console log for a marker line.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::proc::file_tail;

/// Lines of console log quoted in errors.
pub(crate) const TAIL_LINES: usize = 40;

/// Waits until the serial log at `log` contains `marker`. `still_running` is asked about
/// once a second; `Some(why)` means the guest is gone and the wait fails at once.
pub(crate) fn wait_for_marker(
    log: &Path,
    marker: &str,
    timeout: Duration,
    mut still_running: impl FnMut() -> Option<String>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_check = start;
    loop {
        if contains(log, marker) {
            return Ok(());
        }
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            if let Some(why) = still_running() {
                // The last lines may have landed just before it went.
                if contains(log, marker) {
                    return Ok(());
                }
                bail!(
                    "guest stopped before printing {marker:?}: {why}\n--- console {} (tail) ---\n{}",
                    log.display(),
                    file_tail(log, TAIL_LINES)
                );
            }
        }
        if start.elapsed() >= timeout {
            bail!(
                "no {marker:?} on the guest console within {timeout:?}\n--- console {} (tail) ---\n{}",
                log.display(),
                file_tail(log, TAIL_LINES)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn contains(log: &Path, marker: &str) -> bool {
    std::fs::read(log).is_ok_and(|bytes| {
        bytes
            .windows(marker.len().max(1))
            .any(|w| w == marker.as_bytes())
    })
}
