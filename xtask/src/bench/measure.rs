//! The measurements, each a function of the fleet of simulated VMs it runs beside.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use optimus_tests::proc::signal;
use serde::Serialize;

use super::agent::{self, Agent, Memory, Mode};
use super::bpf::{self, Cost, StatsEnabled};
use super::fleet::{Fleet, Helpers};
use super::host::{self, Environment, Top};
use super::report::limits;
use super::stats::Spread;
use super::workload;
use super::{pause, step, Plan};

/// Everything measured, as written to `report.json`.
#[derive(Serialize)]
pub struct Results {
    pub plan: Plan,
    pub environment: Environment,
    pub per_event: Vec<PerEvent>,
    pub slowdown: Vec<Slowdown>,
    pub steady: Vec<Steady>,
    pub profiles: Vec<Profile>,
}

impl Results {
    pub fn new(plan: Plan, environment: Environment) -> Self {
        Self {
            plan,
            environment,
            per_event: Vec::new(),
            slowdown: Vec::new(),
            steady: Vec::new(),
            profiles: Vec::new(),
        }
    }
}

/// Per-event cost of every program of one agent under a ping-pong storm.
#[derive(Serialize)]
pub struct PerEvent {
    pub track_all: bool,
    /// Simulated vCPU threads the agent listed (and so tracked) during the storm.
    pub vcpus_tracked: usize,
    pub storm_loops: u64,
    pub costs: Vec<Cost>,
    /// ns/event of `sched_switch` over the empty program's.
    pub ratio: Option<f64>,
}

impl PerEvent {
    /// The real sched_switch program's cost, and the empty one's.
    pub fn pair(&self) -> (Option<&Cost>, Option<&Cost>) {
        let find = |f: &dyn Fn(&str) -> bool| self.costs.iter().find(|c| f(&c.info.name));
        (
            find(&|n| n == "sched_switch"),
            // The kernel cuts object names to 15 bytes: "sched_switch_em".
            find(&|n| n.starts_with("sched_switch_e")),
        )
    }
}

/// One workload, agent off and on.
#[derive(Serialize)]
pub struct Slowdown {
    pub workload: &'static str,
    /// What one run does.
    pub size: String,
    /// Loops or rounds per run.
    pub units: u64,
    /// Wall seconds per run, in run order.
    pub off_s: Vec<f64>,
    pub on_s: Vec<f64>,
    /// on/off of each pair.
    pub ratio: Spread,
    /// Runs with the agent started but its process stopped (SIGSTOP): its eBPF programs
    /// still run, its userspace does not. Ping-pong only.
    pub stopped_s: Option<Vec<f64>>,
    /// stopped/off of each pair.
    pub stopped_ratio: Option<Spread>,
}

/// The agent at steady state beside one fleet.
#[derive(Serialize)]
pub struct Steady {
    pub vms: usize,
    pub vcpus_listed: usize,
    pub window_s: f64,
    /// CPU seconds per wall second, all the agent's threads.
    pub cpu_per_s: f64,
    /// Right after it first listed every vCPU.
    pub memory_ready: Memory,
    /// After the window and the scrapes.
    pub memory: Memory,
    pub scrape: ScrapeStats,
}

#[derive(Serialize)]
pub struct ScrapeStats {
    pub latency_ms: Spread,
    pub body_bytes: usize,
    pub series: usize,
}

/// The top of a profile of the agent.
#[derive(Serialize)]
pub struct Profile {
    pub what: &'static str,
    /// perf's event: `cpu-clock` or `page-faults`.
    pub event: &'static str,
    pub seconds: Option<u32>,
    pub top: Option<Top>,
    /// Why there is no profile.
    pub error: Option<String>,
}

impl Profile {
    fn of(what: &'static str, event: &'static str, seconds: Option<u32>, r: Result<Top>) -> Self {
        let (top, error) = match r {
            Ok(top) => (Some(top), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        Self {
            what,
            event,
            seconds,
            top,
            error,
        }
    }
}

/// Names of the profiles, which the report looks up.
pub const PROFILE_STEADY: &str = "agent at steady state";
pub const PROFILE_SCRAPED: &str = "agent while scraped back to back";
pub const PROFILE_STARTUP: &str = "agent start-up until it serves /metrics";

/// What every measurement needs.
pub struct Ctx<'a> {
    pub plan: &'a Plan,
    pub bin: &'a Path,
    pub helpers: &'a Helpers,
    /// `target/bench`, on a real disk (the O_DIRECT writes need one).
    pub out: &'a Path,
    pub logs: &'a Path,
}

impl Ctx<'_> {
    fn start_agent(&self, fleet: &Fleet, mode: Mode) -> Result<Agent> {
        let mut agent = Agent::start(self.bin, mode, self.logs)?;
        let listed = agent.wait_ready(fleet.vcpus())?;
        pause(Duration::from_secs(1))?;
        if listed > fleet.vcpus() {
            step(&format!(
                "  note: the agent lists {listed} simulated vCPUs, more than the {} started",
                fleet.vcpus()
            ));
        }
        Ok(agent)
    }

    /// Ping-pong loops and spin rounds that last about one run each, agent off.
    pub fn size_workloads(&self) -> Result<(u64, u64)> {
        step("sizing the workloads (agent off)");
        let loops = workload::calibrate(100_000, self.plan.run, workload::pingpong)?;
        let spin = |n| workload::spin(&self.helpers.spin, n);
        let rounds = workload::calibrate(200_000_000, self.plan.run, spin)?;
        step(&format!(
            "  ping-pong: {loops} loops, CPU-bound: {rounds} rounds (about {:.1} s each)",
            self.plan.run.as_secs_f64()
        ));
        Ok((loops, rounds))
    }

    /// Per-event cost of each program, with the empty baseline attached beside.
    pub fn per_event(&self, fleet: &Fleet, track_all: bool) -> Result<PerEvent> {
        let config = if track_all {
            "--track-all".to_owned()
        } else {
            format!("{} tracked threads", fleet.vcpus())
        };
        step(&format!(
            "per-event cost, {config}: agent with the empty baseline program"
        ));
        let stats = StatsEnabled::enable()?;
        let agent = self.start_agent(
            fleet,
            Mode {
                track_all,
                baseline: true,
            },
        )?;
        let storm = self.storm_loops()?;
        let before = bpf::counters_of(agent.pid())?;
        step(&format!(
            "  ping-pong storm: {storm} loops on CPU 0, then 2,048 O_DIRECT writes and 512 buffered files + sync"
        ));
        workload::pingpong(storm)?;
        if let Err(e) = workload::block_writes(self.out, 2048) {
            step(&format!("  note: no block I/O exercised: {e:#}"));
        }
        let after = bpf::counters_of(agent.pid())?;
        let costs = bpf::costs(&before, &after, &bpf::loaded()?)?;
        drop(agent);
        drop(stats);
        let mut result = PerEvent {
            track_all,
            vcpus_tracked: fleet.vcpus(),
            storm_loops: storm,
            costs,
            ratio: None,
        };
        if let (Some(real), Some(empty)) = result.pair() {
            result.ratio = real
                .ns_per_event
                .zip(empty.ns_per_event)
                .map(|(r, e)| r / e);
        }
        for c in &result.costs {
            step(&format!(
                "  {}: {} events, {} ns/event",
                c.info.name,
                c.events,
                c.ns_per_event.map_or("-".to_owned(), |n| format!("{n:.1}"))
            ));
        }
        Ok(result)
    }

    fn storm_loops(&self) -> Result<u64> {
        workload::calibrate(50_000, self.plan.storm, workload::pingpong)
    }

    /// Both workloads, agent off and on in alternating order (off-on, on-off, ...); in each
    /// "on" arm the ping-pong also runs once more with the agent's process stopped, which
    /// leaves only its eBPF programs at work.
    pub fn slowdown(&self, fleet: &Fleet, loops: u64, rounds: u64) -> Result<Vec<Slowdown>> {
        step(&format!(
            "workload slowdown: {} off/on pairs, interleaved, {} simulated vCPUs tracked",
            self.plan.pairs,
            fleet.vcpus()
        ));
        let mut runs = Runs::default();
        for pair in 0..self.plan.pairs {
            let order = if pair % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                if on {
                    self.on_arm(fleet, loops, rounds, &mut runs)?;
                } else {
                    runs.pp_off.push(workload::pingpong(loops)?.as_secs_f64());
                    let cpu = workload::spin(&self.helpers.spin, rounds)?;
                    runs.cpu_off.push(cpu.as_secs_f64());
                }
            }
            step(&format!(
                "  pair {}/{}: ping-pong off {:.3} s, on {:.3} s, on but agent stopped {:.3} s; \
                 CPU-bound off {:.3} s, on {:.3} s",
                pair + 1,
                self.plan.pairs,
                runs.pp_off[pair],
                runs.pp_on[pair],
                runs.pp_paused[pair],
                runs.cpu_off[pair],
                runs.cpu_on[pair]
            ));
        }
        Ok(vec![
            Slowdown::new(
                "ping-pong",
                format!("`perf bench sched pipe -l {loops}`"),
                loops,
                [runs.pp_off, runs.pp_on],
                Some(runs.pp_paused),
            )?,
            Slowdown::new(
                "CPU-bound",
                format!("{rounds} xorshift rounds"),
                rounds,
                [runs.cpu_off, runs.cpu_on],
                None,
            )?,
        ])
    }

    fn on_arm(&self, fleet: &Fleet, loops: u64, rounds: u64, runs: &mut Runs) -> Result<()> {
        let agent = self.start_agent(fleet, Mode::default())?;
        runs.pp_on.push(workload::pingpong(loops)?.as_secs_f64());
        let cpu = workload::spin(&self.helpers.spin, rounds)?;
        runs.cpu_on.push(cpu.as_secs_f64());
        let stopped = Stopped::new(agent.pid())?;
        runs.pp_paused
            .push(workload::pingpong(loops)?.as_secs_f64());
        drop(stopped);
        Ok(())
    }

    /// The agent beside `fleet` at 1 s sampling: CPU over a window after warm-up, memory,
    /// scrapes; with `profile_misses`, a CPU profile for each target it misses.
    pub fn steady(
        &self,
        fleet: &Fleet,
        profile_misses: bool,
        profiles: &mut Vec<Profile>,
    ) -> Result<Steady> {
        let vms = fleet.vms();
        step(&format!(
            "steady state with {vms} simulated VMs: warm-up {} s, CPU over {} s, {} scrapes",
            self.plan.warmup.as_secs(),
            self.plan.window.as_secs(),
            self.plan.scrapes
        ));
        let agent = self.start_agent(fleet, Mode::default())?;
        let pid = agent.pid();
        let memory_ready = agent::memory(pid)?;
        pause(self.plan.warmup)?;
        let (cpu0, t0) = (agent::cpu_time(pid)?, Instant::now());
        pause(self.plan.window)?;
        let (cpu1, window) = (agent::cpu_time(pid)?, t0.elapsed().as_secs_f64());
        let cpu_per_s = cpu1.saturating_sub(cpu0).as_secs_f64() / window;
        let scrape = scrapes(agent.addr(), self.plan.scrapes)?;
        let memory = agent::memory(pid)?;
        step(&format!(
            "  CPU {:.3} % of one CPU, peak RSS {:.1} MB, scrape median {:.1} ms p99 {:.1} ms, {} bytes",
            cpu_per_s * 100.0,
            mb(memory.peak),
            scrape.latency_ms.median,
            scrape.latency_ms.p99,
            scrape.body_bytes
        ));
        if profile_misses {
            if cpu_per_s > limits::AGENT_CPU {
                profiles.push(self.profile(&agent, PROFILE_STEADY, || Ok(())));
            }
            if scrape.latency_ms.p99 > limits::SCRAPE_MS {
                let addr = agent.addr().to_owned();
                let busy = || scrape_for(&addr, Duration::from_secs(self.plan.profile_secs.into()));
                profiles.push(self.profile(&agent, PROFILE_SCRAPED, busy));
            }
            if memory.peak > limits::AGENT_PEAK_BYTES {
                step("  profiling where the agent's start-up touches memory (perf, page-faults)");
                let top = host::startup_faults(self.bin, self.logs);
                profiles.push(Profile::of(PROFILE_STARTUP, "page-faults", None, top));
            }
        }
        Ok(Steady {
            vms,
            vcpus_listed: fleet.vcpus(),
            window_s: window,
            cpu_per_s,
            memory_ready,
            memory,
            scrape,
        })
    }

    fn profile(
        &self,
        agent: &Agent,
        what: &'static str,
        during: impl FnOnce() -> Result<()>,
    ) -> Profile {
        let secs = self.plan.profile_secs;
        step(&format!(
            "  profiling the {what} for {secs} s (perf, cpu-clock)"
        ));
        let top = host::cpu_profile(agent.pid(), secs, during);
        Profile::of(what, "cpu-clock", Some(secs), top)
    }
}

impl Slowdown {
    fn new(
        workload: &'static str,
        size: String,
        units: u64,
        [off, on]: [Vec<f64>; 2],
        stopped: Option<Vec<f64>>,
    ) -> Result<Self> {
        let ratio = |arm: &[f64]| {
            let ratios: Vec<f64> = arm.iter().zip(&off).map(|(n, f)| n / f).collect();
            Spread::of(&ratios).context("no slowdown pairs were run")
        };
        Ok(Self {
            workload,
            size,
            units,
            ratio: ratio(&on)?,
            stopped_ratio: stopped.as_deref().map(ratio).transpose()?,
            off_s: off,
            on_s: on,
            stopped_s: stopped,
        })
    }
}

/// Wall seconds of each run, by workload and arm.
#[derive(Default)]
struct Runs {
    pp_off: Vec<f64>,
    pp_on: Vec<f64>,
    pp_paused: Vec<f64>,
    cpu_off: Vec<f64>,
    cpu_on: Vec<f64>,
}

/// A process stopped (SIGSTOP) while this lives, continued on drop.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Result<Self> {
        if !signal(pid, libc::SIGSTOP) {
            anyhow::bail!("could not stop the agent (pid {pid})");
        }
        Ok(Self(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// `n` GET /metrics one after the other.
fn scrapes(addr: &str, n: usize) -> Result<ScrapeStats> {
    let mut ms = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        super::check_interrupted()?;
        let s = agent::scrape(addr)?;
        if s.status != 200 {
            anyhow::bail!("GET /metrics answered HTTP {}", s.status);
        }
        ms.push(s.took.as_secs_f64() * 1e3);
        last = Some(s);
    }
    let last = last.context("no scrapes were run")?;
    Ok(ScrapeStats {
        latency_ms: Spread::of(&ms).context("no scrapes were run")?,
        body_bytes: last.body.len(),
        series: last
            .body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count(),
    })
}

/// Scrapes back to back for `d`.
fn scrape_for(addr: &str, d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        super::check_interrupted()?;
        agent::scrape(addr)?;
    }
    Ok(())
}

/// Bytes in decimal megabytes.
pub fn mb(bytes: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "memory sizes far below 2^52")]
    let b = bytes as f64;
    b / 1e6
}
