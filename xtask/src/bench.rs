//! `cargo xtask bench`: what the agent costs the host it watches, measured on this machine
//! and written to `target/bench/report.md` and `report.json`.
//!
//! 1. One agent's life beside a fleet growing from 0 to 100 to 1,000 simulated VMs: its CPU
//!    at each level (and the slope between), its peak memory over the whole life, and
//!    /metrics latency (plain and gzip) at 1,000 VMs.
//! 2. Per-event cost of each eBPF program from the kernel's own accounting
//!    (`kernel.bpf_stats_enabled`), the real `sched_switch` program beside an empty one on the
//!    same hook, under a pipe ping-pong storm beside the 1,000 VMs, in the default mode and
//!    with `--track-all`.
//! 3. Slowdown of a ping-pong with the agent against the slowdown with only the empty
//!    program attached (the floor), interleaved, with bootstrap intervals; a CPU-bound
//!    workload off and on.
//! 4. `optimus measure`: its overhead on 2,000 runs of `/bin/true`, and phase-switch latency.
//!
//! VMs are simulated (see [`fleet`]): processes named like QEMU with `CPU k/KVM` threads
//! that wake every [`Plan::vcpu_wake`], as an idle guest's vCPUs do on its timer ticks.
//! Needs root (eBPF, the sysctl); takes about 10 minutes, `--quick` about 5.
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
mod command;
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
    /// How often every simulated vCPU thread wakes.
    #[serde(serialize_with = "millis")]
    pub vcpu_wake: Duration,
    /// Simulated VM counts of the agent's life; the per-event and slowdown measurements run
    /// beside the largest.
    pub vm_levels: Vec<usize>,
    /// How long the ping-pong storm of the per-event measurement lasts.
    pub storm: Duration,
    /// Rounds of the slowdown measurement (each: off, on, empty program only).
    pub rounds: usize,
    /// Ping-pong runs per arm and round.
    pub runs_per_arm: usize,
    /// How long one ping-pong run lasts.
    pub run: Duration,
    /// How long one CPU-bound run lasts.
    pub spin_run: Duration,
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
            minutes: pick(full, 10, 5),
            vcpus_per_vm: 8,
            vcpu_wake: Duration::from_millis(500),
            vm_levels: vec![0, 100, 1000],
            storm: Duration::from_secs(pick(full, 5, 2)),
            rounds: pick(full, 10, 3),
            runs_per_arm: pick(full, 4, 2),
            run: Duration::from_millis(pick(full, 600, 400)),
            spin_run: Duration::from_millis(pick(full, 1000, 600)),
            warmup: Duration::from_secs(5),
            // At least discovery's full rescan period (30 s): the steady state includes
            // one safety-net rescan, neither none nor two.
            window: Duration::from_secs(pick(full, 60, 30)),
            scrapes: pick(full, 50, 20),
            profile_secs: pick(full, 10, 4),
        }
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_millis())
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
    let mut fleet = Fleet::new(&helpers.fake_qemu, plan.vcpus_per_vm, plan.vcpu_wake);
    let (loops, rounds) = ctx.size_workloads()?;
    results.life = Some(ctx.life(&mut fleet, true, &mut results.profiles)?);
    for track_all in [false, true] {
        results.per_event.push(ctx.per_event(&fleet, track_all)?);
    }
    let (pingpong, slowdown) = ctx.slowdown(&fleet, loops, rounds)?;
    results.pingpong = Some(pingpong);
    results.slowdown = slowdown;
    step("stopping the simulated VMs");
    drop(fleet);
    results.measure = match command::run(plan, bin, out) {
        Ok(m) => Some(m),
        Err(e) => {
            check_interrupted()?;
            step(&format!("optimus measure bench failed: {e:#}"));
            None
        }
    };
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
