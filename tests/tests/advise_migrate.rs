//! `optimus advise --apply` for real: two libvirtd instances on this machine (the harness's
//! and a second one in its own mount namespace, with its own run, state and config
//! directories and host UUID) play hosts `a` and `b`, each with an agent that exports only
//! its own libvirt's VMs (`--libvirt-only`); a real Prometheus labels them `host="a"` and
//! `host="b"`. advise live-migrates the busy guest from the dirty host to the clean one;
//! first through a template whose target socket does not exist, which must fail and leave
//! the guest where it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{advise, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan, READY_MARKER};
use optimus_tests::http::sample;
use optimus_tests::libvirt::{Domain, Libvirtd, SecondLibvirtd};
use optimus_tests::proc::{alive, run_ok};
use optimus_tests::prometheus::{value, Prometheus};
use serde_json::Value;

const VIRSH: Duration = Duration::from_secs(60);

/// `virsh ARGS` through `cmd` (a `virsh -c URI` command), trimmed stdout.
fn virsh(mut cmd: Command, args: &[&str]) -> String {
    run_ok(cmd.args(args), VIRSH).unwrap().trim().to_owned()
}

/// The host UUID in `virsh capabilities` (the first `<uuid>`, inside `<host>`).
fn host_uuid(cmd: Command) -> String {
    let caps = virsh(cmd, &["capabilities"]);
    let start = caps.find("<uuid>").expect("no <uuid> in capabilities") + "<uuid>".len();
    let end = caps[start..].find("</uuid>").unwrap() + start;
    caps[start..end].to_owned()
}

/// Whether two paths name one directory (device and inode), each resolved in the mount
/// namespace its path goes through (`/proc/PID/root/...`: that process's).
fn same_file(x: &str, y: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (x, y) = (std::fs::metadata(x).unwrap(), std::fs::metadata(y).unwrap());
    (x.dev(), x.ino()) == (y.dev(), y.ino())
}

/// A relabeling rule giving the target at `addr` the label `host="<name>"`.
fn host_rule(addr: &str, name: &str) -> String {
    format!(
        "      - source_labels: [__address__]\n        regex: '{}'\n        \
         target_label: host\n        replacement: '{name}'\n",
        addr.replace('.', "\\.")
    )
}

fn vm_cpu_seconds(metrics: &str, uuid: &str) -> f64 {
    sample(
        metrics,
        "optimus_vm_cpu_seconds_total",
        &[("vm_uuid", uuid), ("thread_kind", "vcpu")],
    )
    .unwrap_or(0.0)
}

#[test]
fn advise_apply_live_migrates_the_busy_guest_to_the_clean_host() {
    if optimus_tests::env::require_root("advise_apply_live_migrates").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let a = Libvirtd::start().unwrap();
    let b = SecondLibvirtd::start().unwrap();
    let (uuid_a, uuid_b) = (host_uuid(a.virsh()), host_uuid(b.virsh()));
    assert_eq!(uuid_b, b.host_uuid());
    assert_ne!(uuid_a, uuid_b, "both libvirtd instances have one host UUID");
    eprintln!(
        "host a: {uuid_a} ({}), host b: {uuid_b} ({})",
        a.uri(),
        b.uri()
    );

    // Both hosts' sockets under one directory, so that one template names them both.
    let hosts = tempfile::tempdir().unwrap();
    symlink("/run/libvirt", hosts.path().join("a")).unwrap();
    symlink(b.run_dir(), hosts.path().join("b")).unwrap();
    let template = format!(
        "qemu+unix:///system?socket={}/{{host}}/libvirt-sock",
        hosts.path().display()
    );
    // The same, but host b's libvirtd is missing.
    let broken = tempfile::tempdir().unwrap();
    symlink("/run/libvirt", broken.path().join("a")).unwrap();
    std::fs::create_dir(broken.path().join("b")).unwrap();
    let broken_template = format!(
        "qemu+unix:///system?socket={}/{{host}}/libvirt-sock",
        broken.path().display()
    );

    let vm = Domain::create(
        &a,
        "mig-busy",
        &image,
        &GuestPlan {
            busy_vcpus: vec![0],
            io: None,
        },
        1,
        None,
    )
    .unwrap();
    let uuid = vm.uuid().to_owned();
    // Persistent, as most production VMs are: it must move with its definition.
    let xml_path = hosts.path().join("mig-busy.xml");
    std::fs::write(&xml_path, virsh(a.virsh(), &["dumpxml", &uuid])).unwrap();
    virsh(a.virsh(), &["define", xml_path.to_str().unwrap()]);
    assert!(virsh(a.virsh(), &["dominfo", &uuid]).contains("Persistent:     yes"));
    let qemu_before = vm.qemu_pid().unwrap();

    // Each agent reads its own host's libvirt: its socket, and its status files under
    // `--run-root` (libvirt's word on which QEMU process is which domain). `--vm-filter` as
    // well: other harness users' VMs on host a are not this test's.
    let b_run = b.run_root();
    let agent = |uri: &str, run: &str, intensity: &str| {
        Agent::start(&[
            "--libvirt-uri",
            uri,
            "--run-root",
            run,
            "--libvirt-only",
            "--vm-filter",
            "mig-.*",
            "--carbon-intensity",
            intensity,
        ])
    };
    let agent_a = agent(a.uri(), "/run", "900");
    let agent_b = agent(b.uri(), b_run.to_str().unwrap(), "50");
    agent_a.wait_for(Duration::from_secs(20), "the guest on host a", |m| {
        m.contains(&format!(
            "optimus_vm_info{{vm_name=\"mig-busy\",vm_uuid=\"{uuid}\",source=\"libvirt\"}} 1"
        ))
    });
    // Host b's agent sees the same QEMU in /proc, but libvirt b does not run it.
    let m = agent_b.scrape();
    let leaked: Vec<&str> = m.lines().filter(|l| l.contains(&uuid)).collect();
    assert!(
        leaked.is_empty(),
        "--libvirt-only let host a's guest into host b's metrics:\n{}",
        leaked.join("\n")
    );

    let job = format!(
        "    relabel_configs:\n{}{}",
        host_rule(&agent_a.addr, "a"),
        host_rule(&agent_b.addr, "b")
    );
    let prom = Prometheus::start_many(
        &[agent_a.addr.as_str(), agent_b.addr.as_str()],
        Duration::from_secs(1),
        &job,
    )
    .unwrap();
    let scraping_since = Instant::now();
    vm.wait_for_console(READY_MARKER, Duration::from_secs(120))
        .unwrap();
    let power_q = format!(
        "sum(rate(optimus_vm_energy_joules_total{{zone=~\"package|dram|gpu\",vm_uuid=\"{uuid}\",host=\"a\"}}[20s]))"
    );
    prom.query_until(&power_q, Duration::from_secs(60), |r| {
        r.first().and_then(value).is_some_and(|v| v > 0.0)
    })
    .unwrap();
    // rate() over the window needs a window's worth of samples, or it reads low.
    std::thread::sleep(Duration::from_secs(23).saturating_sub(scraping_since.elapsed()));
    let url = format!("http://{}", prom.addr());
    let apply = |template: &str, extra: &[&str]| {
        let started = Instant::now();
        let mut args = vec![
            "--prometheus",
            &url,
            "--host-label",
            "host",
            "--window",
            "20s",
            // A tenth of the default: a TCG guest draws about a watt from the estimate.
            "--network-kwh-per-gb",
            "0.006",
            "--apply",
            "--libvirt-uri-template",
            template,
            "--json",
        ];
        args.extend(extra);
        let (code, out, err) = advise(&args);
        eprintln!(
            "advise --apply took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let j: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {out}\nstderr: {err}"));
        eprintln!("{}", serde_json::to_string_pretty(&j).unwrap());
        (code, j)
    };

    // A target whose libvirtd is not there: nothing moves, and advise says why.
    let (code, j) = apply(&broken_template, &[]);
    assert_eq!(code, 1, "a failed migration must fail the run: {j}");
    let rec = &j["recommendations"][0];
    assert_eq!(rec["vm_uuid"], uuid.as_str(), "{j}");
    assert_eq!(
        (&rec["from"], &rec["to"]),
        (&"a".into(), &"b".into()),
        "{j}"
    );
    let applied = j["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 1, "{j}");
    assert_eq!(applied[0]["ok"], false, "{j}");
    let detail = applied[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("live migration to") && detail.contains("the VM still runs on a"),
        "{detail}"
    );
    assert!(
        detail.contains("libvirt-sock"),
        "libvirt's reason: {detail}"
    );
    assert_eq!(virsh(a.virsh(), &["domstate", &uuid]), "running");
    assert_eq!(vm.qemu_pid().unwrap(), qemu_before);

    // A migration that cannot finish in time (256 MiB at 1 MiB/s, 3 s allowed) is aborted,
    // and the guest keeps running where it was.
    let (code, j) = apply(
        &template,
        &["--migration-bandwidth", "1", "--migration-timeout", "3s"],
    );
    assert_eq!(code, 1, "an aborted migration must fail the run: {j}");
    let detail = j["applied"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("did not finish within 3 s")
            && detail.contains("aborted")
            && detail.contains("the VM still runs on a"),
        "{detail}"
    );
    assert_eq!(virsh(a.virsh(), &["domstate", &uuid]), "running");
    assert_eq!(vm.qemu_pid().unwrap(), qemu_before);
    assert!(
        !virsh(b.virsh(), &["list", "--all", "--uuid"]).contains(&uuid),
        "host b kept the aborted guest"
    );

    // The real move.
    let (code, j) = apply(&template, &[]);
    let applied = &j["applied"][0];
    assert_eq!(code, 0, "{j}\nlibvirtd b log:\n{}", b.log_tail(30));
    assert_eq!(applied["ok"], true, "{j}");
    assert_eq!(applied["vm_uuid"], uuid.as_str());
    assert_eq!(
        (&applied["from"], &applied["to"]),
        (&"a".into(), &"b".into())
    );
    assert!(
        applied["detail"]
            .as_str()
            .unwrap()
            .contains("its agent reported it"),
        "{j}"
    );
    // It runs under b's libvirt, with its definition, and a knows it no more.
    assert_eq!(virsh(b.virsh(), &["domstate", &uuid]), "running");
    assert!(virsh(b.virsh(), &["dominfo", &uuid]).contains("Persistent:     yes"));
    assert!(
        !virsh(a.virsh(), &["list", "--all", "--uuid"]).contains(&uuid),
        "host a still has the domain"
    );
    // A new QEMU, started by b's libvirtd in its namespace; a's is gone.
    let qemu_after = vm.qemu_pid().unwrap();
    assert_ne!(qemu_after, qemu_before);
    assert!(!alive(qemu_before));
    // libvirt gives each QEMU a mount namespace of its own, made from its daemon's.
    assert!(
        same_file(
            &format!("/proc/{qemu_after}/root/run/libvirt"),
            b.run_dir().to_str().unwrap()
        ),
        "the new QEMU does not see host b's /run/libvirt"
    );
    // Host b's agent exports it, as libvirt's, and its vCPU keeps spinning there.
    let m = agent_b.wait_for(Duration::from_secs(10), "the guest on host b", |m| {
        m.contains(&format!(
            "optimus_vm_info{{vm_name=\"mig-busy\",vm_uuid=\"{uuid}\",source=\"libvirt\"}} 1"
        ))
    });
    let cpu_then = vm_cpu_seconds(&m, &uuid);
    agent_b.wait_for(
        Duration::from_secs(20),
        "the guest's vCPU to run on host b",
        |m| vm_cpu_seconds(m, &uuid) > cpu_then + 0.5,
    );
    agent_a.wait_for(Duration::from_secs(10), "host a to drop the guest", |m| {
        !m.contains(&uuid)
    });
    let info = prom
        .query_until(
            &format!("optimus_vm_info{{vm_uuid=\"{uuid}\"}}"),
            Duration::from_secs(10),
            |r| r.len() == 1,
        )
        .unwrap();
    assert_eq!(info[0]["metric"]["host"], "b", "{info:?}");
    assert_eq!(info[0]["metric"]["source"], "libvirt", "{info:?}");
}
