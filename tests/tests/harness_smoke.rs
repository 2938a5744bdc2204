//! Smoke tests of the real-component harness itself: a TCG guest under plain QEMU and under
//! libvirt, Prometheus, and guest block I/O seen in the kernel's accounting.
//!
//! Needs root. Run one at a time:
//! `cargo test -p optimus-tests --test harness_smoke -- --test-threads=1 --nocapture`

#![expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use optimus_tests::env::require_tools;
use optimus_tests::guest::{
    GuestImage, GuestPlan, IoPlan, IO_READ_DONE_MARKER, IO_WRITE_DONE_MARKER, READY_MARKER,
};
use optimus_tests::libvirt::{Disk, DiskCache, Domain, Libvirtd};
use optimus_tests::prometheus::{value, Prometheus};
use optimus_tests::qemu::PlainQemu;
use optimus_tests::{env, proc};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;

/// Skips (or fails in CI) when the tools are missing; the reason names the apt packages.
fn tools_or_skip(test: &str, tools: &[(&str, &str)]) -> bool {
    match require_tools(tools) {
        Ok(()) => true,
        Err(e) => env::skip(test, &format!("{e:#}")).is_ok(),
    }
}

#[test]
fn plain_qemu_busy_vcpu_burns_cpu() {
    if env::require_root("plain_qemu_busy_vcpu_burns_cpu").is_err() {
        return;
    }
    if !tools_or_skip(
        "plain_qemu_busy_vcpu_burns_cpu",
        &[("qemu-system-x86_64", "qemu-system-x86")],
    ) {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let qemu = PlainQemu::spawn(
        "optimus-smoke-plain",
        Some("6b1f9a52-3c1d-4e1a-9f00-0123456789ab"),
        &image,
        &plan,
        2,
        None,
    )
    .unwrap();
    let boot = std::time::Instant::now();
    qemu.wait_for_console(READY_MARKER, BOOT_TIMEOUT).unwrap();
    eprintln!(
        "plain QEMU pid {} ready after {:?}",
        qemu.pid(),
        boot.elapsed()
    );

    let tids = proc::vcpu_tids(qemu.pid()).unwrap();
    assert_eq!(tids.len(), 2, "vCPU threads: {tids:?}");
    let before: Vec<u64> = tids
        .values()
        .map(|tid| proc::schedstat_ns(qemu.pid(), *tid).unwrap())
        .collect();
    thread::sleep(Duration::from_secs(5));
    let after: Vec<u64> = tids
        .values()
        .map(|tid| proc::schedstat_ns(qemu.pid(), *tid).unwrap())
        .collect();
    let busy = after[0] - before[0];
    let idle = after[1] - before[1];
    eprintln!(
        "over 5 s: vCPU 0 (busy) ran {:.3} s, vCPU 1 (idle) ran {:.3} s",
        busy as f64 / 1e9,
        idle as f64 / 1e9
    );
    assert!(busy > 4 * idle, "busy {busy} ns vs idle {idle} ns");
    assert!(busy > 1_000_000_000, "busy vCPU ran only {busy} ns in 5 s");

    let pid = qemu.pid();
    drop(qemu);
    assert!(!proc::alive(pid), "QEMU {pid} survived its guard");
}

#[test]
fn libvirt_domain_with_odd_name() {
    if env::require_root("libvirt_domain_with_odd_name").is_err() {
        return;
    }
    if !tools_or_skip(
        "libvirt_domain_with_odd_name",
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("virsh", "libvirt-clients"),
            ("libvirtd", "libvirt-daemon"),
        ],
    ) {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let libvirtd = Libvirtd::start().unwrap();
    eprintln!(
        "libvirtd on {} ({})",
        libvirtd.uri(),
        if libvirtd.started_here() {
            "started here"
        } else {
            "reused"
        }
    );
    let name = "optimus test \"ü\"";
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let domain = Domain::create(&libvirtd, name, &image, &plan, 2, None).unwrap();
    assert_eq!(domain.name(), name);
    let boot = std::time::Instant::now();
    domain.wait_for_console(READY_MARKER, BOOT_TIMEOUT).unwrap();
    let pid = domain.qemu_pid().unwrap();
    eprintln!(
        "domain {name:?} uuid {} QEMU pid {pid} ready after {:?}",
        domain.uuid(),
        boot.elapsed()
    );
    let tids = proc::vcpu_tids(pid).unwrap();
    assert_eq!(tids.len(), 2, "vCPU threads: {tids:?}");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("guest=optimus test \"ü\""),
        "QEMU -name keeps the raw name"
    );

    let uuid = domain.uuid().to_owned();
    drop(domain);
    assert!(!proc::alive(pid), "QEMU {pid} survived the domain guard");
    let list = proc::run_ok(
        libvirtd.virsh().args(["list", "--all", "--uuid"]),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(!list.contains(&uuid), "virsh list still shows it:\n{list}");
}

#[test]
fn prometheus_scrapes_and_answers_queries() {
    if env::require_root("prometheus_scrapes_and_answers_queries").is_err() {
        return;
    }
    if !tools_or_skip(
        "prometheus_scrapes_and_answers_queries",
        &[("prometheus", "prometheus")],
    ) {
        return;
    }
    // A one-metric exporter, so `up` is 1 and a sample comes through end to end.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = [0u8; 4096];
            let _ = conn.read(&mut req);
            let body = "# HELP optimus_smoke A test gauge.\n# TYPE optimus_smoke gauge\n\
                        optimus_smoke{vm=\"a \\\"b\\\"\"} 42\n";
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let prom = Prometheus::start(&target, Duration::from_secs(1)).unwrap();
    eprintln!("prometheus on {} scraping {target}", prom.addr());
    let up = prom
        .query_until("up", Duration::from_secs(30), |r| {
            r.first().and_then(value) == Some(1.0)
        })
        .unwrap();
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["metric"]["job"], "optimus");
    let smoke = prom
        .query_until("optimus_smoke", Duration::from_secs(10), |r| !r.is_empty())
        .unwrap();
    assert_eq!(value(&smoke[0]), Some(42.0));
    assert_eq!(smoke[0]["metric"]["vm"], "a \"b\"");
    assert!(prom.query("up{").is_err(), "a bad query must be an error");

    let pid = prom.pid();
    drop(prom);
    assert!(!proc::alive(pid), "prometheus {pid} survived its guard");
}

#[test]
fn guest_block_io_shows_in_proc_io() {
    if env::require_root("guest_block_io_shows_in_proc_io").is_err() {
        return;
    }
    if !tools_or_skip(
        "guest_block_io_shows_in_proc_io",
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("virsh", "libvirt-clients"),
            ("libvirtd", "libvirt-daemon"),
        ],
    ) {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let disk_dir = tempfile::Builder::new()
        .prefix("optimus-disk-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let disk = disk_dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let host_dev = proc::block_dev_of(&disk).ok();

    let libvirtd = Libvirtd::start().unwrap();
    let plan = GuestPlan {
        busy_vcpus: vec![],
        io: Some(IoPlan {
            write_mib: 8,
            read_mib: 8,
            pause_s: 1,
        }),
    };
    let disk = Disk {
        path: &disk,
        cache: DiskCache::Direct,
    };
    let domain =
        Domain::create(&libvirtd, "optimus-smoke-io", &image, &plan, 1, Some(disk)).unwrap();
    let pid = domain.qemu_pid().unwrap();
    let (read0, write0) = proc::proc_io(pid).unwrap();
    let sectors0 = host_dev
        .as_deref()
        .map(|d| proc::block_stat_sectors(d).unwrap());
    domain.wait_for_console(READY_MARKER, BOOT_TIMEOUT).unwrap();
    domain
        .wait_for_console(IO_WRITE_DONE_MARKER, BOOT_TIMEOUT)
        .unwrap();
    domain
        .wait_for_console(IO_READ_DONE_MARKER, BOOT_TIMEOUT)
        .unwrap();
    let (read1, write1) = proc::proc_io(pid).unwrap();
    eprintln!(
        "QEMU {pid} /proc/<pid>/io: read_bytes +{} ({:.2} MiB), write_bytes +{} ({:.2} MiB)",
        read1 - read0,
        (read1 - read0) as f64 / MIB as f64,
        write1 - write0,
        (write1 - write0) as f64 / MIB as f64
    );
    if let (Some(dev), Some((r0, w0))) = (host_dev.as_deref(), sectors0) {
        let (r1, w1) = proc::block_stat_sectors(dev).unwrap();
        eprintln!(
            "host device {dev}: sectors read +{}, written +{} (whole device, other I/O included)",
            r1 - r0,
            w1 - w0
        );
    }
    assert!(
        write1 - write0 >= 8 * MIB,
        "write_bytes grew by {} only",
        write1 - write0
    );
    domain.destroy().unwrap();
    assert!(!proc::alive(pid));
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    if env::require_root("guards_clean_up_when_a_test_panics").is_err() {
        return;
    }
    if !tools_or_skip(
        "guards_clean_up_when_a_test_panics",
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("virsh", "libvirt-clients"),
            ("libvirtd", "libvirt-daemon"),
            ("prometheus", "prometheus"),
        ],
    ) {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let pids = std::sync::Mutex::new(Vec::new());
    let dirs = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let plan = GuestPlan::default();
        let qemu = PlainQemu::spawn("optimus-smoke-panic", None, &image, &plan, 1, None).unwrap();
        pids.lock().unwrap().push(qemu.pid());
        dirs.lock()
            .unwrap()
            .push(qemu.console_log().parent().unwrap().to_owned());
        let libvirtd = Libvirtd::start().unwrap();
        let domain =
            Domain::create(&libvirtd, "optimus-smoke-panic", &image, &plan, 1, None).unwrap();
        pids.lock().unwrap().push(domain.qemu_pid().unwrap());
        dirs.lock()
            .unwrap()
            .push(domain.console_log().parent().unwrap().to_owned());
        let prom = Prometheus::start("127.0.0.1:1", Duration::from_secs(1)).unwrap();
        pids.lock().unwrap().push(prom.pid());
        panic!("deliberate panic with QEMU, a domain and Prometheus running");
    });
    assert!(result.is_err());
    let pids = pids.into_inner().unwrap();
    assert_eq!(pids.len(), 3);
    for pid in pids {
        assert!(!proc::alive(pid), "process {pid} survived the panic");
    }
    for dir in dirs.into_inner().unwrap() {
        assert!(!dir.exists(), "{} survived the panic", dir.display());
    }
}
