//! `build`, `run`, `test` and `lint`: cargo commands run with the environment setup chose.
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};

use crate::cmd::Cmd;
use crate::demo::{self, While};
use crate::setup::{self, Purpose, Ready};
use crate::signals;

const AGENT_PACKAGE: &str = "optimus-user";
const AGENT_BIN: &str = "optimus";
const TESTS_PACKAGE: &str = "optimus-tests";

fn banner(step: &str, what: &str, cmd: &Cmd) {
    println!("\n==> [{step}] {what}\n    $ {}", cmd.shown());
}

pub(crate) fn build_agent(ready: &Ready, release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "--package", AGENT_PACKAGE];
    if release {
        args.push("--release");
    }
    let profile = if release { "release" } else { "debug" };
    let cmd = ready.cargo(args);
    banner(
        "build",
        &format!("agent and eBPF programs ({profile})"),
        &cmd,
    );
    cmd.run().context("building the agent")?;
    let bin = ready.ws.bin(profile, AGENT_BIN);
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// `cargo xtask build [--release]`.
pub fn build(release: bool) -> Result<()> {
    let ready = setup::ensure(Purpose::Build)?;
    let bin = build_agent(&ready, release)?;
    println!("built {}", bin.display());
    Ok(())
}

/// `cargo xtask run [--demo-vm [--vm-name NAME]] [-- ARGS]`: the release agent in the
/// foreground, with the demo guest named `demo_vm` booted around it if given.
pub fn run(demo_vm: Option<&str>, args: &[OsString]) -> Result<ExitCode> {
    let purpose = if demo_vm.is_some() {
        Purpose::Demo
    } else {
        Purpose::Run
    };
    let ready = setup::ensure(purpose)?;
    let bin = build_agent(&ready, true)?;
    let agent = || {
        let cmd = ready.tool(&bin).arg("run").args(args);
        println!(
            "\n==> [run] the agent (Ctrl-C stops it)\n    $ {}",
            cmd.shown()
        );
        cmd
    };
    let Some(vm_name) = demo_vm else {
        // Replacing xtask leaves the terminal's signals to the agent alone.
        return Err(agent().exec()).context("starting the agent");
    };
    let signals = signals::catch()?;
    let mut code = ExitCode::FAILURE;
    demo::with_demo_vm(
        vm_name,
        Some(&bin),
        While::Running(&mut || {
            let status = run_forwarding(agent(), signals.clone())?;
            println!("agent exited ({status})");
            code = exit_code(status);
            Ok(())
        }),
    )?;
    Ok(code)
}

/// Runs `cmd` while xtask catches the termination signals, passing to the child those it
/// did not get itself: the terminal's Ctrl-C already reaches the whole process group.
fn run_forwarding(cmd: Cmd, signals: signals::Catcher) -> Result<ExitStatus> {
    let (shown, mut child) = cmd.spawn()?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let done_in_thread = Arc::clone(&done);
    // Never joined: it sits on the signal pipe until the process exits.
    std::thread::spawn(move || {
        while let Ok(caught) = signals.wait() {
            if done_in_thread.load(Ordering::SeqCst) {
                break;
            }
            if caught.signal != libc::SIGINT || caught.from_kill {
                let _ = signals::send(pid, caught.signal);
            }
        }
    });
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    done.store(true, Ordering::SeqCst);
    Ok(status)
}

/// The child's exit code, or 128 + signal as a shell reports it.
fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `cargo xtask test [-- TEST ARGS]`: debug build, unit tests in parallel, then the
/// integration tests one at a time (they share libvirtd, the block devices and the CPUs).
pub fn test(test_args: &[OsString]) -> Result<ExitCode> {
    let ready = setup::ensure(Purpose::Test)?;
    let bin = build_agent(&ready, false)?;
    // Absolute already: cargo metadata's target_directory is.

    let unit = ready
        .cargo([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--exclude",
            TESTS_PACKAGE,
        ])
        .args(["--exclude", "optimus-ebpf"])
        .env("OPTIMUS_BIN", &bin)
        .arg("--")
        .args(test_args);
    banner("unit", "unit tests of every crate, in parallel", &unit);
    let unit = unit.status()?;

    // The package test installs a .deb of this same debug build (no release build in CI).
    let deb_dir = ready.ws.target_dir.join("debian-test");
    let deb = match crate::deb::package(&ready, &bin, true, &deb_dir) {
        Ok(deb) => Some(deb),
        Err(e) => {
            println!("deb: packaging failed, the package test will fail: {e:#}");
            None
        }
    };
    // --no-fail-fast: one failing test file must not hide how the others fare.
    let mut integration = ready
        .cargo(["test", "--package", TESTS_PACKAGE, "--no-fail-fast"])
        .env("OPTIMUS_BIN", &bin);
    if let Some(deb) = &deb {
        integration = integration.env("OPTIMUS_DEB", deb);
    }
    let integration = integration.args(["--", "--test-threads=1"]).args(test_args);
    banner(
        "integration",
        "real-component tests (root, kernel, QEMU), one at a time",
        &integration,
    );
    let integration = integration.status()?;

    // The validation framework's quick run (real guests, about 3 minutes); it fails on a
    // missing scenario or figure and on a figure out of its bound. A filtered run skips it.
    if !test_args.is_empty() {
        println!("\n==> [validate] skipped: a test filter was given");
        return summarize(&[("unit tests", unit), ("integration tests", integration)]);
    }
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let validate = Cmd::new(&xtask)
        .shown_as("cargo xtask")
        .args(["validate", "--quick", "--bin"])
        .arg(&bin)
        .arg("--output")
        .arg(ready.ws.target_dir.join("validate-quick"));
    banner(
        "validate",
        "cargo xtask validate --quick: every scenario and figure, within bounds",
        &validate,
    );
    let validate = validate.status()?;

    summarize(&[
        ("unit tests", unit),
        ("integration tests", integration),
        ("validate --quick", validate),
    ])
}

/// `cargo xtask lint`: rustfmt and clippy as CI runs them (full build, eBPF included).
pub fn lint() -> Result<ExitCode> {
    let ready = setup::ensure(Purpose::Lint)?;
    let fmt = ready.cargo(["fmt", "--all", "--", "--check"]);
    banner("fmt", "formatting", &fmt);
    let fmt = fmt.status()?;
    let clippy = ready.cargo(["clippy", "--all-targets", "--", "-D", "warnings"]);
    banner("clippy", "lints, warnings denied", &clippy);
    let clippy = clippy.status()?;
    summarize(&[("cargo fmt --check", fmt), ("cargo clippy", clippy)])
}

/// One line per phase; failure if any phase failed.
fn summarize(phases: &[(&str, (String, ExitStatus))]) -> Result<ExitCode> {
    println!("\n==> summary");
    let mut failed = false;
    for (name, (_, status)) in phases {
        let verdict = if status.success() { "ok" } else { "FAILED" };
        failed |= !status.success();
        println!("    {name}: {verdict} ({status})");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
