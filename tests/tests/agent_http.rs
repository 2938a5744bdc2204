//! Serving in production conditions, against the real binary: a real Prometheus scraping
//! over TLS with basic auth (exporter-toolkit web config), curl as a second client (401,
//! gzip, keep-alive, plain HTTP refused), and hundreds of idle connections held by an
//! unprivileged user under a tight open-file limit while a real libvirt guest is watched:
//! no VM series may vanish and a scrape still completes at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Agent;
use optimus_tests::guest::{GuestImage, GuestPlan};
use optimus_tests::http::sample;
use optimus_tests::libvirt::{Domain, Libvirtd};
use optimus_tests::proc::{free_port, ChildGuard};
use optimus_tests::prometheus::{value, Prometheus};

/// bcrypt (cost 10) of `optimus-test`, made with `htpasswd -nbBC 10 "" optimus-test`.
const HASH: &str = "$2y$10$7mx0Q3bsJHMEr.EeN/VpN.64d40YoYZGLDf1dBAAGq0W0EdY9HrBy";
const PASSWORD: &str = "optimus-test";

fn tls_fixture(name: &str) -> PathBuf {
    optimus_tests::env::workspace_root()
        .join("tests/fixtures/tls")
        .join(name)
}

/// `curl` with the test CA; returns (exit status success, stdout).
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(tls_fixture("ca.crt"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs (Debian package curl)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth() {
    if optimus_tests::env::require_root("prometheus_scrapes_over_tls_with_basic_auth").is_err() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.yml");
    // Exactly what a node_exporter user has: relative file names resolve next to the file.
    std::fs::copy(tls_fixture("server.crt"), dir.path().join("server.crt")).unwrap();
    std::fs::copy(tls_fixture("server.key"), dir.path().join("server.key")).unwrap();
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             basic_auth_users:\n  prometheus: {HASH}\n\
             http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(common::binary());
    cmd.args(["run", "--listen", &addr, "--libvirt-uri", ""])
        .arg("--web.config.file")
        .arg(&web)
        .stdin(Stdio::null());
    let _agent = ChildGuard::spawn(cmd).unwrap();
    let url = format!("https://{addr}/metrics");
    let auth = format!("prometheus:{PASSWORD}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !curl(&["-u", &auth, &url])
        .1
        .contains("optimus_samples_total")
    {
        assert!(
            Instant::now() < deadline,
            "the TLS agent never served metrics"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A wrong password and no password: 401.
    let code = |args: &[&str]| {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        curl(&all).1
    };
    assert_eq!(code(&["-u", "prometheus:wrong", &url]), "401");
    assert_eq!(code(&[&url]), "401");
    assert_eq!(code(&["-u", &auth, &url]), "200");
    // Plain HTTP to the TLS port gets no metrics.
    let (ok, body) = curl(&[&format!("http://{addr}/metrics")]);
    assert!(
        !ok || !body.contains("optimus_"),
        "plain HTTP got metrics: {body}"
    );
    // gzip when asked for; the configured header on every response.
    let (_, head) = curl(&[
        "-u",
        &auth,
        "-H",
        "Accept-Encoding: gzip",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &url,
    ]);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    // Two requests, one connection: curl reports 1 new connection, then 0.
    let (_, connects) = curl(&[
        "-u",
        &auth,
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{num_connects} ",
        &url,
        &url,
    ]);
    assert_eq!(
        connects.split_whitespace().collect::<Vec<_>>(),
        ["1", "0"],
        "keep-alive"
    );

    // A real Prometheus, configured the way it would scrape a secured node_exporter.
    let job = format!(
        "    scheme: https\n    tls_config:\n      ca_file: '{}'\n    basic_auth:\n      username: prometheus\n      password: '{PASSWORD}'\n",
        tls_fixture("ca.crt").display()
    );
    let prom = Prometheus::start_with(&addr, Duration::from_secs(1), &job).unwrap();
    let up = prom
        .query_until("up", Duration::from_secs(30), |r| {
            r.first().and_then(value) == Some(1.0)
        })
        .unwrap();
    assert_eq!(up.len(), 1);
    let samples = prom
        .query_until("optimus_samples_total", Duration::from_secs(10), |r| {
            r.first().and_then(value).is_some_and(|v| v > 0.0)
        })
        .unwrap();
    assert_eq!(samples.len(), 1);
}

/// Holds `n` idle TCP connections to `addr` as uid 65534 until dropped.
fn hold_idle_connections(addr: &str, n: usize) -> ChildGuard {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = format!(
        "import socket, sys, time\n\
         s = []\n\
         for _ in range({n}):\n    c = socket.create_connection(('{host}', {port}), timeout=10); s.append(c)\n\
         print('ready', len(s), flush=True)\n\
         time.sleep(120)\n"
    );
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        &script,
    ])
    .current_dir("/")
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut child = ChildGuard::spawn(cmd).unwrap();
    let stdout = child.child_mut().stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(
        line.starts_with(&format!("ready {n}")),
        "the unprivileged client did not open {n} connections: {line:?}"
    );
    child
}

#[test]
fn idle_connections_of_another_user_blank_nothing() {
    if optimus_tests::env::require_root("idle_connections_of_another_user_blank_nothing").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let libvirtd = Libvirtd::start().unwrap();
    // 256 descriptors in all, hard limit too: the agent cannot raise it.
    let agent = Agent::start_wrapped(
        &["sh", "-c", "ulimit -n 256 && exec \"$@\"", "sh"],
        &["--libvirt-uri", libvirtd.uri()],
    );
    let plan = GuestPlan {
        busy_vcpus: vec![],
        io: None,
    };
    let domain = Domain::create(&libvirtd, "optimus-http-fd", &image, &plan, 1, None).unwrap();
    let uuid = domain.uuid().to_owned();
    let has_vm = |m: &str| {
        sample(
            m,
            "optimus_vm_info",
            &[
                ("vm_name", "optimus-http-fd"),
                ("vm_uuid", &uuid),
                ("source", "libvirt"),
            ],
        ) == Some(1.0)
    };
    agent.wait_for(Duration::from_secs(30), "the libvirt VM", has_vm);

    let _idle = hold_idle_connections(&agent.addr, 500);
    // Every sample while the 500 are held keeps the VM, and each scrape is prompt.
    for _ in 0..4 {
        let t = Instant::now();
        let m = agent.next_sample();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a scrape took {:?} with 500 idle connections held",
            t.elapsed()
        );
        assert!(
            has_vm(&m),
            "the VM vanished while connections were held:\n{m}"
        );
        assert!(
            sample(&m, "optimus_vms", &[]).is_some_and(|v| v >= 1.0),
            "optimus_vms fell"
        );
    }
    let t = Instant::now();
    agent.scrape();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "one scrape took {:?} beside 500 idle connections",
        t.elapsed()
    );
    domain.destroy().unwrap();
}
