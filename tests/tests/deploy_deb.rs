//! The Debian package on this very machine: `dpkg -i` of the .deb `cargo xtask test` built
//! (`$OPTIMUS_DEB`, the debug build packaged by `cargo xtask deb --debug`'s code), the
//! installed unit verified by systemd, `optimus check` from /usr/bin, the agent run as the
//! package's user with the unit's capabilities and the flags of /etc/default/optimus,
//! then `dpkg --purge`, after which nothing of it is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{run_text as run, Agent};
use optimus_tests::env::{require_root, require_tools, skip, workspace_root};
use optimus_tests::proc::free_port;

/// Everything the package installs or creates (the state directory by postinst).
const INSTALLED: [&str; 7] = [
    "/usr/bin/optimus",
    "/lib/systemd/system/optimus.service",
    "/etc/default/optimus",
    "/var/lib/optimus",
    "/usr/share/man/man1/optimus.1.gz",
    "/usr/share/man/man1/optimus-run.1.gz",
    "/usr/share/doc/optimus",
];
const DASHBOARD: &str = "/usr/share/optimus/grafana/optimus.json";

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "optimus"]))
        .1
        .contains("install ok installed")
}

fn purge() -> (bool, String) {
    run(Command::new("dpkg").args(["--purge", "optimus"]))
}

/// Purges the package whatever happens to the test.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let (ok, text) = purge();
            if !ok {
                eprintln!("optimus-tests: dpkg --purge optimus failed: {text}");
            }
        }
    }
}

/// `getent passwd optimus` fields, if the user exists.
fn passwd() -> Option<Vec<String>> {
    let (ok, text) = run(Command::new("getent").args(["passwd", "optimus"]));
    ok.then(|| text.trim().split(':').map(str::to_owned).collect())
}

fn deb_path() -> Option<PathBuf> {
    let deb = std::env::var_os("OPTIMUS_DEB").map(PathBuf::from)?;
    Some(deb)
}

/// `OPTIMUS_ARGS` of the installed /etc/default/optimus with its `--listen` moved to `addr`
/// (another agent may hold the default port), split as systemd splits `$OPTIMUS_ARGS`.
fn default_args(addr: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/etc/default/optimus").unwrap();
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("OPTIMUS_ARGS="))
        .expect("OPTIMUS_ARGS in /etc/default/optimus");
    let mut args: Vec<String> = value
        .trim_matches('"')
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let at = args.iter().position(|a| a == "--listen").unwrap();
    args[at + 1] = addr.to_owned();
    args
}

#[test]
fn dpkg_install_check_run_as_optimus_and_purge_leaves_nothing() {
    if require_root("dpkg_install_check_run_as_optimus_and_purge").is_err() {
        return;
    }
    require_tools(&[("dpkg", "dpkg"), ("setpriv", "util-linux")]).unwrap();
    let Some(deb) = deb_path() else {
        let _ = skip(
            "dpkg_install_check_run_as_optimus_and_purge",
            "OPTIMUS_DEB is not set: `cargo xtask test` packages the debug build and sets it \
             (or run `cargo xtask deb --debug` and point OPTIMUS_DEB at the .deb)",
        );
        return;
    };
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(concat!("optimus_", env!("CARGO_PKG_VERSION"), "_amd64.deb"))
    );
    if installed() {
        // A run that died before its guard: start from nothing.
        assert!(purge().0);
    }
    assert!(
        passwd().is_none(),
        "a user `optimus` exists before the install"
    );
    let guard = Installed;

    let (ok, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i {}:\n{text}", deb.display());
    for path in INSTALLED {
        assert!(Path::new(path).exists(), "{path} missing after dpkg -i");
    }
    let repo = workspace_root();
    for (installed, shipped) in [
        (
            "/lib/systemd/system/optimus.service",
            "deploy/systemd/optimus.service",
        ),
        ("/etc/default/optimus", "deploy/systemd/optimus.default"),
    ] {
        assert_eq!(
            std::fs::read_to_string(installed).unwrap(),
            std::fs::read_to_string(repo.join(shipped)).unwrap(),
            "{installed}"
        );
    }
    let (_, conffiles) = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "optimus"]));
    assert!(conffiles.contains("/etc/default/optimus"), "{conffiles}");
    // The dashboard is shipped exactly when the tree it was built from had one.
    assert_eq!(
        Path::new(DASHBOARD).exists(),
        repo.join("deploy/grafana/optimus.json").exists(),
        "{DASHBOARD}"
    );

    // The system user: a system uid, no login, home at the state directory it owns.
    let user = passwd().expect("postinst created no user `optimus`");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "not a system uid: {user:?}");
    assert_eq!(user[5], "/var/lib/optimus");
    assert_eq!(user[6], "/usr/sbin/nologin");
    let (_, owner) = run(Command::new("stat").args(["-c", "%U:%G %a", "/var/lib/optimus"]));
    assert_eq!(owner.trim(), "optimus:optimus 750");

    // The installed unit, with its real binary and man page: verify is clean.
    let (ok, text) = run(Command::new("systemd-analyze").args(["verify", "optimus.service"]));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    let (ok, man) = run(Command::new("man").args(["-w", "optimus-run"]));
    assert!(
        ok && man.contains("/usr/share/man/man1/optimus-run.1.gz"),
        "{man}"
    );

    // optimus check from /usr/bin, as root.
    let (ok, text) = run(Command::new("/usr/bin/optimus").args(["check", "--libvirt-uri", ""]));
    assert!(ok, "optimus check:\n{text}");
    assert!(text.contains("[ok  ] eBPF tracer"), "{text}");

    // The agent as the unit runs it: user optimus, exactly the unit's capabilities, the
    // flags of /etc/default/optimus.
    let caps = "+bpf,+perfmon,+dac_read_search";
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=optimus",
        "--regid=optimus",
        "--init-groups",
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
        &format!("--bounding-set=-all,{caps}"),
        "--no-new-privs",
        "/usr/bin/optimus",
        "run",
    ])
    .args(default_args(&addr))
    .args(["--libvirt-uri", ""])
    .stdin(Stdio::null());
    let agent = Agent::spawn_exact(cmd, addr);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == uid.to_string()),
        "{uid_line}"
    );
    assert!(status.contains("CapEff:\t0000000000000004"), "{status}");
    drop(agent);

    // Purge: nothing left, user and group included.
    let (ok, text) = purge();
    assert!(ok, "dpkg --purge optimus:\n{text}");
    for path in INSTALLED
        .iter()
        .chain([&DASHBOARD, &"/usr/share/man/man1/optimus-check.1.gz"])
    {
        assert!(!Path::new(path).exists(), "{path} left after dpkg --purge");
    }
    assert!(passwd().is_none(), "user optimus left after dpkg --purge");
    let (group_left, _) = run(Command::new("getent").args(["group", "optimus"]));
    assert!(!group_left, "group optimus left after dpkg --purge");
    assert!(!installed(), "dpkg still lists optimus as installed");
    drop(guard);
}
