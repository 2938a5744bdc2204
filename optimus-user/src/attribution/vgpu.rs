//! vGPU instances to VMs: in, the instances NVML lists (each with the VM id and mdev UUID
//! the driver reports) and the VMs discovery found; out, each instance's VM, or none (then
//! its share of the GPU is host energy, never dropped).
//!
//! What NVML reports (`nvmlVgpuInstanceGetVmID`, `nvmlVgpuInstanceGetMdevUUID`):
//! - on KVM the VM id is the VM's UUID (type `NVML_VGPU_VM_ID_UUID`): QEMU's `-uuid`, which
//!   is libvirt's domain UUID; a driver that reports the domain form (`..._DOMAIN_ID`) gives
//!   the domain name here;
//! - the mdev UUID is the mediated device the vGPU is: libvirt's domain XML names it
//!   (`<hostdev mode='subsystem' type='mdev'><source><address uuid='…'/>`) and QEMU opens it
//!   as `-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/<uuid>`.
//!
//! An instance matches, in this order: the VM whose UUID is its VM id (case-insensitive),
//! the VM that was given its mdev, the one VM whose name is its VM id. A VM id that names
//! several VMs (two namespaces' `web`) matches none of them.

use crate::discovery::cmdline::normalize_uuid;
use crate::discovery::{Vm, VmId};
use crate::energy::GpuVgpu;

/// The running VM `vgpu` belongs to, if any (see the module docs for the rules).
pub fn vm_of<'a>(vgpu: &GpuVgpu, vms: &'a [Vm]) -> Option<&'a VmId> {
    let vm_id = vgpu
        .vm_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some(uuid) = vm_id.and_then(normalize_uuid) {
        if let Some(vm) = vms.iter().find(|vm| vm.id.uuid == uuid) {
            return Some(&vm.id);
        }
    }
    if let Some(mdev) = vgpu.mdev_uuid.as_deref().and_then(normalize_uuid) {
        if let Some(vm) = vms.iter().find(|vm| vm.mdev_uuids.contains(&mdev)) {
            return Some(&vm.id);
        }
    }
    let name = vm_id?;
    let mut named = vms.iter().filter(|vm| vm.id.name == name);
    match (named.next(), named.next()) {
        (Some(vm), None) => Some(&vm.id),
        _ => None,
    }
}

/// The attribution input for `vgpus`: device, matched VM, SM utilisation in percent (0
/// when the driver gave no sample this interval: no use seen, no share).
pub fn shares(vgpus: &[GpuVgpu], vms: &[Vm]) -> Vec<(String, Option<VmId>, u32)> {
    vgpus
        .iter()
        .map(|v| {
            (
                v.device.clone(),
                vm_of(v, vms).cloned(),
                v.sm_util_percent.unwrap_or(0),
            )
        })
        .collect()
}

/// [`shares`] with no VM for any instance: for a caller that charges no VM (`optimus
/// measure`), the instances still count in each GPU's total use.
pub fn unowned(vgpus: &[GpuVgpu]) -> Vec<(String, Option<VmId>, u32)> {
    shares(vgpus, &[])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::discovery::VmSource;

    const UUID_A: &str = "3f6b2c1d-8e9a-4b5c-a1d2-e3f4a5b6c7d8";
    const MDEV_B: &str = "4b20d080-1b54-4048-85b3-a6a62d165c01";

    fn vm(name: &str, uuid: &str, mdevs: &[&str]) -> Vm {
        Vm {
            id: VmId {
                name: name.into(),
                uuid: uuid.into(),
            },
            source: VmSource::Libvirt,
            pid: 1,
            memory_bytes: None,
            threads: Vec::new(),
            namespace: None,
            mdev_uuids: mdevs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn vgpu(vm_id: Option<&str>, mdev: Option<&str>) -> GpuVgpu {
        GpuVgpu {
            device: "gpu-0".into(),
            instance: 1,
            vm_id: vm_id.map(str::to_owned),
            mdev_uuid: mdev.map(str::to_owned),
            sm_util_percent: Some(30),
        }
    }

    fn vms() -> Vec<Vm> {
        vec![
            vm("a", UUID_A, &[]),
            vm("b", "9e7a0000-0000-4000-8000-000000000002", &[MDEV_B]),
            vm("web", "9e7a0000-0000-4000-8000-000000000003", &[]),
            vm("web", "9e7a0000-0000-4000-8000-000000000004", &[]),
        ]
    }

    fn name(v: &GpuVgpu) -> Option<String> {
        vm_of(v, &vms()).map(|id| id.name.clone())
    }

    #[test]
    fn by_vm_uuid_any_case() {
        assert_eq!(name(&vgpu(Some(UUID_A), None)).as_deref(), Some("a"));
        let upper = UUID_A.to_ascii_uppercase();
        assert_eq!(name(&vgpu(Some(&upper), None)).as_deref(), Some("a"));
    }

    #[test]
    fn by_mdev_when_the_vm_id_names_no_vm() {
        assert_eq!(name(&vgpu(None, Some(MDEV_B))).as_deref(), Some("b"));
        let other = "00000000-0000-4000-8000-0000000000ff";
        assert_eq!(name(&vgpu(Some(other), Some(MDEV_B))).as_deref(), Some("b"));
        // The VM id wins over the mdev when both name a VM.
        assert_eq!(
            name(&vgpu(Some(UUID_A), Some(MDEV_B))).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn by_unique_domain_name() {
        assert_eq!(name(&vgpu(Some("b"), None)).as_deref(), Some("b"));
        // Two VMs called `web`: neither is charged.
        assert_eq!(name(&vgpu(Some("web"), None)), None);
    }

    #[test]
    fn unknown_vm_is_none_and_keeps_its_utilisation() {
        let unknown = vgpu(
            Some("00000000-0000-4000-8000-0000000000ff"),
            Some("00000000-0000-4000-8000-0000000000fe"),
        );
        assert_eq!(name(&unknown), None);
        assert_eq!(name(&vgpu(Some(" "), None)), None);
        assert_eq!(name(&vgpu(None, None)), None);
        let mut silent = vgpu(Some(UUID_A), None);
        silent.sm_util_percent = None;
        assert_eq!(
            shares(&[unknown, silent], &vms()),
            vec![
                ("gpu-0".to_owned(), None, 30),
                ("gpu-0".to_owned(), Some(vms()[0].id.clone()), 0),
            ]
        );
    }
}
