//! The controlled scenarios, each on real TCG guests under the real libvirtd: a plan in;
//! its measurement windows (see [`super::probe`]) out.
//!
//! - (a) `duty_1vcpu`, `duty_2vcpu`: a guest spinning on 1 or 2 vCPUs, throttled by the host
//!   to 0/25/50/75/100 % duty (0 %: paused; else libvirt's per-vCPU CFS quota, `virsh
//!   schedinfo vcpu_quota`, over a 100 ms period).
//! - (b) `contention`: two one-vCPU spinning guests pinned to the same host CPU.
//! - (c) `io_direct`, `io_buffered`: guest `O_DIRECT` writes then reads of the virtio disk,
//!   opened by QEMU with `cache=none` (QEMU submits the I/O) and with `cache=writeback`
//!   (through the host page cache: kernel writeback writes it, charged by page owner).
//! - (d) `churn`: guests started, measured and destroyed one after the other.
//! - (e) `synthetic_meter`: a spinning guest beside host spinner threads stepping the
//!   host's busy CPUs across their range, where the meter's nonlinearity shows most.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use optimus_tests::guest::{
    GuestPlan, IoPlan, IO_FAILED_MARKER, IO_READ_DONE_MARKER, READY_MARKER,
};
use optimus_tests::libvirt::{Disk, DiskCache, Domain};
use optimus_tests::load::Spinners;
use optimus_tests::proc::run_ok;
use serde::Serialize;

use super::probe::{window, Probe, VmRef, Window};
use super::{pause, progress, Ctx};

/// Boot, including a slow TCG start on a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

/// One scenario's measurements.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioRun {
    pub name: String,
    /// The letter: `a` … `e`.
    pub kind: String,
    pub description: String,
    pub duration_seconds: f64,
    pub windows: Vec<Window>,
    /// The agent's CPU seconds over the scenario's wall seconds, and its memory at the end.
    pub agent_cpu_ratio: f64,
    pub agent_rss_bytes: u64,
    pub agent_peak_rss_bytes: u64,
    /// Churn only: VMs started, VMs the agent exported, and the slowest discovery (QEMU
    /// started → `optimus_vm_info`) and removal (destroyed → series gone), seconds.
    pub churn: Option<Churn>,
}

/// What the churn scenario adds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Churn {
    pub vms_started: u32,
    pub vms_discovered: u32,
    pub vms_removed: u32,
    pub discovery_seconds_max: f64,
    pub removal_seconds_max: f64,
}

/// A scenario's body: its windows, and the churn figures where it has them.
pub type Body = fn(&Ctx<'_>) -> Result<(Vec<Window>, Option<Churn>)>;

/// A guest under test, destroyed on drop.
struct Vm {
    domain: Domain,
    r: VmRef,
}

impl Vm {
    fn name(&self) -> &str {
        self.domain.name()
    }
}

/// Boots a guest and waits until the agent exports it (and, unless it does I/O from the
/// start, until the guest runs its plan).
fn boot(
    ctx: &Ctx<'_>,
    name: &str,
    vcpus: u32,
    plan: &GuestPlan,
    disk: Option<Disk<'_>>,
) -> Result<Vm> {
    clear_leftover(ctx, name);
    let started = Instant::now();
    let domain = Domain::create(ctx.libvirtd, name, ctx.image, plan, vcpus, disk)
        .with_context(|| format!("QEMU/libvirt could not start guest {name}"))?;
    let pid = domain.qemu_pid()?;
    let r = VmRef {
        name: name.to_owned(),
        uuid: domain.uuid().to_owned(),
        pid,
    };
    wait_exported(ctx, &r, started)?;
    if plan.io.is_none() {
        domain
            .wait_for_console(READY_MARKER, BOOT_TIMEOUT)
            .with_context(|| format!("guest {name} did not boot"))?;
    }
    Ok(Vm { domain, r })
}

/// A guest of this name left by a run that was killed (its guards never ran) would make
/// `virsh create` fail: destroy it first (no such domain is the normal case).
fn clear_leftover(ctx: &Ctx<'_>, name: &str) {
    if virsh(ctx, &["domstate", name]).is_ok() {
        progress(&format!("  destroying guest {name} left by an earlier run"));
        let _ = virsh(ctx, &["destroy", name]);
    }
}

/// Seconds until the agent exports `vm`.
fn wait_exported(ctx: &Ctx<'_>, vm: &VmRef, since: Instant) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ctx.agent.next_sample()?.has_vm(&vm.uuid) {
            return Ok(since.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("the agent did not export guest {} within 60 s", vm.name);
        }
    }
}

fn virsh(ctx: &Ctx<'_>, args: &[&str]) -> Result<()> {
    run_ok(ctx.libvirtd.virsh().args(args), VIRSH_TIMEOUT).map(drop)
}

/// Measures one window of `ctx.plan.window` over `vms`.
fn measure(ctx: &Ctx<'_>, label: &str, vms: &[&Vm]) -> Result<Window> {
    let refs: Vec<VmRef> = vms.iter().map(|v| v.r.clone()).collect();
    // One interval for the new load to show in a whole sample.
    pause(ctx.plan.settle)?;
    let a = Probe::take(ctx, &refs)?;
    pause(ctx.plan.window)?;
    let b = Probe::take(ctx, &refs)?;
    Ok(window(label, &a, &b, &refs, ctx.cpus))
}

/// Runs `body` as scenario `name`: progress lines, the meter's rows labelled, the agent's
/// cost over it.
pub fn scenario(
    ctx: &Ctx<'_>,
    name: &str,
    kind: &str,
    description: &str,
    body: impl FnOnce(&Ctx<'_>) -> Result<(Vec<Window>, Option<Churn>)>,
) -> Result<ScenarioRun> {
    progress(&format!("scenario {name} ({kind}): {description}"));
    ctx.meter.set_scenario(name);
    let started = Instant::now();
    let before = ctx.agent.usage()?;
    let result = body(ctx);
    ctx.meter.set_scenario("");
    let (windows, churn) = result.with_context(|| format!("scenario {name}"))?;
    let after = ctx.agent.usage()?;
    let wall = started.elapsed().as_secs_f64();
    progress(&format!(
        "scenario {name}: done in {wall:.1} s ({} windows)",
        windows.len()
    ));
    Ok(ScenarioRun {
        name: name.to_owned(),
        kind: kind.to_owned(),
        description: description.to_owned(),
        duration_seconds: wall,
        windows,
        agent_cpu_ratio: super::probe::ratio(after.cpu_s - before.cpu_s, wall),
        agent_rss_bytes: after.rss_bytes,
        agent_peak_rss_bytes: after.peak_rss_bytes,
        churn,
    })
}

/// (a): a guest spinning on `vcpus` vCPUs at each duty level.
pub fn duty(ctx: &Ctx<'_>, vcpus: u32) -> Result<(Vec<Window>, Option<Churn>)> {
    let plan = GuestPlan {
        busy_vcpus: (0..vcpus).collect(),
        io: None,
    };
    let vm = boot(
        ctx,
        &format!("validate-duty-{vcpus}vcpu"),
        vcpus,
        &plan,
        None,
    )?;
    let mut paused = false;
    let mut windows = Vec::new();
    for &level in &ctx.plan.duty_levels {
        if level == 0 {
            virsh(ctx, &["suspend", vm.name()])?;
            paused = true;
        } else {
            if paused {
                virsh(ctx, &["resume", vm.name()])?;
                paused = false;
            }
            // -1: no limit; otherwise level % of each 100 ms period.
            let quota = if level >= 100 {
                "-1".to_owned()
            } else {
                (1000 * level).to_string()
            };
            virsh(
                ctx,
                &[
                    "schedinfo",
                    vm.name(),
                    "--live",
                    "vcpu_period=100000",
                    &format!("vcpu_quota={quota}"),
                ],
            )
            .context("setting the vCPUs' CFS quota (virsh schedinfo)")?;
        }
        windows.push(measure(ctx, &format!("{level}%"), &[&vm])?);
    }
    vm.domain.destroy()?;
    Ok((windows, None))
}

/// (b): two one-vCPU spinning guests pinned to host CPU 0.
pub fn contention(ctx: &Ctx<'_>) -> Result<(Vec<Window>, Option<Churn>)> {
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let a = boot(ctx, "validate-contend-a", 1, &plan, None)?;
    let b = boot(ctx, "validate-contend-b", 1, &plan, None)?;
    for vm in [&a, &b] {
        virsh(ctx, &["vcpupin", vm.name(), "0", "0", "--live"])
            .context("pinning the vCPU to host CPU 0 (virsh vcpupin)")?;
    }
    let w = measure(ctx, "both on CPU 0", &[&a, &b])?;
    a.domain.destroy()?;
    b.domain.destroy()?;
    Ok((vec![w], None))
}

/// (c): guest O_DIRECT I/O of `ctx.plan.io_mib` MiB each way on a disk QEMU opens with
/// `cache`.
pub fn io(ctx: &Ctx<'_>, cache: DiskCache) -> Result<(Vec<Window>, Option<Churn>)> {
    let (label, name) = match cache {
        DiskCache::Direct => ("cache=none", "validate-io-direct"),
        DiskCache::HostPageCache => ("cache=writeback", "validate-io-buffered"),
    };
    let disk = ctx.work.join(format!("{name}.raw"));
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(u64::from(ctx.plan.io_mib + 16) << 20))
        .with_context(|| format!("creating the guest disk {}", disk.display()))?;
    let plan = GuestPlan {
        busy_vcpus: vec![],
        io: Some(IoPlan {
            write_mib: ctx.plan.io_mib,
            read_mib: ctx.plan.io_mib,
            pause_s: 1,
        }),
    };
    let vm = boot(ctx, name, 1, &plan, Some(Disk { path: &disk, cache }))?;
    // The guest boots for seconds before it touches its disk: the window starts before.
    let refs = [vm.r.clone()];
    let a = Probe::take(ctx, &refs)?;
    vm.domain
        .wait_for_console(IO_READ_DONE_MARKER, BOOT_TIMEOUT)
        .with_context(|| format!("guest {name} did not finish its I/O"))?;
    let console = std::fs::read_to_string(vm.domain.console_log()).unwrap_or_default();
    if console.contains(IO_FAILED_MARKER) {
        bail!("a dd in guest {name} failed; its console:\n{console}");
    }
    // Buffered writes reach the disk when written back: flush them inside the window.
    run_ok(&mut std::process::Command::new("sync"), VIRSH_TIMEOUT)?;
    let _ = ctx.agent.next_sample()?;
    let b = Probe::take(ctx, &refs)?;
    let w = window(label, &a, &b, &refs, ctx.cpus);
    vm.domain.destroy()?;
    let _ = std::fs::remove_file(&disk);
    Ok((vec![w], None))
}

/// (d): `ctx.plan.churn_cycles` guests, one after the other.
pub fn churn(ctx: &Ctx<'_>) -> Result<(Vec<Window>, Option<Churn>)> {
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let mut c = Churn::default();
    let mut windows = Vec::new();
    for i in 0..ctx.plan.churn_cycles {
        let name = format!("validate-churn-{i}");
        clear_leftover(ctx, &name);
        let started = Instant::now();
        c.vms_started += 1;
        let domain = Domain::create(ctx.libvirtd, &name, ctx.image, &plan, 1, None)
            .with_context(|| format!("QEMU/libvirt could not start guest {name}"))?;
        let r = VmRef {
            name: name.clone(),
            uuid: domain.uuid().to_owned(),
            pid: domain.qemu_pid()?,
        };
        let found = wait_exported(ctx, &r, started)?;
        c.vms_discovered += 1;
        c.discovery_seconds_max = c.discovery_seconds_max.max(found);
        domain
            .wait_for_console(READY_MARKER, BOOT_TIMEOUT)
            .with_context(|| format!("guest {name} did not boot"))?;
        let vm = Vm { domain, r };
        windows.push(measure(ctx, &name, &[&vm])?);
        let uuid = vm.r.uuid.clone();
        let gone = Instant::now();
        vm.domain.destroy()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !ctx.agent.next_sample()?.has_vm(&uuid) {
                c.vms_removed += 1;
                c.removal_seconds_max = c.removal_seconds_max.max(gone.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                progress(&format!(
                    "  {name}: still exported 30 s after it was destroyed"
                ));
                break;
            }
        }
    }
    // The identity must survive the churn: one more window over no VM at all.
    windows.push(measure(ctx, "after churn", &[])?);
    Ok((windows, Some(c)))
}

/// (e): a spinning guest, paused or running, beside 0 … N host spinner threads.
pub fn synthetic(ctx: &Ctx<'_>) -> Result<(Vec<Window>, Option<Churn>)> {
    let cpus = ctx.cpus;
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let vm = boot(ctx, "validate-synthetic", 1, &plan, None)?;
    let spin = Spinners::start(cpus);
    let mut windows = Vec::new();
    // (guest running, host spinners): idle host, the guest alone, the guest plus host load
    // up to saturation, host load alone.
    let mut steps = vec![(false, 0), (true, 0)];
    steps.extend((1..cpus).map(|k| (true, k)));
    steps.push((false, cpus));
    let mut paused = false;
    for (running, k) in steps {
        if running == paused {
            virsh(
                ctx,
                &[if running { "resume" } else { "suspend" }, vm.name()],
            )?;
            paused = !running;
        }
        spin.set(k);
        let label = format!(
            "guest {}, {k} host spinner(s)",
            if running { "on" } else { "paused" }
        );
        windows.push(measure(ctx, &label, &[&vm])?);
    }
    spin.set(0);
    vm.domain.destroy()?;
    Ok((windows, None))
}

/// A directory on a real block device of the host (not tmpfs) for guest disks.
pub fn disk_dir(target: &Path) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    tempfile::Builder::new()
        .prefix("validate-disks-")
        .tempdir_in(target)
        .with_context(|| format!("creating a disk dir in {}", target.display()))
}
