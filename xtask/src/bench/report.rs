//! Targets, and the report in Markdown (for people) and JSON (for tools).
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::measure::{
    mb, PerEvent, Results, Slowdown, Steady, PROFILE_SCRAPED, PROFILE_STARTUP, PROFILE_STEADY,
};

/// The targets the agent is held to.
pub mod limits {
    /// sched_switch program ns/event over the empty program's.
    pub const PROG_RATIO: f64 = 2.0;
    /// Ping-pong on/off median ratio minus one.
    pub const PINGPONG_SLOWDOWN: f64 = 0.01;
    /// Agent CPU seconds per second at the largest fleet.
    pub const AGENT_CPU: f64 = 0.01;
    /// Agent peak resident set at the largest fleet, bytes (30 MB, decimal).
    pub const AGENT_PEAK_BYTES: u64 = 30_000_000;
    /// p99 of GET /metrics at the largest fleet, milliseconds.
    pub const SCRAPE_MS: f64 = 20.0;
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
    let largest = r.steady.iter().max_by_key(|s| s.vms);
    out.push(cpu_target(largest, r));
    out.push(memory_target(largest, r));
    out.push(scrape_target(largest, r));
    out
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
             accounting's own clock reads, so the 2× target leaves the program about as much \
             time as one clock read on this machine.{size} Per mode: {}. perf cannot sample \
             inside it here (sched_switch runs with interrupts off and there is no hardware \
             PMU for NMI sampling), so the split inside the program is not measured.",
            empty_ns.unwrap_or(0.0),
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

fn pingpong_target(r: &Results) -> Target {
    let pp = r.slowdown.iter().find(|s| s.workload == "ping-pong");
    let slow = pp.map(|s| s.ratio.median - 1.0);
    let pass = slow.map(|x| x <= limits::PINGPONG_SLOWDOWN);
    let why = (pass == Some(false))
        .then(|| pp.map(|s| pingpong_why(s, r)))
        .flatten();
    Target {
        name: "ping-pong slowdown (median on/off − 1)".to_owned(),
        measured: pp.map_or("not run".to_owned(), |s| {
            format!(
                "{:+.2} % (min {:+.2} %, max {:+.2} %)",
                (s.ratio.median - 1.0) * 100.0,
                (s.ratio.min - 1.0) * 100.0,
                (s.ratio.max - 1.0) * 100.0
            )
        }),
        limit: format!("{:.0} %", limits::PINGPONG_SLOWDOWN * 100.0),
        value: slow,
        threshold: limits::PINGPONG_SLOWDOWN,
        pass,
        why,
    }
}

/// Splits the measured slowdown into the eBPF side (agent process stopped) and the rest,
/// and compares the eBPF side with what the program's own run time predicts.
fn pingpong_why(s: &Slowdown, r: &Results) -> String {
    let pct = |ratio: f64| (ratio - 1.0) * 100.0;
    let mut parts = Vec::new();
    if let Some(stopped) = &s.stopped_ratio {
        parts.push(format!(
            "With the agent's process stopped (SIGSTOP: only its eBPF programs run) the \
             ping-pong is {:+.2} % slower, against {:+.2} % with it running: the in-kernel \
             side is most of the cost{}.",
            pct(stopped.median),
            pct(s.ratio.median),
            if stopped.median - 1.0 >= (s.ratio.median - 1.0) / 2.0 {
                ""
            } else {
                " only in part; the agent's own threads make the rest"
            }
        ));
    }
    if let Some((per_loop, ns, loop_ns)) = predicted(s, r) {
        parts.push(format!(
            "The sched_switch program's own run time predicts {:+.2} % ({per_loop:.2} runs per \
             loop × {ns:.0} ns, measured with the accounting on, over {loop_ns:.0} ns per loop \
             with the agent off); what the kernel spends around the program (the raw \
             tracepoint's dispatch into BPF) is outside that figure.",
            per_loop * ns / loop_ns * 100.0
        ));
    }
    parts.push(format!(
        "The pairs spread from {:+.2} % to {:+.2} % (IQR {:+.2} to {:+.2} %).",
        pct(s.ratio.min),
        pct(s.ratio.max),
        pct(s.ratio.p25),
        pct(s.ratio.p75)
    ));
    parts.join(" ")
}

/// sched_switch runs per ping-pong loop, ns per run and ns per loop with the agent off.
fn predicted(s: &Slowdown, r: &Results) -> Option<(f64, f64, f64)> {
    let p = r.per_event.iter().find(|p| !p.track_all)?;
    let real = p.pair().0?;
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per_loop = real.events as f64 / p.storm_loops as f64;
    let off = super::stats::Spread::of(&s.off_s)?.median;
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let ns_per_loop = off * 1e9 / s.units as f64;
    Some((per_loop, real.ns_per_event?, ns_per_loop))
}

fn cpu_target(s: Option<&Steady>, r: &Results) -> Target {
    let pass = s.map(|s| s.cpu_per_s <= limits::AGENT_CPU);
    let why = (pass == Some(false)).then(|| profile_why(r, PROFILE_STEADY));
    Target {
        name: format!("agent CPU at {} VMs", s.map_or(0, |s| s.vms)),
        measured: s.map_or("not run".to_owned(), |s| {
            format!("{:.3} % of one CPU", s.cpu_per_s * 100.0)
        }),
        limit: format!("{:.0} % of one CPU", limits::AGENT_CPU * 100.0),
        value: s.map(|s| s.cpu_per_s),
        threshold: limits::AGENT_CPU,
        pass,
        why,
    }
}

fn memory_target(s: Option<&Steady>, r: &Results) -> Target {
    let pass = s.map(|s| s.memory.peak <= limits::AGENT_PEAK_BYTES);
    let why = (pass == Some(false))
        .then(|| s.map(|s| format!("{} {}", memory_why(s, r), profile_why(r, PROFILE_STARTUP))))
        .flatten();
    Target {
        name: format!(
            "agent peak resident memory at {} VMs",
            s.map_or(0, |s| s.vms)
        ),
        measured: s.map_or("not run".to_owned(), |s| {
            format!("{:.1} MB", mb(s.memory.peak))
        }),
        limit: format!("{:.0} MB", mb(limits::AGENT_PEAK_BYTES)),
        value: s.map(|s| mb(s.memory.peak) * 1e6),
        threshold: mb(limits::AGENT_PEAK_BYTES) * 1e6,
        pass,
        why,
    }
}

fn memory_why(s: &Steady, r: &Results) -> String {
    let m = &s.memory;
    let now = format!(
        "resident now {:.1} MB ({:.1} MB anonymous, {:.1} MB file-backed: pages of the binary and its libraries)",
        mb(m.rss),
        mb(m.rss_anon),
        mb(m.rss_file)
    );
    let smallest = r.steady.iter().min_by_key(|x| x.vms);
    let at_ready = mb(s.memory_ready.peak);
    if s.memory_ready.peak * 10 >= m.peak * 9 {
        let zero = smallest.map_or(String::new(), |z| {
            format!(" (with {} VMs: {:.1} MB)", z.vms, mb(z.memory.peak))
        });
        format!(
            "The peak ({:.1} MB) was already {at_ready:.1} MB when the agent first answered{zero}: \
             it is set at start-up, not by the number of VMs; {now}.",
            mb(m.peak)
        )
    } else {
        format!(
            "The peak grew from {at_ready:.1} MB when the agent first answered to {:.1} MB after \
             the window and the scrapes: it scales with the VMs tracked and the exposition \
             built per scrape; {now}.",
            mb(m.peak)
        )
    }
}

fn scrape_target(s: Option<&Steady>, r: &Results) -> Target {
    let pass = s.map(|s| s.scrape.latency_ms.p99 <= limits::SCRAPE_MS);
    let why = (pass == Some(false)).then(|| profile_why(r, PROFILE_SCRAPED));
    Target {
        name: format!("GET /metrics p99 at {} VMs", s.map_or(0, |s| s.vms)),
        measured: s.map_or("not run".to_owned(), |s| {
            let l = &s.scrape.latency_ms;
            format!("{:.1} ms (median {:.1} ms)", l.p99, l.median)
        }),
        limit: format!("{:.0} ms", limits::SCRAPE_MS),
        value: s.map(|s| s.scrape.latency_ms.p99),
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
    per_event(&mut md, r);
    slowdown(&mut md, r);
    steady(&mut md, r);
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
        "## 1. Per-event cost of the eBPF programs\n\n\
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
    let _ = writeln!(
        md,
        "## 2. Workload slowdown\n\n\
         Agent off and on in alternating order (off-on, on-off, …), a fresh agent for each \
         \"on\" run (default mode, 1 s sampling, {} simulated vCPU threads tracked, accounting \
         off), each workload pinned to CPU 0, wall time per run. Ratio = on/off within a pair. \
         \"Agent stopped\": one more ping-pong run in each \"on\" arm with the agent's process \
         stopped (SIGSTOP), so only its eBPF programs work.\n",
        r.per_event
            .iter()
            .find(|p| !p.track_all)
            .map_or(0, |p| p.vcpus_tracked)
    );
    let _ = writeln!(
        md,
        "| Workload | One run | Pairs | Off median (s) | On median (s) | On/off median | IQR | Min – max | Agent stopped/off median |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for s in &r.slowdown {
        let med = |v: &[f64]| super::stats::Spread::of(v).map_or(f64::NAN, |x| x.median);
        let q = &s.ratio;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {:.3} | {:.4} | {:.4} – {:.4} | {:.4} – {:.4} | {} |",
            s.workload,
            s.size,
            q.n,
            med(&s.off_s),
            med(&s.on_s),
            q.median,
            q.p25,
            q.p75,
            q.min,
            q.max,
            s.stopped_ratio
                .as_ref()
                .map_or("–".to_owned(), |x| format!("{:.4}", x.median))
        );
    }
    md.push('\n');
}

fn steady(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## 3. Agent at steady state and 4. scrapes\n\n\
         Agent in its default mode at 1 s sampling beside simulated VMs of {} vCPUs each. \
         CPU = utime + stime from `/proc/<pid>/stat` over the window after warm-up (no \
         scrapes in the window), peak = VmHWM after the window and the scrapes. Scrapes: \
         sequential GET /metrics, connect to last byte.\n",
        r.plan.vcpus_per_vm
    );
    let _ = writeln!(
        md,
        "| VMs | vCPU threads | CPU (% of one) | Window (s) | Peak RSS (MB) | Peak when ready (MB) | RSS now: anon + file (MB) | GETs | Scrape median / p99 / max (ms) | Body (bytes) | Series |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &r.steady {
        let (m, l) = (&s.memory, &s.scrape.latency_ms);
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.0} | {:.1} | {:.1} | {:.1} + {:.1} | {} | {:.1} / {:.1} / {:.1} | {} | {} |",
            s.vms,
            s.vcpus_listed,
            s.cpu_per_s * 100.0,
            s.window_s,
            mb(m.peak),
            mb(s.memory_ready.peak),
            mb(m.rss_anon),
            mb(m.rss_file),
            l.n,
            l.median,
            l.p99,
            l.max,
            s.scrape.body_bytes,
            s.scrape.series
        );
    }
    md.push('\n');
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
         themselves `CPU k/KVM` and sleep; no guest runs. The agent's discovery takes them for \
         QEMU (argv[0], `-name`, `-uuid`, thread names), so its tracking map, /proc scans and \
         exposition grow as with real VMs while the CPUs stay free.\n\
         - The per-event costs include the accounting's own overhead (two clock reads per \
         run), in both programs alike; the slowdown runs have the accounting off.\n\
         - The agent's CPU excludes its eBPF programs, which run in the context of the \
         switching threads and show up in sections 1 and 2 instead.\n\
         - Full data: `report.json` beside this file; agent logs under `logs/`.",
        r.plan.vcpus_per_vm, r.plan.vcpus_per_vm
    );
}
