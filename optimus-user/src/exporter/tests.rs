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
use crate::sampler::{AgentStats, Snapshot, VmSnapshot};

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
                cpu_seconds_by_kind: [12.5, 0.75, 0.0, 0.125],
                vcpu_seconds: BTreeMap::from([(0, 12.0), (1, 0.5)]),
                block_io: [io(1 << 20, 16), io(48 << 20, 48)],
            },
            VmSnapshot {
                id: plain,
                source: VmSource::Proc,
                cpu_seconds_by_kind: [1.0, 0.25, 0.0, 0.0],
                vcpu_seconds: BTreeMap::from([(0, 1.0)]),
                block_io: [io(0, 0), io(0, 0)],
            },
        ],
        energy: Some(EnergySnapshot {
            zones: vec![
                NodeZone {
                    key: pkg,
                    joules: Some(1000.0),
                    watts: Some(42.5),
                    wraps: 1,
                    idle_joules: 600.0,
                    unattributed_joules: 279.5,
                },
                NodeZone {
                    key: dram,
                    joules: None,
                    watts: None,
                    wraps: 0,
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
        }),
        carbon: Some(CarbonSnapshot {
            intensity: Some((212.0, "DE".into(), "electricitymaps")),
            age_seconds: Some(30.0),
            vm_grams: BTreeMap::from([(odd, 7.5)]),
            errors: BTreeMap::from([("http_429", 2)]),
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
        agent: AgentStats {
            cpu_seconds: 1.5,
            resident_bytes: 12 << 20,
            sched_switch_events: 123_456,
            ebpf_dropped: 0,
            samples: 60,
            last_sample_seconds: 0.002,
            sample_errors: 0,
        },
    }
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
