//! Per-vCPU CPU time of real TCG guests, under libvirt and as a plain QEMU, against the
//! kernel's own accounting (`/proc/<pid>/task/<tid>/schedstat`), scraped by the agent and by
//! a real Prometheus server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{assert_close, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan};
use optimus_tests::http::sample;
use optimus_tests::libvirt::{Domain, Libvirtd};
use optimus_tests::proc::{schedstat_ns, vcpu_tids};
use optimus_tests::prometheus::{promtool_check, value, Prometheus};
use optimus_tests::qemu::PlainQemu;

const WINDOW: Duration = Duration::from_secs(10);
const BOOT: Duration = Duration::from_secs(90);

fn busy_vcpu0() -> GuestPlan {
    GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    }
}

/// Over `WINDOW`, each vCPU's exported seconds move like its thread's schedstat (2 %), and
/// the idle vCPU 1 runs far less than the busy vCPU 0.
fn check_vcpus_against_schedstat(agent: &Agent, name: &str, uuid: &str, pid: u32) {
    let tids = vcpu_tids(pid).unwrap();
    assert_eq!(tids.len(), 2, "expected 2 vCPU threads, got {tids:?}");
    let labels = |n: &'static str| [("vm_name", name), ("vm_uuid", uuid), ("vcpu", n)];
    let read = |m: &str| -> (BTreeMap<u32, f64>, BTreeMap<u32, f64>) {
        let exported = [(0, "0"), (1, "1")]
            .into_iter()
            .map(|(i, n)| {
                let v = sample(m, "optimus_vcpu_cpu_seconds_total", &labels(n))
                    .unwrap_or_else(|| panic!("no vCPU {n} series for {name:?} in:\n{m}"));
                (i, v)
            })
            .collect();
        #[expect(clippy::cast_precision_loss, reason = "ns to s")]
        let kernel = tids
            .iter()
            .map(|(i, tid)| (*i, schedstat_ns(pid, *tid).unwrap() as f64 / 1e9))
            .collect();
        (exported, kernel)
    };
    let (e0, k0) = read(&agent.next_sample());
    std::thread::sleep(WINDOW);
    let (e1, k1) = read(&agent.next_sample());
    let d = |a: &BTreeMap<u32, f64>, b: &BTreeMap<u32, f64>, i| b[&i] - a[&i];
    let (busy, idle) = (d(&e0, &e1, 0), d(&e0, &e1, 1));
    assert_close("vCPU 0 (busy) seconds", busy, d(&k0, &k1, 0), 0.02);
    // The idle vCPU's few milliseconds: 2 % or 20 ms, whichever is larger.
    let kidle = d(&k0, &k1, 1);
    assert!(
        (idle - kidle).abs() <= (0.02 * kidle).max(0.02),
        "vCPU 1 (idle): exported {idle:.4} s, schedstat {kidle:.4} s"
    );
    assert!(
        busy > 0.5 * WINDOW.as_secs_f64(),
        "busy vCPU ran only {busy:.2} s in {WINDOW:?}"
    );
    assert!(
        idle < 0.25 * busy,
        "idle vCPU ({idle:.3} s) not well below busy vCPU ({busy:.3} s)"
    );
}

fn wait_gone(agent: &Agent, uuid: &str) {
    // Two sampling intervals, plus the scrape's own latency.
    agent.wait_for(
        Duration::from_millis(2500),
        "the VM's series to vanish",
        |m| !m.contains(uuid),
    );
}

#[test]
fn libvirt_guest_vcpu_seconds_match_schedstat_and_reach_prometheus() {
    if optimus_tests::env::require_root("libvirt_guest_vcpu_seconds_match_schedstat").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let libvirtd = Libvirtd::start().unwrap();
    let agent = Agent::start(&["--libvirt-uri", libvirtd.uri()]);
    // A name that needs escaping in labels: quote, backslash, space, non-ASCII.
    let name = "optimus \"cpu\" \\ ü";
    let domain = Domain::create(&libvirtd, name, &image, &busy_vcpu0(), 2, None).unwrap();
    domain
        .wait_for_console(optimus_tests::guest::READY_MARKER, BOOT)
        .unwrap();
    let uuid = domain.uuid().to_owned();
    let info = [
        ("vm_name", name),
        ("vm_uuid", uuid.as_str()),
        ("source", "libvirt"),
    ];
    let scrape = agent.wait_for(Duration::from_secs(10), "the libvirt VM", |m| {
        sample(m, "optimus_vm_info", &info) == Some(1.0)
    });
    promtool_check(&scrape).unwrap();

    check_vcpus_against_schedstat(&agent, name, &uuid, domain.qemu_pid().unwrap());

    // A real Prometheus scrapes the agent (OpenMetrics) and answers PromQL about the guest.
    let prom = Prometheus::start(&agent.addr, Duration::from_secs(1)).unwrap();
    let q = format!("optimus_vcpu_cpu_seconds_total{{vm_uuid=\"{uuid}\"}}");
    let result = prom
        .query_until(&q, Duration::from_secs(30), |r| r.len() == 2)
        .unwrap();
    for item in &result {
        assert_eq!(item["metric"]["vm_name"].as_str(), Some(name));
        assert!(value(item).is_some_and(|v| v > 0.0), "{item}");
    }
    let kinds = prom
        .query_until(
            &format!("optimus_vm_cpu_seconds_total{{vm_uuid=\"{uuid}\"}}"),
            Duration::from_secs(10),
            |r| r.len() == 4,
        )
        .unwrap();
    assert_eq!(kinds.len(), 4, "one series per thread kind");

    domain.destroy().unwrap();
    wait_gone(&agent, &uuid);
}

#[test]
fn plain_qemu_vcpu_seconds_match_schedstat() {
    if optimus_tests::env::require_root("plain_qemu_vcpu_seconds_match_schedstat").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let agent = Agent::start(&["--libvirt-uri", ""]);
    let uuid = "0b7c1f3e-6a55-4d0e-9c61-5f0e2a9d7c11";
    let name = "plain, \"odd\" qemu";
    let qemu = PlainQemu::spawn(name, Some(uuid), &image, &busy_vcpu0(), 2, None).unwrap();
    qemu.wait_for_console(optimus_tests::guest::READY_MARKER, BOOT)
        .unwrap();
    let info = [("vm_name", name), ("vm_uuid", uuid), ("source", "proc")];
    let scrape = agent.wait_for(Duration::from_secs(10), "the plain QEMU VM", |m| {
        sample(m, "optimus_vm_info", &info) == Some(1.0)
    });
    promtool_check(&scrape).unwrap();

    check_vcpus_against_schedstat(&agent, name, uuid, qemu.pid());

    drop(qemu);
    wait_gone(&agent, uuid);
}
