//! Developer tasks for Optimus, run as `cargo xtask <command>` (see `.cargo/config.toml`).
//! Every task first makes the machine ready (`setup`) for what it is about to do, then runs
//! cargo with the environment that choice implies.
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod cmd;
mod demo;
mod setup;
mod signals;
mod tasks;
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
    /// Boot a small libvirt guest (vCPU 0 busy, vCPU 1 idle) and keep it until Ctrl-C.
    DemoVm {
        /// libvirt domain name.
        #[arg(long, default_value = demo::DEFAULT_NAME)]
        name: String,
        /// Leave it running after xtask exits.
        #[arg(long)]
        keep: bool,
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
    }
}
