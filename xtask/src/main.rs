//! Developer tasks for Optimus, run as `cargo xtask <command>` (see `.cargo/config.toml`).
//! Every task first makes the machine ready (`setup`) for what it is about to do, then runs
//! cargo with the environment that choice implies.
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod cmd;
mod deb;
mod demo;
mod fuzz;
mod setup;
mod signals;
mod tasks;
mod validate;
mod ws;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test Optimus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (Debian packages, eBPF toolchain, bpf-linker).
    Setup {
        /// Install only what this purpose needs.
        #[arg(long = "for", value_enum, default_value = "all")]
        purpose: setup::Purpose,
    },
    /// Build the agent with its eBPF programs.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build the release agent and run it in the foreground.
    Run {
        /// Boot the demo guest first and destroy it when the agent exits.
        #[arg(long)]
        demo_vm: bool,
        /// libvirt domain name of the demo guest.
        #[arg(long, requires = "demo_vm", default_value = demo::DEFAULT_NAME)]
        vm_name: String,
        /// Arguments for `optimus run`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then run the unit tests and the integration tests (one at a time).
    Test {
        /// Arguments for the test binaries (a name filter, --nocapture, ...).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// cargo fmt --check and clippy with warnings denied.
    Lint,
    /// Boot a small libvirt guest (vCPU 0 busy, vCPU 1 idle, with the guest channel and,
    /// once `optimus` is built, `optimus guest` inside) and keep it until Ctrl-C.
    DemoVm {
        /// libvirt domain name.
        #[arg(long, default_value = demo::DEFAULT_NAME)]
        name: String,
        /// Leave it running after xtask exits.
        #[arg(long)]
        keep: bool,
    },
    /// Build the Debian package target/debian/optimus_<version>_amd64.deb (cargo-deb).
    Deb {
        /// Package the debug build instead of building the release one (what the tests do).
        #[arg(long)]
        debug: bool,
        /// Directory to write the .deb into.
        #[arg(long, value_name = "DIR")]
        output: Option<std::path::PathBuf>,
    },
    /// Fuzz every parser of outside input (cargo-fuzz, nightly): SECONDS per target, one
    /// after the other; reports crashes with the reproducer's path.
    Fuzz {
        /// Seconds to fuzz each target.
        #[arg(default_value_t = 30)]
        seconds: u64,
        /// Only this target (repeatable); default: all of them.
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Then rewrite fuzz/corpus as a minimal set covering it and the new inputs.
        #[arg(long)]
        merge: bool,
    },
    /// Validation (root): real TCG guests, the real agent and a synthetic meter with a
    /// known nonlinear power curve; writes target/validate/report.md, report.json and PNG
    /// plots, and fails when a figure is out of its bound.
    Validate {
        /// A shorter run of every scenario (about 3 minutes; CI runs it).
        #[arg(long)]
        quick: bool,
        /// The agent binary to validate (default: build it, release; debug with --quick).
        #[arg(long, value_name = "PATH")]
        bin: Option<std::path::PathBuf>,
        /// Directory for the report (default: target/validate).
        #[arg(long, value_name = "DIR")]
        output: Option<std::path::PathBuf>,
        /// Where to look for a real RAPL meter to compare the estimate and the model with.
        #[arg(long, value_name = "DIR", default_value = "/sys/class/powercap")]
        rapl_root: std::path::PathBuf,
    },
    /// Overhead benchmark (root): writes target/bench/report.md and report.json.
    Bench {
        /// A short smoke run (about 2 minutes instead of about 4).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            // The cause chain, without the backtrace anyhow's Debug adds under RUST_BACKTRACE.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Setup { purpose } => setup::ensure(purpose).map(|_| ExitCode::SUCCESS),
        Command::Build { release } => tasks::build(release).map(|()| ExitCode::SUCCESS),
        Command::Run {
            demo_vm,
            vm_name,
            args,
        } => tasks::run(demo_vm.then_some(vm_name.as_str()), &args),
        Command::Test { args } => tasks::test(&args),
        Command::Lint => tasks::lint(),
        Command::DemoVm { name, keep } => {
            setup::ensure(setup::Purpose::Demo)?;
            demo::demo_vm(&name, keep).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench { quick } => bench::run(quick),
        Command::Validate {
            quick,
            bin,
            output,
            rapl_root,
        } => validate::run(quick, bin, output, &rapl_root),
        Command::Deb { debug, output } => deb::deb(debug, output).map(|()| ExitCode::SUCCESS),
        Command::Fuzz {
            seconds,
            targets,
            merge,
        } => fuzz::run(seconds, &targets, merge),
    }
}
