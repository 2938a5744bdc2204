//! The `/metrics` contract: a fixed snapshot in, exact text out (golden file), and
//! `promtool check metrics` finds nothing to complain about.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use optimus_common::{BLOCK_DIR_FLUSH, BLOCK_DIR_READ, BLOCK_DIR_WRITE};

use super::{render, to_classic};
use crate::discovery::{VmId, VmSource};
use crate::energy::{MeterSource, MeterState, MeterStatus, Zone, ZoneKey};
use crate::sampler::blockio::{DeviceIo, Io};
use crate::sampler::carbon::CarbonSnapshot;
use crate::sampler::energy::{EnergySnapshot, NodeZone};
use crate::sampler::{AgentStats, NodeSnapshot, Snapshot, VmSnapshot};

fn fixture() -> Snapshot {
    let odd = VmId {
        name: "web \"prod\" \\ ü".into(),
        uuid: "6695eb01-f6a4-8304-79aa-97f2502e193f".into(),
    };
    let plain = VmId {
        name: "plain".into(),
        uuid: "pid-4242".into(),
    };
    let io = |bytes, ops| Io { bytes, ops };
    let pkg = ZoneKey::new(Zone::Package, "package-0", MeterSource::RaplPowercap);
    let dram = ZoneKey::new(Zone::Dram, "package-0", MeterSource::RaplPowercap);
    let mut vm_energy = BTreeMap::new();
    vm_energy.insert(
        odd.clone(),
        BTreeMap::from([
            ((Zone::Package, "rapl-powercap"), (120.5, 12.25)),
            ((Zone::Dram, "rapl-powercap"), (10.0, 1.0)),
        ]),
    );
    Snapshot {
        vms: vec![
            VmSnapshot {
                id: odd.clone(),
                source: VmSource::Libvirt,
                cpu_seconds_by_kind: [12.5, 0.75, 0.0, 0.125, 0.0],
                vcpu_seconds: BTreeMap::from([(0, 12.0), (1, 0.5)]),
                block_io: [io(1 << 20, 16), io(48 << 20, 48)],
                vcpus: Some(2),
                memory_bytes: Some(2 << 30),
                namespace: None,
            },
            VmSnapshot {
                id: plain,
                source: VmSource::Proc,
                cpu_seconds_by_kind: [1.0, 0.25, 0.0, 0.0, 0.0],
                vcpu_seconds: BTreeMap::from([(0, 1.0)]),
                block_io: [io(0, 0), io(0, 0)],
                vcpus: Some(1),
                memory_bytes: None,
                namespace: None,
            },
            // QEMU without debug-threads=on: its vCPU threads are not known.
            VmSnapshot {
                id: VmId {
                    name: "no-debug-threads".into(),
                    uuid: "0b7c1f3e-6a55-4d0e-9c61-5f0e2a9d7c11".into(),
                },
                source: VmSource::Proc,
                cpu_seconds_by_kind: [0.0, 0.5, 0.0, 0.0, 8.5],
                vcpu_seconds: BTreeMap::new(),
                block_io: [io(0, 0), io(0, 0)],
                vcpus: None,
                memory_bytes: None,
                namespace: None,
            },
        ],
        energy: Some(EnergySnapshot {
            zones: vec![
                NodeZone {
                    key: pkg,
                    joules: Some(1000.0),
                    watts: Some(42.5),
                    wraps: 1,
                    glitches: 2,
                    idle_joules: 600.0,
                    unattributed_joules: 279.5,
                },
                NodeZone {
                    key: dram,
                    joules: None,
                    watts: None,
                    wraps: 0,
                    glitches: 0,
                    idle_joules: 20.0,
                    unattributed_joules: 5.0,
                },
            ],
            vms: vm_energy,
            vm_interval_joules: BTreeMap::new(),
            meters: vec![MeterStatus {
                source: MeterSource::RaplPowercap,
                state: MeterState::Active,
                detail: String::new(),
            }],
            model: vec![
                crate::model::ZoneModelStatus {
                    zone: crate::energy::Zone::Package,
                    device: "package-0".into(),
                    error_ratio: Some(0.0125),
                    samples: 3600,
                    extrapolated: None,
                },
                crate::model::ZoneModelStatus {
                    zone: crate::energy::Zone::Dram,
                    device: "package-0".into(),
                    error_ratio: None,
                    samples: 12,
                    extrapolated: Some(3),
                },
            ],
            forecasts: BTreeMap::from([(
                odd.clone(),
                crate::model::forecast::VmForecast {
                    watts: [12.5, 9.75],
                    seasonal: true,
                },
            )]),
            forecast_error: [Some(0.08), None],
        }),
        carbon: Some(CarbonSnapshot {
            intensity: Some((212.0, "DE".into(), "electricitymaps")),
            age_seconds: Some(30.0),
            vm_grams: BTreeMap::from([(odd.clone(), 7.5)]),
            errors: BTreeMap::from([("http_429", 2)]),
            forecast: vec![(1, 200.0), (6, 150.5), (24, 240.0)],
        }),
        block_devices: BTreeMap::from([
            (
                ("vda".to_owned(), BLOCK_DIR_READ),
                DeviceIo {
                    total: io(2 << 20, 20),
                    vms: io(1 << 20, 16),
                    vm_writeback: io(0, 0),
                    unattributed: io(4096, 1),
                    processes: io((1 << 20) - 4096, 3),
                },
            ),
            (
                ("vda".to_owned(), BLOCK_DIR_WRITE),
                DeviceIo {
                    total: io(64 << 20, 70),
                    vms: io(48 << 20, 48),
                    vm_writeback: io(8 << 20, 2),
                    unattributed: io(16 << 20, 22),
                    processes: io(0, 0),
                },
            ),
            (
                ("vda".to_owned(), BLOCK_DIR_FLUSH),
                DeviceIo {
                    total: io(0, 5),
                    ..DeviceIo::default()
                },
            ),
        ]),
        node: NodeSnapshot {
            cpus: 8,
            memory_bytes: Some(32 << 30),
            memory_available_bytes: Some(20 << 30),
            cpu_busy_seconds: Some(1234.5),
        },
        agent: AgentStats {
            cpu_seconds: 1.5,
            resident_bytes: 12 << 20,
            sched_switch_events: 123_456,
            ebpf_dropped: 0,
            samples: 60,
            last_sample_seconds: 0.002,
            sample_errors: BTreeMap::from([("proc", 3), ("tracer", 1)]),
            identity_conflicts: 1,
            vms_over_limit: 2,
            discovery_rescan_missed: 4,
        },
        // One VM in a phase, so the golden file holds the phase families too.
        phases: BTreeMap::from([(odd, phase_ledger())]),
        guest_channels: BTreeMap::new(),
        guest_view: None,
    }
}

/// A VM that spent 1 s in no phase, then 2.5 s (0.5 J) in `train`, where it is now.
fn phase_ledger() -> crate::phase::PhaseLedger {
    use crate::phase::{parse_line, PhaseLedger, Usage};
    let cum = |cpu_ns: u64, uj: u64| Usage {
        cpu_ns,
        energy_uj: BTreeMap::from([((Zone::Package, "rapl-powercap"), uj)]),
        ..Usage::default()
    };
    let mut l = PhaseLedger::new(0, Usage::default(), 10);
    l.observe(1, &cum(1_000_000_000, 2_000_000));
    l.switch(1, parse_line(b"train epoch=7").unwrap().unwrap());
    l.observe(2, &cum(3_500_000_000, 2_500_000));
    l
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(name)
}

/// Compares with the golden file; `UPDATE_GOLDEN=1` rewrites it (review the diff!).
fn assert_golden(name: &str, text: &str) {
    let path = golden(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1", path.display()));
    assert!(
        text == want,
        "/metrics differs from {}; rerun with UPDATE_GOLDEN=1 and review the diff:\n{text}",
        path.display()
    );
}

#[test]
fn golden_openmetrics_and_classic() {
    let om = render(&fixture()).unwrap();
    assert_golden("metrics.openmetrics.txt", &om);
    assert_golden("metrics.prom", &to_classic(&om));
}

#[test]
fn label_values_are_escaped() {
    let om = render(&fixture()).unwrap();
    assert!(om.contains(r#"vm_name="web \"prod\" \\ ü""#), "{om}");
}

#[test]
fn vm_without_known_vcpus_has_unclassified_time_and_no_vcpu_series() {
    let om = render(&fixture()).unwrap();
    let of = |vm: &str| -> Vec<&str> {
        om.lines()
            .filter(|l| l.contains(&format!("vm_name=\"{vm}\"")) && l.contains("cpu_seconds"))
            .collect()
    };
    let plain = of("no-debug-threads");
    assert!(
        plain
            .iter()
            .any(|l| l.contains(r#"thread_kind="unclassified"} 8.5"#)),
        "{plain:?}"
    );
    assert!(
        plain.iter().all(|l| !l.contains("vcpu")
            || l.contains("optimus_vm_cpu") && !l.contains(r#"thread_kind="vcpu""#)),
        "{plain:?}"
    );
    assert!(
        !plain.iter().any(|l| l.starts_with("optimus_vcpu_cpu")),
        "{plain:?}"
    );
    // A VM with known vCPUs has no unclassified series.
    assert!(of("plain").iter().all(|l| !l.contains("unclassified")));
}

#[test]
fn sample_errors_by_source_start_at_zero() {
    let mut snapshot = fixture();
    snapshot.agent.sample_errors.clear();
    let om = render(&snapshot).unwrap();
    for source in super::SAMPLE_ERROR_SOURCES {
        assert!(
            om.contains(&format!(
                "optimus_sample_errors_total{{source=\"{source}\"}} 0"
            )),
            "{source}: {om}"
        );
    }
}

#[test]
fn unavailable_zone_has_no_energy_series() {
    let om = render(&fixture()).unwrap();
    assert!(!om.contains(r#"optimus_node_energy_joules_total{zone="dram""#));
    assert!(om.contains(
        r#"optimus_node_energy_zone_available{zone="dram",device="package-0",source="rapl-powercap"} 0.0"#
    ));
}

#[test]
fn promtool_finds_nothing_to_complain_about() {
    let text = to_classic(&render(&fixture()).unwrap());
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "promtool: {e}");
            eprintln!("SKIPPED promtool_finds_nothing_to_complain_about: promtool: {e}");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A KubeVirt VM carries `vm_namespace` on every one of its series, right after its UUID;
/// no other VM gets the label (so their series, and the golden text, stay as they were).
#[test]
fn kubevirt_vm_series_carry_vm_namespace_and_only_they() {
    let mut snapshot = fixture();
    snapshot.vms[0].namespace = Some("tenant-a".into());
    let text = to_classic(&render(&snapshot).unwrap());
    let uuid = "vm_uuid=\"6695eb01-f6a4-8304-79aa-97f2502e193f\"";
    let mut families = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.contains(uuid) {
            assert!(
                line.contains(&format!("{uuid},vm_namespace=\"tenant-a\"")),
                "{line}"
            );
            families.insert(line.split('{').next().unwrap().to_owned());
        } else {
            assert!(!line.contains("vm_namespace"), "{line}");
        }
    }
    for family in [
        "optimus_vm_info",
        "optimus_vm_cpu_seconds_total",
        "optimus_vcpu_cpu_seconds_total",
        "optimus_vm_block_io_bytes_total",
        "optimus_vm_block_io_operations_total",
        "optimus_vm_energy_joules_total",
        "optimus_vm_power_watts",
        "optimus_vm_carbon_grams_total",
        "optimus_vm_vcpus",
        "optimus_vm_memory_bytes",
        "optimus_vm_phase_cpu_seconds_total",
        "optimus_vm_phase_energy_joules_total",
        "optimus_vm_phase_info",
    ] {
        assert!(
            families.contains(family),
            "{family} lacks the VM: {families:?}"
        );
    }
}
