//! The agent under validation: the real `optimus run` beside the synthetic meter in; its
//! /metrics read in step with its sampler, and its own CPU time and memory, out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use optimus_tests::http::{self, Sample};
use optimus_tests::proc::{file_tail, free_port, ChildGuard};

/// The running agent; stopped on drop.
pub struct Agent {
    child: ChildGuard,
    addr: String,
    log: PathBuf,
    _state: tempfile::TempDir,
}

/// The agent's own cost at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds so far (`/proc/<pid>/stat`).
    pub cpu_s: f64,
    /// Resident memory now and its peak (`VmRSS`, `VmHWM`), bytes.
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl Agent {
    /// `optimus run` on a free loopback port, metered by the fixture tree at `powercap`,
    /// logging to `log`; waits for its first sample.
    pub fn start(bin: &Path, powercap: &Path, log: &Path) -> Result<Self> {
        let state = tempfile::Builder::new()
            .prefix("optimus-validate-state-")
            .tempdir()
            .context("creating the agent's state dir")?;
        let addr = format!("127.0.0.1:{}", free_port());
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--listen", &addr, "--no-nvml", "--control-socket"])
            .arg(state.path().join("control.sock"))
            .arg("--powercap-root")
            .arg(powercap)
            .arg("--state-dir")
            .arg(state.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = ChildGuard::spawn(cmd)
            .with_context(|| format!("starting the agent {}", bin.display()))?;
        let mut agent = Self {
            child,
            addr,
            log: log.to_path_buf(),
            _state: state,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited at start ({status}); its log {}:\n{}",
                    log.display(),
                    file_tail(log, 15)
                );
            }
            if let Ok(m) = agent.scrape() {
                if samples(&m) >= 1.0 {
                    return Ok(agent);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent took no sample within 60 s; its log {}:\n{}",
                    log.display(),
                    file_tail(log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// One scrape.
    pub fn scrape(&self) -> Result<String> {
        let (status, body) = http::get(&self.addr, "/metrics")?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        Ok(body)
    }

    /// Waits for the sampler's next sample and returns that scrape at once, so kernel
    /// counters read right after it describe the same instant (within milliseconds).
    pub fn next_sample(&self) -> Result<Metrics> {
        let now = samples(&self.scrape()?);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let body = self.scrape()?;
            if samples(&body) > now {
                return Ok(Metrics(http::parse(&body)));
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent stopped sampling; its log {}:\n{}",
                    self.log.display(),
                    file_tail(&self.log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's CPU time and memory now.
    pub fn usage(&self) -> Result<Usage> {
        let pid = self.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // Fields 14 and 15 (utime, stime), counted from 3 after the comm.
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
            n if n > 0 => u64::try_from(n).unwrap_or(100),
            _ => 100,
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        #[expect(clippy::cast_precision_loss, reason = "clock ticks of a run")]
        let cpu_s = (ticks(11) + ticks(12)) as f64 / hz as f64;
        Ok(Usage {
            cpu_s,
            rss_bytes: kib("VmRSS:"),
            peak_rss_bytes: kib("VmHWM:"),
        })
    }
}

fn samples(text: &str) -> f64 {
    http::sample(text, "optimus_samples_total", &[]).unwrap_or(0.0)
}

/// One parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub Vec<Sample>);

impl Metrics {
    /// Σ of the samples named `name` whose labels include `labels`; `None` if there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.0.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|got| got == v))
        }) {
            *found.get_or_insert(0.0) += s.value;
        }
        found
    }

    /// Like [`Metrics::sum`], 0 when absent (a counter not yet exported).
    pub fn total(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }

    /// Whether the VM with this UUID is exported.
    pub fn has_vm(&self, uuid: &str) -> bool {
        self.sum("optimus_vm_info", &[("vm_uuid", uuid)]).is_some()
    }

    /// `node − Σ VMs − unattributed − idle` of the package zone, J (cumulative totals: a VM
    /// that stopped moved its joules to unattributed, so the identity holds on totals).
    pub fn conservation_residual(&self) -> f64 {
        let zone = [("zone", "package")];
        let node = self.total("optimus_node_energy_joules_total", &zone);
        let vms = self.total("optimus_vm_energy_joules_total", &zone);
        let host = self.total("optimus_node_unattributed_energy_joules_total", &zone);
        let idle = self.total("optimus_node_idle_energy_joules_total", &zone);
        node - vms - host - idle
    }
}
