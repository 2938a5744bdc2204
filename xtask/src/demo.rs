//! `cargo xtask demo-vm`: a small TCG guest under libvirt with vCPU 0 spinning and vCPU 1
//! idle, booted through the test harness so the demo and the tests share one recipe. It has
//! the guest channel (`org.optimus.agent.0`); when an `optimus` binary is built, the guest
//! runs `optimus guest` with the fake NVML library and one declared passthrough GPU, and
//! marks two phases (see `optimus_tests::guest::AgentRole::Honest`).
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use optimus_tests::fakes::FakeNvml;
use optimus_tests::guest::{agent_cmdline, AgentRole, GuestImage, GuestPlan};
use optimus_tests::libvirt::{Domain, DomainExtras, Libvirtd};

use crate::signals;

pub const DEFAULT_NAME: &str = "optimus-demo";
const READY_LINE: &str = "OPTIMUS-GUEST-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// What to do once the guest is up.
pub enum While<'a> {
    /// Leave libvirtd and the domain running after xtask exits.
    Keep,
    /// Run `body`, then destroy the domain and stop libvirtd (also when `body` fails).
    Running(&'a mut dyn FnMut() -> Result<()>),
}

/// Boots the demo guest, then does `what`. Call with the termination signals caught
/// ([`signals::catch`]) so Ctrl-C during boot cannot skip the cleanup.
pub fn with_demo_vm(name: &str, agent: Option<&Path>, what: While<'_>) -> Result<()> {
    println!("demo: starting libvirtd (or reusing a running one)…");
    let libvirtd = Libvirtd::start().context("starting libvirtd for the demo VM")?;
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let mut extras = DomainExtras {
        channel: true,
        ..DomainExtras::default()
    };
    let image = match agent {
        Some(bin) => {
            println!(
                "demo: preparing the guest image with `optimus guest` inside ({}, fake NVML)…",
                bin.display()
            );
            let nvml = FakeNvml::build("").context("building the fake NVML library")?;
            extras.memory_mib = Some(768);
            extras.cmdline = Some(agent_cmdline(&plan, &AgentRole::Honest));
            extras.metadata = Some(
                "    <optimus:guest xmlns:optimus='urn:optimus:guest:1'>\n      \
                 <optimus:gpu host_pci='0000:65:00.0' guest_pci='0000:00:05.0'/>\n    \
                 </optimus:guest>"
                    .to_owned(),
            );
            GuestImage::with_agent(bin, nvml.lib()).context("preparing the demo guest image")?
        }
        None => {
            println!("demo: preparing the guest image (kernel + busybox initramfs; no optimus binary built, so no `optimus guest` inside)…");
            GuestImage::ensure().context("preparing the demo guest image")?
        }
    };
    println!("demo: booting {name} (TCG, 2 vCPUs; takes a few seconds)…");
    let domain = Domain::create_with(&libvirtd, name, &image, &plan, 2, None, &extras)
        .with_context(|| format!("creating libvirt domain {name}"))?;
    domain
        .wait_for_console(READY_LINE, BOOT_TIMEOUT)
        .with_context(|| format!("waiting for {name} to print {READY_LINE}"))?;
    println!(
        "demo VM {name} up: vCPU 0 busy, vCPU 1 idle, guest channel at {}. \
         Scrape: curl -s 127.0.0.1:9947/metrics | grep -e optimus_vcpu -e optimus_guest",
        domain
            .channel_socket()
            .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
    );
    match what {
        While::Keep => {
            if libvirtd.started_here() {
                println!(
                    "demo: the libvirtd started for it keeps running too (later runs reuse it)"
                );
            }
            // Leaked on purpose: their Drop would destroy the domain and stop libvirtd. The
            // image may go: QEMU read the kernel and initramfs at boot.
            std::mem::forget(domain);
            std::mem::forget(libvirtd);
            println!("demo: left running; stop it with: virsh -c qemu:///system destroy {name}");
            Ok(())
        }
        While::Running(body) => {
            let result = body();
            println!("demo: destroying {name}…");
            drop(domain);
            drop(libvirtd);
            result
        }
    }
}

/// `cargo xtask demo-vm`: boots the guest and keeps it until Ctrl-C (or `--keep`: for good).
pub fn demo_vm(name: &str, keep: bool) -> Result<()> {
    let signals = signals::catch()?;
    let agent = built_agent();
    if keep {
        return with_demo_vm(name, agent.as_deref(), While::Keep);
    }
    with_demo_vm(
        name,
        agent.as_deref(),
        While::Running(&mut || {
            println!("demo: press Ctrl-C to stop it");
            signals.wait().map(drop)
        }),
    )
}

/// The `optimus` binary last built (release first), to run inside the demo guest.
fn built_agent() -> Option<PathBuf> {
    let root = optimus_tests::env::workspace_root();
    ["target/release/optimus", "target/debug/optimus"]
        .into_iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
}
