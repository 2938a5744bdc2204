//! `optimus check`: one screen that tells a new user what works on this host, what does
//! not, why, and the fix. Exits non-zero when the tracer cannot run.

use std::collections::HashSet;
use std::process::ExitCode;

use crate::cli::{EnergyArgs, HostArgs};
use crate::discovery::cgroup::VmCgroups;
use crate::discovery::{escape_controls, Discovery, IgnoredWhy, LibvirtStatus, ThreadKind, VmId};
use crate::energy::{EnergyMeters, GpuVgpu, MeterSource, MeterState};
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

    // The agent's own capabilities, from its own /proc whatever --proc-root says.
    let caps = crate::privileges::CapSets::current().unwrap_or_default();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let privileged = crate::privileges::can_trace(caps.effective);
    items.extend(privilege_items(euid, &caps));

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
    let proc_has_processes = std::fs::read_dir(&paths_proc).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
    });
    if !proc_has_processes {
        items.push(item(
            Status::Warn,
            "procfs",
            format!(
                "no processes under {}: is it a procfs mount? VMs are found there (--proc-root)",
                paths_proc.display()
            ),
        ));
    }
    let mut discovery = Discovery::with_config(paths, args.libvirt(), args.discovery_config());
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
                "{why}; VMs are still found in /proc. {}",
                libvirt_fix(&why, euid)
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
        let names: Vec<String> = vms
            .iter()
            .map(|vm| escape_controls(&vm.id.name).into_owned())
            .collect();
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
    for vm in &vms {
        if !vm
            .threads
            .iter()
            .any(|t| matches!(t.kind, ThreadKind::Vcpu(_)))
        {
            items.push(item(
                Status::Warn,
                "vCPU threads",
                format!(
                    "VM \"{}\" (pid {}): its vCPU threads cannot be told from its other \
                     threads, so no vCPU time is exported (its time shows as \
                     thread_kind=\"unclassified\"); fix: start QEMU with \
                     -name guest=NAME,debug-threads=on, or run it under libvirt",
                    escape_controls(&vm.id.name),
                    vm.pid
                ),
            ));
        }
    }
    // A hostile user can start thousands of fakes: name a few, count the rest.
    const SHOWN: usize = 10;
    let ignored = discovery.ignored();
    for ignored in ignored.iter().take(SHOWN) {
        let fix = match &ignored.why {
            IgnoredWhy::Untrusted(_) => {
                "; a real VM must run a root-owned QEMU binary as root or a --qemu-users user"
            }
            IgnoredWhy::Conflict { .. } => "",
            IgnoredWhy::OverLimit => "; raise --max-vms",
        };
        items.push(item(
            Status::Warn,
            "not a VM",
            format!(
                "pid {} (\"{}\") is not charged as a VM: {}{fix}",
                ignored.pid,
                escape_controls(&ignored.name),
                ignored.why
            ),
        ));
    }
    if ignored.len() > SHOWN {
        items.push(item(
            Status::Warn,
            "not a VM",
            format!(
                "and {} more QEMU-looking processes not charged as VMs",
                ignored.len() - SHOWN
            ),
        ));
    }
    if !vms.is_empty() {
        items.push(vm_cgroups_item(paths_proc.clone(), &vms));
    }
    for (ok, detail) in crate::channel::probe::items(&vms, &paths_proc, &args.run_root) {
        let status = if ok { Status::Ok } else { Status::Warn };
        items.push(item(status, "guest channel", detail));
    }
    let mut meters = EnergyMeters::open(&energy.config(args));
    let statuses = meters.status();
    for m in &statuses {
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
    if statuses
        .iter()
        .any(|m| m.source == MeterSource::Nvml && m.state == MeterState::Active)
    {
        items.extend(vgpu_items(&meters.sample().vgpus, &vms));
    }
    items
}

/// The vGPU lines: which instances NVML lists and the VM each is charged to.
fn vgpu_items(vgpus: &[GpuVgpu], vms: &[crate::discovery::Vm]) -> Vec<Item> {
    const SHOWN: usize = 10;
    if vgpus.is_empty() {
        return vec![item(
            Status::Ok,
            "vGPU",
            "no vGPU instances on the NVML GPUs (not a vGPU host, or no vGPU VM running): \
             GPU energy goes to the processes NVML lists",
        )];
    }
    let mut items = Vec::new();
    let mut matched = 0;
    for (i, v) in vgpus.iter().enumerate() {
        let vm = crate::attribution::vgpu::vm_of(v, vms);
        matched += usize::from(vm.is_some());
        if i >= SHOWN {
            continue;
        }
        let who = format!(
            "{} instance {} (VM id {}, mdev {}, SM {})",
            v.device,
            v.instance,
            v.vm_id.as_deref().map_or("unknown".into(), escape_controls),
            v.mdev_uuid.as_deref().unwrap_or("unknown"),
            v.sm_util_percent
                .map_or("not sampled".to_owned(), |p| format!("{p} %")),
        );
        items.push(match vm {
            Some(id) => item(
                Status::Ok,
                "vGPU",
                format!(
                    "{who}: charged to VM \"{}\" ({})",
                    escape_controls(&id.name),
                    id.uuid
                ),
            ),
            None => item(
                Status::Warn,
                "vGPU",
                format!(
                    "{who}: no running VM has this UUID, name or mdev, so its share of the GPU \
                     stays unattributed; check that the VM runs here (libvirt domain UUID = \
                     QEMU -uuid)"
                ),
            ),
        });
    }
    if vgpus.len() > SHOWN {
        items.push(item(
            Status::Ok,
            "vGPU",
            format!("and {} more instances", vgpus.len() - SHOWN),
        ));
    }
    items.insert(
        0,
        item(
            Status::Ok,
            "vGPU",
            format!(
                "{} instance(s) seen, {matched} charged to a running VM by SM utilisation",
                vgpus.len()
            ),
        ),
    );
    items
}

/// The privilege lines: root, or which of the unit's capabilities this user holds, each
/// missing one named with what it costs and the fix.
fn privilege_items(euid: u32, caps: &crate::privileges::CapSets) -> Vec<Item> {
    use crate::privileges::{cap_names, Cap};
    const GRANT: &str = "run it from the systemd unit (deploy/systemd/optimus.service: \
        User=optimus, AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH), or \
        `setpriv --inh-caps=+bpf,+perfmon,+dac_read_search \
        --ambient-caps=+bpf,+perfmon,+dac_read_search`, or as root (sudo)";
    if euid == 0 && caps.has(Cap::SysAdmin) {
        return vec![item(
            Status::Ok,
            "privileges",
            "root: can load eBPF programs; `optimus run` drops every capability once loaded",
        )];
    }
    let who = if euid == 0 {
        "root without CAP_SYS_ADMIN".to_owned()
    } else {
        format!("uid {euid}")
    };
    if !crate::privileges::can_trace(caps.effective) {
        let missing: Vec<&str> = [Cap::Bpf, Cap::Perfmon]
            .into_iter()
            .filter(|c| !caps.has(*c))
            .map(Cap::name)
            .collect();
        return vec![item(
            Status::Fail,
            "privileges",
            format!(
                "{who} lacks {}: cannot load and attach the eBPF programs (holds: {}); fix: {GRANT}",
                missing.join(" and "),
                cap_names(caps.effective)
            ),
        )];
    }
    let kept = cap_names(crate::privileges::sampling_needs(euid, caps.permitted));
    let mut items = vec![item(
        Status::Ok,
        "privileges",
        format!(
            "{who} with {}: can load eBPF programs; `optimus run` keeps {kept} once loaded",
            cap_names(caps.effective)
        ),
    )];
    if euid != 0 && !caps.has(Cap::DacReadSearch) {
        items.push(item(
            Status::Warn,
            "privileges",
            format!(
                "{who} lacks CAP_DAC_READ_SEARCH: root-only files stay unreadable (RAPL \
                 energy_uj since CVE-2020-8694, libvirt's status files under \
                 /run/libvirt/qemu); fix: add it, e.g. AmbientCapabilities=CAP_BPF \
                 CAP_PERFMON CAP_DAC_READ_SEARCH"
            ),
        ));
    }
    items
}

/// What to do about an unreachable libvirt, from its message: a non-root user is refused
/// when polkit cannot be asked or the socket is not open to it.
fn libvirt_fix(why: &str, euid: u32) -> String {
    let lower = why.to_ascii_lowercase();
    let denied = [
        "polkit",
        "system bus",
        "authentication",
        "permission denied",
        "access denied",
    ]
    .iter()
    .any(|w| lower.contains(w));
    if denied && euid != 0 {
        format!(
            "uid {euid} may not open libvirt's read-only socket (/run/libvirt/libvirt-sock-ro): \
             fix: run polkitd with libvirt's policy (package libvirt-daemon-system allows any \
             local user read-only access), or set auth_unix_ro = \"none\" in \
             /etc/libvirt/libvirtd.conf and restart libvirtd"
        )
    } else {
        "Start libvirtd or pass --libvirt-uri URI".to_owned()
    }
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
        // Details carry names from command lines: never let them drive the terminal.
        println!("[{tag}] {:<15} {}", i.what, escape_controls(&i.detail));
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
    let shared: Vec<String> = vms
        .iter()
        .filter(|vm| !owned.contains(&vm.id))
        .map(|vm| escape_controls(&vm.id.name).into_owned())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod vgpu_tests {
    use super::*;
    use crate::discovery::{Vm, VmSource};

    #[test]
    fn vgpu_lines_name_the_vm_or_say_unattributed() {
        let vm = Vm {
            id: VmId {
                name: "guest".into(),
                uuid: "3f6b2c1d-8e9a-4b5c-a1d2-e3f4a5b6c7d8".into(),
            },
            source: VmSource::Libvirt,
            pid: 1,
            memory_bytes: None,
            threads: Vec::new(),
            namespace: None,
            mdev_uuids: Vec::new(),
        };
        let v = |id: u32, vm_id: &str, sm| GpuVgpu {
            device: "gpu-1".into(),
            instance: id,
            vm_id: Some(vm_id.into()),
            mdev_uuid: None,
            sm_util_percent: sm,
        };
        let items = vgpu_items(
            &[
                v(21, "3F6B2C1D-8E9A-4B5C-A1D2-E3F4A5B6C7D8", Some(50)),
                v(22, "00000000-0000-4000-8000-0000000000ff", None),
            ],
            std::slice::from_ref(&vm),
        );
        let lines: Vec<(Status, &str)> = items
            .iter()
            .map(|i| (i.status, i.detail.as_str()))
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(
            lines[0],
            (
                Status::Ok,
                "2 instance(s) seen, 1 charged to a running VM by SM utilisation"
            )
        );
        assert_eq!(
            lines[1],
            (
                Status::Ok,
                "gpu-1 instance 21 (VM id 3F6B2C1D-8E9A-4B5C-A1D2-E3F4A5B6C7D8, mdev unknown, SM \
                 50 %): charged to VM \"guest\" (3f6b2c1d-8e9a-4b5c-a1d2-e3f4a5b6c7d8)"
            )
        );
        assert_eq!(lines[2].0, Status::Warn);
        assert!(
            lines[2].1.starts_with(
                "gpu-1 instance 22 (VM id 00000000-0000-4000-8000-0000000000ff, mdev unknown, \
                 SM not sampled): no running VM"
            ),
            "{}",
            lines[2].1
        );
        let none = vgpu_items(&[], &[vm]);
        assert_eq!(none.len(), 1);
        assert!(none[0].detail.starts_with("no vGPU instances"));
    }
}
