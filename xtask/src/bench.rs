//! `cargo xtask bench`: what the agent costs the host it watches, measured on this machine
//! and written to `target/bench/report.md` and `report.json`.
//!
//! 1. Per-event cost of each eBPF program from the kernel's own accounting
//!    (`kernel.bpf_stats_enabled`), the real `sched_switch` program beside an empty one on the
//!    same hook, under a pipe ping-pong storm, with 1,000 tracked threads and with
//!    `--track-all`.
//! 2. Slowdown of a ping-pong and a CPU-bound workload, agent off and on, interleaved.
//! 3. The agent's CPU and peak memory at steady state with 0, 100 and 1,000 simulated VMs.
//! 4. /metrics latency and size with 1,000 VMs.
//!
//! VMs are simulated (see [`fleet`]): processes named like QEMU with `CPU k/KVM` threads.
//! Needs root (eBPF, the sysctl); takes about 4 minutes, `--quick` about 2.
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::signals;
use crate::ws::Workspace;

mod agent;
mod bpf;
mod fleet;
mod host;
mod measure;
mod report;
mod stats;
mod workload;

use fleet::{Fleet, Helpers};
use measure::Results;

/// Sizes of one bench run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub name: &'static str,
    /// Rough length of the whole run on a 2-CPU machine.
    pub minutes: u32,
    pub vcpus_per_vm: u32,
    /// Simulated VMs during the per-event and slowdown measurements (1,000 vCPU threads).
    pub storm_vms: usize,
    /// Simulated VM counts for the steady-state measurements; the last one is also scraped.
    pub vm_levels: Vec<usize>,
    /// How long the ping-pong storm of the per-event measurement lasts.
    pub storm: Duration,
    /// Off/on pairs of the slowdown measurement.
    pub pairs: usize,
    /// How long one workload run lasts.
    pub run: Duration,
    /// Agent running before its CPU time is counted.
    pub warmup: Duration,
    /// Window over which its CPU time is counted.
    pub window: Duration,
    /// GET /metrics requests per VM level.
    pub scrapes: usize,
    /// Length of a CPU profile, where one is taken.
    pub profile_secs: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let full = !quick;
        Self {
            name: if full { "full" } else { "quick" },
            minutes: pick(full, 4, 2),
            vcpus_per_vm: 8,
            storm_vms: 125,
            vm_levels: vec![0, 100, 1000],
            storm: Duration::from_secs(pick(full, 5, 2)),
            pairs: pick(full, 9, 3),
            run: Duration::from_millis(pick(full, 1500, 800)),
            warmup: Duration::from_secs(pick(full, 5, 3)),
            window: Duration::from_secs(pick(full, 30, 8)),
            scrapes: pick(full, 50, 20),
            profile_secs: pick(full, 10, 4),
        }
    }
}

/// `full` in a full run, `quick` in a quick one.
fn pick<T>(full: bool, full_value: T, quick_value: T) -> T {
    if full {
        full_value
    } else {
        quick_value
    }
}

/// Set once a termination signal arrived; long steps check it and unwind (guards clean up).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Fails once Ctrl-C (or SIGTERM/SIGHUP) arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, waking early to fail if interrupted.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// A progress line.
fn step(line: &str) {
    println!("==> bench: {line}");
}

/// `cargo xtask bench [--quick]`: exit status 0 when every target is met.
pub fn run(quick: bool) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs and sets kernel.bpf_stats_enabled: run it as root");
    }
    let catcher = signals::catch()?;
    // Never joined: it waits on the signal pipe until the process exits.
    std::thread::spawn(move || {
        while catcher.wait().is_ok() {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("bench: interrupted, cleaning up…");
        }
    });
    let result = bench(&Plan::new(quick));
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; the simulated VMs and agents were stopped");
    }
    result
}

fn bench(plan: &Plan) -> Result<ExitCode> {
    let started = Instant::now();
    host::ensure_tools()?;
    crate::tasks::build(true)?;
    let ws = Workspace::locate()?;
    let out = ws.target_dir.join("bench");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    step(&format!(
        "{} run: about {} minutes on a 2-CPU machine",
        plan.name, plan.minutes
    ));
    let helpers = Helpers::build()?;
    let bin = helpers.copy_in(&ws.bin("release", "optimus"))?;
    step("recording the environment (and what else is busy on it)");
    let env = host::environment(&ws.root, &bin)?;
    for b in &env.busy_processes {
        step(&format!(
            "note: {} (pid {}) uses {:.0} % of a CPU",
            b.comm,
            b.pid,
            b.cpu * 100.0
        ));
    }
    let results = measure_all(plan, &bin, &helpers, &out, env)?;
    let (md, json) = (out.join("report.md"), out.join("report.json"));
    let failed = report::write(&results, &md, &json)?;
    step(&format!(
        "done in {:.0} s: {} and {}",
        started.elapsed().as_secs_f64(),
        md.display(),
        json.display()
    ));
    if failed > 0 {
        println!("bench: {failed} target(s) missed; the report says what dominates");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every measurement, growing one fleet of simulated VMs as it goes.
fn measure_all(
    plan: &Plan,
    bin: &Path,
    helpers: &Helpers,
    out: &Path,
    environment: host::Environment,
) -> Result<Results> {
    let logs = out.join("logs");
    // Only this run's logs: a missing directory is fine, anything else fails the create.
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let ctx = measure::Ctx {
        plan,
        bin,
        helpers,
        out,
        logs: &logs,
    };
    let mut results = Results::new(plan.clone(), environment);
    let mut fleet = Fleet::new(&helpers.fake_qemu, plan.vcpus_per_vm);
    let (loops, rounds) = ctx.size_workloads()?;
    let mut levels: Vec<usize> = plan.vm_levels.clone();
    levels.sort_unstable();
    let last = levels.last().copied().unwrap_or(0);
    for &vms in levels.iter().filter(|&&v| v < plan.storm_vms) {
        grow(&mut fleet, vms)?;
        results
            .steady
            .push(ctx.steady(&fleet, false, &mut results.profiles)?);
    }
    grow(&mut fleet, plan.storm_vms)?;
    for track_all in [false, true] {
        results.per_event.push(ctx.per_event(&fleet, track_all)?);
    }
    results.slowdown = ctx.slowdown(&fleet, loops, rounds)?;
    for &vms in levels.iter().filter(|&&v| v >= plan.storm_vms) {
        grow(&mut fleet, vms)?;
        let profile_misses = vms == last;
        let steady = ctx.steady(&fleet, profile_misses, &mut results.profiles)?;
        results.steady.push(steady);
    }
    step("stopping the simulated VMs");
    drop(fleet);
    Ok(results)
}

fn grow(fleet: &mut Fleet, vms: usize) -> Result<()> {
    if fleet.vms() < vms {
        step(&format!(
            "starting simulated VMs: {} → {vms} ({} vCPU threads in all)",
            fleet.vms(),
            vms * fleet.vcpus_per_vm() as usize
        ));
        let t = Instant::now();
        fleet.grow_to(vms)?;
        step(&format!(
            "  {vms} VMs up in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}
