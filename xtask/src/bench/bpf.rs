//! The kernel's own accounting of eBPF programs: with `kernel.bpf_stats_enabled=1` every
//! program fd's `/proc/<pid>/fdinfo/<fd>` carries `run_time_ns` and `run_cnt`
//! (<https://docs.kernel.org/bpf/bpf_prog_run.html>, "BPF_ENABLE_STATS"); names and sizes
//! come from `bpftool prog show`.
use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::cmd::Cmd;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` set to 1 while this lives; the previous value comes back on
/// drop. The accounting itself costs two clock reads per program run, in every program.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "1")
            .with_context(|| format!("writing 1 to {STATS_SYSCTL}"))?;
        Ok(Self { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, self.previous.trim()) {
            eprintln!(
                "bench: could not restore {STATS_SYSCTL} to {}: {e}",
                self.previous.trim()
            );
        }
    }
}

/// One program's counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub id: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Counters of every BPF program process `pid` holds an fd of, by program id.
pub fn counters_of(pid: u32) -> Result<BTreeMap<u32, Counters>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry.with_context(|| format!("listing {dir}"))?;
        // An fd closed since readdir is no program of interest.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(c) = parse_fdinfo(&text) {
            out.insert(c.id, c);
        }
    }
    Ok(out)
}

/// The counters in one fdinfo text, `None` unless it is a BPF program's.
fn parse_fdinfo(text: &str) -> Option<Counters> {
    let field = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    field("prog_type")?;
    Some(Counters {
        id: u32::try_from(field("prog_id")?).ok()?,
        run_time_ns: field("run_time_ns")?,
        run_cnt: field("run_cnt")?,
    })
}

/// What `bpftool prog show` says about a program.
#[derive(Clone, Debug, Serialize)]
pub struct Info {
    pub id: u32,
    /// Object name, cut by the kernel to 15 bytes.
    pub name: String,
    /// `raw_tracepoint`, `tracepoint`...
    pub kind: String,
    pub bytes_xlated: u64,
    pub bytes_jited: u64,
}

/// Every BPF program loaded on the host.
pub fn loaded() -> Result<Vec<Info>> {
    let json = Cmd::new("bpftool")
        .args(["--json", "prog", "show"])
        .read()
        .context("listing BPF programs")?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&json).context("parsing `bpftool --json prog show`")?;
    Ok(list.iter().filter_map(info_from_json).collect())
}

fn info_from_json(v: &serde_json::Value) -> Option<Info> {
    let text = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    Some(Info {
        id: u32::try_from(num("id")?).ok()?,
        name: text("name").unwrap_or_default(),
        kind: text("type").unwrap_or_default(),
        bytes_xlated: num("bytes_xlated").unwrap_or(0),
        bytes_jited: num("bytes_jited").unwrap_or(0),
    })
}

/// One program's cost over a measured stretch.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub info: Info,
    /// Runs in the stretch.
    pub events: u64,
    /// Mean nanoseconds per run; `None` without runs.
    pub ns_per_event: Option<f64>,
}

/// Per-program cost between two snapshots of the same process, names from `infos`.
pub fn costs(
    before: &BTreeMap<u32, Counters>,
    after: &BTreeMap<u32, Counters>,
    infos: &[Info],
) -> Result<Vec<Cost>> {
    let mut out = Vec::new();
    for (id, a) in after {
        let Some(b) = before.get(id) else {
            bail!("BPF program {id} appeared during the measurement");
        };
        let events = a.run_cnt.saturating_sub(b.run_cnt);
        let ns = a.run_time_ns.saturating_sub(b.run_time_ns);
        #[expect(
            clippy::cast_precision_loss,
            reason = "counts far below 2^52 in a bench run"
        )]
        let ns_per_event = (events > 0).then(|| ns as f64 / events as f64);
        let info = infos
            .iter()
            .find(|i| i.id == *id)
            .cloned()
            .with_context(|| format!("bpftool does not list BPF program {id}"))?;
        out.push(Cost {
            info,
            events,
            ns_per_event,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_program_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t17\nprog_jited:\t1\n\
                    prog_id:\t291\nrun_time_ns:\t2453316\nrun_cnt:\t7045\n";
        let c = parse_fdinfo(text).unwrap();
        assert_eq!((c.id, c.run_time_ns, c.run_cnt), (291, 2_453_316, 7045));
        assert!(parse_fdinfo("pos:\t0\nflags:\t02\nmap_type:\t1\n").is_none());
    }

    #[test]
    fn cost_is_the_difference() {
        let c = |run_time_ns, run_cnt| Counters {
            id: 7,
            run_time_ns,
            run_cnt,
        };
        let info = Info {
            id: 7,
            name: "sched_switch".into(),
            kind: "raw_tracepoint".into(),
            bytes_xlated: 1,
            bytes_jited: 1,
        };
        let before = BTreeMap::from([(7, c(1000, 10))]);
        let after = BTreeMap::from([(7, c(9000, 110))]);
        let got = costs(&before, &after, std::slice::from_ref(&info)).unwrap();
        assert_eq!(got[0].events, 100);
        assert_eq!(got[0].ns_per_event, Some(80.0));
        let idle = costs(&before, &before, &[info]).unwrap();
        assert_eq!(idle[0].ns_per_event, None);
    }
}
