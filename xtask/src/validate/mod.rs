//! `cargo xtask validate [--quick]`: how wrong Optimus' own numbers are, measured on this
//! host with real TCG guests, the real agent and a synthetic meter whose power is a known
//! nonlinear function of the busy CPUs (so every split has a ground truth). Writes
//! `target/validate/report.md`, `report.json` and PNG plots.
//!
//! Flow: libvirtd and the guest image ([`optimus_tests`]), the synthetic meter
//! ([`meter`]), one agent for the whole run ([`agent`]); each scenario ([`scenarios`])
//! takes measurement windows ([`probe`]: the agent's scrape right after a sample against
//! schedstat, `/proc/<pid>/io` and the meter); the power model is fitted offline from the
//! meter's rows with the agent's own fitter (`optimus model fit`/`score`, [`model`]); the
//! figures and the files come out of [`report`] and [`plots`]; [`check`] holds the bounds
//! a run must meet (CI runs `--quick` and fails on them).
//! Needs root (eBPF, libvirt). `--quick` takes about 3 minutes here, a full run about 8.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use optimus_tests::guest::GuestImage;
use optimus_tests::libvirt::{DiskCache, Libvirtd};

use crate::signals;
use crate::ws::Workspace;

mod agent;
pub mod check;
mod meter;
mod model;
mod plots;
mod probe;
mod rapl;
pub mod report;
mod scenarios;

/// Sizes of one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    /// `quick` or `full`.
    pub name: &'static str,
    /// Measurement window of each scenario step.
    #[serde(serialize_with = "secs")]
    pub window: Duration,
    /// Wait after changing the load before a window starts.
    #[serde(serialize_with = "secs")]
    pub settle: Duration,
    /// Duty cycles of scenario (a), percent.
    pub duty_levels: Vec<u32>,
    /// Guests of scenario (d).
    pub churn_cycles: u32,
    /// MiB written and read back in scenario (c).
    pub io_mib: u32,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                name: "quick",
                window: Duration::from_secs(4),
                settle: Duration::from_secs(1),
                duty_levels: vec![0, 50, 100],
                churn_cycles: 2,
                io_mib: 24,
            }
        } else {
            Self {
                name: "full",
                window: Duration::from_secs(12),
                settle: Duration::from_secs(2),
                duty_levels: vec![0, 25, 50, 75, 100],
                churn_cycles: 4,
                io_mib: 48,
            }
        }
    }
}

/// What every scenario uses.
pub struct Ctx<'a> {
    pub plan: &'a Plan,
    pub libvirtd: &'a Libvirtd,
    pub image: &'a GuestImage,
    pub agent: &'a agent::Agent,
    /// A second agent without any meter (the estimate), where the host has a real one.
    pub estimate: Option<&'a agent::Agent>,
    pub meter: &'a meter::SyntheticMeter,
    /// Where guest disks go (a real block device, not tmpfs).
    pub work: &'a Path,
    /// The host's CPUs.
    pub cpus: usize,
}

/// Set once a termination signal arrived; waits check it and unwind (guards clean up).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Sleeps `d`, waking early to fail if interrupted.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// A progress line.
fn progress(line: &str) {
    println!("==> validate: {line}");
}

/// `cargo xtask validate [--quick]`: builds the agent (release; debug with `--quick`, as CI
/// has it) unless `bin` is given, runs, writes the report into `out` (default
/// `target/validate`); exit status 0 when every bound of [`check`] holds.
pub fn run(
    quick: bool,
    bin: Option<PathBuf>,
    out: Option<PathBuf>,
    rapl_root: &Path,
) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("validate loads eBPF programs and starts libvirt guests: run it as root");
    }
    let catcher = signals::catch()?;
    // Never joined: it waits on the signal pipe until the process exits.
    std::thread::spawn(move || {
        while catcher.wait().is_ok() {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("validate: interrupted, cleaning up…");
        }
    });
    let ws = Workspace::locate()?;
    let bin = match bin {
        Some(b) => b,
        None => {
            let ready = crate::setup::ensure(crate::setup::Purpose::Test)?;
            crate::tasks::build_agent(&ready, !quick)?
        }
    };
    let out = out.unwrap_or_else(|| ws.target_dir.join("validate"));
    let result = validate(&Plan::new(quick), &bin, &out, &ws.target_dir, rapl_root);
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; the guests and the agent were stopped");
    }
    result
}

fn validate(
    plan: &Plan,
    bin: &Path,
    out: &Path,
    target: &Path,
    rapl_root: &Path,
) -> Result<ExitCode> {
    let started = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    progress(&format!(
        "{} run ({} s windows); writing {}",
        plan.name,
        plan.window.as_secs(),
        out.display()
    ));
    let host = report::Host::detect(rapl_root);
    progress(&format!(
        "host: {} CPUs, {}, kernel {}; real RAPL: {}",
        host.cpus,
        host.cpu_model,
        host.kernel,
        if host.rapl.present { "yes" } else { "none" }
    ));
    let image = GuestImage::ensure().context("the guest image could not be built")?;
    let libvirtd = Libvirtd::start()
        .context("libvirtd could not start (`cargo xtask setup` installs and configures it)")?;
    let meter =
        meter::SyntheticMeter::start(host.rapl.present.then(|| rapl::Counter::new(&host.rapl)))?;
    let agent = agent::Agent::start(bin, meter.root(), &out.join("agent.log"))
        .context("the agent could not start")?;
    progress(&format!("agent {} up (pid {})", bin.display(), agent.pid()));
    // Beside a real meter, a second agent that has none: the estimate, to compare with it.
    let no_meter = tempfile::tempdir().context("creating an empty powercap root")?;
    let estimate = if host.rapl.present {
        let a = agent::Agent::start(bin, no_meter.path(), &out.join("agent-estimate.log"))
            .context("the estimating agent could not start")?;
        progress(&format!("estimating agent up (pid {}), no meter", a.pid()));
        Some(a)
    } else {
        None
    };
    let disks = scenarios::disk_dir(&target.join("validate-disks"))?;
    let ctx = Ctx {
        plan,
        libvirtd: &libvirtd,
        image: &image,
        agent: &agent,
        estimate: estimate.as_ref(),
        meter: &meter,
        work: disks.path(),
        cpus: host.cpus,
    };
    let mut runs = Vec::new();
    let all: [(&str, &str, &str, scenarios::Body); 7] = [
        ("duty_1vcpu", "a", "one spinning vCPU throttled to each duty cycle", |c| scenarios::duty(c, 1)),
        ("duty_2vcpu", "a", "two spinning vCPUs throttled to each duty cycle", |c| scenarios::duty(c, 2)),
        ("contention", "b", "two one-vCPU guests pinned to host CPU 0", scenarios::contention),
        ("io_direct", "c", "guest O_DIRECT write and read, QEMU cache=none (O_DIRECT on the host)", |c| scenarios::io(c, DiskCache::Direct)),
        ("io_buffered", "c", "guest O_DIRECT write and read, QEMU cache=writeback (host page cache, kernel writeback)", |c| scenarios::io(c, DiskCache::HostPageCache)),
        ("churn", "d", "guests started, measured and destroyed one after the other", scenarios::churn),
        ("synthetic_meter", "e", "a spinning guest beside host spinners across the busy range", scenarios::synthetic),
    ];
    for (name, kind, description, body) in all {
        runs.push(scenarios::scenario(&ctx, name, kind, description, body)?);
    }
    let live_error = agent
        .next_sample()?
        .sum("optimus_power_model_error_ratio", &[("zone", "package")]);
    drop(estimate);
    drop(agent);
    drop(libvirtd);
    progress("fitting the power model offline (in-sample, leave-one-scenario-out)");
    let rows = meter.rows();
    drop(meter);
    let models = model::analyse(
        bin,
        &rows,
        &runs,
        &out.join("model"),
        model::Target::Synthetic,
    )?;
    let rapl_models = if host.rapl.present {
        progress("fitting the power model on the real RAPL meter's rows");
        Some(model::analyse(
            bin,
            &rows,
            &runs,
            &out.join("model-rapl"),
            model::Target::Rapl,
        )?)
    } else {
        None
    };
    let report = report::Report::new(
        plan,
        host,
        runs,
        models,
        rapl_models.as_ref(),
        live_error,
        started.elapsed(),
    );
    let json = out.join("report.json");
    let md = out.join("report.md");
    report.write(&json, &md)?;
    let pngs = plots::draw(&report, &rows, out)?;
    let problems = check::report(&serde_json::to_value(&report)?);
    progress(&format!(
        "done in {:.0} s: {}, {} and {} plots",
        started.elapsed().as_secs_f64(),
        md.display(),
        json.display(),
        pngs.len()
    ));
    if problems.is_empty() {
        progress("every figure within its bound");
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        println!("validate: out of bounds: {p}");
    }
    Ok(ExitCode::FAILURE)
}
