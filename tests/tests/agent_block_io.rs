//! Block I/O per VM against the kernel's own counters: a real TCG guest writes and reads
//! its virtio disk with O_DIRECT; the disk is a host file attached with `cache=none`, so
//! QEMU's threads submit the I/O to the host block layer themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{assert_close, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan, IoPlan, IO_READ_DONE_MARKER, READY_MARKER};
use optimus_tests::http::sample;
use optimus_tests::proc::{block_dev_of, block_stat_sectors, proc_io};
use optimus_tests::prometheus::promtool_check;
use optimus_tests::qemu::PlainQemu;

const MIB: f64 = 1024.0 * 1024.0;

#[expect(clippy::cast_precision_loss, reason = "byte counts of a test")]
fn f(v: u64) -> f64 {
    v as f64
}

#[test]
fn guest_direct_io_matches_proc_io_and_block_stat() {
    if optimus_tests::env::require_root("guest_direct_io_matches_proc_io_and_block_stat").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    // The disk lives next to the build, on a real block device of the host (not tmpfs).
    let dir = tempfile::Builder::new()
        .prefix("optimus-disk-")
        .tempdir_in(optimus_tests::env::cache_dir())
        .unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = block_dev_of(&disk).unwrap();
    let agent = Agent::start(&["--libvirt-uri", ""]);
    let uuid = "5d1c0a8e-2f43-4b7a-9e11-7d0c3b2a1f00";
    let name = "io-guest";
    let plan = GuestPlan {
        busy_vcpus: vec![],
        io: Some(IoPlan {
            write_mib: 48,
            read_mib: 32,
            pause_s: 1,
        }),
    };
    // A few seconds of boot before the guest touches its disk leave the agent time to
    // find the VM: every byte in the window below is then the VM's.
    let qemu = PlainQemu::spawn(name, Some(uuid), &image, &plan, 1, Some(&disk)).unwrap();
    let labels = |d: &'static str| [("vm_name", name), ("vm_uuid", uuid), ("direction", d)];
    let m0 = agent.wait_for(Duration::from_secs(30), "the VM's block I/O series", |m| {
        sample(m, "optimus_vm_block_io_bytes_total", &labels("write")).is_some()
    });
    let io0 = proc_io(qemu.pid()).unwrap();
    let sys0 = block_stat_sectors(&dev).unwrap();
    let console = std::fs::read_to_string(qemu.console_log()).unwrap_or_default();
    assert!(
        !console.contains(READY_MARKER),
        "the guest was up before the agent saw it; the window would miss I/O"
    );

    qemu.wait_for_console(IO_READ_DONE_MARKER, Duration::from_secs(120))
        .unwrap();
    let m1 = agent.next_sample();
    let io1 = proc_io(qemu.pid()).unwrap();
    let sys1 = block_stat_sectors(&dev).unwrap();
    promtool_check(&m1).unwrap();

    let exported = |m: &str, d| sample(m, "optimus_vm_block_io_bytes_total", &labels(d)).unwrap();
    let ops = |m: &str, d| sample(m, "optimus_vm_block_io_operations_total", &labels(d)).unwrap();
    let (w, r) = (
        exported(&m1, "write") - exported(&m0, "write"),
        exported(&m1, "read") - exported(&m0, "read"),
    );
    // The kernel's per-process accounting of the same QEMU process.
    assert_close(
        "VM write bytes vs /proc/<pid>/io",
        w,
        f(io1.1 - io0.1),
        0.01,
    );
    assert_close("VM read bytes vs /proc/<pid>/io", r, f(io1.0 - io0.0), 0.01);
    assert!(w >= 48.0 * MIB && r >= 32.0 * MIB, "write {w} read {r}");
    assert!(ops(&m1, "write") - ops(&m0, "write") >= 1.0);

    // The host device saw at least the VM's I/O, and the node total for that device agrees
    // with the device's own counters over the same window (other host I/O included).
    let node = |m: &str, d| {
        sample(
            m,
            "optimus_node_block_io_bytes_total",
            &[("device", dev.as_str()), ("direction", d)],
        )
        .unwrap_or(0.0)
    };
    let dev_w = f(sys1.1 - sys0.1) * 512.0;
    let dev_r = f(sys1.0 - sys0.0) * 512.0;
    assert!(dev_w >= w * 0.99, "device wrote {dev_w}, VM {w}");
    assert!(dev_r >= r * 0.99, "device read {dev_r}, VM {r}");
    assert_close(
        "node write bytes vs /sys/block stat",
        node(&m1, "write") - node(&m0, "write"),
        dev_w,
        0.01,
    );
    assert_close(
        "node read bytes vs /sys/block stat",
        node(&m1, "read") - node(&m0, "read"),
        dev_r,
        0.01,
    );
    drop(qemu);
}

#[test]
fn buffered_host_write_shows_in_node_totals_never_vanishes() {
    if optimus_tests::env::require_root("buffered_host_write_shows_in_node_totals").is_err() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("optimus-dd-")
        .tempdir_in(optimus_tests::env::cache_dir())
        .unwrap();
    let dev = block_dev_of(dir.path()).unwrap();
    let agent = Agent::start(&["--libvirt-uri", ""]);
    let read = |m: &str, metric: &str| {
        sample(
            m,
            metric,
            &[("device", dev.as_str()), ("direction", "write")],
        )
        .unwrap_or(0.0)
    };
    let m0 = agent.next_sample();
    let file = dir.path().join("buffered");
    let ok = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=32"])
        .arg(format!("of={}", file.display()))
        .status()
        .unwrap()
        .success();
    assert!(ok, "dd failed");
    assert!(Command::new("sync").status().unwrap().success());
    let m1 = agent.next_sample();
    let total = read(&m1, "optimus_node_block_io_bytes_total")
        - read(&m0, "optimus_node_block_io_bytes_total");
    let unattributed = read(&m1, "optimus_node_block_io_unattributed_bytes_total")
        - read(&m0, "optimus_node_block_io_unattributed_bytes_total");
    eprintln!("buffered 32 MiB: node total +{total}, unattributed +{unattributed}");
    // Writeback runs in kernel threads, so the 32 MiB reach the disk as unattributed I/O
    // (this host has no cgroup v2 writeback to tell whose pages they were).
    assert!(total >= 32.0 * MIB, "node total grew by only {total}");
    assert!(
        unattributed >= 32.0 * MIB * 0.99,
        "writeback not counted as unattributed: {unattributed}"
    );
}
