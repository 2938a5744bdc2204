//! Bench section 5, `optimus measure`: what following a command's process tree costs a
//! fork-heavy workload (2,000 runs of `/bin/true`, its own clock, measure off and on,
//! interleaved), and how long one phase switch takes from the workload's write to the
//! boundary being recorded.
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::stats::Spread;
use super::{check_interrupted, step, Plan};

/// What was measured.
#[derive(Serialize)]
pub struct MeasureBench {
    /// `/bin/true` runs per workload run.
    pub forks: u32,
    /// The workload's own wall seconds per run, without and with measure, in run order.
    pub off_s: Vec<f64>,
    pub on_s: Vec<f64>,
    /// on/off of each pair.
    pub ratio: Spread,
    /// The loop's CPU seconds (the shell's and its children's user + system, `times`) per
    /// run, and on/off of each pair: steadier than wall time on a shared host, and where
    /// eBPF time is charged.
    pub off_cpu_s: Vec<f64>,
    pub on_cpu_s: Vec<f64>,
    pub cpu_ratio: Spread,
    /// measure's whole wall time per run (its start-up and report included).
    pub outer_on_s: Vec<f64>,
    /// Phase switches timed, and write → boundary microseconds.
    pub switches: usize,
    pub latency_us: Spread,
}

const FORKS: u32 = 2_000;

/// The fork loop; prints its own elapsed nanoseconds (CLOCK_REALTIME via `date`, read just
/// before and after the loop, inside whatever runs it), then `times` (the shell's and its
/// children's user and system time).
fn fork_loop() -> String {
    format!(
        "s=$(date +%s%N); i=0; while [ $i -lt {FORKS} ]; do /bin/true; i=$((i+1)); done; e=$(date +%s%N); echo $((e-s)); times"
    )
}

/// `0m1.230000s` in seconds.
fn times_field(f: &str) -> Option<f64> {
    let (m, s) = f.strip_suffix('s')?.split_once('m')?;
    Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// The shell's and its children's user + system seconds, from the two lines of `times`
/// (the fork program runs in the forking shell, `sched_switch` in whoever switches).
fn child_cpu_seconds(out: &std::process::Output) -> Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines
        .get(lines.len().saturating_sub(2)..)
        .unwrap_or_default();
    let fields: Vec<Option<f64>> = tail
        .iter()
        .flat_map(|l| l.split_whitespace().map(times_field))
        .collect();
    if fields.len() != 4 || fields.iter().any(Option::is_none) {
        bail!("cannot read `times` output {tail:?}");
    }
    Ok(fields.into_iter().flatten().sum())
}

fn inner_seconds(out: &std::process::Output, what: &str) -> Result<f64> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ns: f64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .with_context(|| format!("{what}: no elapsed time in its output"))?;
    Ok(ns / 1e9)
}

/// Switches: the workload writes `p t=<CLOCK_MONOTONIC ns>` lines 20 ms apart (so each
/// finds measure idle, as a real phase switch does); the boundary's instant is measure's
/// `origin_monotonic_ns` plus the occurrence's `start_seconds`.
const SWITCH_SCRIPT: &str = r#"
import os, sys, time
n = int(sys.argv[1])
with open(os.environ["OPTIMUS_PHASE"], "w", buffering=1) as f:
    for i in range(n):
        time.sleep(0.02)
        f.write("p%d t=%d\n" % (i % 2, time.monotonic_ns()))
"#;

pub fn run(plan: &Plan, bin: &Path, out: &Path) -> Result<MeasureBench> {
    let pairs = plan.rounds.clamp(5, 9);
    step(&format!(
        "optimus measure: {pairs} off/on pairs of {FORKS} × /bin/true"
    ));
    let script = fork_loop();
    let (mut off_s, mut on_s, mut outer_on_s, mut ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut off_cpu_s, mut on_cpu_s, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        check_interrupted()?;
        let off = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()
            .context("running the fork loop")?;
        let off_cpu = child_cpu_seconds(&off)?;
        let off = inner_seconds(&off, "the fork loop")?;
        let t = std::time::Instant::now();
        let on = Command::new(bin)
            .args(["measure", "--no-nvml", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .context("running the fork loop under optimus measure")?;
        outer_on_s.push(t.elapsed().as_secs_f64());
        let on_cpu = child_cpu_seconds(&on)?;
        let on = inner_seconds(&on, "optimus measure -- the fork loop")?;
        off_cpu_s.push(off_cpu);
        on_cpu_s.push(on_cpu);
        if off_cpu > 0.0 {
            cpu_ratios.push(on_cpu / off_cpu);
        }
        off_s.push(off);
        on_s.push(on);
        ratios.push(on / off);
    }
    let ratio = Spread::of(&ratios).context("no pairs were run")?;
    let cpu_ratio = Spread::of(&cpu_ratios).context("the loop used no CPU time")?;
    step(&format!(
        "  median on/off {:.4} ({:.3} s off, {:.3} s on); CPU time on/off {:.4}",
        ratio.median,
        Spread::of(&off_s).map_or(0.0, |s| s.median),
        Spread::of(&on_s).map_or(0.0, |s| s.median),
        cpu_ratio.median
    ));

    let switches: usize = if plan.name == "quick" { 100 } else { 300 };
    step(&format!(
        "optimus measure: {switches} phase switches, 20 ms apart"
    ));
    check_interrupted()?;
    let json = out.join("measure-switches.json");
    let run = Command::new(bin)
        .args(["measure", "--no-nvml", "--json"])
        .arg(&json)
        .args(["--", "python3", "-c", SWITCH_SCRIPT, &switches.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running the phase switch workload under optimus measure")?;
    if !run.status.success() {
        bail!(
            "the phase switch workload failed ({}): {}",
            run.status,
            String::from_utf8_lossy(&run.stderr).trim()
        );
    }
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("parsing {}", json.display()))?;
    let origin = doc["origin_monotonic_ns"]
        .as_f64()
        .context("no origin_monotonic_ns in measure's JSON")?;
    let latency: Vec<f64> = doc["phases"]
        .as_array()
        .context("no phases in measure's JSON")?
        .iter()
        .filter_map(|p| {
            let t: f64 = p["labels"]["t"].as_str()?.parse().ok()?;
            let at = origin + p["start_seconds"].as_f64()? * 1e9;
            Some((at - t) / 1e3)
        })
        .collect();
    if latency.len() != switches {
        bail!(
            "{} of {switches} phase switches were recorded",
            latency.len()
        );
    }
    let latency_us = Spread::of(&latency).context("no switches were timed")?;
    step(&format!(
        "  write → boundary: median {:.0} µs, p99 {:.0} µs",
        latency_us.median, latency_us.p99
    ));
    Ok(MeasureBench {
        forks: FORKS,
        off_s,
        on_s,
        ratio,
        off_cpu_s,
        on_cpu_s,
        cpu_ratio,
        outer_on_s,
        switches,
        latency_us,
    })
}
