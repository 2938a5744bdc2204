//! Targets, and the report in Markdown (for people) and JSON (for tools).
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::measure::{
    mb, Life, PerEvent, PingPong, Results, Steady, PROFILE_SCRAPED, PROFILE_STARTUP, PROFILE_STEADY,
};

/// The targets the agent is held to.
pub mod limits {
    /// sched_switch program ns/event over the empty program's on the same hook.
    pub const PROG_RATIO: f64 = 1.5;
    /// Ping-pong slowdown with the agent over the slowdown with only the empty program.
    pub const PINGPONG_RATIO: f64 = 1.25;
    /// Largest half-width of a slowdown's 95 % interval for the ratio to mean anything
    /// (one percentage point).
    pub const PINGPONG_HALF_WIDTH: f64 = 0.01;
    /// Agent CPU seconds per second at the largest fleet (1,000 VMs).
    pub const AGENT_CPU_LARGEST: f64 = 0.005;
    /// Agent CPU seconds per second at 100 VMs.
    pub const AGENT_CPU_100: f64 = 0.001;
    /// Agent peak resident set over its whole life, 0 to 1,000 VMs, bytes (25 MB, decimal).
    pub const AGENT_PEAK_BYTES: u64 = 25_000_000;
    /// p99 of GET /metrics with gzip at the largest fleet, milliseconds.
    pub const SCRAPE_MS: f64 = 10.0;
    /// `optimus measure`'s slowdown of 2,000 × /bin/true (median on/off − 1).
    pub const MEASURE_OVERHEAD: f64 = 0.03;
    /// Median phase switch latency, write to recorded boundary, microseconds.
    pub const PHASE_SWITCH_US: f64 = 200.0;
}

/// One target, met or not.
#[derive(Serialize)]
pub struct Target {
    pub name: String,
    pub measured: String,
    pub limit: String,
    /// The measured number and its limit, in the limit's unit (ratio, fraction, bytes, ms).
    pub value: Option<f64>,
    pub threshold: f64,
    /// `None`: not measured (the run gave no number).
    pub pass: Option<bool>,
    /// What dominates, for a missed target.
    pub why: Option<String>,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "NOT MEASURED",
        }
    }
}

/// Writes both files, prints the targets; returns how many were missed or not measured.
pub fn write(results: &Results, md: &Path, json: &Path) -> Result<usize> {
    let targets = targets(results);
    println!("\n==> bench: targets");
    for t in &targets {
        println!(
            "    {}: {} (limit {}) {}",
            t.name,
            t.measured,
            t.limit,
            t.verdict()
        );
    }
    let text = markdown(results, &targets);
    std::fs::write(md, text).with_context(|| format!("writing {}", md.display()))?;
    let doc = serde_json::json!({ "results": results, "targets": targets });
    let pretty = serde_json::to_string_pretty(&doc).context("serialising the results")?;
    std::fs::write(json, pretty).with_context(|| format!("writing {}", json.display()))?;
    Ok(targets.iter().filter(|t| t.pass != Some(true)).count())
}

fn targets(r: &Results) -> Vec<Target> {
    let mut out: Vec<Target> = r.per_event.iter().map(|p| prog_target(p, r)).collect();
    out.push(pingpong_target(r));
    let life = r.life.as_ref();
    let at = |vms: usize| life.and_then(|l| l.steady.iter().find(|s| s.vms == vms));
    out.push(cpu_target(at(100), limits::AGENT_CPU_100, None, r));
    let largest = life.and_then(|l| l.steady.iter().max_by_key(|s| s.vms));
    let slope = life.and_then(Life::slope_per_100);
    out.push(cpu_target(largest, limits::AGENT_CPU_LARGEST, slope, r));
    out.push(memory_target(life, r));
    out.push(scrape_target(life, r));
    out.extend(measure_targets(r));
    out
}

fn measure_targets(r: &Results) -> [Target; 2] {
    let m = r.measure.as_ref();
    let slow = m.map(|m| m.ratio.median - 1.0);
    let lat = m.map(|m| m.latency_us.median);
    let pass_slow = slow.map(|x| x <= limits::MEASURE_OVERHEAD);
    let pass_lat = lat.map(|x| x <= limits::PHASE_SWITCH_US);
    [
        Target {
            name: "optimus measure overhead, 2,000 × /bin/true (median on/off − 1)".to_owned(),
            measured: m.map_or("not run".to_owned(), |m| {
                format!(
                    "{:+.1} % wall ({} pairs, {:+.1} % to {:+.1} %); CPU time {:+.1} %",
                    (m.ratio.median - 1.0) * 100.0,
                    m.ratio.n,
                    (m.ratio.min - 1.0) * 100.0,
                    (m.ratio.max - 1.0) * 100.0,
                    (m.cpu_ratio.median - 1.0) * 100.0
                )
            }),
            limit: format!("{:.0} %", limits::MEASURE_OVERHEAD * 100.0),
            value: slow,
            threshold: limits::MEASURE_OVERHEAD,
            pass: pass_slow,
            why: (pass_slow == Some(false)).then(|| {
                "every fork and exit of the tree runs the fork program and a map update, and every context switch on the host runs measure's sched_switch program".to_owned()
            }),
        },
        Target {
            name: "phase switch, write → boundary recorded (median)".to_owned(),
            measured: m.map_or("not run".to_owned(), |m| {
                format!(
                    "{:.0} µs (p99 {:.0} µs, {} switches)",
                    m.latency_us.median, m.latency_us.p99, m.switches
                )
            }),
            limit: format!("{:.0} µs", limits::PHASE_SWITCH_US),
            value: lat,
            threshold: limits::PHASE_SWITCH_US,
            pass: pass_lat,
            why: (pass_lat == Some(false)).then(|| {
                "a boundary reads the eBPF counters and every energy meter (sysfs files, /proc/stat for the estimate) before it is recorded".to_owned()
            }),
        },
    ]
}

fn config(p: &PerEvent) -> String {
    if p.track_all {
        "--track-all".to_owned()
    } else {
        format!("{} tracked threads", p.vcpus_tracked)
    }
}

fn prog_target(p: &PerEvent, r: &Results) -> Target {
    let (real, empty) = p.pair();
    let (real_ns, empty_ns) = (
        real.and_then(|c| c.ns_per_event),
        empty.and_then(|c| c.ns_per_event),
    );
    let pass = p.ratio.map(|x| x <= limits::PROG_RATIO);
    let why = (pass == Some(false)).then(|| {
        let net = real_ns.zip(empty_ns).map_or(0.0, |(a, b)| a - b);
        let size = real.map_or(String::new(), |c| {
            format!(
                " It is {} bytes of BPF ({} JITed).",
                c.info.bytes_xlated, c.info.bytes_jited
            )
        });
        let modes: Vec<String> = r
            .per_event
            .iter()
            .filter_map(|q| Some(format!("{} {:.0} ns", config(q), q.pair().0?.ns_per_event?)))
            .collect();
        format!(
            "The program's own work is {net:.0} ns per switch over the empty program's \
             {:.0} ns, and the empty program (two instructions) measures little but the \
             accounting's own clock reads, so the {}× target leaves the program about half \
             the time of the empty program's own cost on this machine.{size} Per mode: {}. perf cannot sample \
             inside it here (sched_switch runs with interrupts off and there is no hardware \
             PMU for NMI sampling), so the split inside the program is not measured.",
            empty_ns.unwrap_or(0.0),
            limits::PROG_RATIO,
            modes.join(", ")
        )
    });
    Target {
        name: format!(
            "sched_switch ≤ {}× empty program ({})",
            limits::PROG_RATIO,
            config(p)
        ),
        measured: match (p.ratio, real_ns, empty_ns) {
            (Some(x), Some(a), Some(b)) => format!("{x:.2}× ({a:.0} vs {b:.0} ns/event)"),
            _ => "no events".to_owned(),
        },
        limit: format!("{}×", limits::PROG_RATIO),
        value: p.ratio,
        threshold: limits::PROG_RATIO,
        pass,
        why,
    }
}

fn pct(x: f64) -> f64 {
    x * 100.0
}

fn pingpong_target(r: &Results) -> Target {
    let pp = r.pingpong.as_ref();
    let stable = pp.is_some_and(PingPong::stable);
    let value = pp.map(|p| p.ratio.value);
    let pass = pp.map(|p| stable && p.ratio.value <= limits::PINGPONG_RATIO);
    let why = (pass == Some(false))
        .then(|| pp.map(|p| pingpong_why(p, r)))
        .flatten();
    Target {
        name: "ping-pong slowdown, agent over empty program only (median, bootstrap 95 %)"
            .to_owned(),
        measured: pp.map_or("not run".to_owned(), |p| {
            let (a, e) = (&p.agent_slowdown, &p.empty_slowdown);
            format!(
                "{:.2}× [{:.2}, {:.2}]: agent {:+.2} % [{:+.2}, {:+.2}], empty {:+.2} % [{:+.2}, {:+.2}], {} triples{}",
                p.ratio.value,
                p.ratio.lo,
                p.ratio.hi,
                pct(a.value),
                pct(a.lo),
                pct(a.hi),
                pct(e.value),
                pct(e.lo),
                pct(e.hi),
                p.off_s.len(),
                if stable { "" } else { "; unstable on this machine" }
            )
        }),
        limit: format!(
            "{}×, each interval within ±{:.0} point",
            limits::PINGPONG_RATIO,
            pct(limits::PINGPONG_HALF_WIDTH)
        ),
        value,
        threshold: limits::PINGPONG_RATIO,
        pass,
        why,
    }
}

fn pingpong_why(p: &PingPong, r: &Results) -> String {
    let mut parts = Vec::new();
    if !p.stable() {
        parts.push(format!(
            "This machine cannot give a stable figure: the 95 % intervals are ±{:.2} points \
             (agent) and ±{:.2} points (empty program) over {} interleaved triples, wider \
             than ±{:.0} point, so the ratio of the two slowdowns ({:.2}×, interval {:.2} to \
             {:.2}) is not a measurement here.",
            pct(p.agent_slowdown.half_width()),
            pct(p.empty_slowdown.half_width()),
            p.off_s.len(),
            pct(limits::PINGPONG_HALF_WIDTH),
            p.ratio.value,
            p.ratio.lo,
            p.ratio.hi
        ));
    }
    if let Some((per_loop, ns, empty_ns, loop_ns)) = predicted(p, r) {
        parts.push(format!(
            "From the programs' own run time: the agent's sched_switch predicts {:+.2} % and \
             the empty program {:+.2} % ({per_loop:.2} runs per loop × {ns:.0} / {empty_ns:.0} ns, \
             over {loop_ns:.0} ns per loop with the agent off); the kernel's dispatch into BPF \
             is outside both figures.",
            per_loop * ns / loop_ns * 100.0,
            per_loop * empty_ns / loop_ns * 100.0
        ));
    }
    parts.join(" ")
}

/// sched_switch runs per ping-pong loop, ns per run of the real and the empty program, and
/// ns per loop with the agent off.
fn predicted(p: &PingPong, r: &Results) -> Option<(f64, f64, f64, f64)> {
    let pe = r.per_event.iter().find(|p| !p.track_all)?;
    let (real, empty) = pe.pair();
    let (real, empty) = (real?, empty?);
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per_loop = real.events as f64 / pe.storm_loops as f64;
    let off = super::stats::median(&p.off_s);
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let ns_per_loop = off * 1e9 / p.loops as f64;
    Some((
        per_loop,
        real.ns_per_event?,
        empty.ns_per_event?,
        ns_per_loop,
    ))
}

fn cpu_target(s: Option<&Steady>, limit: f64, slope: Option<f64>, r: &Results) -> Target {
    let pass = s.map(|s| s.cpu_per_s <= limit);
    let why = (pass == Some(false)).then(|| profile_why(r, PROFILE_STEADY));
    let slope = slope.map_or(String::new(), |x| {
        format!("; slope {:.3} points per 100 VMs", pct(x))
    });
    Target {
        name: format!(
            "agent CPU at {} VMs × {} vCPUs waking every {} ms",
            s.map_or(0, |s| s.vms),
            r.plan.vcpus_per_vm,
            r.plan.vcpu_wake.as_millis()
        ),
        measured: s.map_or("not run".to_owned(), |s| {
            format!("{:.3} % of one CPU{slope}", pct(s.cpu_per_s))
        }),
        limit: format!("{} % of one CPU", pct(limit)),
        value: s.map(|s| s.cpu_per_s),
        threshold: limit,
        pass,
        why,
    }
}

fn memory_target(life: Option<&Life>, r: &Results) -> Target {
    let pass = life.map(|l| l.memory.peak <= limits::AGENT_PEAK_BYTES);
    let why = (pass == Some(false))
        .then(|| life.map(|l| format!("{} {}", memory_why(l), profile_why(r, PROFILE_STARTUP))))
        .flatten();
    Target {
        name: "agent peak resident memory, whole life from 0 to the largest fleet".to_owned(),
        measured: life.map_or("not run".to_owned(), |l| {
            format!(
                "{:.1} MB (at start-up {:.1} MB; resident at the end {:.1} MB)",
                mb(l.memory.peak),
                mb(l.memory_ready.peak),
                mb(l.memory.rss)
            )
        }),
        limit: format!("{:.0} MB", mb(limits::AGENT_PEAK_BYTES)),
        value: life.map(|l| mb(l.memory.peak) * 1e6),
        threshold: mb(limits::AGENT_PEAK_BYTES) * 1e6,
        pass,
        why,
    }
}

fn memory_why(l: &Life) -> String {
    let m = &l.memory;
    let now = format!(
        "resident at the end {:.1} MB ({:.1} MB anonymous, {:.1} MB file-backed: pages of the binary and its libraries)",
        mb(m.rss),
        mb(m.rss_anon),
        mb(m.rss_file)
    );
    if l.memory_ready.peak * 10 >= m.peak * 9 {
        format!(
            "The peak ({:.1} MB) was already {:.1} MB when the agent first answered with no VMs: \
             it is set at start-up, not by the number of VMs; {now}.",
            mb(m.peak),
            mb(l.memory_ready.peak)
        )
    } else {
        format!(
            "The peak grew from {:.1} MB when the agent first answered with no VMs to {:.1} MB \
             at the end: it scales with the VMs tracked and the exposition built per scrape; \
             {now}.",
            mb(l.memory_ready.peak),
            mb(m.peak)
        )
    }
}

fn scrape_target(life: Option<&Life>, r: &Results) -> Target {
    let largest = life.and_then(|l| l.steady.iter().map(|s| s.vms).max());
    let pass = life.map(|l| l.scrape_gzip.latency_ms.p99 <= limits::SCRAPE_MS);
    let why = (pass == Some(false)).then(|| profile_why(r, PROFILE_SCRAPED));
    Target {
        name: format!("GET /metrics p99 with gzip at {} VMs", largest.unwrap_or(0)),
        measured: life.map_or("not run".to_owned(), |l| {
            let (z, p) = (&l.scrape_gzip, &l.scrape);
            format!(
                "{:.1} ms (median {:.1} ms, {} bytes; without gzip p99 {:.1} ms, {} bytes)",
                z.latency_ms.p99, z.latency_ms.median, z.body_bytes, p.latency_ms.p99, p.body_bytes
            )
        }),
        limit: format!("{:.0} ms", limits::SCRAPE_MS),
        value: life.map(|l| l.scrape_gzip.latency_ms.p99),
        threshold: limits::SCRAPE_MS,
        pass,
        why,
    }
}

/// The top of the named profile, or why there is none.
fn profile_why(r: &Results, what: &str) -> String {
    let Some(p) = r.profiles.iter().find(|p| p.what == what) else {
        return "No profile was taken.".to_owned();
    };
    match &p.top {
        Some(top) if !top.inclusive.is_empty() || !top.own.is_empty() => {
            let lines = if top.inclusive.is_empty() {
                &top.own
            } else {
                &top.inclusive
            };
            format!(
                "Top of the profile ({what}, {}, see Profiles): {}.",
                p.event,
                lines.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
            )
        }
        _ => format!(
            "No profile: {}.",
            p.error.as_deref().unwrap_or("perf recorded nothing")
        ),
    }
}

fn markdown(r: &Results, targets: &[Target]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Optimus overhead bench ({} run)\n", r.plan.name);
    environment(&mut md, r);
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "| Target | Measured | Limit | Result |\n|---|---|---|---|"
    );
    for t in targets {
        let _ = writeln!(
            md,
            "| {} | {} | {} | **{}** |",
            t.name,
            t.measured,
            t.limit,
            t.verdict()
        );
    }
    let misses: Vec<&Target> = targets.iter().filter(|t| t.why.is_some()).collect();
    if !misses.is_empty() {
        let _ = writeln!(md, "\nWhat dominates where a target is missed:\n");
        for t in misses {
            let _ = writeln!(md, "- **{}**: {}", t.name, t.why.as_deref().unwrap_or(""));
        }
    }
    md.push('\n');
    steady(&mut md, r);
    per_event(&mut md, r);
    slowdown(&mut md, r);
    measure_section(&mut md, r);
    profiles(&mut md, r);
    method(&mut md, r);
    md
}

fn environment(md: &mut String, r: &Results) {
    let e = &r.environment;
    let vm = if e.virtual_machine {
        let nested = if Path::new("/dev/kvm").exists() {
            "; guests started here run under nested virtualisation"
        } else {
            ""
        };
        format!("a virtual machine (CPU flag `hypervisor`{nested})")
    } else {
        "bare metal (no `hypervisor` CPU flag)".to_owned()
    };
    let _ = writeln!(
        md,
        "Measured on {vm} with {} CPUs shared with other work: **numbers are noisy**; \
         compare runs on the same machine only, and read the spreads.\n",
        e.nproc
    );
    let busy = if e.busy_processes.is_empty() {
        "none above 5 % of a CPU".to_owned()
    } else {
        e.busy_processes
            .iter()
            .map(|b| format!("`{}` (pid {}) {:.0} %", b.comm, b.pid, b.cpu * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let bpf = if e.other_bpf_programs.is_empty() {
        "none".to_owned()
    } else {
        e.other_bpf_programs.join(", ")
    };
    let rows = [
        ("Date (UTC)", e.date.clone()),
        ("Kernel", e.kernel.clone()),
        ("CPU", format!("{} × {}", e.nproc, e.cpu_model)),
        (
            "Hardware PMU",
            if e.hardware_pmu {
                "yes"
            } else {
                "no (perf `instructions` not supported; profiles use `cpu-clock`)"
            }
            .to_owned(),
        ),
        ("Git revision", e.git_rev.clone()),
        ("Agent", e.agent_version.clone()),
        ("Load average at start", e.loadavg.clone()),
        ("Other busy processes at start", busy),
        ("Other tracing BPF programs loaded at start", bpf),
    ];
    let _ = writeln!(md, "| | |\n|---|---|");
    for (k, v) in rows {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push('\n');
}

fn per_event(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## 2. Per-event cost of the eBPF programs\n\n\
         Kernel accounting (`kernel.bpf_stats_enabled=1`: `run_time_ns / run_cnt` from the \
         agent's program fds) over a `perf bench sched pipe` storm pinned to CPU 0 plus 2,048 \
         O_DIRECT 4 KiB writes, the real `sched_switch` program and an empty one \
         (`--bench-baseline`) on the same hook in the same run. Counts include every switch \
         on the host, not only the storm's.\n"
    );
    let _ = writeln!(
        md,
        "| Configuration | Program | Type | Events | ns/event | × empty | BPF bytes (JITed) |\n\
         |---|---|---|---|---|---|---|"
    );
    for p in &r.per_event {
        let empty = p.pair().1.and_then(|c| c.ns_per_event);
        for c in &p.costs {
            let ratio = match (c.ns_per_event, empty) {
                (Some(a), Some(b)) if c.info.name.starts_with("sched_switch") => {
                    format!("{:.2}", a / b)
                }
                _ => "–".to_owned(),
            };
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {} | {} | {ratio} | {} ({}) |",
                config(p),
                c.info.name,
                c.info.kind,
                c.events,
                c.ns_per_event.map_or("–".to_owned(), |n| format!("{n:.1}")),
                c.info.bytes_xlated,
                c.info.bytes_jited
            );
        }
    }
    md.push('\n');
}

fn slowdown(md: &mut String, r: &Results) {
    let tracked = r
        .per_event
        .iter()
        .find(|p| !p.track_all)
        .map_or(0, |p| p.vcpus_tracked);
    if let Some(p) = &r.pingpong {
        let med = super::stats::median;
        let est = |e: &super::stats::Estimate| {
            format!(
                "{:+.2} % [{:+.2}, {:+.2}]",
                pct(e.value),
                pct(e.lo),
                pct(e.hi)
            )
        };
        let _ = writeln!(
            md,
            "## 3. Workload slowdown\n\n\
             `perf bench sched pipe -l {}` pinned to CPU 0, wall time per run, in {} rounds of \
             three arms whose order rotates: agent off; agent on (fresh agent, default mode, \
             1 s sampling, {tracked} simulated vCPU threads tracked, accounting off); only the \
             empty sched_switch program attached (`--bench-baseline-only`, its process \
             stopped). {} runs per arm and round; run `i` of each arm in a round makes a \
             triple. Slowdown = median over triples of arm/off − 1, with a bootstrap 95 % \
             interval (4,000 resamples of the triples).\n",
            p.loops, r.plan.rounds, r.plan.runs_per_arm
        );
        let _ = writeln!(
            md,
            "| Arm | Runs | Median (s) | Slowdown [95 %] |\n|---|---|---|---|\n\
             | agent off | {} | {:.3} | – |\n\
             | agent on | {} | {:.3} | {} |\n\
             | empty program only | {} | {:.3} | {} |\n\
             | agent / empty program | | | {:.2}× [{:.2}, {:.2}] |\n",
            p.off_s.len(),
            med(&p.off_s),
            p.on_s.len(),
            med(&p.on_s),
            est(&p.agent_slowdown),
            p.empty_s.len(),
            med(&p.empty_s),
            est(&p.empty_slowdown),
            p.ratio.value,
            p.ratio.lo,
            p.ratio.hi
        );
    }
    let _ = writeln!(
        md,
        "| Workload | One run | Pairs | Off median (s) | On median (s) | On/off median | IQR | Min – max |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for s in &r.slowdown {
        let q = &s.ratio;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {:.3} | {:.4} | {:.4} – {:.4} | {:.4} – {:.4} |",
            s.workload,
            s.size,
            q.n,
            super::stats::median(&s.off_s),
            super::stats::median(&s.on_s),
            q.median,
            q.p25,
            q.p75,
            q.min,
            q.max,
        );
    }
    md.push('\n');
}

fn steady(md: &mut String, r: &Results) {
    let Some(l) = &r.life else {
        let _ = writeln!(md, "## 1. Agent life\n\nNot measured.\n");
        return;
    };
    let _ = writeln!(
        md,
        "## 1. Agent life and scrapes\n\n\
         One agent in its default mode at 1 s sampling, started with no simulated VMs, while \
         the fleet grows level by level (VMs of {} vCPU threads, each waking every {} ms: \
         {:.0} wake-ups per second at the largest level). At each level: CPU = utime + stime \
         from `/proc/<pid>/stat` over the window (no scrapes in it), which starts a warm-up \
         after the agent lists every new vCPU (taking in new VMs is work of its own, over by \
         then) and lasts at least one full /proc rescan period (30 s), so the safety-net \
         rescan is in it once. Peak = \
         VmHWM, over the whole life. Scrapes at the largest level: sequential GET /metrics, \
         connect to last byte, plain and with `Accept-Encoding: gzip`. Slope between the two \
         largest levels: {}.\n",
        r.plan.vcpus_per_vm,
        r.plan.vcpu_wake.as_millis(),
        l.steady.last().map_or(0.0, |s| {
            #[expect(clippy::cast_precision_loss, reason = "thread counts are small")]
            let n = s.vcpus_listed as f64;
            n * 1000.0 / r.plan.vcpu_wake.as_millis().max(1) as f64
        }),
        l.slope_per_100().map_or("–".to_owned(), |x| format!(
            "{:.3} points of one CPU per 100 VMs",
            pct(x)
        ))
    );
    let _ = writeln!(
        md,
        "| VMs | vCPU threads | CPU (% of one) | Window (s) | RSS (MB) | Peak so far (MB) |\n\
         |---|---|---|---|---|---|"
    );
    for s in &l.steady {
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.0} | {:.1} | {:.1} |",
            s.vms,
            s.vcpus_listed,
            pct(s.cpu_per_s),
            s.window_s,
            mb(s.memory.rss),
            mb(s.memory.peak)
        );
    }
    let _ = writeln!(
        md,
        "\nPeak when first ready (no VMs): {:.1} MB; at the end: peak {:.1} MB, resident {:.1} MB \
         ({:.1} anonymous + {:.1} file-backed).\n",
        mb(l.memory_ready.peak),
        mb(l.memory.peak),
        mb(l.memory.rss),
        mb(l.memory.rss_anon),
        mb(l.memory.rss_file)
    );
    let _ = writeln!(
        md,
        "| Scrape | GETs | Median / p99 / max (ms) | Body (bytes) | Series |\n|---|---|---|---|---|"
    );
    for (what, s) in [("plain", &l.scrape), ("gzip", &l.scrape_gzip)] {
        let q = &s.latency_ms;
        let _ = writeln!(
            md,
            "| {what} | {} | {:.1} / {:.1} / {:.1} | {} | {} |",
            q.n, q.median, q.p99, q.max, s.body_bytes, s.series
        );
    }
    md.push('\n');
}

fn measure_section(md: &mut String, r: &Results) {
    let Some(m) = &r.measure else {
        let _ = writeln!(
            md,
            "## 4. optimus measure\n\nNot measured: the run failed (see its output).\n"
        );
        return;
    };
    let med = |v: &[f64]| super::stats::Spread::of(v).map_or(0.0, |s| s.median);
    let _ = writeln!(
        md,
        "## 4. optimus measure\n\n\
         A shell loop of {} × `/bin/true` timed by itself (`date +%s%N` around the loop), alone \
         and under `optimus measure`, in {} interleaved pairs: median {:.3} s alone, {:.3} s \
         measured (on/off {:.4}; measure's whole run, start-up and report included, {:.3} s); \
         the loop's CPU time (user + system of the shell and its children, `times`) on/off {:.4}. \
         Phase switches: {} lines written 20 ms apart by a Python workload stamped with \
         CLOCK_MONOTONIC, against the boundary instant in measure's JSON: median {:.0} µs, \
         p25 {:.0} µs, p99 {:.0} µs, max {:.0} µs.\n",
        m.forks,
        m.ratio.n,
        med(&m.off_s),
        med(&m.on_s),
        m.ratio.median,
        med(&m.outer_on_s),
        m.cpu_ratio.median,
        m.switches,
        m.latency_us.median,
        m.latency_us.p25,
        m.latency_us.p99,
        m.latency_us.max
    );
}

fn profiles(md: &mut String, r: &Results) {
    if r.profiles.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Profiles\n\n\
         `perf record --call-graph dwarf` (the agent has no frame pointers) on perf's software \
         events; \"inclusive\" counts a function with everything it calls (Rust frames only), \
         \"own\" only its own instructions (`perf report --no-children --sort dso,sym`).\n"
    );
    for p in &r.profiles {
        let span = p.seconds.map_or(String::new(), |s| format!(", {s} s"));
        let _ = writeln!(md, "### {} (`{}`{span})\n", p.what, p.event);
        match (&p.top, &p.error) {
            (Some(top), _) => {
                let _ = writeln!(
                    md,
                    "Inclusive:\n\n```\n{}\n```\n\nOwn:\n\n```\n{}\n```\n",
                    top.inclusive.join("\n"),
                    top.own.join("\n")
                );
            }
            (None, Some(e)) => {
                let _ = writeln!(md, "No profile: {e}\n");
            }
            (None, None) => {}
        }
    }
}

fn method(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## Method\n\n\
         - Simulated VMs: processes named `qemu-system-x86_64` started with \
         `-name guest=bench-N,debug-threads=on -uuid … -smp {}`, whose {} threads name \
         themselves `CPU k/KVM` and wake every {} ms (each at its own phase, doing no work: an \
         idle guest's timer ticks); no guest runs. The agent's discovery takes them for \
         QEMU (argv[0], `-name`, `-uuid`, thread names), so its tracking, discovery and \
         exposition grow as with real VMs, and the tracked threads' switches run the \
         charging path.\n\
         - The per-event costs include the accounting's own overhead (two clock reads per \
         run), in both programs alike; the slowdown runs have the accounting off.\n\
         - The agent's CPU excludes its eBPF programs, which run in the context of the \
         switching threads and show up in sections 2 and 3 instead.\n\
         - Full data: `report.json` beside this file; agent logs under `logs/`.",
        r.plan.vcpus_per_vm,
        r.plan.vcpus_per_vm,
        r.plan.vcpu_wake.as_millis()
    );
}
