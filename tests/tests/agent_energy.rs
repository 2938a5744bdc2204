//! Energy end to end: the real agent reads a fixture powercap tree (this host has no RAPL)
//! whose counters the test advances, while a real TCG guest keeps one vCPU busy. Checks
//! exact node joules across a counter wrap, an unreadable zone reported unavailable (never
//! zero), the guest's share of active energy, and the conservation identity on the scrape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_close, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan, READY_MARKER};
use optimus_tests::http::{parse, sample};
use optimus_tests::prometheus::promtool_check;
use optimus_tests::qemu::PlainQemu;

/// `max_energy_range_uj` of the fixture: small enough that the package counter wraps
/// during the test.
const MAX_RANGE: u64 = 60_000_000;
/// Per 10 ms step: 0.2 J on the package (20 W), 0.05 J on dram (5 W).
const PKG_STEP: u64 = 200_000;
const DRAM_STEP: u64 = 50_000;

struct Zone {
    dir: PathBuf,
}

impl Zone {
    fn new(dir: PathBuf, name: &str, start: u64) -> Zone {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(dir.join("max_energy_range_uj"), format!("{MAX_RANGE}\n")).unwrap();
        let z = Zone { dir };
        z.set(start);
        z
    }
    fn set(&self, uj: u64) {
        // Write-then-rename: the agent never reads a half-written number.
        let tmp = self.dir.join("energy_uj.tmp");
        std::fs::write(&tmp, format!("{uj}\n")).unwrap();
        std::fs::rename(&tmp, self.dir.join("energy_uj")).unwrap();
    }
    fn set_raw(&self, text: &str) {
        std::fs::write(self.dir.join("energy_uj"), text).unwrap();
    }
}

/// Advances both counters every 10 ms (modulo the range, as RAPL does) until stopped;
/// counts the steps so the test knows the exact energy.
fn spawn_writer(
    pkg: Zone,
    dram: Zone,
    pkg_start: u64,
    steps: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    dram_broken: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Zone, Zone)> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let n = steps.fetch_add(1, Ordering::Relaxed) + 1;
            pkg.set((pkg_start + n * PKG_STEP) % (MAX_RANGE + 1));
            if !dram_broken.load(Ordering::Relaxed) {
                dram.set((n * DRAM_STEP) % (MAX_RANGE + 1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (pkg, dram)
    })
}

fn node(m: &str, zone: &str) -> Option<f64> {
    sample(
        m,
        "optimus_node_energy_joules_total",
        &[("zone", zone), ("source", "rapl-powercap")],
    )
}

/// Σ VMs + unattributed + idle = node, per zone, on one scrape.
fn assert_conservation(m: &str, zone: &str) {
    let samples = parse(m);
    let sum = |name: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name && s.labels.get("zone").map(String::as_str) == Some(zone))
            .map(|s| s.value)
            .sum()
    };
    let node = sum("optimus_node_energy_joules_total");
    let parts = sum("optimus_vm_energy_joules_total")
        + sum("optimus_node_unattributed_energy_joules_total")
        + sum("optimus_node_idle_energy_joules_total");
    assert!(
        (node - parts).abs() <= 1e-6 * node.max(1.0),
        "zone {zone}: node {node} J but VMs + unattributed + idle = {parts} J"
    );
    eprintln!("conservation {zone}: node {node:.6} J = parts {parts:.6} J");
}

fn vm_cpu_seconds(m: &str, uuid: &str) -> f64 {
    parse(m)
        .iter()
        .filter(|s| {
            s.name == "optimus_vm_cpu_seconds_total"
                && s.labels.get("vm_uuid").map(String::as_str) == Some(uuid)
        })
        .map(|s| s.value)
        .sum()
}

fn ncpus() -> f64 {
    let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    f64::from(u32::try_from(n).unwrap())
}

#[test]
fn powercap_fixture_exact_joules_wrap_unavailable_and_guest_share() {
    if optimus_tests::env::require_root("powercap_fixture_exact_joules").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let root = tempfile::tempdir().unwrap();
    let pkg_dir = root.path().join("intel-rapl:0");
    // Starts 5 J below the range: the counter wraps about 0.25 s into the run.
    let pkg_start = MAX_RANGE - 5_000_000;
    let pkg = Zone::new(pkg_dir.clone(), "package-0", pkg_start);
    let dram = Zone::new(pkg_dir.join("intel-rapl:0:0"), "dram", 0);

    let uuid = "3f6b2c1d-8e9a-4b5c-a1d2-e3f4a5b6c7d8";
    let qemu = PlainQemu::spawn(
        "energy-guest",
        Some(uuid),
        &image,
        &GuestPlan {
            busy_vcpus: vec![0],
            io: None,
        },
        2,
        None,
    )
    .unwrap();
    qemu.wait_for_console(READY_MARKER, Duration::from_secs(90))
        .unwrap();
    let powercap: &Path = root.path();
    let agent = Agent::start(&[
        "--libvirt-uri",
        "",
        "--no-nvml",
        "--powercap-root",
        powercap.to_str().unwrap(),
        "--carbon-intensity",
        "300",
        "--pue",
        "1.5",
    ]);
    let steps = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let dram_broken = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(
        pkg,
        dram,
        pkg_start,
        steps.clone(),
        stop.clone(),
        dram_broken.clone(),
    );
    agent.wait_for(Duration::from_secs(10), "the VM's package energy", |m| {
        sample(
            m,
            "optimus_vm_energy_joules_total",
            &[("vm_uuid", uuid), ("zone", "package")],
        )
        .is_some()
    });

    // The guest's share: over 10 s at constant power, its joules are the active energy
    // times its share of the CPUs: ΔE × Δcpu_vm / (ncpus × Δt).
    let m0 = agent.next_sample();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let m1 = agent.next_sample();
    let dt = t0.elapsed().as_secs_f64();
    let vm_j = |m: &str| {
        sample(
            m,
            "optimus_vm_energy_joules_total",
            &[
                ("vm_uuid", uuid),
                ("zone", "package"),
                ("source", "rapl-powercap"),
            ],
        )
        .unwrap()
    };
    let de = node(&m1, "package").unwrap() - node(&m0, "package").unwrap();
    let dcpu = vm_cpu_seconds(&m1, uuid) - vm_cpu_seconds(&m0, uuid);
    assert_close(
        "guest package joules vs its CPU share of the node's energy",
        vm_j(&m1) - vm_j(&m0),
        de * dcpu / (ncpus() * dt),
        0.02,
    );
    // Carbon: the VM's package + dram joules at 300 g/kWh and PUE 1.5.
    let vm_zone = |m: &str, zone| {
        sample(
            m,
            "optimus_vm_energy_joules_total",
            &[("vm_uuid", uuid), ("zone", zone)],
        )
        .unwrap_or(0.0)
    };
    let grams = |m: &str| sample(m, "optimus_vm_carbon_grams_total", &[("vm_uuid", uuid)]).unwrap();
    let dj = vm_zone(&m1, "package") - vm_zone(&m0, "package") + vm_zone(&m1, "dram")
        - vm_zone(&m0, "dram");
    assert_close(
        "VM grams CO2eq vs its joules x 300 g/kWh x PUE 1.5",
        grams(&m1) - grams(&m0),
        dj / 3.6e6 * 300.0 * 1.5,
        1e-6,
    );
    assert_eq!(
        sample(
            &m1,
            "optimus_grid_carbon_intensity_grams_per_kwh",
            &[("source", "static")]
        ),
        Some(300.0)
    );
    promtool_check(&m1).unwrap();
    for zone in ["package", "dram"] {
        assert_conservation(&m1, zone);
    }
    let wraps = sample(
        &m1,
        "optimus_node_energy_wraps_total",
        &[("zone", "package")],
    )
    .unwrap();
    assert!(
        wraps >= 1.0,
        "the package counter wrapped but wraps = {wraps}"
    );

    // An unreadable zone: reported unavailable, its energy series absent (never 0 W).
    dram_broken.store(true, Ordering::Relaxed);
    let writer_dram = root.path().join("intel-rapl:0/intel-rapl:0:0");
    std::fs::write(writer_dram.join("energy_uj"), "garbage\n").unwrap();
    let m = agent.wait_for(Duration::from_secs(5), "dram to be unavailable", |m| {
        sample(m, "optimus_node_energy_zone_available", &[("zone", "dram")]) == Some(0.0)
    });
    assert!(
        node(&m, "dram").is_none(),
        "unavailable dram still exported"
    );
    assert!(
        sample(&m, "optimus_node_power_watts", &[("zone", "dram")]).is_none(),
        "unavailable dram exported a power"
    );
    assert_conservation(&m, "package");

    // Stop the counters: after two more samples the node's joules are exactly the energy
    // the fixture advanced by, across the wrap.
    stop.store(true, Ordering::Relaxed);
    let (_pkg, dram) = writer.join().unwrap();
    dram.set_raw("0\n");
    let n = steps.load(Ordering::Relaxed);
    agent.next_sample();
    let m = agent.next_sample();
    #[expect(clippy::cast_precision_loss, reason = "test arithmetic")]
    let want = (n * PKG_STEP) as f64 / 1e6;
    let got = node(&m, "package").unwrap();
    assert!(
        (got - want).abs() < 1e-6,
        "package joules {got}, the fixture advanced exactly {want}"
    );
    eprintln!("package joules after {n} steps and a wrap: {got} (exact: {want})");
    assert_conservation(&m, "package");
    drop(qemu);
}
