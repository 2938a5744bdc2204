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
use super::stats::{self, Estimate, Spread};
use super::workload;
use super::{pause, step, Plan};

/// Everything measured, as written to `report.json`.
#[derive(Serialize)]
pub struct Results {
    pub plan: Plan,
    pub environment: Environment,
    pub per_event: Vec<PerEvent>,
    /// Ping-pong: agent off, agent on, only the empty program attached.
    pub pingpong: Option<PingPong>,
    /// The CPU-bound workload, agent off and on.
    pub slowdown: Vec<Slowdown>,
    /// One agent's life beside a fleet growing from 0 to the largest level: its CPU at
    /// each level, its whole-life peak memory, its scrapes at the largest.
    pub life: Option<Life>,
    pub profiles: Vec<Profile>,
    /// `optimus measure` (`None`: it failed; the run's output says why).
    pub measure: Option<super::command::MeasureBench>,
}

impl Results {
    pub fn new(plan: Plan, environment: Environment) -> Self {
        Self {
            plan,
            environment,
            per_event: Vec::new(),
            pingpong: None,
            slowdown: Vec::new(),
            life: None,
            profiles: Vec::new(),
            measure: None,
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
            // The BTF tracepoint, or the raw tracepoint the agent falls back to.
            find(&|n| n == "sched_switch" || n == "ss_raw"),
            // The kernel cuts object names to 15 bytes: "sched_switch_em".
            find(&|n| n.starts_with("sched_switch_e") || n == "ss_raw_empty"),
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
}

/// The ping-pong in three arms, interleaved: agent off, agent on (default mode), and only
/// the empty `sched_switch` program attached (the floor any attached program costs).
#[derive(Serialize)]
pub struct PingPong {
    pub loops: u64,
    /// Wall seconds per run; entry `i` of the three lists ran in the same round.
    pub off_s: Vec<f64>,
    pub on_s: Vec<f64>,
    pub empty_s: Vec<f64>,
    /// median(on/off) − 1 over the triples, with its bootstrap 95 % interval.
    pub agent_slowdown: Estimate,
    /// median(empty/off) − 1.
    pub empty_slowdown: Estimate,
    /// agent_slowdown / empty_slowdown, from the same resamples.
    pub ratio: Estimate,
}

impl PingPong {
    /// Both slowdowns known to within ±[`limits::PINGPONG_HALF_WIDTH`].
    pub fn stable(&self) -> bool {
        [self.agent_slowdown, self.empty_slowdown]
            .iter()
            .all(|e| e.half_width() <= limits::PINGPONG_HALF_WIDTH)
    }
}

/// The agent at steady state beside one fleet.
#[derive(Serialize)]
pub struct Steady {
    pub vms: usize,
    pub vcpus_listed: usize,
    pub window_s: f64,
    /// CPU seconds per wall second, all the agent's threads.
    pub cpu_per_s: f64,
    /// After the window.
    pub memory: Memory,
}

/// One agent from 0 VMs to the largest fleet.
#[derive(Serialize)]
pub struct Life {
    /// Steady state at each fleet size, smallest first.
    pub steady: Vec<Steady>,
    /// When it first answered, with no VMs.
    pub memory_ready: Memory,
    /// At the end: `peak` is the whole life's.
    pub memory: Memory,
    /// GET /metrics at the largest fleet, plain and with `Accept-Encoding: gzip`.
    pub scrape: ScrapeStats,
    pub scrape_gzip: ScrapeStats,
}

impl Life {
    /// CPU growth per 100 VMs between the two largest levels (fraction of one CPU).
    pub fn slope_per_100(&self) -> Option<f64> {
        let n = self.steady.len();
        let (a, b) = (self.steady.get(n.checked_sub(2)?)?, self.steady.get(n - 1)?);
        #[expect(clippy::cast_precision_loss, reason = "VM counts are small")]
        let dv = (b.vms as f64 - a.vms as f64) / 100.0;
        (dv > 0.0).then(|| (b.cpu_per_s - a.cpu_per_s) / dv)
    }
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
        let rounds = workload::calibrate(200_000_000, self.plan.spin_run, spin)?;
        step(&format!(
            "  ping-pong: {loops} loops (about {:.1} s), CPU-bound: {rounds} rounds (about {:.1} s)",
            self.plan.run.as_secs_f64(),
            self.plan.spin_run.as_secs_f64()
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
                baseline_only: false,
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

    /// The ping-pong in three arms (agent off, agent on, only the empty program), and the
    /// CPU-bound workload off and on, in rounds whose arm order rotates; each arm runs
    /// `plan.runs_per_arm` ping-pongs back to back. The empty arm's agent is stopped
    /// (SIGSTOP) once ready, so only the empty program works.
    pub fn slowdown(
        &self,
        fleet: &Fleet,
        loops: u64,
        rounds: u64,
    ) -> Result<(PingPong, Vec<Slowdown>)> {
        step(&format!(
            "workload slowdown: {} rounds of agent off / on / empty program only, {} ping-pongs \
             each, {} simulated vCPUs tracked",
            self.plan.rounds,
            self.plan.runs_per_arm,
            fleet.vcpus()
        ));
        let mut runs = Runs::default();
        for round in 0..self.plan.rounds {
            for arm in 0..3 {
                match (arm + round) % 3 {
                    0 => {
                        for _ in 0..self.plan.runs_per_arm {
                            runs.pp_off.push(workload::pingpong(loops)?.as_secs_f64());
                        }
                        let cpu = workload::spin(&self.helpers.spin, rounds)?;
                        runs.cpu_off.push(cpu.as_secs_f64());
                    }
                    1 => {
                        let _agent = self.start_agent(fleet, Mode::default())?;
                        for _ in 0..self.plan.runs_per_arm {
                            runs.pp_on.push(workload::pingpong(loops)?.as_secs_f64());
                        }
                        let cpu = workload::spin(&self.helpers.spin, rounds)?;
                        runs.cpu_on.push(cpu.as_secs_f64());
                    }
                    _ => {
                        let mode = Mode {
                            baseline_only: true,
                            ..Mode::default()
                        };
                        let agent = self.start_agent(fleet, mode)?;
                        let _stopped = Stopped::new(agent.pid())?;
                        for _ in 0..self.plan.runs_per_arm {
                            runs.pp_empty.push(workload::pingpong(loops)?.as_secs_f64());
                        }
                    }
                }
            }
            let k = self.plan.runs_per_arm;
            let last = |v: &[f64]| stats::median(&v[v.len().saturating_sub(k)..]);
            step(&format!(
                "  round {}/{}: ping-pong median off {:.3} s, on {:.3} s, empty program only \
                 {:.3} s; CPU-bound off {:.3} s, on {:.3} s",
                round + 1,
                self.plan.rounds,
                last(&runs.pp_off),
                last(&runs.pp_on),
                last(&runs.pp_empty),
                runs.cpu_off[round],
                runs.cpu_on[round]
            ));
        }
        let pingpong = PingPong::new(loops, runs.pp_off, runs.pp_on, runs.pp_empty)?;
        let cpu = Slowdown::new(
            "CPU-bound",
            format!("{rounds} xorshift rounds"),
            rounds,
            [runs.cpu_off, runs.cpu_on],
        )?;
        Ok((pingpong, vec![cpu]))
    }

    /// One agent from 0 VMs to the largest of `plan.vm_levels`: at each level a warm-up and
    /// a CPU window; at the largest, scrapes (plain and gzip) and, with `profile_misses`, a
    /// profile for each target missed. Memory: the whole life's peak (VmHWM).
    pub fn life(
        &self,
        fleet: &mut Fleet,
        profile_misses: bool,
        profiles: &mut Vec<Profile>,
    ) -> Result<Life> {
        let mut levels = self.plan.vm_levels.clone();
        levels.sort_unstable();
        step(&format!(
            "agent life from {} to {} simulated VMs: at each level warm-up {} s, CPU over {} s",
            fleet.vms(),
            levels.last().copied().unwrap_or(0),
            self.plan.warmup.as_secs(),
            self.plan.window.as_secs()
        ));
        let mut agent = self.start_agent(fleet, Mode::default())?;
        let pid = agent.pid();
        let memory_ready = agent::memory(pid)?;
        let mut steady = Vec::new();
        for &vms in &levels {
            super::grow(fleet, vms)?;
            agent.wait_ready(fleet.vcpus())?;
            pause(self.plan.warmup)?;
            let (cpu0, t0) = (agent::cpu_time(pid)?, Instant::now());
            pause(self.plan.window)?;
            let (cpu1, window) = (agent::cpu_time(pid)?, t0.elapsed().as_secs_f64());
            let cpu_per_s = cpu1.saturating_sub(cpu0).as_secs_f64() / window;
            let memory = agent::memory(pid)?;
            step(&format!(
                "  {vms} VMs: CPU {:.3} % of one CPU, RSS {:.1} MB, peak so far {:.1} MB",
                cpu_per_s * 100.0,
                mb(memory.rss),
                mb(memory.peak)
            ));
            steady.push(Steady {
                vms,
                vcpus_listed: fleet.vcpus(),
                window_s: window,
                cpu_per_s,
                memory,
            });
        }
        let scrape = scrapes(agent.addr(), self.plan.scrapes, false)?;
        let scrape_gzip = scrapes(agent.addr(), self.plan.scrapes, true)?;
        let memory = agent::memory(pid)?;
        step(&format!(
            "  scrapes: median {:.1} ms p99 {:.1} ms ({} bytes); gzip median {:.1} ms p99 {:.1} ms \
             ({} bytes); whole-life peak RSS {:.1} MB",
            scrape.latency_ms.median,
            scrape.latency_ms.p99,
            scrape.body_bytes,
            scrape_gzip.latency_ms.median,
            scrape_gzip.latency_ms.p99,
            scrape_gzip.body_bytes,
            mb(memory.peak)
        ));
        let cpu_last = steady.last().map_or(0.0, |s| s.cpu_per_s);
        if profile_misses {
            if cpu_last > limits::AGENT_CPU_LARGEST {
                profiles.push(self.profile(&agent, PROFILE_STEADY, || Ok(())));
            }
            if scrape_gzip.latency_ms.p99 > limits::SCRAPE_MS {
                let addr = agent.addr().to_owned();
                let secs = Duration::from_secs(self.plan.profile_secs.into());
                let busy = || scrape_for(&addr, secs);
                profiles.push(self.profile(&agent, PROFILE_SCRAPED, busy));
            }
        }
        drop(agent);
        if profile_misses && memory.peak > limits::AGENT_PEAK_BYTES {
            step("  profiling where the agent's start-up touches memory (perf, page-faults)");
            let top = host::startup_faults(self.bin, self.logs);
            profiles.push(Profile::of(PROFILE_STARTUP, "page-faults", None, top));
        }
        Ok(Life {
            steady,
            memory_ready,
            memory,
            scrape,
            scrape_gzip,
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
    ) -> Result<Self> {
        let ratios: Vec<f64> = on.iter().zip(&off).map(|(n, f)| n / f).collect();
        Ok(Self {
            workload,
            size,
            units,
            ratio: Spread::of(&ratios).context("no slowdown pairs were run")?,
            off_s: off,
            on_s: on,
        })
    }
}

/// One round's ping-pong seconds: agent off, agent on, empty program only.
type Triple = (f64, f64, f64);

impl PingPong {
    fn new(loops: u64, off_s: Vec<f64>, on_s: Vec<f64>, empty_s: Vec<f64>) -> Result<Self> {
        let triples: Vec<Triple> = off_s
            .iter()
            .zip(&on_s)
            .zip(&empty_s)
            .map(|((&f, &n), &e)| (f, n, e))
            .collect();
        let agent = |t: &[Triple]| {
            stats::median(&t.iter().map(|(f, n, _)| n / f).collect::<Vec<_>>()) - 1.0
        };
        let empty = |t: &[Triple]| {
            stats::median(&t.iter().map(|(f, _, e)| e / f).collect::<Vec<_>>()) - 1.0
        };
        let ratio = |t: &[Triple]| agent(t) / empty(t);
        let est = |f: &dyn Fn(&[Triple]) -> f64| {
            stats::bootstrap(&triples, f).context("no ping-pong runs were made")
        };
        Ok(Self {
            loops,
            agent_slowdown: est(&agent)?,
            empty_slowdown: est(&empty)?,
            ratio: est(&ratio)?,
            off_s,
            on_s,
            empty_s,
        })
    }
}

/// Wall seconds of each run, by workload and arm.
#[derive(Default)]
struct Runs {
    pp_off: Vec<f64>,
    pp_on: Vec<f64>,
    pp_empty: Vec<f64>,
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

/// `n` GET /metrics one after the other, asking for gzip when `gzip` (then the server must
/// answer with it); series are counted in one more, plain GET.
fn scrapes(addr: &str, n: usize, gzip: bool) -> Result<ScrapeStats> {
    let mut ms = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        super::check_interrupted()?;
        let s = agent::get_metrics(addr, gzip)?;
        if s.status != 200 {
            anyhow::bail!("GET /metrics answered HTTP {}", s.status);
        }
        if s.gzip != gzip {
            anyhow::bail!(
                "GET /metrics with gzip {}asked answered with{} Content-Encoding: gzip",
                if gzip { "" } else { "not " },
                if s.gzip { "" } else { "out" }
            );
        }
        ms.push(s.took.as_secs_f64() * 1e3);
        bytes = s.body.len();
    }
    let plain = agent::scrape(addr)?;
    Ok(ScrapeStats {
        latency_ms: Spread::of(&ms).context("no scrapes were run")?,
        body_bytes: bytes,
        series: plain
            .text()
            .context("the /metrics body is not UTF-8")?
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
