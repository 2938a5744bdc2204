//! vGPU energy end to end: the real agent loads the fake `libnvidia-ml.so` (this host has no
//! GPU) through nvml-wrapper, and that library lists two vGPU instances on `gpu-1`: one
//! whose VM id is the UUID of a real libvirt TCG guest, at 50 % SM, and one of a VM that
//! runs nowhere, at 25 % SM. Each interval gpu-1's energy splits 50 / 25 / 25: the guest's
//! GPU joules are exactly half of gpu-1's, the unknown VM's quarter is unattributed, the
//! rest is idle, and per GPU VMs + unattributed + idle = the GPU's energy; with
//! `--idle-policy vcpus` the idle part goes to the running VMs by vCPUs. `optimus check`
//! says which VM each instance is charged to. Once the guest is gone its instance's share is
//! unattributed too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, run_text, Agent};
use optimus_tests::fakes::FakeNvml;
use optimus_tests::guest::{GuestImage, GuestPlan, READY_MARKER};
use optimus_tests::http::sample;
use optimus_tests::libvirt::{Domain, Libvirtd};
use optimus_tests::prometheus::promtool_check;

const BOOT: Duration = Duration::from_secs(90);
/// The VM of the second instance: no VM anywhere has this UUID.
const UNKNOWN_VM: &str = "0badc0de-0000-4000-8000-00000000abcd";
/// Float rounding only: each interval's shares are products of one energy and one ratio
/// (relative error about 1e-16), summed over a few hundred intervals at most.
const EXACT: f64 = 1e-9;

fn gpu(m: &str, family: &str, device: &str) -> f64 {
    sample(m, family, &[("zone", "gpu"), ("device", device)])
        .unwrap_or_else(|| panic!("no {family} for {device}:\n{m}"))
}

fn node(m: &str, device: &str) -> f64 {
    gpu(m, "optimus_node_energy_joules_total", device)
}

fn idle(m: &str, device: &str) -> f64 {
    gpu(m, "optimus_node_idle_energy_joules_total", device)
}

fn unattributed(m: &str, device: &str) -> f64 {
    gpu(m, "optimus_node_unattributed_energy_joules_total", device)
}

/// The VM's GPU joules from host NVML (0 when it has no series yet).
fn vm_gpu(m: &str, uuid: &str) -> f64 {
    sample(
        m,
        "optimus_vm_energy_joules_total",
        &[("vm_uuid", uuid), ("zone", "gpu"), ("source", "nvml")],
    )
    .unwrap_or(0.0)
}

/// Σ of every VM's GPU joules on the scrape.
fn all_vms_gpu(m: &str) -> f64 {
    optimus_tests::http::parse(m)
        .iter()
        .filter(|s| {
            s.name == "optimus_vm_energy_joules_total"
                && s.labels.get("zone").map(String::as_str) == Some("gpu")
        })
        .map(|s| s.value)
        .sum()
}

/// vCPUs of each running VM by UUID, from `optimus_vm_vcpus`.
fn vm_vcpus(m: &str) -> BTreeMap<String, f64> {
    optimus_tests::http::parse(m)
        .into_iter()
        .filter(|s| s.name == "optimus_vm_vcpus")
        .filter_map(|s| Some((s.labels.get("vm_uuid")?.clone(), s.value)))
        .collect()
}

fn assert_exact(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= EXACT * want.abs().max(1.0),
        "{what}: exported {got} J, the split says {want} J"
    );
    eprintln!("{what}: exported {got:.9} J = {want:.9} J");
}

/// Per GPU, VMs + unattributed + idle = node. VM series are summed over devices, so: with no
/// VM on gpu-0 (`gpu0_has_vms` false: it has no user and idle stays idle) gpu-0's part must
/// be 0 and gpu-1's is every VM's GPU joules; otherwise the VM parts of both GPUs add up to
/// every VM's GPU joules and neither is negative.
fn assert_conservation_per_gpu(m: &str, gpu0_has_vms: bool) {
    let vm_part = |device| node(m, device) - unattributed(m, device) - idle(m, device);
    if gpu0_has_vms {
        for device in ["gpu-0", "gpu-1"] {
            assert!(
                vm_part(device) >= -EXACT * node(m, device),
                "{device}: parts exceed node:\n{m}"
            );
        }
        assert_exact(
            "gpu-0 + gpu-1: VMs vs node - unattributed - idle",
            all_vms_gpu(m),
            vm_part("gpu-0") + vm_part("gpu-1"),
        );
    } else {
        assert_exact(
            "gpu-0: unattributed + idle vs node (no VM uses it)",
            unattributed(m, "gpu-0") + idle(m, "gpu-0"),
            node(m, "gpu-0"),
        );
        assert_exact(
            "gpu-1: VMs + unattributed + idle vs node",
            all_vms_gpu(m) + unattributed(m, "gpu-1") + idle(m, "gpu-1"),
            node(m, "gpu-1"),
        );
    }
}

#[test]
fn vgpu_instances_charge_their_vm_and_unknown_vms_stay_unattributed() {
    if optimus_tests::env::require_root("vgpu_instances_charge_their_vm").is_err() {
        return;
    }
    println!("vgpu test: FAKE libnvidia-ml.so with two vGPU instances, no GPU on this host");
    let image = GuestImage::ensure().unwrap();
    let libvirtd = Libvirtd::start().unwrap();
    let domain = Domain::create(
        &libvirtd,
        "optimus-vgpu",
        &image,
        &GuestPlan::default(),
        1,
        None,
    )
    .unwrap();
    domain.wait_for_console(READY_MARKER, BOOT).unwrap();
    let uuid = domain.uuid().to_owned();
    // The guest's instance under its UUID as NVML on KVM reports it (upper case, which the
    // agent must not mind); gpu-0 has no user (no host processes), so it is all idle.
    let nvml = FakeNvml::build(&format!(
        "processes off\n\
         vgpu 1 21 uuid {} - 50\n\
         vgpu 1 22 uuid {UNKNOWN_VM} - 25\n",
        uuid.to_ascii_uppercase()
    ))
    .unwrap();
    let lib = nvml.lib().to_str().unwrap();

    // `optimus check` names the VM each instance is charged to.
    let (ok, check) = run_text(
        Command::new(binary())
            .args([
                "check",
                "--libvirt-uri",
                libvirtd.uri(),
                "--nvml-library",
                lib,
            ])
            .stdin(Stdio::null()),
    );
    println!("{check}");
    assert!(ok, "optimus check failed:\n{check}");
    assert!(
        check.contains("2 instance(s) seen, 1 charged to a running VM by SM utilisation"),
        "{check}"
    );
    assert!(
        check.contains(&format!(
            "gpu-1 instance 21 (VM id {}, mdev unknown, SM 50 %): charged to VM \"optimus-vgpu\" ({uuid})",
            uuid.to_ascii_uppercase()
        )),
        "{check}"
    );
    let unknown =
        format!("gpu-1 instance 22 (VM id {UNKNOWN_VM}, mdev unknown, SM 25 %): no running VM");
    assert!(
        check
            .lines()
            .any(|l| l.starts_with("[warn] vGPU ") && l.contains(&unknown)),
        "{check}"
    );

    // --idle-policy vcpus: the idle GPU energy (gpu-1's unused quarter, all of gpu-0) goes to
    // the running VMs by vCPU count, as for every zone; the unknown VM's quarter stays
    // unattributed. Other VMs may run on this host and come and go (a retiring VM moves its
    // joules to unattributed), so each interval is checked on its own, with the VMs of that
    // sample: only intervals whose VM set equals the previous one's count, and three must.
    let agent = Agent::start(&[
        "--libvirt-uri",
        libvirtd.uri(),
        "--nvml-library",
        lib,
        "--idle-policy",
        "vcpus",
    ]);
    agent.wait_for(Duration::from_secs(30), "the guest's GPU energy", |m| {
        vm_gpu(m, &uuid) > 0.0
    });
    let samples = |m: &str| sample(m, "optimus_samples_total", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut clean, mut skipped) = (0, 0);
    let mut m0 = agent.next_sample();
    while clean < 3 {
        assert!(
            Instant::now() < deadline,
            "only {clean} of {} intervals in 120 s had a steady VM set and no missed sample",
            clean + skipped
        );
        let m1 = agent.next_sample();
        let vms = vm_vcpus(&m1);
        if samples(&m1) - samples(&m0) != 1.0 || vm_vcpus(&m0) != vms {
            skipped += 1;
            m0 = m1;
            continue;
        }
        let d = |f: fn(&str, &str) -> f64, device| f(&m1, device) - f(&m0, device);
        let (de0, de1) = (d(node, "gpu-0"), d(node, "gpu-1"));
        assert_eq!(
            (d(idle, "gpu-0"), d(idle, "gpu-1")),
            (0.0, 0.0),
            "idle left:\n{m1}"
        );
        assert_exact(
            "gpu-1 unattributed vs the unknown VM's quarter (idle policy vcpus)",
            d(unattributed, "gpu-1"),
            0.25 * de1,
        );
        let share = vms[&uuid] / vms.values().sum::<f64>();
        assert_exact(
            "guest's GPU joules vs its half of gpu-1 + its vCPU share of the idle (idle policy vcpus)",
            vm_gpu(&m1, &uuid) - vm_gpu(&m0, &uuid),
            0.5 * de1 + (0.25 * de1 + de0) * share,
        );
        assert_conservation_per_gpu(&m1, true);
        clean += 1;
        m0 = m1;
    }
    println!("idle policy vcpus: {clean} intervals checked, {skipped} skipped (VM churn or a missed sample)");
    drop(agent);

    // --idle-policy none (the default): other VMs never get GPU energy, so the checks hold
    // over a window whatever else runs here.
    let agent = Agent::start(&["--libvirt-uri", libvirtd.uri(), "--nvml-library", lib]);
    agent.wait_for(Duration::from_secs(30), "the guest's GPU energy", |m| {
        vm_gpu(m, &uuid) > 0.0
    });
    let m0 = agent.next_sample();
    std::thread::sleep(Duration::from_secs(3));
    let m1 = agent.next_sample();
    promtool_check(&m1).unwrap();
    for line in m1
        .lines()
        .filter(|l| l.contains("zone=\"gpu\"") && !l.starts_with('#'))
    {
        println!("{line}");
    }

    let d = |f: fn(&str, &str) -> f64, device| f(&m1, device) - f(&m0, device);
    let de = d(node, "gpu-1");
    assert!(de > 0.0, "gpu-1 reported no energy in 3 s");
    // 50 % of gpu-1 to the guest, 25 % (the unknown VM) to unattributed, 25 % idle.
    assert_exact(
        "guest's GPU joules vs half of gpu-1's",
        vm_gpu(&m1, &uuid) - vm_gpu(&m0, &uuid),
        0.5 * de,
    );
    assert_exact(
        "gpu-1 unattributed vs the unknown VM's quarter",
        d(unattributed, "gpu-1"),
        0.25 * de,
    );
    assert_exact(
        "gpu-1 idle vs the unused quarter",
        d(idle, "gpu-1"),
        0.25 * de,
    );
    // gpu-0: its counter advances exactly 5 J per sample, all idle.
    let de0 = d(node, "gpu-0");
    assert!(
        de0 >= 5.0 && (de0 / 5.0 - (de0 / 5.0).round()).abs() < 1e-9,
        "gpu-0 advanced {de0} J, not a whole number of 5 J samples"
    );
    assert_exact("gpu-0 idle vs node", d(idle, "gpu-0"), de0);
    assert_conservation_per_gpu(&m1, false);

    // The guest goes: its series leave, its joules and its instance's share go to
    // unattributed, and conservation still holds per GPU.
    domain.destroy().unwrap();
    agent.wait_for(
        Duration::from_secs(30),
        "the guest's series to vanish",
        |m| !m.contains(&uuid),
    );
    let m2 = agent.next_sample();
    std::thread::sleep(Duration::from_secs(2));
    let m3 = agent.next_sample();
    let de = node(&m3, "gpu-1") - node(&m2, "gpu-1");
    assert_exact(
        "gpu-1 unattributed after the guest left vs both instances' 75 %",
        unattributed(&m3, "gpu-1") - unattributed(&m2, "gpu-1"),
        0.75 * de,
    );
    assert!(
        !m3.contains(&uuid),
        "the destroyed guest still has series:\n{m3}"
    );
    assert_conservation_per_gpu(&m3, false);
}
