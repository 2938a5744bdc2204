//! The workloads the agent must not slow down, each pinned to CPU 0 and timed on the wall
//! clock: a context-switch storm (pipe ping-pong) and fixed CPU-bound arithmetic.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::cmd::Cmd;

/// The CPU every workload is pinned to: two threads on one CPU switch on every message.
const CPU: &str = "0";

/// `perf bench sched pipe -l loops` pinned to one CPU: two processes bounce a message over
/// pipes, two context switches per loop.
pub fn pingpong(loops: u64) -> Result<Duration> {
    timed(
        Cmd::new("taskset")
            .args(["-c", CPU, "perf", "bench", "sched", "pipe", "-l"])
            .arg(loops.to_string()),
    )
    .context("running the ping-pong workload")
}

/// `spin rounds`: xorshift rounds in registers, pinned to one CPU.
pub fn spin(helper: &Path, rounds: u64) -> Result<Duration> {
    timed(
        Cmd::new("taskset")
            .args(["-c", CPU])
            .arg(helper)
            .arg(rounds.to_string()),
    )
    .context("running the CPU-bound workload")
}

fn timed(cmd: Cmd) -> Result<Duration> {
    crate::bench::check_interrupted()?;
    let start = Instant::now();
    cmd.read()?;
    Ok(start.elapsed())
}

/// Sizes a workload to last about `target`: one trial run of `trial` units, scaled.
pub fn calibrate(
    trial: u64,
    target: Duration,
    run: impl Fn(u64) -> Result<Duration>,
) -> Result<u64> {
    let took = run(trial)?.as_secs_f64().max(1e-3);
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive count well inside f64's exact range"
    )]
    let units = (trial as f64 * target.as_secs_f64() / took).round() as u64;
    Ok(units.max(1))
}

/// Block I/O that runs every block program path: `count` direct (O_DIRECT) 4 KiB writes
/// (a process submits its own requests), then `count / 4` buffered 8 KiB files and a
/// `sync` (kernel threads write them back, bios merge, the page-owner lookup runs). The
/// files are removed afterwards.
pub fn block_writes(dir: &Path, count: u32) -> Result<()> {
    let file = dir.join("block-io.bin");
    let result = Cmd::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=4k", "oflag=direct"])
        .arg(format!("count={count}"))
        .run_quiet()
        .context("writing with O_DIRECT to exercise the block I/O program");
    let _ = std::fs::remove_file(&file);
    result?;
    let small = dir.join("block-io-small");
    let buffered = (|| -> Result<()> {
        std::fs::create_dir_all(&small)?;
        for i in 0..count / 4 {
            std::fs::write(small.join(i.to_string()), [0x5a_u8; 8192])?;
        }
        Cmd::new("sync").run_quiet()
    })()
    .context("buffered writes and sync to exercise kernel writeback");
    let _ = std::fs::remove_dir_all(&small);
    buffered
}
