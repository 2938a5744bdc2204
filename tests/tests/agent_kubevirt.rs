//! A KubeVirt VM as the host sees it: a real QEMU started the way virt-launcher starts it
//! (`-name guest=<namespace>_<name>`, KubeVirt's `-smbios`, a disk under
//! /var/run/kubevirt*) is exported with `vm_name` = the VM's name and `vm_namespace` = its
//! namespace; a plain QEMU beside it with an underscore in its name gets neither.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::Agent;
use optimus_tests::env::{require_root, require_tools};
use optimus_tests::http::sample;
use optimus_tests::proc::ChildGuard;

/// A QEMU that never runs a guest (`-S`: vCPUs stopped) but has its threads and its
/// command line, which is all discovery reads.
fn qemu(name: &str, uuid: &str, extra: &[&str]) -> ChildGuard {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "64", "-smp", "1", "-S"])
        .args(["-display", "none", "-monitor", "none", "-serial", "none"])
        .args(["-nodefaults", "-no-user-config"])
        .args([
            "-name",
            &format!("guest={name},debug-threads=on"),
            "-uuid",
            uuid,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    ChildGuard::spawn(cmd).unwrap()
}

#[test]
fn kubevirt_vm_gets_its_namespace_and_name_others_do_not() {
    if require_root("kubevirt_vm_gets_its_namespace_and_name").is_err() {
        return;
    }
    require_tools(&[("qemu-system-x86_64", "qemu-system-x86")]).unwrap();
    let kubevirt_uuid = "bc8c54d2-dd77-5f22-b862-c33d929c03ea";
    let plain_uuid = "1f0e2d3c-4b5a-4697-8877-665544332211";
    let smbios =
        format!("type=1,manufacturer=KubeVirt,product=None,uuid={kubevirt_uuid},family=KubeVirt");
    let _kubevirt = qemu("tenant-a_vm-ubuntu-1", kubevirt_uuid, &["-smbios", &smbios]);
    let _plain = qemu("web_01", plain_uuid, &[]);
    let agent = Agent::start(&["--libvirt-uri", ""]);
    let kubevirt_info = [
        ("vm_name", "vm-ubuntu-1"),
        ("vm_uuid", kubevirt_uuid),
        ("vm_namespace", "tenant-a"),
        ("source", "proc"),
    ];
    let scrape = agent.wait_for(Duration::from_secs(10), "both QEMUs", |m| {
        sample(m, "optimus_vm_info", &kubevirt_info) == Some(1.0) && m.contains(plain_uuid)
    });
    let plain_lines: Vec<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(plain_uuid))
        .collect();
    assert!(!plain_lines.is_empty());
    for line in &plain_lines {
        assert!(
            line.contains("vm_name=\"web_01\"") && !line.contains("vm_namespace"),
            "{line}"
        );
    }
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(kubevirt_uuid))
    {
        assert!(line.contains("vm_namespace=\"tenant-a\""), "{line}");
        assert!(line.contains("vm_name=\"vm-ubuntu-1\""), "{line}");
    }
}
