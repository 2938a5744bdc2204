//! Simulated VMs: processes the agent takes for QEMU. A small C program, compiled here as
//! `qemu-system-x86_64`, takes QEMU's `-name guest=NAME,debug-threads=on -uuid UUID -smp N`,
//! starts N threads named `CPU k/KVM` that wake every `wake` (an idle guest's timer ticks)
//! and do nothing else, and runs no guest. The agent's discovery
//! (argv[0] basename, `-name`, `-uuid`, thread names) cannot tell it from a KVM QEMU, so
//! its tracking map, /proc scans and /metrics grow as with real VMs, while the CPUs stay
//! free for the measurements.
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::cmd::Cmd;

const FAKE_QEMU_C: &str = include_str!("../../../tests/fixtures/bench/fake_qemu.c");
const SPIN_C: &str = include_str!("../../../tests/fixtures/bench/spin.c");

/// Prefix of every simulated VM's name, to tell them from real VMs on the same host.
pub const NAME_PREFIX: &str = "bench-";

/// The helper programs, compiled into a temporary directory that goes with this value.
pub struct Helpers {
    dir: tempfile::TempDir,
    /// The fake QEMU (`qemu-system-x86_64`).
    pub fake_qemu: PathBuf,
    /// `spin N`: fixed CPU-bound work.
    pub spin: PathBuf,
}

impl Helpers {
    pub fn build() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("optimus-bench-")
            .tempdir()
            .context("creating a temporary directory for the bench helpers")?;
        let fake_qemu = compile(dir.path(), "fake_qemu.c", FAKE_QEMU_C, "qemu-system-x86_64")?;
        let spin = compile(dir.path(), "spin.c", SPIN_C, "spin")?;
        Ok(Self {
            dir,
            fake_qemu,
            spin,
        })
    }

    /// A private copy of `bin`, so that a rebuild elsewhere during the run changes neither
    /// the agent measured nor the binary perf reads symbols from.
    pub fn copy_in(&self, bin: &Path) -> Result<PathBuf> {
        let name = bin
            .file_name()
            .context("the agent binary path has no file name")?;
        let copy = self.dir.path().join(name);
        std::fs::copy(bin, &copy)
            .with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
        Ok(copy)
    }
}

fn compile(dir: &Path, file: &str, source: &str, exe: &str) -> Result<PathBuf> {
    let src = dir.join(file);
    std::fs::write(&src, source).with_context(|| format!("writing {}", src.display()))?;
    let out = dir.join(exe);
    Cmd::new("cc")
        .args(["-O2", "-Wall", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .run_quiet()
        .with_context(|| format!("compiling the bench helper {file}"))?;
    Ok(out)
}

/// Running simulated VMs, all in one process group, killed and reaped on drop.
pub struct Fleet {
    qemu: PathBuf,
    vcpus_per_vm: u32,
    /// How often each vCPU thread wakes (zero: never).
    wake: Duration,
    children: Vec<Child>,
    /// The group every VM joins: the first VM's pid.
    pgid: Option<u32>,
}

impl Fleet {
    pub fn new(fake_qemu: &Path, vcpus_per_vm: u32, wake: Duration) -> Self {
        Self {
            qemu: fake_qemu.to_path_buf(),
            vcpus_per_vm,
            wake,
            children: Vec::new(),
            pgid: None,
        }
    }

    pub fn vms(&self) -> usize {
        self.children.len()
    }

    pub fn vcpus_per_vm(&self) -> u32 {
        self.vcpus_per_vm
    }

    /// vCPU threads in all VMs.
    pub fn vcpus(&self) -> usize {
        self.children.len() * self.vcpus_per_vm as usize
    }

    /// Starts VMs until there are `vms`, each with every vCPU thread named before it
    /// returns. Spawned from the calling thread: the VMs die with it (PR_SET_PDEATHSIG).
    pub fn grow_to(&mut self, vms: usize) -> Result<()> {
        while self.children.len() < vms {
            crate::bench::check_interrupted()?;
            let child = self.spawn_one(self.children.len())?;
            self.pgid.get_or_insert(child.id());
            self.children.push(child);
        }
        Ok(())
    }

    fn spawn_one(&self, index: usize) -> Result<Child> {
        let name = format!("{NAME_PREFIX}{index}");
        let mut cmd = Command::new(&self.qemu);
        cmd.arg("-name")
            .arg(format!("guest={name},debug-threads=on"))
            .args([
                "-uuid",
                &uuid(index),
                "-smp",
                &self.vcpus_per_vm.to_string(),
            ])
            .env("FAKE_QEMU_WAKE_MS", self.wake.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(self.pgid.map_or(0, |g| i32::try_from(g).unwrap_or(0)));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting simulated VM {name}"))?;
        let stdout = child
            .stdout
            .take()
            .context("simulated VM has no stdout pipe")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if read.is_err() || line.trim_end() != "ready" {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            bail!(
                "simulated VM {name} did not start its {} vCPU threads ({status}); \
                 thread or pid limits? (ulimit -u, /proc/sys/kernel/threads-max)",
                self.vcpus_per_vm
            );
        }
        Ok(child)
    }
}

/// A fixed, valid UUID per VM index, so runs are comparable.
fn uuid(index: usize) -> String {
    format!("0b0e4c00-0000-4000-8000-{index:012}")
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.and_then(|g| libc::pid_t::try_from(g).ok()) {
            // SAFETY: kill has no memory-safety preconditions; a negative pid names the
            // group, which holds only the simulated VMs.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        for child in &mut self.children {
            // A VM that left the group (it never does) still gets its own signal.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_well_formed() {
        let u = super::uuid(999);
        assert_eq!(u, "0b0e4c00-0000-4000-8000-000000000999");
        assert_eq!(u.len(), 36);
    }
}
