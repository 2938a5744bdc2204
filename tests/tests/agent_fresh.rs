//! Freshness: a new QEMU's threads are charged from their first switch, with no slice lost
//! while they wait for a discovery scan: the process from its exec, a thread it starts later
//! from its creation.
//!
//! The QEMU is the bench's stand-in (tests/fixtures/bench/fake_qemu.c, compiled here as
//! `qemu-system-x86_64`, root-owned so discovery trusts it): its main thread burns 1.5 s of
//! CPU right after exec, before any thread is named; on SIGUSR1 it starts a thread
//! `CPU 1/KVM` that burns 1.5 s and then sleeps. Both are started right after a sample, so a
//! tracer that waited for the next scan (about one 1 s interval later) would miss most of a
//! second of each: exported at most about 0.5 s of 1.5 s. Both burners then sleep, so their
//! schedstat totals stand still and the comparison needs no alignment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Agent;
use optimus_tests::http::sample;
use optimus_tests::proc::{schedstat_ns, signal, ChildGuard};

const FAKE_QEMU_C: &str = include_str!("../fixtures/bench/fake_qemu.c");
const NAME: &str = "fresh-vm";
const UUID: &str = "5a0f3c2e-8d41-4b7a-9e15-2c6d7f80a913";
/// CPU each burner spends, milliseconds.
const SPIN_MS: u64 = 1500;

/// Exported seconds against schedstat: within 1 % + 10 ms. Slices are the scheduler's own
/// runtime deltas, so they match schedstat to the nanosecond; the main thread's schedstat
/// also holds the moments between fork and exec, before it was QEMU. A slice lost to a
/// late scan, or to a switch the tracepoint did not show, is far outside.
fn assert_charged_in_full(what: &str, exported: f64, schedstat: f64) {
    eprintln!("{what}: exported {exported:.4} s, schedstat {schedstat:.4} s");
    assert!(
        schedstat > 0.9 * SPIN_MS as f64 / 1e3,
        "{what}: the burner ran only {schedstat:.3} s"
    );
    assert!(
        (exported - schedstat).abs() <= 0.01 * schedstat + 0.01,
        "{what}: exported {exported:.4} s against {schedstat:.4} s of schedstat: slices were lost \
         (or double counted) around the scan that found it"
    );
}

#[test]
fn a_new_qemu_and_its_new_thread_are_charged_from_their_first_switch() {
    if optimus_tests::env::require_root(
        "a_new_qemu_and_its_new_thread_are_charged_from_their_first_switch",
    )
    .is_err()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("fake_qemu.c");
    std::fs::write(&src, FAKE_QEMU_C).unwrap();
    let qemu_bin = dir.path().join("qemu-system-x86_64");
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-pthread", "-o"])
        .arg(&qemu_bin)
        .arg(&src)
        .status()
        .expect("cc (gcc) is needed to build the stand-in QEMU");
    assert!(cc.success(), "compiling the stand-in QEMU failed");

    let agent = Agent::start(&["--libvirt-uri", "", "--interval", "1s"]);
    agent.next_sample();
    let mut cmd = Command::new(&qemu_bin);
    cmd.args(["-name", &format!("guest={NAME},debug-threads=on")])
        .args(["-uuid", UUID, "-smp", "1"])
        .env("FAKE_QEMU_START_SPIN_MS", SPIN_MS.to_string())
        .env("FAKE_QEMU_HOTPLUG_SPIN_MS", SPIN_MS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: only prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut qemu = ChildGuard::spawn(cmd).unwrap();
    let pid = qemu.pid();
    let mut lines = BufReader::new(qemu.child_mut().stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");

    let labels = |kind| [("vm_name", NAME), ("vm_uuid", UUID), ("thread_kind", kind)];
    agent.wait_for(Duration::from_secs(10), "the new VM's series", |m| {
        sample(m, "optimus_vm_cpu_seconds_total", &labels("emulator")).is_some()
    });
    let m = agent.next_sample();
    let exported = sample(
        m.as_str(),
        "optimus_vm_cpu_seconds_total",
        &labels("emulator"),
    )
    .unwrap();
    #[expect(clippy::cast_precision_loss, reason = "ns to s")]
    let main = schedstat_ns(pid, pid).unwrap() as f64 / 1e9;
    // The main thread only sleeps in sigwait now.
    assert_charged_in_full("main thread, burning from exec", exported, main);

    agent.next_sample();
    assert!(signal(pid, libc::SIGUSR1), "SIGUSR1 to the stand-in QEMU");
    let line = lines.next().unwrap().unwrap();
    let tid: u32 = line
        .strip_prefix("spun ")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line from the stand-in QEMU: {line:?}"));
    let vcpu1 = [("vm_name", NAME), ("vm_uuid", UUID), ("vcpu", "1")];
    agent.wait_for(Duration::from_secs(10), "the new vCPU's series", |m| {
        sample(m, "optimus_vcpu_cpu_seconds_total", &vcpu1).is_some()
    });
    let m = agent.next_sample();
    let exported = sample(m.as_str(), "optimus_vcpu_cpu_seconds_total", &vcpu1).unwrap();
    #[expect(clippy::cast_precision_loss, reason = "ns to s")]
    let thread = schedstat_ns(pid, tid).unwrap() as f64 / 1e9;
    assert_charged_in_full("thread started after discovery", exported, thread);
    drop(qemu);
}
