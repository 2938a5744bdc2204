//! Billing integrity against hostile local users (issue 10 A, B, D, F, H): fake QEMU
//! processes run as an unprivileged uid (65534) and as root next to a real libvirt TCG
//! guest and a plain QEMU, and the real agent must charge only real VMs, keep its VMs when
//! /proc cannot be read, stay bounded, and print names harmlessly. The kernel's own
//! accounting (`/proc/<pid>/task/<tid>/schedstat`) is the oracle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan};
use optimus_tests::http::{parse, sample};
use optimus_tests::libvirt::{Domain, Libvirtd};
use optimus_tests::proc::{free_port, schedstat_ns, ChildGuard};

const NOBODY: u32 = 65534;
const BOOT: Duration = Duration::from_secs(90);

/// A directory everyone may enter, holding `name`: a copy of `program` that belongs to root,
/// mode 0755 (what a root-installed binary looks like; tests run as root).
fn copy_binary(dir: &Path, program: &str, name: &str) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let real = std::fs::canonicalize(program).unwrap();
    let path = dir.join(name);
    std::fs::copy(real, &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A copy of python3 named `qemu-system-x86_64` (owned by `owner`), running a busy loop
/// with the given QEMU-looking arguments, as `uid`.
fn busy_fake(dir: &Path, owner: u32, uid: u32, args: &[&str]) -> ChildGuard {
    let bin = copy_binary(dir, "/usr/bin/python3", "qemu-system-x86_64");
    std::os::unix::fs::chown(&bin, Some(owner), Some(owner)).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(["-c", "while True: pass"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    ChildGuard::spawn(cmd).unwrap()
}

/// Starts `optimus run` with its log in a file (for checking what it warned about).
fn agent_with_log(extra: &[&str]) -> (Agent, tempfile::NamedTempFile) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(binary());
    cmd.args(["run", "--listen", &addr])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(log.reopen().unwrap());
    (Agent::spawn(cmd, addr), log)
}

/// On-CPU seconds of every thread of `pid` (kernel accounting).
fn process_cpu_seconds(pid: u32) -> f64 {
    let mut ns = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = entry
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        ns += schedstat_ns(pid, tid).unwrap_or(0);
    }
    #[expect(clippy::cast_precision_loss, reason = "ns to s")]
    let s = ns as f64 / 1e9;
    s
}

/// Σ `optimus_vm_cpu_seconds_total` over thread kinds of one VM.
fn vm_cpu(m: &str, uuid: &str) -> f64 {
    parse(m)
        .iter()
        .filter(|s| {
            s.name == "optimus_vm_cpu_seconds_total"
                && s.labels.get("vm_uuid").map(String::as_str) == Some(uuid)
        })
        .map(|s| s.value)
        .sum()
}

fn counter(m: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(m, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{m}"))
}

/// Issue 10 A and B on a real libvirt guest: a busy copy of python3 named
/// `qemu-system-x86_64` claiming the guest's name and UUID, run as uid 65534, adds nothing
/// to the guest; a root-owned one run as root is an identity conflict, warned once with both
/// pids, never merged. Then /proc becomes unreadable: the scan failure is counted per
/// source and the guest's series stay.
#[test]
fn spoofers_do_not_inflate_a_libvirt_guest_and_a_failed_scan_keeps_it() {
    if optimus_tests::env::require_root("spoofers_do_not_inflate_a_libvirt_guest").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let libvirtd = Libvirtd::start().unwrap();
    let name = "integrity-real";
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let domain = Domain::create(&libvirtd, name, &image, &plan, 2, None).unwrap();
    domain
        .wait_for_console(optimus_tests::guest::READY_MARKER, BOOT)
        .unwrap();
    let uuid = domain.uuid().to_owned();
    let real_pid = domain.qemu_pid().unwrap();

    // The agent reads /proc through a link the test can break.
    let roots = tempfile::tempdir().unwrap();
    let proc_link = roots.path().join("proc");
    std::os::unix::fs::symlink("/proc", &proc_link).unwrap();
    let (agent, log) = agent_with_log(&[
        "--libvirt-uri",
        libvirtd.uri(),
        "--proc-root",
        proc_link.to_str().unwrap(),
    ]);
    let info = [
        ("vm_name", name),
        ("vm_uuid", uuid.as_str()),
        ("source", "libvirt"),
    ];
    agent.wait_for(Duration::from_secs(15), "the libvirt guest", |m| {
        sample(m, "optimus_vm_info", &info) == Some(1.0)
    });

    let spoof_args = ["-name", &format!("guest={name}"), "-uuid", &uuid];
    let nobody_dir = tempfile::tempdir().unwrap();
    let nobody = busy_fake(nobody_dir.path(), NOBODY, NOBODY, &spoof_args);
    let root_dir = tempfile::tempdir().unwrap();
    let rooted = busy_fake(root_dir.path(), 0, 0, &spoof_args);
    // Two scans, so both fakes have been seen.
    agent.next_sample();
    agent.next_sample();

    let m0 = agent.next_sample();
    let (k0, n0, r0) = (
        process_cpu_seconds(real_pid),
        process_cpu_seconds(nobody.pid()),
        process_cpu_seconds(rooted.pid()),
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let m1 = agent.next_sample();
    let (k1, n1, r1) = (
        process_cpu_seconds(real_pid),
        process_cpu_seconds(nobody.pid()),
        process_cpu_seconds(rooted.pid()),
    );
    let exported = vm_cpu(&m1, &uuid) - vm_cpu(&m0, &uuid);
    let kernel = k1 - k0;
    eprintln!(
        "over {:.1} s: guest exported {exported:.3} s, its QEMU's schedstat {kernel:.3} s; \
         fake as uid 65534 ran {:.3} s, fake as root {:.3} s",
        t0.elapsed().as_secs_f64(),
        n1 - n0,
        r1 - r0
    );
    assert!(
        n1 - n0 > 0.5 && r1 - r0 > 0.5,
        "the fakes must really burn CPU for the test to mean anything"
    );
    assert!(
        (exported - kernel).abs() <= 0.05 * kernel + 0.1,
        "guest charged {exported:.3} s while its QEMU ran {kernel:.3} s: spoofed time leaked in"
    );
    assert_eq!(sample(&m1, "optimus_vm_info", &info), Some(1.0));
    let vms_with_uuid = parse(&m1)
        .iter()
        .filter(|s| s.name == "optimus_vm_info" && s.labels.get("vm_uuid") == Some(&uuid))
        .count();
    assert_eq!(vms_with_uuid, 1, "one VM per UUID");
    assert_eq!(
        counter(&m1, "optimus_vm_identity_conflicts_total", &[]),
        1.0,
        "the root fake is a conflict (the uid 65534 one is not even a claim)"
    );
    let text = std::fs::read_to_string(log.path()).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("claims to be VM"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning per conflict:\n{text}");
    assert!(
        warnings[0].contains(&format!("pid {}", rooted.pid()))
            && warnings[0].contains(&format!("pid {real_pid}")),
        "the warning names both pids: {}",
        warnings[0]
    );

    // B: /proc cannot be listed any more. The scan fails, is counted, and the guest stays.
    let errors = |m: &str| counter(m, "optimus_sample_errors_total", &[("source", "proc")]);
    let vms = |m: &str| counter(m, "optimus_vms", &[]);
    let before = agent.next_sample();
    std::fs::remove_file(&proc_link).unwrap();
    std::os::unix::fs::symlink(roots.path().join("gone"), &proc_link).unwrap();
    let during = agent.wait_for(Duration::from_secs(10), "two failed scans", |m| {
        errors(m) >= errors(&before) + 2.0
    });
    assert_eq!(vms(&during), vms(&before), "no VM vanished:\n{during}");
    assert_eq!(sample(&during, "optimus_vm_info", &info), Some(1.0));
    assert!(vm_cpu(&during, &uuid) >= vm_cpu(&before, &uuid));
    std::fs::remove_file(&proc_link).unwrap();
    std::os::unix::fs::symlink("/proc", &proc_link).unwrap();
    let back = agent.next_sample();
    let back = {
        agent.next_sample();
        let later = agent.next_sample();
        assert_eq!(errors(&later), errors(&back), "scans work again");
        later
    };
    assert_eq!(sample(&back, "optimus_vm_info", &info), Some(1.0));
    eprintln!(
        "proc scan errors counted: {} while /proc was unreadable, VMs kept: {}",
        errors(&back) - errors(&before),
        vms(&back)
    );
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(
        text.matches("cannot scan for QEMU processes").count(),
        1,
        "one warning per failure streak:\n{text}"
    );
    drop((nobody, rooted));
    domain.destroy().unwrap();
}

/// Issue 10 D: 200 copies of sleep named `qemu-system-x86_64` run as uid 65534 are no VMs;
/// root-owned ones run as root are, up to `--max-vms`, past which one warning and a count.
#[test]
fn fake_qemus_are_excluded_and_max_vms_bounds_the_rest() {
    if optimus_tests::env::require_root("fake_qemus_are_excluded_and_max_vms_bounds").is_err() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sleep = copy_binary(dir.path(), "/bin/sleep", "qemu-system-x86_64");
    let spawn = |uid: u32| {
        let mut cmd = Command::new(&sleep);
        cmd.arg("600").stdin(Stdio::null());
        if uid != 0 {
            cmd.uid(uid).gid(uid);
        }
        ChildGuard::spawn(cmd).unwrap()
    };
    let nobody: Vec<ChildGuard> = (0..200).map(|_| spawn(NOBODY)).collect();
    let (agent, log) = agent_with_log(&["--libvirt-uri", "", "--max-vms", "3"]);
    let m = agent.next_sample();
    let m = {
        agent.next_sample();
        let _ = m;
        agent.next_sample()
    };
    for fake in &nobody {
        let id = format!("pid-{}", fake.pid());
        assert!(!m.contains(&id), "uid 65534's fake {id} is exported:\n{m}");
    }
    let series = m.lines().filter(|l| !l.starts_with('#')).count();
    eprintln!(
        "200 uid-65534 fakes: {} VMs, {series} series exported",
        counter(&m, "optimus_vms", &[])
    );
    // Other real VMs may run on this host (a shared machine): only what the fakes add counts.
    let over0 = counter(&m, "optimus_vms_over_limit_total", &[]);

    // Root's own fakes are trusted (root may run anything): the cap holds them.
    let rooted: Vec<ChildGuard> = (0..5).map(|_| spawn(0)).collect();
    let m = agent.wait_for(Duration::from_secs(10), "the cap", |m| {
        sample(m, "optimus_vms_over_limit_total", &[]).is_some_and(|v| v >= over0 + 2.0)
    });
    assert_eq!(counter(&m, "optimus_vms", &[]), 3.0, "{m}");
    let exported_fakes = rooted
        .iter()
        .filter(|f| m.contains(&format!("pid-{}", f.pid())))
        .count();
    assert!(exported_fakes <= 3, "{exported_fakes} of 5 exported");
    let over = counter(&m, "optimus_vms_over_limit_total", &[]);
    agent.next_sample();
    let later = agent.next_sample();
    assert_eq!(
        counter(&later, "optimus_vms_over_limit_total", &[]),
        over,
        "counted once per VM, not per scan"
    );
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(
        text.matches("more than --max-vms 3").count(),
        1,
        "one warning:\n{text}"
    );
    drop(rooted);
    drop(nobody);
}

/// Issue 10 F: a name full of terminal escapes is shown escaped by `optimus check`.
#[test]
fn check_prints_escape_codes_in_names_escaped() {
    if optimus_tests::env::require_root("check_prints_escape_codes_in_names_escaped").is_err() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fake = busy_fake(
        dir.path(),
        0,
        0,
        &["-name", "guest=\u{1b}[31mRED\u{1b}]0;pwned\u{7}"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(binary())
        .args(["check", "--libvirt-uri", ""])
        .output()
        .unwrap();
    drop(fake);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.stdout.contains(&0x1b) && !out.stdout.contains(&0x07),
        "raw escape codes printed:\n{stdout:?}"
    );
    assert!(
        stdout.contains(r"\x1b[31mRED\x1b]0;pwned\x07"),
        "the name is shown, escaped:\n{stdout}"
    );
}

/// A plain TCG QEMU with a busy vCPU 0, started without `debug-threads=on`, with `extra`
/// arguments.
fn qemu_without_debug_threads(dir: &Path, name: &str, uuid: &str, extra: &[&str]) -> ChildGuard {
    let image = GuestImage::ensure().unwrap();
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg,thread=multi", "-smp", "2", "-m", "256"])
        .args(["-name", name, "-uuid", uuid])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &plan.kernel_cmdline()])
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("{name}.log")).display()
        ))
        .args(extra)
        .stdin(Stdio::null());
    ChildGuard::spawn(cmd).unwrap()
}

/// Issue 10 H: a plain QEMU without `debug-threads=on` has no vCPU series (not a measured
/// zero); its time is `unclassified` and matches the kernel's; `check` names it and the fix.
/// With a QMP socket on its command line, its vCPU threads come from `query-cpus-fast`.
#[test]
fn qemu_without_debug_threads_has_unclassified_time_not_a_zero_vcpu() {
    if optimus_tests::env::require_root("qemu_without_debug_threads").is_err() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uuid = "5d7c2a9e-1b3f-4c6d-8e0a-9f1b2c3d4e5f";
    let name = "no-debug-threads";
    let qemu = qemu_without_debug_threads(dir.path(), name, uuid, &[]);
    let agent = Agent::start(&["--libvirt-uri", ""]);
    agent.wait_for(Duration::from_secs(15), "the plain QEMU", |m| {
        sample(m, "optimus_vm_info", &[("vm_uuid", uuid)]) == Some(1.0)
    });
    // Let the guest boot and its busy vCPU run.
    std::thread::sleep(Duration::from_secs(3));
    let m0 = agent.next_sample();
    let k0 = process_cpu_seconds(qemu.pid());
    std::thread::sleep(Duration::from_secs(6));
    let m1 = agent.next_sample();
    let k1 = process_cpu_seconds(qemu.pid());
    let kinds: Vec<String> = parse(&m1)
        .iter()
        .filter(|s| {
            s.name == "optimus_vm_cpu_seconds_total"
                && s.labels.get("vm_uuid").map(String::as_str) == Some(uuid)
        })
        .map(|s| s.labels["thread_kind"].clone())
        .collect();
    assert!(!kinds.contains(&"vcpu".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"unclassified".to_owned()), "{kinds:?}");
    assert!(
        sample(&m1, "optimus_vcpu_cpu_seconds_total", &[("vm_uuid", uuid)]).is_none(),
        "no per-vCPU series"
    );
    let unclassified = |m: &str| {
        counter(
            m,
            "optimus_vm_cpu_seconds_total",
            &[("vm_uuid", uuid), ("thread_kind", "unclassified")],
        )
    };
    let (exported, kernel) = (vm_cpu(&m1, uuid) - vm_cpu(&m0, uuid), k1 - k0);
    eprintln!(
        "QEMU without debug-threads: exported {exported:.3} s ({:.3} s unclassified), schedstat {kernel:.3} s",
        unclassified(&m1) - unclassified(&m0)
    );
    assert!(
        unclassified(&m1) - unclassified(&m0) > 1.0,
        "the busy vCPU's time is there"
    );
    assert!(
        (exported - kernel).abs() <= 0.05 * kernel + 0.1,
        "exported {exported:.3} s, kernel {kernel:.3} s"
    );
    drop(agent);

    let out = Command::new(binary())
        .args(["check", "--libvirt-uri", ""])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("vCPU threads") && l.contains(name))
        .unwrap_or_else(|| panic!("check does not name the VM:\n{stdout}"));
    assert!(line.contains("debug-threads=on"), "{line}");
    drop(qemu);

    // The same QEMU with a QMP socket: its vCPU threads are known after all.
    let sock = dir.path().join("qmp.sock");
    let uuid = "6e8d3b0f-2c4a-4d7e-9f1b-0a2b3c4d5e6f";
    let qemu = qemu_without_debug_threads(
        dir.path(),
        "with-qmp",
        uuid,
        &[
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ],
    );
    let agent = Agent::start(&["--libvirt-uri", ""]);
    agent.wait_for(Duration::from_secs(15), "vCPU series from QMP", |m| {
        sample(
            m,
            "optimus_vcpu_cpu_seconds_total",
            &[("vm_uuid", uuid), ("vcpu", "0")],
        )
        .is_some()
    });
    std::thread::sleep(Duration::from_secs(3));
    let busiest = |pid: u32| -> f64 {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|tid| *tid != pid)
            .map(|tid| {
                #[expect(clippy::cast_precision_loss, reason = "ns to s")]
                let s = schedstat_ns(pid, tid).unwrap_or(0) as f64 / 1e9;
                s
            })
            .fold(0.0, f64::max)
    };
    let vcpu0 = |m: &str| {
        counter(
            m,
            "optimus_vcpu_cpu_seconds_total",
            &[("vm_uuid", uuid), ("vcpu", "0")],
        )
    };
    let m0 = agent.next_sample();
    let k0 = busiest(qemu.pid());
    std::thread::sleep(Duration::from_secs(5));
    let m1 = agent.next_sample();
    let k1 = busiest(qemu.pid());
    eprintln!(
        "QEMU with QMP, no debug-threads: vCPU 0 exported {:.3} s, its thread's schedstat {:.3} s",
        vcpu0(&m1) - vcpu0(&m0),
        k1 - k0
    );
    assert!(
        ((vcpu0(&m1) - vcpu0(&m0)) - (k1 - k0)).abs() <= 0.05 * (k1 - k0) + 0.1,
        "vCPU 0 from QMP"
    );
    assert!(
        sample(
            &m1,
            "optimus_vm_cpu_seconds_total",
            &[("vm_uuid", uuid), ("thread_kind", "unclassified")]
        )
        .is_none(),
        "no unclassified time once the vCPUs are known"
    );
    drop(qemu);
}
