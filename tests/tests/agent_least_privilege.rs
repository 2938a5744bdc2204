//! Least privilege, against the real kernel and a real libvirt TCG guest: the agent run as
//! an unprivileged uid with exactly the systemd unit's capabilities (`setpriv`, which sets
//! them the way `AmbientCapabilities=` does) loads, attaches, finds the guest over
//! libvirt's read-only socket and serves its per-VM series; after loading every thread of
//! it holds only what sampling needs, as `/proc/<pid>/task/*/status` shows, in each mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{binary, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan};
use optimus_tests::http::sample;
use optimus_tests::libvirt::{Domain, Libvirtd};
use optimus_tests::proc::free_port;

const BOOT: Duration = Duration::from_secs(90);
const NOBODY: &str = "65534";
const CAP_DAC_READ_SEARCH: u64 = 1 << 2;

/// The capabilities the unit grants, from its `AmbientCapabilities=` line, in setpriv's
/// spelling (`bpf`); the test fails if the bounding set says anything else.
fn unit_caps() -> Vec<String> {
    let unit = optimus_tests::env::workspace_root().join("deploy/systemd/optimus.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let caps_of = |key: &str| -> Vec<String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {}", unit.display()));
        line.split_whitespace()
            .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
            .collect()
    };
    let ambient = caps_of("AmbientCapabilities=");
    assert_eq!(ambient, caps_of("CapabilityBoundingSet="));
    ambient
}

/// A copy of the agent binary that uid 65534 can run (the build tree may sit under a
/// directory only root can enter).
fn world_executable_binary() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("optimus-lp-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("optimus");
    std::fs::copy(binary(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, bin)
}

/// `setpriv` as uid/gid 65534 with `caps` inheritable and ambient and, if `bounded`, a
/// bounding set of exactly `caps` and no_new_privs (what the unit sets).
fn setpriv(caps: &[String], bounded: bool) -> Command {
    let list: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let list = list.join(",");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
    ]);
    if caps.is_empty() {
        cmd.arg("--inh-caps=-all");
    } else {
        cmd.args([
            format!("--inh-caps={list}"),
            format!("--ambient-caps={list}"),
        ]);
    }
    if bounded {
        cmd.arg(format!("--bounding-set=-all,{list}"));
        cmd.arg("--no-new-privs");
    }
    cmd
}

/// An agent started through `prefix` (or directly), its log in `log`.
fn start(prefix: Option<Command>, bin: &Path, libvirt_uri: &str, log: &Path) -> Agent {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = prefix.unwrap_or_else(|| Command::new(bin));
    if cmd.get_program() != bin.as_os_str() {
        cmd.arg(bin);
    }
    cmd.args(["run", "--listen", &addr, "--libvirt-uri", libvirt_uri])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    Agent::spawn(cmd, addr)
}

/// Every thread's capability sets, `(tid, status text)`.
fn thread_statuses(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let status = std::fs::read_to_string(e.path().join("status")).unwrap();
            (e.file_name().to_string_lossy().into_owned(), status)
        })
        .collect()
}

fn hex_field(status: &str, key: &str) -> u64 {
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"));
    u64::from_str_radix(v.trim(), 16).unwrap()
}

/// Every thread of `pid` holds exactly `want` (effective and permitted), nothing
/// inheritable or ambient, with no_new_privs set, and runs as `uid`.
fn assert_caps(what: &str, pid: u32, uid: &str, want: u64) {
    let threads = thread_statuses(pid);
    assert!(
        threads.len() >= 2,
        "{what}: only {} thread(s)",
        threads.len()
    );
    for (tid, status) in &threads {
        let caps: Vec<&str> = status.lines().filter(|l| l.starts_with("Cap")).collect();
        eprintln!("{what}: thread {tid}: {}", caps.join(" "));
        for key in ["CapEff:", "CapPrm:"] {
            assert_eq!(
                hex_field(status, key),
                want,
                "{what}: thread {tid} {key} {:#x}, wanted {want:#x}:\n{status}",
                hex_field(status, key)
            );
        }
        assert_eq!(hex_field(status, "CapInh:"), 0, "{what}: thread {tid}");
        assert_eq!(hex_field(status, "CapAmb:"), 0, "{what}: thread {tid}");
        assert!(
            status.lines().any(|l| l == "NoNewPrivs:\t1"),
            "{what}: thread {tid} without no_new_privs"
        );
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid_line.split_whitespace().skip(1).all(|u| u == uid),
            "{what}: thread {tid}: {uid_line}"
        );
    }
}

/// The guest is found through libvirt and its busy vCPU's seconds grow.
fn assert_serves_guest(what: &str, agent: &Agent, domain: &Domain) {
    let info = [
        ("vm_name", domain.name()),
        ("vm_uuid", domain.uuid()),
        ("source", "libvirt"),
    ];
    agent.wait_for(Duration::from_secs(15), "the libvirt guest", |m| {
        sample(m, "optimus_vm_info", &info) == Some(1.0)
    });
    let vcpu0 = [
        ("vm_name", domain.name()),
        ("vm_uuid", domain.uuid()),
        ("vcpu", "0"),
    ];
    let first = sample(
        &agent.next_sample(),
        "optimus_vcpu_cpu_seconds_total",
        &vcpu0,
    )
    .unwrap_or_else(|| panic!("{what}: no vCPU 0 series"));
    std::thread::sleep(Duration::from_secs(3));
    let later = sample(
        &agent.next_sample(),
        "optimus_vcpu_cpu_seconds_total",
        &vcpu0,
    )
    .unwrap();
    eprintln!("{what}: busy vCPU 0 ran {:.3} s in 3 s", later - first);
    // Only that the series moves: agent_cpu.rs compares it with schedstat, and a loaded
    // machine can starve the guest.
    assert!(
        later - first > 0.05,
        "{what}: busy vCPU 0 ran only {:.3} s in 3 s",
        later - first
    );
}

fn assert_log_clean(what: &str, log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    assert!(
        !text.contains("could not drop capabilities") && !text.contains("still holds"),
        "{what}: {text}"
    );
    assert!(text.contains("capabilities after load:"), "{what}: {text}");
    text
}

/// The agent, started with the unit's three capabilities, ended with CAP_DAC_READ_SEARCH
/// only in every thread, and said so.
fn assert_kept_only_dac_read_search(what: &str, agent: &Agent, log: &Path) {
    assert_caps(what, agent.child.pid(), NOBODY, CAP_DAC_READ_SEARCH);
    let text = assert_log_clean(what, log);
    assert!(
        text.contains(
            "capabilities after load: cap_dac_read_search (held before: \
             cap_dac_read_search,cap_perfmon,cap_bpf)"
        ),
        "{what}: {text}"
    );
}

#[test]
fn unprivileged_agent_with_the_units_capabilities_serves_a_libvirt_guest() {
    if optimus_tests::env::require_root("unprivileged_agent_serves_a_libvirt_guest").is_err() {
        return;
    }
    let caps = unit_caps();
    assert_eq!(caps, ["bpf", "perfmon", "dac_read_search"]);
    let image = GuestImage::ensure().unwrap();
    let libvirtd = Libvirtd::start().unwrap();
    // uid 65534 reaches libvirt only through the read-only socket; a libvirtd started
    // before the harness allowed that (auth_unix_ro) refuses it, and says so here.
    let probe = setpriv(&[], false)
        .args(["virsh", "-r", "-c", libvirtd.uri(), "list", "--name"])
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "uid 65534 cannot open libvirt read-only ({}); restart libvirtd so the harness \
         config (auth_unix_ro = \"none\" in /etc/libvirt/libvirtd.conf) applies",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let plan = GuestPlan {
        busy_vcpus: vec![0],
        io: None,
    };
    let domain = Domain::create(&libvirtd, "optimus-least-priv", &image, &plan, 2, None).unwrap();
    domain
        .wait_for_console(optimus_tests::guest::READY_MARKER, BOOT)
        .unwrap();
    let (_dir, bin) = world_executable_binary();
    let logs = tempfile::tempdir().unwrap();

    // The unit's way: uid 65534, exactly its capabilities, bounding set and no_new_privs.
    let log = logs.path().join("unit.log");
    let agent = start(Some(setpriv(&caps, true)), &bin, libvirtd.uri(), &log);
    assert_serves_guest("as the unit", &agent, &domain);
    // Loaded without CAP_SYS_RESOURCE (not even in the bounding set) under a finite memlock
    // limit: kernels from 5.11 charge BPF memory to the cgroup, not RLIMIT_MEMLOCK.
    let pid = agent.child.pid();
    for (tid, status) in thread_statuses(pid) {
        assert_eq!(hex_field(&status, "CapBnd:") & (1 << 24), 0, "thread {tid}");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let memlock = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .unwrap();
    eprintln!("as the unit: {memlock}");
    assert_kept_only_dac_read_search("as the unit", &agent, &log);
    drop(agent);

    // Issue 10 E's reproduction: CAP_BPF and CAP_PERFMON only; nothing is left after load.
    let log = logs.path().join("bpf-perfmon.log");
    let two = ["bpf".to_owned(), "perfmon".to_owned()];
    let agent = start(Some(setpriv(&two, false)), &bin, libvirtd.uri(), &log);
    assert_serves_guest("as uid 65534 with bpf,perfmon", &agent, &domain);
    assert_caps(
        "as uid 65534 with bpf,perfmon",
        agent.child.pid(),
        NOBODY,
        0,
    );
    assert_log_clean("as uid 65534 with bpf,perfmon", &log);
    drop(agent);

    // Root: no capability left, the bounding set emptied too.
    let log = logs.path().join("root.log");
    let agent = start(None, &bin, libvirtd.uri(), &log);
    assert_serves_guest("as root", &agent, &domain);
    assert_caps("as root", agent.child.pid(), "0", 0);
    for (tid, status) in thread_statuses(agent.child.pid()) {
        assert_eq!(hex_field(&status, "CapBnd:"), 0, "root thread {tid}");
    }
    assert_log_clean("as root", &log);
    drop(agent);

    domain.destroy().unwrap();
}

#[test]
fn check_names_the_missing_capability_and_the_fix() {
    if optimus_tests::env::require_root("check_names_the_missing_capability").is_err() {
        return;
    }
    let (_dir, bin) = world_executable_binary();
    let check = |caps: &[&str]| {
        let caps: Vec<String> = caps.iter().map(|c| (*c).to_owned()).collect();
        let out = setpriv(&caps, false)
            .arg(&bin)
            .args(["check", "--libvirt-uri", ""])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("check with {caps:?}:\n{text}");
        (out.status.code(), text)
    };
    let (code, out) = check(&["bpf"]);
    assert_eq!(code, Some(1), "{out}");
    let line = out.lines().find(|l| l.contains("privileges")).unwrap();
    assert!(line.starts_with("[FAIL]"), "{line}");
    assert!(line.contains("uid 65534 lacks CAP_PERFMON:"), "{line}");
    assert!(!line.contains("CAP_BPF and"), "CAP_BPF is held: {line}");
    assert!(
        line.contains("AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH"),
        "{line}"
    );

    let (code, out) = check(&["bpf", "perfmon"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[ok  ] eBPF tracer"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("[warn] privileges") && l.contains("lacks CAP_DAC_READ_SEARCH")),
        "{out}"
    );
    let (code, out) = check(&["bpf", "perfmon", "dac_read_search"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("keeps cap_dac_read_search once loaded") && !out.contains("lacks"),
        "{out}"
    );
}

/// The Kubernetes DaemonSet's way (deploy/kubernetes): the runtime holds the added
/// capabilities in the permitted set but sets none ambient or inheritable, uid 65534,
/// no_new_privs (allowPrivilegeEscalation: false); the image's binary carries them as file
/// capabilities. Reproduced with two setpriv steps: the first gets the three into the
/// permitted set, the second clears ambient and inheritable before exec'ing the agent.
#[test]
fn file_capabilities_as_the_kubernetes_image_sets_them() {
    if optimus_tests::env::require_root("file_capabilities_as_the_kubernetes_image").is_err() {
        return;
    }
    optimus_tests::env::require_tools(&[("setcap", "libcap2-bin")]).unwrap();
    let caps = unit_caps();
    let (dir, bin) = world_executable_binary();
    let plain = dir.path().join("optimus-no-file-caps");
    std::fs::copy(&bin, &plain).unwrap();
    let file_caps = format!(
        "{}=ep",
        caps.iter()
            .map(|c| format!("cap_{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (ok, text) = common::run_text(Command::new("setcap").arg(&file_caps).arg(&bin));
    assert!(ok, "setcap {file_caps}: {text}");
    let like_kubernetes = || {
        let mut cmd = setpriv(&caps, true);
        cmd.args(["setpriv", "--inh-caps=-all", "--ambient-caps=-all"]);
        cmd
    };

    // Without file capabilities the agent cannot load: what a non-root pod gets from
    // capabilities.add alone.
    let out = like_kubernetes()
        .arg(&plain)
        .args(["run", "--libvirt-uri", ""])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs root (or CAP_BPF + CAP_PERFMON)"),
        "{err}"
    );

    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("kubernetes.log");
    let agent = start(Some(like_kubernetes()), &bin, "", &log);
    assert_kept_only_dac_read_search("as the Kubernetes pod", &agent, &log);
}
