//! The machine the bench runs on: tools it needs, what it is, how busy it is already, and
//! CPU profiles with `perf`.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use optimus_tests::env::find_tool;
use optimus_tests::proc::{file_tail, signal, try_free_port, ChildGuard};
use serde::Serialize;

use super::bpf;
use crate::cmd::Cmd;

/// Commands the bench runs, with the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("perf", "linux-perf"),
    ("bpftool", "bpftool"),
    ("cc", "gcc"),
    ("taskset", "util-linux"),
    ("dd", "coreutils"),
];

/// Installs the missing tools from Debian, one progress line each.
pub fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "bench: installing {} (Debian packages the bench uses)…",
        missing.join(" ")
    );
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y"])
        .args(&missing)
        .run_quiet()
        .with_context(|| format!("installing {}", missing.join(" ")))
}

/// What the numbers were measured on.
#[derive(Debug, Serialize)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    /// The CPU flags say a hypervisor runs this machine.
    pub virtual_machine: bool,
    /// The perf `instructions` event works (a hardware PMU is visible).
    pub hardware_pmu: bool,
    pub git_rev: String,
    pub agent_version: String,
    pub loadavg: String,
    /// Other processes above 5 % of a CPU over one second before the bench started.
    pub busy_processes: Vec<Busy>,
    /// BPF programs already loaded by others (name, type).
    pub other_bpf_programs: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Busy {
    pub pid: u32,
    pub comm: String,
    /// Fraction of one CPU.
    pub cpu: f64,
}

pub fn environment(root: &Path, agent: &Path) -> Result<Environment> {
    let cpuinfo = read("/proc/cpuinfo")?;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let virtual_machine = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    // perf stat prints its counts on stderr; "<not supported>" where no PMU counts.
    let hardware_pmu = Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions", "true"])
        .output()
        .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("<not"));
    Ok(Environment {
        date: Cmd::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .read()?
            .trim()
            .to_owned(),
        kernel: read("/proc/sys/kernel/osrelease")?.trim().to_owned(),
        cpu_model,
        nproc: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        virtual_machine,
        hardware_pmu,
        git_rev: git_rev(root),
        agent_version: Cmd::new(agent)
            .arg("--version")
            .read()
            .map_or_else(|e| format!("unknown ({e})"), |v| v.trim().to_owned()),
        loadavg: read("/proc/loadavg")?.trim().to_owned(),
        busy_processes: busy_processes(Duration::from_secs(1))?,
        other_bpf_programs: bpf::loaded()?
            .into_iter()
            .filter(|p| p.kind.contains("tracepoint") || p.kind == "tracing")
            .map(|p| format!("{} ({})", p.name, p.kind))
            .collect(),
    })
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

/// `git rev-parse --short HEAD`, with `-dirty` when the tree has changes.
fn git_rev(root: &Path) -> String {
    let git = |args: &[&str]| Cmd::new("git").current_dir(root).args(args).probe();
    let Some(rev) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.trim().is_empty());
    format!("{}{}", rev.trim(), if dirty { "-dirty" } else { "" })
}

/// Processes that used more than 5 % of a CPU over `window`, busiest first.
fn busy_processes(window: Duration) -> Result<Vec<Busy>> {
    let before = process_ticks()?;
    std::thread::sleep(window);
    let after = process_ticks()?;
    let hz = super::agent::clock_ticks()?;
    let mut busy: Vec<Busy> = after
        .into_iter()
        .filter_map(|(pid, (comm, ticks))| {
            let delta = ticks.saturating_sub(before.get(&pid)?.1);
            #[expect(clippy::cast_precision_loss, reason = "small tick counts")]
            let cpu = delta as f64 / hz as f64 / window.as_secs_f64();
            (cpu > 0.05).then_some(Busy { pid, comm, cpu })
        })
        .collect();
    busy.sort_by(|a, b| b.cpu.total_cmp(&a.cpu));
    Ok(busy)
}

/// pid → (comm, utime + stime in ticks) of every process.
fn process_ticks() -> Result<BTreeMap<u32, (String, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // Gone since readdir: not busy.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(parsed) = super::agent::parse_stat(&stat) {
            out.insert(pid, parsed);
        }
    }
    Ok(out)
}

/// A profile's top entries in two views.
#[derive(Debug, Default, Serialize)]
pub struct Top {
    /// Share including callees, Rust frames only ("which part of the agent").
    pub inclusive: Vec<String>,
    /// Share in the function itself, any code ("which instructions").
    pub own: Vec<String>,
}

/// A CPU profile of process `pid` over `secs` seconds (perf's cpu-clock software event,
/// which works without a hardware PMU; DWARF call graphs, as the agent has no frame
/// pointers), taken while `during` runs.
pub fn cpu_profile(pid: u32, secs: u32, during: impl FnOnce() -> Result<()>) -> Result<Top> {
    let data = perf_dir()?;
    let file = data.path().join("perf.data");
    let shown =
        format!("perf record -F 499 -e cpu-clock --call-graph dwarf -p {pid} -- sleep {secs}");
    let mut child = Command::new("perf")
        .args(["record", "-q", "-F", "499", "-e", "cpu-clock"])
        .args(["--call-graph", "dwarf,16384", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&file)
        .args(["--", "sleep"])
        .arg(secs.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let started = Instant::now();
    let ran = during();
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    ran?;
    // Ended early: perf could not attach (or the agent died), whatever the status says.
    if !status.success() || started.elapsed() < Duration::from_secs(u64::from(secs)) {
        bail!("`{shown}` failed ({status})");
    }
    top(&file)
}

/// Where the agent's start-up touches memory: a page-fault profile (each first touch of a
/// page is one fault, so this is where the resident set grows) from exec until it serves
/// /metrics.
pub fn startup_faults(bin: &Path, logs: &Path) -> Result<Top> {
    let data = perf_dir()?;
    let file = data.path().join("perf.data");
    let addr = format!("127.0.0.1:{}", try_free_port()?);
    let log = logs.join("agent-startup-faults.log");
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log file")?;
    let mut cmd = Command::new("perf");
    cmd.args([
        "record",
        "-q",
        "-e",
        "page-faults",
        "--call-graph",
        "dwarf,16384",
        "-o",
    ])
    .arg(&file)
    .arg("--")
    .arg(bin)
    .args([
        "run",
        "--listen",
        &addr,
        "--libvirt-uri",
        "",
        "--log-level",
        "warn",
    ])
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    let mut perf = ChildGuard::spawn(cmd).context("starting the agent under perf")?;
    wait_serving(&addr, &mut perf, &log)?;
    // perf waits for its workload; stopping the agent ends the recording.
    let children = format!("/proc/{0}/task/{0}/children", perf.pid());
    let agent: u32 = read(&children)?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("{children} names no agent process"))?;
    signal(agent, libc::SIGTERM);
    let status = wait_exit(&mut perf, Duration::from_secs(30))?;
    if !status.success() {
        bail!("perf record of the agent's start-up failed ({status})");
    }
    top(&file)
}

/// Waits for `child` to exit by itself; stops it after `timeout`.
fn wait_exit(child: &mut ChildGuard, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.stop(Duration::from_secs(5))
}

fn wait_serving(addr: &str, perf: &mut ChildGuard, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        super::check_interrupted()?;
        if let Some(status) = perf.try_wait()? {
            bail!(
                "perf record of the agent exited ({status}): {}",
                file_tail(log, 10)
            );
        }
        if super::agent::scrape(addr).is_ok_and(|s| s.status == 200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "the agent under perf did not serve /metrics within 60 s: {}",
        file_tail(log, 10)
    )
}

fn perf_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("optimus-bench-perf-")
        .tempdir()
        .context("creating a directory for perf data")
}

/// Frames every thread has (runtime start, closure shims): 100 % and no information.
fn is_wrapper_frame(line: &str) -> bool {
    [
        "call_once",
        "__rust_begin_short_backtrace",
        "std::rt::",
        "std::thread::",
        "std::sys::thread",
    ]
    .iter()
    .any(|w| line.contains(w))
}

/// The two views of a recorded profile.
fn top(file: &Path) -> Result<Top> {
    let report = |args: &[&str]| -> Result<Vec<String>> {
        let text = Cmd::new("perf")
            .args(["report", "--stdio", "-g", "none", "--percent-limit", "2"])
            .args(args)
            .arg("-i")
            .arg(file)
            .read()
            .context("reading the profile with perf report")?;
        Ok(text
            .lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect())
    };
    let inclusive = report(&["--children", "--sort", "sym"])?
        .into_iter()
        .filter(|l| l.contains("::") && !is_wrapper_frame(l))
        // "93.45% 0.00% [.] sym": the inclusive share and the symbol.
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let share = parts.next()?.to_owned();
            Some(format!("{share} {}", parts.nth(2)?))
        })
        .take(10)
        .collect();
    let own = report(&["--no-children", "--sort", "dso,sym"])?
        .into_iter()
        .take(8)
        .collect();
    Ok(Top { inclusive, own })
}
