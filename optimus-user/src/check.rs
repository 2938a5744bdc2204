//! `optimus check`: one screen that tells a new user what works on this host, what does
//! not, why, and the fix. Exits non-zero when the tracer cannot run.

use std::collections::HashSet;
use std::process::ExitCode;

use crate::cli::{EnergyArgs, HostArgs};
use crate::discovery::cgroup::VmCgroups;
use crate::discovery::{Discovery, LibvirtStatus, VmId};
use crate::energy::{EnergyMeters, MeterState};
use crate::tracer::{btf, BlockIoStatus, Tracer, TracerOptions};

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works in a reduced way, or an optional part is missing.
    Warn,
    /// The tracer cannot run.
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Item {
    pub status: Status,
    pub what: &'static str,
    pub detail: String,
}

fn item(status: Status, what: &'static str, detail: impl Into<String>) -> Item {
    Item {
        status,
        what,
        detail: detail.into(),
    }
}

/// Runs every check (loading the real eBPF programs when privileged).
pub fn report(args: &HostArgs, energy: &EnergyArgs) -> Vec<Item> {
    let paths = args.paths();
    let mut items = Vec::new();

    let caps = std::fs::read_to_string(paths.proc.join("self/status"))
        .ok()
        .and_then(|s| crate::privileges::effective_caps(&s))
        .unwrap_or(0);
    let privileged = crate::privileges::can_trace(caps);
    items.push(if privileged {
        item(Status::Ok, "privileges", "can load eBPF programs")
    } else {
        item(
            Status::Fail,
            "privileges",
            "cannot load eBPF programs; run as root (sudo) or grant CAP_BPF and CAP_PERFMON",
        )
    });

    let btf_path = paths.sys.join("kernel/btf/vmlinux");
    items.push(match btf::member_offset(&btf_path, "task_struct", "pid") {
        Ok(off) => item(
            Status::Ok,
            "kernel BTF",
            format!("{} (task_struct.pid at byte {off})", btf_path.display()),
        ),
        Err(e) => item(
            Status::Fail,
            "kernel BTF",
            format!("{e}; use a kernel with CONFIG_DEBUG_INFO_BTF=y"),
        ),
    });

    if privileged {
        let opts = TracerOptions {
            btf_path,
            ..TracerOptions::default()
        };
        match Tracer::load(&opts) {
            Ok(tracer) => {
                items.push(item(
                    Status::Ok,
                    "eBPF tracer",
                    "loaded and attached to sched_switch",
                ));
                items.push(match tracer.block_io_status() {
                    BlockIoStatus::Attached {
                        tracepoint,
                        page_owner: Ok(()),
                    } => item(
                        Status::Ok,
                        "block I/O",
                        format!(
                            "attached to block:{tracepoint} and the bio merges; kernel \
                             writeback traced to the pages' memory cgroup"
                        ),
                    ),
                    BlockIoStatus::Attached {
                        tracepoint,
                        page_owner: Err(why),
                    } => item(
                        Status::Warn,
                        "block I/O",
                        format!(
                            "attached to block:{tracepoint}; kernel writeback stays \
                             unattributed: {why}"
                        ),
                    ),
                    BlockIoStatus::Unavailable(why) => item(Status::Warn, "block I/O", why.clone()),
                    BlockIoStatus::Disabled => item(Status::Warn, "block I/O", "disabled"),
                });
            }
            Err(e) => items.push(item(Status::Fail, "eBPF tracer", error_chain(&e))),
        }
    } else {
        items.push(item(
            Status::Fail,
            "eBPF tracer",
            "not tried without privileges (bpf syscall needs them)",
        ));
    }

    let paths_proc = paths.proc.clone();
    let mut discovery = Discovery::new(paths, args.libvirt());
    let vms = discovery.scan();
    items.push(match discovery.libvirt_status() {
        LibvirtStatus::Connected => item(
            Status::Ok,
            "libvirt",
            format!("connected to {}", args.libvirt_uri),
        ),
        LibvirtStatus::Disabled => item(
            Status::Warn,
            "libvirt",
            "disabled (--libvirt-uri ''); VMs are found from /proc only",
        ),
        LibvirtStatus::Unreachable(why) => item(
            Status::Warn,
            "libvirt",
            format!(
                "{why}; VMs are still found in /proc. Start libvirtd or pass --libvirt-uri URI"
            ),
        ),
    });
    let threads: usize = vms.iter().map(|vm| vm.threads.len()).sum();
    items.push(if vms.is_empty() {
        item(
            Status::Warn,
            "QEMU processes",
            "none running; start a VM (or `cargo xtask demo-vm`) to see per-VM metrics",
        )
    } else {
        let names: Vec<&str> = vms.iter().map(|vm| vm.id.name.as_str()).collect();
        item(
            Status::Ok,
            "QEMU processes",
            format!(
                "{} VM(s), {threads} threads: {}",
                vms.len(),
                names.join(", ")
            ),
        )
    });
    if !vms.is_empty() {
        items.push(vm_cgroups_item(paths_proc, &vms));
    }
    for m in EnergyMeters::open(&energy.config(args)).status() {
        let status = match m.state {
            MeterState::Active | MeterState::Standby => Status::Ok,
            MeterState::NotFound
            | MeterState::Disabled
            | MeterState::NotPermitted
            | MeterState::Failed => Status::Warn,
        };
        items.push(Item {
            status,
            what: "energy meter",
            detail: format!("{}: {}: {}", m.source.label(), m.state.label(), m.detail),
        });
    }
    items
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Prints the report; exit code 1 when anything failed.
pub fn run(args: &HostArgs, energy: &EnergyArgs) -> ExitCode {
    let items = report(args, energy);
    println!("optimus check: what works on this host\n");
    for i in &items {
        let tag = match i.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("[{tag}] {:<15} {}", i.what, i.detail);
    }
    if items.iter().any(|i| i.status == Status::Fail) {
        println!("\nThe tracer cannot run here; fix the FAIL lines above.");
        ExitCode::FAILURE
    } else {
        println!("\nReady: `optimus run` (or `cargo xtask run`).");
        ExitCode::SUCCESS
    }
}

/// Which VMs have a memory cgroup of their own, so that kernel writeback of their pages
/// is charged to them.
fn vm_cgroups_item(proc_root: std::path::PathBuf, vms: &[crate::discovery::Vm]) -> Item {
    let mut cgroups = VmCgroups::new(proc_root);
    let list: Vec<_> = vms.iter().map(|vm| (vm.id.clone(), vm.pid)).collect();
    cgroups.refresh(&list);
    if let Some(why) = cgroups.unavailable() {
        return item(Status::Warn, "VM cgroups", why.to_owned());
    }
    let owned: HashSet<&VmId> = cgroups.ids().filter_map(|id| cgroups.vm_of(id)).collect();
    let shared: Vec<&str> = vms
        .iter()
        .filter(|vm| !owned.contains(&vm.id))
        .map(|vm| vm.id.name.as_str())
        .collect();
    if shared.is_empty() {
        item(
            Status::Ok,
            "VM cgroups",
            format!(
                "all {} VM(s) have a memory cgroup of their own: kernel writeback of their pages is charged to them",
                vms.len()
            ),
        )
    } else {
        item(
            Status::Warn,
            "VM cgroups",
            format!(
                "{} share a memory cgroup with other processes: their kernel writeback stays unattributed (run them under libvirt or in a cgroup of their own)",
                shared.join(", ")
            ),
        )
    }
}
