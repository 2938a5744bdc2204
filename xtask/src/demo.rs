//! `cargo xtask demo-vm`: a small TCG guest under libvirt with vCPU 0 spinning and vCPU 1
//! idle, booted through the test harness so the demo and the tests share one recipe.
use std::time::Duration;

use anyhow::{Context as _, Result};
use optimus_tests::guest::{GuestImage, GuestPlan};
use optimus_tests::libvirt::{Domain, Libvirtd};

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
pub fn with_demo_vm(name: &str, what: While<'_>) -> Result<()> {
    println!("demo: starting libvirtd (or reusing a running one)…");
    let libvirtd = Libvirtd::start().context("starting libvirtd for the demo VM")?;
    println!("demo: preparing the guest image (kernel + busybox initramfs)…");
    let image = GuestImage::ensure().context("preparing the demo guest image")?;
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    println!("demo: booting {name} (TCG, 2 vCPUs; takes a few seconds)…");
    let domain = Domain::create(&libvirtd, name, &image, &plan, 2, None)
        .with_context(|| format!("creating libvirt domain {name}"))?;
    domain
        .wait_for_console(READY_LINE, BOOT_TIMEOUT)
        .with_context(|| format!("waiting for {name} to print {READY_LINE}"))?;
    println!(
        "demo VM {name} up: vCPU 0 busy, vCPU 1 idle. \
         Scrape: curl -s 127.0.0.1:9947/metrics | grep optimus_vcpu"
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
    if keep {
        return with_demo_vm(name, While::Keep);
    }
    with_demo_vm(
        name,
        While::Running(&mut || {
            println!("demo: press Ctrl-C to stop it");
            signals.wait().map(drop)
        }),
    )
}
