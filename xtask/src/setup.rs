//! `cargo xtask setup`: makes this machine able to build, run and test Optimus, installing
//! only what is missing and saying so, one line per thing. A second run checks and prints one
//! line. See `../shared/ENGINEERING.md` for why each piece is needed.
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{self, Cmd};
use crate::ws::Workspace;

/// What the machine is being made ready for; each purpose installs only what it needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Purpose {
    /// Compile the agent (eBPF included).
    Build,
    /// Build plus rustfmt and clippy.
    Lint,
    /// Build plus what the running agent needs (libvirt client library).
    Run,
    /// Run plus QEMU, libvirtd and the guest image tools.
    Demo,
    /// Build plus cargo-deb (`cargo xtask deb`).
    Package,
    /// Everything the test suite touches.
    Test,
    /// `cargo xtask fuzz`: the nightly toolchain and cargo-fuzz.
    Fuzz,
    /// All of the above.
    All,
}

/// Why a piece is needed; a purpose needs some of these.
#[derive(Clone, Copy)]
enum Need {
    Build,
    Agent,
    Guest,
    Test,
    Lint,
    Package,
    Fuzz,
}

impl Purpose {
    fn needs(self, need: Need) -> bool {
        use Purpose as P;
        match need {
            Need::Build => true,
            Need::Agent => matches!(self, P::Run | P::Demo | P::Test | P::All),
            Need::Guest => matches!(self, P::Demo | P::Test | P::All),
            Need::Test => matches!(self, P::Test | P::All),
            Need::Lint => matches!(self, P::Lint | P::All),
            Need::Package => matches!(self, P::Package | P::Test | P::All),
            Need::Fuzz => matches!(self, P::Fuzz | P::All),
        }
    }
}

struct Package {
    name: &'static str,
    why: &'static str,
    need: Need,
}

const fn pkg(name: &'static str, why: &'static str, need: Need) -> Package {
    Package { name, why, need }
}

const PACKAGES: &[Package] = &[
    pkg("llvm-22-dev", "bpf-linker", Need::Build),
    pkg("libpolly-22-dev", "bpf-linker", Need::Build),
    pkg("libzstd-dev", "bpf-linker", Need::Build),
    pkg("zlib1g-dev", "bpf-linker", Need::Build),
    pkg("pkg-config", "virt crate build", Need::Build),
    pkg("libvirt-dev", "virt crate build", Need::Build),
    pkg(
        "libvirt0",
        "libvirt client library for the agent",
        Need::Agent,
    ),
    pkg("qemu-system-x86", "tests and demo VM", Need::Guest),
    pkg("libvirt-daemon", "tests and demo VM", Need::Guest),
    pkg(
        "libvirt-daemon-driver-qemu",
        "tests and demo VM",
        Need::Guest,
    ),
    pkg("libvirt-clients", "tests and demo VM", Need::Guest),
    pkg("busybox-static", "guest initramfs", Need::Guest),
    pkg("xz-utils", "guest kernel modules", Need::Guest),
    pkg("zstd", "guest kernel modules", Need::Guest),
    pkg("cpio", "guest kernel modules", Need::Guest),
    pkg(
        "prometheus",
        "tests: promtool and a real scraper",
        Need::Test,
    ),
    pkg("linux-perf", "bench", Need::Test),
    pkg(
        "chromium",
        "tests: renders the live page headless",
        Need::Test,
    ),
    pkg("tmux", "tests: drives `optimus top`", Need::Test),
    pkg(
        "fonts-dejavu-core",
        "cargo xtask validate: text of its plots",
        Need::Test,
    ),
    pkg("iproute2", "tests", Need::Test),
    pkg("procps", "tests", Need::Test),
    pkg(
        "dpkg-dev",
        "cargo xtask deb: dpkg-shlibdeps finds the binary's dependencies",
        Need::Package,
    ),
    pkg("binutils", "cargo xtask deb: strip", Need::Package),
    pkg(
        "libcap2-bin",
        "tests: setcap, file capabilities as the Kubernetes image sets them",
        Need::Test,
    ),
    pkg(
        "python3-venv",
        "tests: a venv for kubernetes-validate and yamllint",
        Need::Test,
    ),
    pkg(
        "systemd",
        "tests: systemd-analyze verify/security of the unit",
        Need::Test,
    ),
    pkg(
        "man-db",
        "tests: systemd-analyze verify resolves the unit's man page",
        Need::Test,
    ),
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// PyPI packages the manifest test runs, pinned, in a venv under the target directory.
const PYTHON_TOOLS: [(&str, &str); 2] = [("kubernetes-validate", "1.37.0"), ("yamllint", "1.38.0")];
/// Pinned: `cargo xtask deb` relies on its `target/release` asset prefix and `--profile dev`.
const CARGO_DEB_VERSION: &str = "3.8.0";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The toolchain that builds the eBPF crate (`-Z build-std=core` needs nightly features).
#[derive(Clone, Copy, Debug)]
pub enum EbpfToolchain {
    Nightly,
    /// Stable with `RUSTC_BOOTSTRAP=1`, for machines without a nightly toolchain.
    StableBootstrap,
}

impl EbpfToolchain {
    pub fn name(self) -> &'static str {
        match self {
            Self::Nightly => "nightly",
            Self::StableBootstrap => "stable",
        }
    }
}

/// A machine made ready: the environment every cargo command of xtask runs with.
pub struct Ready {
    pub toolchain: EbpfToolchain,
    pub ws: Workspace,
    /// `PATH` with cargo's bin directory (bpf-linker) in front.
    path: OsString,
}

impl Ready {
    /// `cargo ARGS` in the workspace root with the build environment: the eBPF toolchain
    /// choice for `optimus-user/build.rs`, `RUSTC_BOOTSTRAP=1` when that is stable, and
    /// `AYA_BUILD_SKIP` removed so the eBPF object is really built.
    pub fn cargo<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let cmd = Cmd::new(&self.ws.cargo)
            .shown_as("cargo")
            .args(args)
            .current_dir(&self.ws.root)
            .env("PATH", &self.path)
            .env_remove("AYA_BUILD_SKIP")
            .env("OPTIMUS_EBPF_TOOLCHAIN", self.toolchain.name());
        match self.toolchain {
            EbpfToolchain::Nightly => cmd,
            EbpfToolchain::StableBootstrap => cmd.env("RUSTC_BOOTSTRAP", "1"),
        }
    }

    /// Any other program, with the same `PATH`.
    pub fn tool(&self, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
        Cmd::new(program)
            .current_dir(&self.ws.root)
            .env("PATH", &self.path)
    }
}

/// Prints what setup does and remembers whether it did anything.
#[derive(Default)]
struct Log {
    acted: bool,
}

impl Log {
    fn installing(&mut self, what: &str, why: &str) {
        self.say(&format!("installing {what} ({why})…"));
    }

    fn say(&mut self, line: &str) {
        println!("{line}");
        self.acted = true;
    }
}

/// Checks every piece `purpose` needs, installs what is missing, and returns the build
/// environment.
pub fn ensure(purpose: Purpose) -> Result<Ready> {
    let ws = Workspace::locate()?;
    let path = cmd::path_with(&[&cargo_bin()?], std::env::var_os("PATH"))?;
    let mut log = Log::default();

    packages(purpose, &mut log)?;
    let toolchain = ebpf_toolchain(&path, &mut log)?;
    if purpose.needs(Need::Lint) {
        let why = "cargo fmt and clippy in cargo xtask lint";
        ensure_components(&path, None, &["rustfmt", "clippy"], why, &mut log)?;
    }
    bpf_linker(&ws, &path, &mut log)?;
    if purpose.needs(Need::Package) {
        cargo_deb(&ws, &path, &mut log)?;
    }
    if purpose.needs(Need::Test) {
        python_tools(&ws, &mut log)?;
    }
    if purpose.needs(Need::Fuzz) {
        cargo_fuzz(&ws, &path, purpose == Purpose::Fuzz, &mut log)?;
    }

    let tc = toolchain.name();
    if log.acted {
        println!("setup: done (eBPF toolchain: {tc})");
    } else {
        println!("setup: everything present (eBPF toolchain: {tc})");
    }
    Ok(Ready {
        toolchain,
        ws,
        path,
    })
}

/// `$CARGO_HOME/bin`, where `cargo install` puts bpf-linker.
fn cargo_bin() -> Result<PathBuf> {
    let home = match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cargo"))
            .context("neither CARGO_HOME nor HOME is set: cannot find cargo's bin directory")?,
    };
    Ok(home.join("bin"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn packages(purpose: Purpose, log: &mut Log) -> Result<()> {
    let wanted: Vec<&Package> = PACKAGES.iter().filter(|p| purpose.needs(p.need)).collect();
    // One dpkg-query for all: it exits 1 when any is unknown, so read its output instead.
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(wanted.iter().map(|p| p.name))
        .read_any_status()
        .context("checking Debian packages (setup knows Debian's dpkg/apt only)")?;
    let installed = |name: &str| {
        out.lines().any(|l| {
            l.split_once(' ')
                .is_some_and(|(n, status)| n == name && status == "install ok installed")
        })
    };
    let missing: Vec<&Package> = wanted.into_iter().filter(|p| !installed(p.name)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if !is_root() {
        bail!(
            "missing Debian packages: {list}\nfix, as root: apt-get update && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y {list}",
            list = names.join(" ")
        );
    }
    for p in &missing {
        log.installing(p.name, p.why);
    }
    // Wait for the dpkg lock rather than fail when another apt run holds it.
    let lock = "DPkg::Lock::Timeout=300";
    Cmd::new("apt-get")
        .args(["-o", lock, "update"])
        .run_quiet()
        .context("apt-get update failed (no network to the Debian mirror?)")?;
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", lock, "install", "-y"])
        .args(&names)
        .run_quiet()
        .with_context(|| format!("installing Debian packages {}", names.join(" ")))
}

/// Nightly where it is installed; otherwise stable with `RUSTC_BOOTSTRAP=1`, so the build
/// works on machines where nightly cannot be fetched. Either way with `rust-src`, which
/// `-Z build-std=core` compiles.
fn ebpf_toolchain(path: &OsString, log: &mut Log) -> Result<EbpfToolchain> {
    let works = |tc: &str| {
        Cmd::new("rustup")
            .env("PATH", path)
            .env("RUSTUP_AUTO_INSTALL", "0")
            .args(["run", tc, "rustc", "--version"])
            .probe()
            .is_some()
    };
    let toolchain = if works("nightly") {
        EbpfToolchain::Nightly
    } else if works("stable") {
        EbpfToolchain::StableBootstrap
    } else {
        bail!(
            "no usable Rust toolchain for the eBPF build: `rustup run nightly rustc --version` \
             and `rustup run stable rustc --version` both fail\n\
             fix: rustup toolchain install nightly (or stable)"
        );
    };
    let tc = toolchain.name();
    let why = format!("-Z build-std=core for the eBPF target with the {tc} toolchain");
    ensure_components(path, Some(tc), &["rust-src"], &why, log)?;
    Ok(toolchain)
}

/// `components` for `toolchain` (`None`: the toolchain running xtask, which is the one
/// `cargo fmt` and `cargo clippy` use).
fn ensure_components(
    path: &OsString,
    toolchain: Option<&str>,
    components: &[&str],
    why: &str,
    log: &mut Log,
) -> Result<()> {
    let with_tc = |cmd: Cmd| match toolchain {
        Some(tc) => cmd.args(["--toolchain", tc]),
        None => cmd,
    };
    let list =
        with_tc(
            Cmd::new("rustup")
                .env("PATH", path)
                .args(["component", "list", "--installed"]),
        )
        .read()
        .context("listing installed rustup components")?;
    // Lines read `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
    let has = |c: &str| {
        list.lines()
            .any(|l| l == c || l.strip_prefix(c).is_some_and(|r| r.starts_with('-')))
    };
    let missing: Vec<&str> = components.iter().copied().filter(|c| !has(c)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let which = toolchain.map_or(String::new(), |tc| format!(" for {tc}"));
    log.installing(&format!("{}{which}", missing.join(", ")), why);
    with_tc(
        Cmd::new("rustup")
            .env("PATH", path)
            .args(["component", "add"])
            .args(&missing),
    )
    .run()
    .context("rustup could not add the components (no network to static.rust-lang.org?)")
}

/// cargo-fuzz, which builds the libFuzzer targets in `fuzz/` with the nightly toolchain.
/// Without nightly that is an error when fuzzing is what was asked for, else a note.
fn cargo_fuzz(ws: &Workspace, path: &OsString, required: bool, log: &mut Log) -> Result<()> {
    let nightly = Cmd::new("rustup")
        .env("PATH", path)
        .env("RUSTUP_AUTO_INSTALL", "0")
        .args(["run", "nightly", "rustc", "--version"])
        .probe();
    if nightly.is_none() && !required {
        log.say("skipping cargo-fuzz: no nightly toolchain (only `cargo xtask fuzz` needs it)");
        return Ok(());
    }
    if nightly.is_none() {
        bail!(
            "cargo xtask fuzz needs the nightly toolchain (libFuzzer instrumentation is \
             nightly-only)\nfix: rustup toolchain install nightly"
        );
    }
    let version = Cmd::new("cargo-fuzz")
        .env("PATH", path)
        .arg("--version")
        .probe();
    if version.is_some_and(|v| v.starts_with(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}"))) {
        return Ok(());
    }
    log.installing(
        &format!("cargo-fuzz {CARGO_FUZZ_VERSION}"),
        "cargo xtask fuzz",
    );
    Cmd::new(&ws.cargo)
        .current_dir(std::env::temp_dir())
        .env("PATH", path)
        .args([
            "install",
            "--quiet",
            "--locked",
            "--force",
            "cargo-fuzz",
            "--version",
        ])
        .arg(CARGO_FUZZ_VERSION)
        .run()
        .context("installing cargo-fuzz (needs crates.io)")
}

/// bpf-linker 0.13 built against Debian's LLVM 22 (its default, LLVM 23, is not packaged).
fn bpf_linker(ws: &Workspace, path: &OsString, log: &mut Log) -> Result<()> {
    let version = Cmd::new("bpf-linker")
        .env("PATH", path)
        .arg("--version")
        .probe();
    let minor = BPF_LINKER_VERSION.rsplit_once('.').map_or("", |(m, _)| m);
    if version.is_some_and(|v| v.starts_with(&format!("bpf-linker {minor}."))) {
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!("bpf-linker needs LLVM 22 in {LLVM_PREFIX}\nfix, as root: apt-get install -y llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev");
    }
    log.say("building bpf-linker against LLVM 22 (about a minute)…");
    let llvm_bin = Path::new(LLVM_PREFIX).join("bin");
    let path = cmd::path_with(&[&llvm_bin], Some(path.clone()))?;
    Cmd::new(&ws.cargo)
        // Outside the workspace, so its .cargo/config.toml plays no part.
        .current_dir(std::env::temp_dir())
        .env("PATH", &path)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            "--quiet",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .run()
        .context("building bpf-linker (needs crates.io and the llvm-22-dev package)")
}

/// cargo-deb for `cargo xtask deb` (crates.io has it; no Debian package does).
fn cargo_deb(ws: &Workspace, path: &OsString, log: &mut Log) -> Result<()> {
    let version = Cmd::new("cargo-deb")
        .env("PATH", path)
        .arg("--version")
        .probe();
    if version.is_some_and(|v| v.trim().ends_with(CARGO_DEB_VERSION)) {
        return Ok(());
    }
    log.say(&format!(
        "building cargo-deb {CARGO_DEB_VERSION} for cargo xtask deb (about 3 minutes on 2 cores)…"
    ));
    Cmd::new(&ws.cargo)
        .current_dir(std::env::temp_dir())
        .env("PATH", path)
        .args(["install", "--quiet", "--locked", "--force", "cargo-deb"])
        .args(["--version", CARGO_DEB_VERSION])
        .run()
        .context("building cargo-deb (needs crates.io)")
}

/// kubernetes-validate and yamllint for the Kubernetes manifest test, in
/// `<target>/python` (`tests/tests/deploy_kubernetes.rs` looks there first), so the
/// system's Python stays untouched.
fn python_tools(ws: &Workspace, log: &mut Log) -> Result<()> {
    let venv = ws.target_dir.join("python");
    let pip = venv.join("bin/pip");
    let frozen = Cmd::new(&pip).arg("freeze").probe().unwrap_or_default();
    let pinned: Vec<String> = PYTHON_TOOLS
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    if pinned.iter().all(|p| frozen.lines().any(|l| l == p)) {
        return Ok(());
    }
    log.installing(
        &pinned.join(" "),
        "tests: Kubernetes manifest schemas and YAML lint, from PyPI",
    );
    if !pip.exists() {
        Cmd::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .run_quiet()
            .context("creating a Python venv (needs python3-venv)")?;
    }
    Cmd::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(&pinned)
        .run_quiet()
        .context("pip install (needs PyPI)")
}
