//! The agent's command line as a user meets it: bad input gets a one-line cause and fix and
//! a non-zero exit; `optimus check` tells what works here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{binary, Agent};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_say_what_is_wrong() {
    let (code, _, err) = run(&["run", "--interval", "fast"]);
    assert_ne!(code, 0);
    assert!(err.contains("`fast` is not a duration"), "{err}");
    let (code, _, err) = run(&["run", "--listen", "nowhere"]);
    assert_ne!(code, 0);
    assert!(err.contains("--listen"), "{err}");
    let (code, _, err) = run(&["run", "--carbon-intensity", "200", "--uk-grid"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = run(&["run", "--pue", "0.5", "--libvirt-uri", ""]);
    assert_ne!(code, 0);
    assert!(
        err.starts_with("error: ") && err.to_lowercase().contains("pue"),
        "{err}"
    );
    let (code, _, err) = run(&["run", "--libvirt-only", "--libvirt-uri", ""]);
    assert_ne!(code, 0);
    assert!(
        err.starts_with("error: --libvirt-only") && err.contains("give a libvirt URI"),
        "{err}"
    );
}

#[test]
fn not_root_and_no_btf_say_why_and_how_to_fix() {
    if optimus_tests::env::require_root("not_root_and_no_btf_say_why").is_err() {
        return;
    }
    // As nobody, without capabilities.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(binary())
        .args(["run", "--libvirt-uri", ""])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("needs root") && err.contains("sudo"), "{err}");
    // A sysfs root without BTF.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&[
        "run",
        "--libvirt-uri",
        "",
        "--sys-root",
        empty.path().to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn port_in_use_is_one_line_with_the_fix() {
    if optimus_tests::env::require_root("port_in_use_is_one_line_with_the_fix").is_err() {
        return;
    }
    let first = Agent::start(&["--libvirt-uri", ""]);
    let (code, _, err) = run(&["run", "--listen", &first.addr, "--libvirt-uri", ""]);
    assert_ne!(code, 0);
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"));
    assert!(
        line.contains("address already in use") && line.contains("--listen"),
        "{line}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn check_reports_what_works() {
    if optimus_tests::env::require_root("check_reports_what_works").is_err() {
        return;
    }
    let (code, out, err) = run(&["check", "--libvirt-uri", ""]);
    assert_eq!(code, 0, "check failed here:\n{out}\n{err}");
    for what in [
        "privileges",
        "kernel BTF",
        "eBPF tracer",
        "block I/O",
        "libvirt",
        "QEMU processes",
        "energy meter",
    ] {
        assert!(out.contains(what), "check does not mention {what}:\n{out}");
    }
    assert!(out.contains("[ok  ] eBPF tracer"), "{out}");
}
