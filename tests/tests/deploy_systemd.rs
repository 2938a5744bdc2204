//! The systemd unit as shipped (`deploy/systemd/optimus.service`): `systemd-analyze verify`
//! is clean (its command and man page resolved in a scratch root, nothing installed on the
//! host) and `systemd-analyze security --offline=true` rates its exposure at most 3.0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{binary, run_text as output};
use optimus_tests::env::{require_tools, skip, workspace_root};

const UNIT: &str = "deploy/systemd/optimus.service";

/// A scratch root holding the unit, the agent at /usr/bin/optimus, its man pages and
/// systemd's own units (verify resolves sysinit.target and friends there).
fn scratch_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for dir in [
        "etc/systemd/system",
        "usr/bin",
        "usr/lib/systemd",
        "usr/share/man",
    ] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    std::fs::copy(
        workspace_root().join(UNIT),
        r.join("etc/systemd/system/optimus.service"),
    )
    .unwrap();
    std::fs::copy(binary(), r.join("usr/bin/optimus")).unwrap();
    let (ok, text) = output(
        Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system")
            .arg(r.join("usr/lib/systemd/")),
    );
    assert!(ok, "copying systemd's units: {text}");
    let (ok, text) = output(
        Command::new(binary())
            .arg("man")
            .arg(r.join("usr/share/man/man1")),
    );
    assert!(ok, "optimus man: {text}");
    root
}

/// `Overall exposure level for optimus.service: 2.2 OK` → 2.2.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for optimus.service"))?;
    line.rsplit_once(':')?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn unit_verifies_clean_and_its_exposure_is_at_most_3() {
    if let Err(e) = require_tools(&[("systemd-analyze", "systemd"), ("man", "man-db")]) {
        let _ = skip(
            "unit_verifies_clean_and_its_exposure_is_at_most_3",
            &e.to_string(),
        );
        return;
    }
    assert!(
        binary().exists(),
        "{} missing: build it first",
        binary().display()
    );
    let root = scratch_root();
    let r: &Path = root.path();
    let (ok, text) = output(
        Command::new("systemd-analyze")
            .env("MANPATH", r.join("usr/share/man"))
            .arg("verify")
            .arg(format!("--root={}", r.display()))
            .arg("/etc/systemd/system/optimus.service"),
    );
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    let (ok, report) = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(workspace_root().join(UNIT)),
    );
    assert!(ok, "systemd-analyze security:\n{report}");
    let level = exposure(&report).unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    eprintln!("systemd-analyze security --offline=true: overall exposure {level}");
    assert!(level <= 3.0, "exposure {level} > 3.0:\n{report}");
}

#[test]
fn unit_runs_the_agent_as_optimus_with_flags_from_etc_default() {
    let unit = std::fs::read_to_string(workspace_root().join(UNIT)).unwrap();
    let value = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .collect()
    };
    assert_eq!(value("User"), ["optimus"]);
    assert_eq!(value("EnvironmentFile"), ["-/etc/default/optimus"]);
    assert_eq!(value("ExecStart"), ["/usr/bin/optimus run $OPTIMUS_ARGS"]);
    assert_eq!(value("StateDirectory"), ["optimus"]);
    assert_eq!(value("NoNewPrivileges"), ["yes"]);
    assert_eq!(value("ProtectSystem"), ["strict"]);
    let caps = "CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH";
    assert_eq!(value("AmbientCapabilities"), [caps]);
    assert_eq!(value("CapabilityBoundingSet"), [caps]);
    let default =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/optimus.default")).unwrap();
    let args = default
        .lines()
        .find_map(|l| l.strip_prefix("OPTIMUS_ARGS="))
        .expect("OPTIMUS_ARGS in optimus.default");
    assert!(args.contains("--listen 127.0.0.1:9947"), "{args}");
    // The shipped flags parse: clap rejects an unknown flag or a bad value before it
    // honours the trailing --help, so this fails on any typo without starting the agent.
    let flags: Vec<&str> = args.trim_matches('"').split_whitespace().collect();
    let out = Command::new(binary())
        .arg("run")
        .args(&flags)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{flags:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
