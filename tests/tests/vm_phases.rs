//! VM phases end to end: a real TCG guest with vCPU 0 burning, phases switched with
//! `optimus phase` over the agent's control socket. Each occurrence's CPU seconds
//! (`/api/v1/phases`) match the kernel's schedstat deltas of the guest's QEMU threads
//! between the switches, the phase energies add up to the VM's energy on one scrape, phase
//! labels never become Prometheus labels, and `optimus measure` runs beside the agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{assert_close, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan, READY_MARKER};
use optimus_tests::http::{get, parse, sample};
use optimus_tests::proc::{run, schedstat_ns};
use optimus_tests::prometheus::promtool_check;
use optimus_tests::qemu::PlainQemu;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// On-CPU seconds of every thread of process `pid`, from schedstat.
fn qemu_cpu_seconds(pid: u32) -> f64 {
    let mut ns = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = entry
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // A thread may exit between the listing and the read.
        ns += schedstat_ns(pid, tid).unwrap_or(0);
    }
    #[expect(clippy::cast_precision_loss, reason = "ns to s")]
    let s = ns as f64 / 1e9;
    s
}

/// Runs `optimus phase`. A blocking wait (no polling), so the kernel's account read right
/// after it returns is within a millisecond or so of the boundary the agent recorded; the
/// client itself gives up after 10 s without an answer.
fn phase(socket: &str, vm: &str, words: &[&str]) -> std::process::Output {
    Command::new(common::binary())
        .args(["phase", "--control-socket", socket, "--vm", vm])
        .args(words)
        .output()
        .unwrap()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "optimus phase failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vm_phases_match_schedstat_and_add_up_to_the_vm() {
    if optimus_tests::env::require_root("vm_phases_match_schedstat").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let uuid = "6c0f2a1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
    let name = "phase-guest";
    let qemu = PlainQemu::spawn(
        name,
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
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("control.sock");
    let socket = socket.to_str().unwrap();
    let agent = Agent::start(&["--libvirt-uri", "", "--no-nvml", "--control-socket", socket]);
    agent.wait_for(Duration::from_secs(10), "the guest", |m| {
        sample(m, "optimus_vm_info", &[("vm_uuid", uuid)]).is_some()
    });
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is root-only");

    // Switch phases by name and by UUID; read the kernel's account right after each switch.
    let pid = qemu.pid();
    let plan: [(&str, &[&str], u64); 4] = [
        (name, &["warmup"], 3),
        (uuid, &["train", "epoch=1"], 4),
        (name, &["train", "epoch=2"], 4),
        (name, &["-"], 0),
    ];
    let mut kernel = Vec::new();
    for (vm, words, secs) in plan {
        let line = ok(&phase(socket, vm, words));
        assert!(line.contains(uuid), "{line}");
        kernel.push(qemu_cpu_seconds(pid));
        std::thread::sleep(Duration::from_secs(secs));
    }

    let (status, body) = get(&agent.addr, "/api/v1/phases").unwrap();
    assert_eq!(status, 200, "{body}");
    eprintln!("GET /api/v1/phases: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let vm = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["vm_uuid"] == uuid)
        .unwrap_or_else(|| panic!("no phases for the guest: {v}"));
    assert_eq!(vm["vm_name"], name);
    assert_eq!(vm["current"], "(none)");
    let occ = vm["occurrences"].as_array().unwrap();
    let names: Vec<&str> = occ.iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["(none)", "warmup", "train", "train", "(none)"]);
    assert_eq!(occ[2]["labels"]["epoch"], "1");
    assert_eq!(occ[3]["labels"]["epoch"], "2");
    for (i, o) in occ.iter().enumerate().skip(1).take(3) {
        let want = kernel[i] - kernel[i - 1];
        let got = o["cpu_seconds"].as_f64().unwrap();
        assert_close(
            &format!("phase {} {} CPU s", o["name"], o["labels"]),
            got,
            want,
            0.02,
        );
        let d = o["duration_seconds"].as_f64().unwrap();
        assert!(d > 1.5, "{o}");
        assert!(o["energy_joules"]["package"].as_f64().unwrap() > 0.0, "{o}");
    }

    // One scrape: the phases' energy adds up to the VM's, per zone; labels stay out.
    let m = agent.next_sample();
    promtool_check(&m).unwrap();
    assert!(
        !m.contains("epoch"),
        "a phase label became a Prometheus label"
    );
    let samples = parse(&m);
    let sum = |metric: &str, zone: &str| -> f64 {
        samples
            .iter()
            .filter(|s| {
                s.name == metric
                    && s.labels.get("vm_uuid").map(String::as_str) == Some(uuid)
                    && s.labels.get("zone").map(String::as_str) == Some(zone)
            })
            .map(|s| s.value)
            .sum()
    };
    let vm_j = sum("optimus_vm_energy_joules_total", "package");
    let phase_j = sum("optimus_vm_phase_energy_joules_total", "package");
    assert!(vm_j > 0.0);
    assert!(
        (vm_j - phase_j).abs() <= 1e-6 * vm_j + 1e-5,
        "phases {phase_j} J, VM {vm_j} J"
    );
    eprintln!("package: phases {phase_j:.6} J = VM {vm_j:.6} J");
    let info = |p: &str| {
        sample(
            &m,
            "optimus_vm_phase_info",
            &[("vm_uuid", uuid), ("phase", p)],
        )
    };
    assert_eq!(info("(none)"), Some(1.0));
    assert_eq!(info("train"), Some(0.0));
    let train_cpu = sample(
        &m,
        "optimus_vm_phase_cpu_seconds_total",
        &[("vm_uuid", uuid), ("phase", "train")],
    )
    .unwrap();
    assert_close(
        "train CPU s (both epochs)",
        train_cpu,
        kernel[3] - kernel[1],
        0.02,
    );

    // Bad requests: one clear line, non-zero exit.
    let out = phase(socket, "no-such-vm", &["train"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: unknown VM \"no-such-vm\""), "{err}");
    let out = phase(socket, name, &["bad(name)"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: bad phase"));
    let out = phase(&format!("{socket}.none"), name, &["train"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: no agent is running"), "{err}");

    // `optimus measure` works beside the agent (its own programs and maps).
    let mut cmd = Command::new(common::binary());
    cmd.args([
        "measure",
        "--",
        "sh",
        "-c",
        "echo beside > \"$OPTIMUS_PHASE\"; exit 3",
    ]);
    let out = run(&mut cmd, None, TIMEOUT).unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("beside"));
    agent.next_sample();

    drop(agent);
    assert!(
        !std::path::Path::new(socket).exists(),
        "the agent left its socket behind"
    );
    drop(qemu);
}
