//! A tiny Linux guest: Debian's cloud kernel plus a busybox initramfs whose `/init` does
//! what a [`GuestPlan`] says (spin on some vCPUs, optionally do direct block I/O).
//!
//! The kernel package comes from the host's apt sources (`apt-get download`), so building
//! needs no internet beyond the Debian mirror; the initramfs is written here in the `newc`
//! cpio format (<https://docs.kernel.org/driver-api/early-userspace/buffer-format.html>).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cpio::Newc;
use crate::env::{cache_dir, find_tool, require_tools};
use crate::proc::run_ok;

/// Printed on the serial console once modules are loaded and the busy loops started.
pub const READY_MARKER: &str = "OPTIMUS-GUEST-READY";
/// Printed after the [`IoPlan`] write finished.
pub const IO_WRITE_DONE_MARKER: &str = "OPTIMUS-IO-WRITE-DONE";
/// Printed after the [`IoPlan`] read finished.
pub const IO_READ_DONE_MARKER: &str = "OPTIMUS-IO-READ-DONE";
/// Printed instead of a done marker when a `dd` of the [`IoPlan`] failed.
pub const IO_FAILED_MARKER: &str = "OPTIMUS-IO-FAILED";

/// virtio modules the guest loads, in dependency order (the cloud kernel builds them as
/// modules, so a guest without them sees no `/dev/vda`).
const MODULES: [&str; 7] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
];

/// Applets the init script uses, linked to `/bin/busybox` in the initramfs.
const APPLETS: [&str; 19] = [
    "sh", "mount", "insmod", "taskset", "dd", "sleep", "cat", "echo", "tr", "seq", "ls", "dmesg",
    "wget", "grep", "ip", "head", "yes", "printf", "mkdir",
];

/// Printed by an agent guest once `optimus guest` serves its phase FIFO.
pub const AGENT_UP_MARKER: &str = "OPTIMUS-AGENT-UP";
/// Printed by an agent guest after its phase marks (warmup 3 s, train epoch=1 3 s, end).
pub const PHASES_DONE_MARKER: &str = "OPTIMUS-PHASES-DONE";
/// Printed by a hostile guest after it wrote everything it writes.
pub const HOSTILE_DONE_MARKER: &str = "OPTIMUS-HOSTILE-DONE";
/// Lines between these two are one scrape of the guest's own /metrics, from inside it.
pub const SCRAPE_BEGIN: &str = "OPTIMUS-SCRAPE-BEGIN";
/// Ends a scrape on the console.
pub const SCRAPE_END: &str = "OPTIMUS-SCRAPE-END";
/// Where the agent image keeps the fake NVML library.
const GUEST_NVML: &str = "lib/libnvidia-ml.so";

/// Bump when the cache layout or initramfs contents change in a way the hash below misses.
const FORMAT_VERSION: u32 = 1;

/// Kernel and initramfs of the test guest, on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// `vmlinuz` of Debian's `linux-image-*-cloud-amd64`.
    pub kernel: PathBuf,
    /// newc cpio (uncompressed) with busybox, the virtio modules and `/init`.
    pub initrd: PathBuf,
}

impl GuestImage {
    /// Builds the image once into `cache_dir()/guest` and returns it; later calls (from any
    /// process: a file lock serialises them) reuse it. Prints progress to stderr while
    /// building. Needs `apt-get`, `apt-cache`, `dpkg-deb` and `busybox-static`.
    pub fn ensure() -> anyhow::Result<GuestImage> {
        let dir = cache_dir().join("guest");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let _lock = lock(&dir.join(".lock"))?;
        let kernel_dir = ensure_kernel(&dir)?;
        let modules = list_modules(&kernel_dir.join("modules"))?;
        let busybox = static_busybox()?;
        let init = init_script(&modules, false);

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        FORMAT_VERSION.hash(&mut hasher);
        init.hash(&mut hasher);
        for (name, path) in &modules {
            name.hash(&mut hasher);
            file_fingerprint(path)?.hash(&mut hasher);
        }
        file_fingerprint(&busybox)?.hash(&mut hasher);
        let initrd = dir.join(format!("initrd-{:016x}.cpio", hasher.finish()));
        if !initrd.exists() {
            let bytes = build_initramfs(&busybox, &modules, &init)?;
            write_atomic(&initrd, &bytes)?;
            eprintln!(
                "optimus-tests: built guest initramfs {} ({} KiB)",
                initrd.display(),
                bytes.len() / 1024
            );
            remove_stale_initrds(&dir, &initrd);
        }
        Ok(GuestImage {
            kernel: kernel_dir.join("vmlinuz"),
            initrd,
        })
    }
}

impl GuestImage {
    /// [`GuestImage::ensure`] plus the `optimus` binary (stripped), the shared libraries
    /// `ldd` lists for it at their own paths, and `nvml` (the fake libnvidia-ml.so) as
    /// `/lib/libnvidia-ml.so`: a guest whose `/init` also runs the [`AgentRole`] its kernel
    /// command line names ([`agent_cmdline`]). Cached under the inputs' fingerprints.
    /// Needs `ldd` and `strip` (binutils). About 100 MiB: give the domain 768 MiB.
    pub fn with_agent(optimus: &Path, nvml: &Path) -> anyhow::Result<GuestImage> {
        let base = GuestImage::ensure()?;
        let dir = cache_dir().join("guest");
        let _lock = lock(&dir.join(".lock"))?;
        let modules = list_modules(&dir.join("kernel/modules"))?;
        let busybox = static_busybox()?;
        let init = init_script(&modules, true);
        let libs = shared_libraries(optimus)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        FORMAT_VERSION.hash(&mut hasher);
        init.hash(&mut hasher);
        for path in modules.values().chain(&libs).chain([&busybox]) {
            path.hash(&mut hasher);
            file_fingerprint(path)?.hash(&mut hasher);
        }
        for path in [optimus, nvml] {
            file_fingerprint(path)?.hash(&mut hasher);
        }
        let initrd = dir.join(format!("initrd-agent-{:016x}.cpio", hasher.finish()));
        if !initrd.exists() {
            require_tools(&[("strip", "binutils")])?;
            let stripped = tempfile::NamedTempFile::new().context("create a temp file")?;
            run_ok(
                Command::new("strip")
                    .arg("-s")
                    .arg("-o")
                    .arg(stripped.path())
                    .arg(optimus),
                Duration::from_secs(120),
            )
            .with_context(|| format!("strip {}", optimus.display()))?;
            let mut files: Vec<(String, PathBuf, u32)> = vec![
                ("bin/optimus".into(), stripped.path().to_path_buf(), 0o755),
                (GUEST_NVML.into(), nvml.to_path_buf(), 0o755),
            ];
            for lib in &libs {
                let inside = lib.to_string_lossy().trim_start_matches('/').to_owned();
                files.push((inside, lib.clone(), 0o755));
            }
            let bytes = build_initramfs_with(&busybox, &modules, &init, &files)?;
            write_atomic(&initrd, &bytes)?;
            eprintln!(
                "optimus-tests: built agent guest initramfs {} ({} KiB: optimus, {} libraries, fake NVML)",
                initrd.display(),
                bytes.len() / 1024,
                libs.len()
            );
            remove_stale(&dir, &initrd, "initrd-agent-");
        }
        Ok(GuestImage {
            kernel: base.kernel,
            initrd,
        })
    }
}

/// What an agent guest ([`GuestImage::with_agent`]) does besides its [`GuestPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRole {
    /// Runs `optimus guest` (fake NVML), scrapes its own /metrics every 2 s onto the
    /// console between [`SCRAPE_BEGIN`] and [`SCRAPE_END`], and once the host's figures
    /// arrive marks phases: `warmup` (3 s), `train epoch=1` (3 s), end; then prints
    /// [`PHASES_DONE_MARKER`].
    Honest,
    /// Writes to the channel port, in order: two junk lines, a 1 MiB line, a negative
    /// energy, a baseline of its own GPU (`0000:00:06.0`) then a lower reading and an
    /// implausible one, a claim for `0000:00:05.0` (not its GPU), a GPU claim and a phase
    /// naming VM `other` (a UUID), a version-9 line, a bad phase line, then 1000 junk lines
    /// at once (a flood); then prints [`HOSTILE_DONE_MARKER`].
    Hostile { other: String },
}

/// The kernel command line of an agent guest: the plan's, plus `optimus.agent=ROLE`.
pub fn agent_cmdline(plan: &GuestPlan, role: &AgentRole) -> String {
    let mut cmdline = plan.kernel_cmdline();
    match role {
        AgentRole::Honest => cmdline.push_str(" optimus.agent=honest"),
        AgentRole::Hostile { other } => {
            let _ = write!(cmdline, " optimus.agent=hostile optimus.other={other}");
        }
    }
    cmdline
}

/// The shared libraries (and the ELF interpreter) `ldd` resolves for `binary`.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = run_ok(Command::new("ldd").arg(binary), Duration::from_secs(60))
        .with_context(|| format!("ldd {}", binary.display()))?;
    let mut libs: Vec<PathBuf> = out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    if libs.is_empty() {
        bail!("ldd {} listed no libraries:\n{out}", binary.display());
    }
    Ok(libs)
}

/// The agent part of `/init` (see [`AgentRole`]); what it starts runs in the background.
fn agent_script() -> String {
    format!(
        r#"agent=""
other=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    optimus.agent=*) agent="${{arg#optimus.agent=}}" ;;
    optimus.other=*) other="${{arg#optimus.other=}}" ;;
  esac
done
if [ -n "$agent" ]; then
  ip link set lo up
  port=""
  for i in $(seq 100); do
    for d in /sys/class/virtio-ports/*; do
      [ "$(cat $d/name 2>/dev/null)" = org.optimus.agent.0 ] && port="/dev/${{d##*/}}"
    done
    [ -n "$port" ] && [ -c "$port" ] && break
    sleep 0.1
  done
  echo "OPTIMUS-PORT $port"
fi
if [ "$agent" = honest ]; then
  /bin/optimus --log-level warn guest --nvml-library /{GUEST_NVML} &
  for i in $(seq 300); do [ -p /run/optimus-guest/phase ] && break; sleep 0.1; done
  echo "{AGENT_UP_MARKER}"
  (
    while :; do
      sleep 2
      echo "{SCRAPE_BEGIN}"
      wget -q -O - http://127.0.0.1:9947/metrics | grep -E '^optimus_(guest_host_interval|guest_channel_connected|vcpu_cpu|vm_energy|vm_phase_info|guest_gpu_energy)'
      echo "{SCRAPE_END}"
    done
  ) &
  (
    until wget -q -O - http://127.0.0.1:9947/metrics | grep -q '^optimus_guest_host_interval'; do
      sleep 0.5
    done
    /bin/optimus guest phase warmup
    sleep 3
    echo "train epoch=1" > /run/optimus-guest/phase
    sleep 3
    /bin/optimus guest phase -
    echo "{PHASES_DONE_MARKER}"
  ) &
fi
if [ "$agent" = hostile ]; then
  (
    printf 'junk\n\001\002\377\n' > "$port"
    head -c 1048576 /dev/zero | tr '\0' a > "$port"
    echo > "$port"
    g='{{"v":1,"type":"gpu","gpus":[{{"pci_bus_id":"0000:00:0'
    echo "$g"'5.0","energy_mj":-5}}]}}' > "$port"
    echo "$g"'6.0","energy_mj":1000}}]}}' > "$port"
    echo "$g"'6.0","energy_mj":500}}]}}' > "$port"
    echo "$g"'6.0","energy_mj":1000000000000}}]}}' > "$port"
    echo "$g"'5.0","energy_mj":2000}}]}}' > "$port"
    echo '{{"v":1,"type":"gpu","vm_uuid":"'"$other"'","gpus":[{{"pci_bus_id":"0000:00:05.0","energy_mj":3000}}]}}' > "$port"
    echo '{{"v":1,"type":"phase","vm_uuid":"'"$other"'","line":"stolen"}}' > "$port"
    echo '{{"v":9,"type":"hello"}}' > "$port"
    echo '{{"v":1,"type":"phase","line":"bad(name)"}}' > "$port"
    yes x | head -n 1000 > "$port"
    echo "{HOSTILE_DONE_MARKER}"
  ) &
fi
"#
    )
}

/// What the guest's `/init` does; passed on the kernel command line (`optimus.*`
/// parameters, which `/init` reads back from `/proc/cmdline`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestPlan {
    /// vCPU indices that spin forever in a busy loop pinned to that CPU (busybox `taskset`),
    /// e.g. `vec![0]`. Other vCPUs stay idle (halted).
    pub busy_vcpus: Vec<u32>,
    /// Block I/O on `/dev/vda` after boot, for the block I/O tests.
    pub io: Option<IoPlan>,
}

/// Direct (`O_DIRECT`) block I/O on the guest's `/dev/vda`: write `write_mib` MiB with
/// `dd oflag=direct bs=1M`, print [`IO_WRITE_DONE_MARKER`], sleep `pause_s` seconds, read
/// `read_mib` MiB with `iflag=direct`, print [`IO_READ_DONE_MARKER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoPlan {
    /// MiB written from the start of the disk.
    pub write_mib: u32,
    /// MiB read back from the start of the disk.
    pub read_mib: u32,
    /// Seconds between the write and the read.
    pub pause_s: u32,
}

impl GuestPlan {
    /// Kernel command line: serial console on ttyS0, reboot (which the harness turns into
    /// power-off) on panic, and the plan as `optimus.busy=0,1 optimus.io=W,R,P`.
    pub fn kernel_cmdline(&self) -> String {
        let mut cmdline = String::from("console=ttyS0 panic=-1 quiet");
        if !self.busy_vcpus.is_empty() {
            let list: Vec<String> = self.busy_vcpus.iter().map(u32::to_string).collect();
            let _ = write!(cmdline, " optimus.busy={}", list.join(","));
        }
        if let Some(io) = self.io {
            let _ = write!(
                cmdline,
                " optimus.io={},{},{}",
                io.write_mib, io.read_mib, io.pause_s
            );
        }
        cmdline
    }
}

fn init_script(modules: &BTreeMap<String, PathBuf>, agent: bool) -> String {
    let load: Vec<&str> = MODULES
        .iter()
        .copied()
        .filter(|m| modules.contains_key(*m))
        .collect();
    format!(
        r#"#!/bin/sh
# /init of the optimus-tests guest (tests/src/guest.rs): load the virtio modules, run the
# plan from the optimus.* kernel parameters, then idle forever (PID 1 must not exit).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {load}; do
  insmod /lib/modules/$m.ko || echo "OPTIMUS-INSMOD-FAILED $m"
done
busy=""
io=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    optimus.busy=*) busy="${{arg#optimus.busy=}}" ;;
    optimus.io=*) io="${{arg#optimus.io=}}" ;;
  esac
done
for c in $(echo "$busy" | tr , ' '); do
  taskset -c "$c" sh -c 'while :; do :; done' &
done
echo "{READY_MARKER}"
if [ -n "$io" ]; then
  set -- $(echo "$io" | tr , ' ')
  for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
  if dd if=/dev/zero of=/dev/vda bs=1M count="$1" oflag=direct; then
    echo "{IO_WRITE_DONE_MARKER}"
  else
    echo "{IO_FAILED_MARKER} write"
  fi
  sleep "$3"
  if dd if=/dev/vda of=/dev/null bs=1M count="$2" iflag=direct; then
    echo "{IO_READ_DONE_MARKER}"
  else
    echo "{IO_FAILED_MARKER} read"
  fi
fi
{agent}while :; do sleep 3600; done
"#,
        load = load.join(" "),
        agent = if agent { agent_script() } else { String::new() }
    )
}

/// Exclusive `flock` on `path`, released when the returned file closes.
fn lock(path: &Path) -> anyhow::Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock(2) on a file descriptor we own for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("lock {}", path.display()));
    }
    Ok(file)
}

/// `<dir>/kernel` with `vmlinuz`, `package` and `modules/<name>.ko` (decompressed),
/// downloading and extracting the kernel package if it is not there yet.
fn ensure_kernel(dir: &Path) -> anyhow::Result<PathBuf> {
    let kernel_dir = dir.join("kernel");
    let set = MODULES.join(",");
    let modules_stamp = kernel_dir.join("modules/.set");
    if kernel_dir.join("vmlinuz").is_file()
        && kernel_dir.join("package").is_file()
        && std::fs::read_to_string(&modules_stamp).is_ok_and(|s| s.trim() == set)
    {
        return Ok(kernel_dir);
    }
    require_tools(&[
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
    ])?;
    let package = resolve_kernel_package()?;
    let work = tempfile::Builder::new()
        .prefix("kernel-build-")
        .tempdir_in(dir)
        .with_context(|| format!("create a temp dir in {}", dir.display()))?;
    eprintln!("optimus-tests: downloading guest kernel {package} (apt-get download)");
    run_ok(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(work.path()),
        Duration::from_secs(600),
    )
    .with_context(|| format!("download {package}"))?;
    let deb = find_file(work.path(), |name| name.ends_with(".deb"))?
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let extracted = work.path().join("x");
    eprintln!("optimus-tests: extracting {}", deb.display());
    run_ok(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted),
        Duration::from_secs(300),
    )?;

    let staged = work.path().join("kernel");
    let staged_modules = staged.join("modules");
    std::fs::create_dir_all(&staged_modules)
        .with_context(|| format!("create {}", staged_modules.display()))?;
    let vmlinuz = find_file(&extracted.join("boot"), |n| n.starts_with("vmlinuz-"))?
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    std::fs::copy(&vmlinuz, staged.join("vmlinuz"))
        .with_context(|| format!("copy {}", vmlinuz.display()))?;
    copy_modules(&extracted.join("lib/modules"), &staged_modules, &package)?;
    // Which MODULES this cache holds: a cache made for another list is made again.
    std::fs::write(
        staged_modules.join(".set"),
        format!("{}\n", MODULES.join(",")),
    )
    .context("write the module list stamp")?;
    std::fs::write(staged.join("package"), format!("{package}\n")).context("write package name")?;

    if kernel_dir.exists() {
        // A half-built leftover (no vmlinuz or package file): replace it.
        std::fs::remove_dir_all(&kernel_dir)
            .with_context(|| format!("remove {}", kernel_dir.display()))?;
    }
    std::fs::rename(&staged, &kernel_dir)
        .with_context(|| format!("move kernel into {}", kernel_dir.display()))?;
    eprintln!(
        "optimus-tests: guest kernel ready in {}",
        kernel_dir.display()
    );
    Ok(kernel_dir)
}

/// The concrete package `linux-image-cloud-amd64` depends on, e.g.
/// `linux-image-6.1.0-56-cloud-amd64`; runs `apt-get update` once if apt knows nothing.
fn resolve_kernel_package() -> anyhow::Result<String> {
    const META: &str = "linux-image-cloud-amd64";
    let depends = || {
        run_ok(
            Command::new("apt-cache").args(["depends", META]),
            Duration::from_secs(60),
        )
        .ok()
        .and_then(|out| parse_depends(&out))
    };
    if let Some(package) = depends() {
        return Ok(package);
    }
    eprintln!("optimus-tests: apt knows no {META}; running apt-get update");
    run_ok(
        Command::new("apt-get").args(["update"]),
        Duration::from_secs(600),
    )
    .context("apt-get update")?;
    depends().with_context(|| {
        format!(
            "apt-cache depends {META} names no linux-image-* package, even after apt-get update"
        )
    })
}

fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_owned)
}

/// Copies [`MODULES`] out of an extracted `lib/modules`, decompressing `.ko.xz`/`.ko.zst`/
/// `.ko.gz` (busybox insmod loads only plain `.ko`). Modules the kernel has built in are
/// skipped; any other missing one is an error.
fn copy_modules(lib_modules: &Path, dest: &Path, package: &str) -> anyhow::Result<()> {
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut builtin = String::new();
    walk(lib_modules, &mut |path| {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        if name == "modules.builtin" {
            builtin.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
            if let Some(stem) = name.strip_suffix(ext) {
                if MODULES.contains(&stem) {
                    found.insert(stem.to_owned(), path.to_path_buf());
                }
            }
        }
    })?;
    for module in MODULES {
        let Some(src) = found.get(module) else {
            if builtin
                .lines()
                .any(|l| l.ends_with(&format!("/{module}.ko")))
            {
                continue;
            }
            bail!("{package} has neither a {module}.ko module nor {module} built in");
        };
        let out = dest.join(format!("{module}.ko"));
        let name = src.to_string_lossy();
        let decompressor = if name.ends_with(".xz") {
            Some(("xz", "xz-utils"))
        } else if name.ends_with(".zst") {
            Some(("zstd", "zstd"))
        } else if name.ends_with(".gz") {
            Some(("gzip", "gzip"))
        } else {
            None
        };
        match decompressor {
            None => {
                std::fs::copy(src, &out).with_context(|| format!("copy {}", src.display()))?;
            }
            Some((tool, package)) => {
                require_tools(&[(tool, package)])?;
                let file =
                    File::create(&out).with_context(|| format!("create {}", out.display()))?;
                let status = Command::new(tool)
                    .arg("-dc")
                    .arg(src)
                    .stdout(file)
                    .status()
                    .with_context(|| format!("run {tool} -dc {}", src.display()))?;
                if !status.success() {
                    bail!("{tool} -dc {} failed: {status}", src.display());
                }
            }
        }
    }
    Ok(())
}

fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry.with_context(|| format!("read {}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("stat {}", path.display()))?;
        if kind.is_dir() {
            walk(&path, visit)?;
        } else {
            visit(&path);
        }
    }
    Ok(())
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> anyhow::Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry.with_context(|| format!("read {}", dir.display()))?;
        if entry.file_name().to_str().is_some_and(&pred) {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// `<name> -> <dir>/<name>.ko` for the cached modules.
fn list_modules(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut modules = BTreeMap::new();
    for module in MODULES {
        let path = dir.join(format!("{module}.ko"));
        if path.is_file() {
            modules.insert(module.to_owned(), path);
        }
    }
    Ok(modules)
}

/// The host's statically linked busybox (package busybox-static); a dynamic one cannot
/// run in an initramfs without its libraries.
fn static_busybox() -> anyhow::Result<PathBuf> {
    let hint = "the guest initramfs needs a static busybox: apt-get install busybox-static";
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| find_tool("busybox"))
        .with_context(|| format!("no busybox found; {hint}"))?;
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    match elf_has_interpreter(&bytes) {
        Some(false) => Ok(path),
        Some(true) => bail!("{} is dynamically linked; {hint}", path.display()),
        None => bail!("{} is not a 64-bit ELF executable; {hint}", path.display()),
    }
}

/// Whether a 64-bit little-endian ELF has a `PT_INTERP` program header (i.e. is
/// dynamically linked); `None` if it is not such an ELF.
fn elf_has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// Size and mtime: enough to notice that a cached input changed.
fn file_fingerprint(path: &Path) -> anyhow::Result<(u64, i64)> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((meta.len(), meta.mtime()))
}

fn build_initramfs(
    busybox: &Path,
    modules: &BTreeMap<String, PathBuf>,
    init: &str,
) -> anyhow::Result<Vec<u8>> {
    build_initramfs_with(busybox, modules, init, &[])
}

/// [`build_initramfs`] plus `extra` files: (path inside, file on the host, mode); their
/// parent directories are created.
fn build_initramfs_with(
    busybox: &Path,
    modules: &BTreeMap<String, PathBuf>,
    init: &str,
    extra: &[(String, PathBuf, u32)],
) -> anyhow::Result<Vec<u8>> {
    let mut cpio = Newc::default();
    let mut dirs: Vec<String> = [
        "bin",
        "dev",
        "proc",
        "sys",
        "lib",
        "lib/modules",
        "tmp",
        "run",
    ]
    .map(str::to_owned)
    .to_vec();
    for (inside, _, _) in extra {
        for p in Path::new(inside).ancestors().skip(1) {
            let p = p.to_string_lossy().into_owned();
            if !p.is_empty() && !dirs.contains(&p) {
                dirs.push(p);
            }
        }
    }
    dirs.sort_by_key(|d| d.matches('/').count());
    for dir in &dirs {
        cpio.dir(dir, 0o755)?;
    }
    for (inside, host, mode) in extra {
        let bytes = std::fs::read(host).with_context(|| format!("read {}", host.display()))?;
        cpio.file(inside, *mode, &bytes)?;
    }
    // The kernel opens /dev/console for init's stdio before init mounts devtmpfs.
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    let busybox_bytes =
        std::fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &busybox_bytes)?;
    for applet in APPLETS {
        cpio.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    for (name, path) in modules {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &bytes)?;
    }
    cpio.file("init", 0o755, init.as_bytes())?;
    Ok(cpio.finish())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

fn remove_stale_initrds(dir: &Path, keep: &Path) {
    remove_stale(dir, keep, "initrd-");
}

/// Removes the `<prefix>*.cpio` files of `dir` other than `keep` (agent images are
/// `initrd-agent-*`, which the plain image's cleanup leaves alone).
fn remove_stale(dir: &Path, keep: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_initrd = entry.file_name().to_str().is_some_and(|n| {
            n.starts_with(prefix)
                && n.ends_with(".cpio")
                && (prefix != "initrd-" || !n.starts_with("initrd-agent-"))
        });
        if is_initrd && path != keep {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        assert_eq!(
            GuestPlan::default().kernel_cmdline(),
            "console=ttyS0 panic=-1 quiet"
        );
        let plan = GuestPlan {
            busy_vcpus: vec![0, 2],
            io: Some(IoPlan {
                write_mib: 8,
                read_mib: 4,
                pause_s: 1,
            }),
        };
        assert_eq!(
            plan.kernel_cmdline(),
            "console=ttyS0 panic=-1 quiet optimus.busy=0,2 optimus.io=8,4,1"
        );
    }

    #[test]
    fn depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_depends("E: No packages found"), None);
    }

    #[test]
    fn elf_interp() {
        assert_eq!(elf_has_interpreter(b"not an elf"), None);
        let sh = std::fs::read("/bin/sh").unwrap();
        assert_eq!(elf_has_interpreter(&sh), Some(true));
    }

    #[test]
    fn init_mentions_markers_and_modules() {
        let modules: BTreeMap<String, PathBuf> = MODULES
            .iter()
            .map(|m| ((*m).to_owned(), PathBuf::from(format!("/x/{m}.ko"))))
            .collect();
        let init = init_script(&modules, false);
        assert!(init.contains(READY_MARKER));
        assert!(init.contains(
            "for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console; do"
        ));
        assert!(init.contains("${arg#optimus.busy=}"));
        assert!(
            !init.contains("optimus guest"),
            "a plain image runs no agent"
        );
        let agent = init_script(&modules, true);
        for marker in [
            AGENT_UP_MARKER,
            PHASES_DONE_MARKER,
            HOSTILE_DONE_MARKER,
            SCRAPE_BEGIN,
        ] {
            assert!(agent.contains(marker), "{marker}");
        }
        assert!(agent
            .contains("/bin/optimus --log-level warn guest --nvml-library /lib/libnvidia-ml.so &"));
    }

    #[test]
    fn agent_cmdlines() {
        let plan = GuestPlan {
            busy_vcpus: vec![0],
            io: None,
        };
        assert_eq!(
            agent_cmdline(&plan, &AgentRole::Honest),
            "console=ttyS0 panic=-1 quiet optimus.busy=0 optimus.agent=honest"
        );
        assert_eq!(
            agent_cmdline(
                &GuestPlan::default(),
                &AgentRole::Hostile { other: "u".into() }
            ),
            "console=ttyS0 panic=-1 quiet optimus.agent=hostile optimus.other=u"
        );
    }
}
