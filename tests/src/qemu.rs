//! A plain QEMU process (no libvirt) running the test guest under TCG.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tempfile::TempDir;

use crate::console::{wait_for_marker, TAIL_LINES};
use crate::env::require_tools;
use crate::guest::{GuestImage, GuestPlan};
use crate::proc::{file_tail, ChildGuard};

/// A running `qemu-system-x86_64`; killed and reaped on drop, its temp dir (serial log,
/// QEMU's stderr) removed after.
#[derive(Debug)]
pub struct PlainQemu {
    // Declared first: dropped (QEMU stopped) before the temp dir goes.
    child: ChildGuard,
    name: String,
    uuid: Option<String>,
    console_log: PathBuf,
    stderr_log: PathBuf,
    _dir: TempDir,
}

impl PlainQemu {
    /// Starts `qemu-system-x86_64 -accel tcg,thread=multi` with `vcpus` vCPUs, 256 MiB,
    /// `-name guest=NAME,debug-threads=on` (so vCPU threads are named `CPU N/TCG`),
    /// `-uuid` if given, the guest image and plan, the serial console to a log file and,
    /// if `disk` is given, that raw file as a virtio disk with `cache=none,aio=native`.
    /// Returns once QEMU runs; use [`PlainQemu::wait_for_console`] to wait for the guest.
    pub fn spawn(
        name: &str,
        uuid: Option<&str>,
        image: &GuestImage,
        plan: &GuestPlan,
        vcpus: u32,
        disk: Option<&Path>,
    ) -> anyhow::Result<PlainQemu> {
        require_tools(&[("qemu-system-x86_64", "qemu-system-x86")])?;
        let dir = tempfile::Builder::new()
            .prefix("optimus-qemu-")
            .tempdir()
            .context("create a temp dir for QEMU")?;
        let console_log = dir.path().join("console.log");
        let stderr_log = dir.path().join("qemu.stderr.log");
        let args = qemu_args(name, uuid, image, plan, vcpus, disk, &console_log);
        let stderr = File::create(&stderr_log)
            .with_context(|| format!("create {}", stderr_log.display()))?;
        let stdout = stderr
            .try_clone()
            .with_context(|| format!("dup {}", stderr_log.display()))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = ChildGuard::spawn(cmd)?;
        let mut qemu = PlainQemu {
            child,
            name: name.to_owned(),
            uuid: uuid.map(str::to_owned),
            console_log,
            stderr_log,
            _dir: dir,
        };
        // QEMU rejects bad options at once: report that here rather than as a console timeout.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(why) = qemu.exited() {
            anyhow::bail!("QEMU for {name:?} exited at start: {why}");
        }
        Ok(qemu)
    }

    /// Process id of QEMU.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Name given with `-name guest=`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// UUID given with `-uuid`, if any.
    pub fn uuid(&self) -> Option<&str> {
        self.uuid.as_deref()
    }

    /// The serial console log file.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Waits until the serial console shows `marker` (e.g. [`crate::guest::READY_MARKER`]).
    /// Fails at once if QEMU exits; errors quote the console tail and QEMU's stderr.
    pub fn wait_for_console(&self, marker: &str, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.pid();
        let stderr_log = self.stderr_log.clone();
        wait_for_marker(&self.console_log, marker, timeout, || {
            (!crate::proc::alive(pid)).then(|| {
                format!(
                    "QEMU process {pid} exited; its stderr:\n{}",
                    file_tail(&stderr_log, TAIL_LINES)
                )
            })
        })
    }

    /// `Some(description)` if QEMU has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{status}; stderr:\n{}",
                file_tail(&self.stderr_log, TAIL_LINES)
            )),
            Ok(None) => None,
            Err(e) => Some(format!("{e:#}")),
        }
    }
}

/// QEMU's option parser splits on `,`; a literal comma is written `,,`.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn qemu_args(
    name: &str,
    uuid: Option<&str>,
    image: &GuestImage,
    plan: &GuestPlan,
    vcpus: u32,
    disk: Option<&Path>,
    console_log: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-accel",
        "tcg,thread=multi",
        "-smp",
        &vcpus.to_string(),
        "-m",
        "256",
        "-name",
        &format!("guest={},debug-threads=on", qemu_escape(name)),
        "-kernel",
        &image.kernel.to_string_lossy(),
        "-initrd",
        &image.initrd.to_string_lossy(),
        "-append",
        &plan.kernel_cmdline(),
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        // A guest panic reboots (panic=-1); -no-reboot turns that into QEMU exiting.
        "-no-reboot",
        "-serial",
        &format!("file:{}", console_log.to_string_lossy()),
    ]
    .map(str::to_owned)
    .into();
    if let Some(uuid) = uuid {
        args.extend(["-uuid".to_owned(), uuid.to_owned()]);
    }
    if let Some(disk) = disk {
        args.extend([
            "-drive".to_owned(),
            format!(
                "file={},if=virtio,format=raw,cache=none,aio=native",
                qemu_escape(&disk.to_string_lossy())
            ),
        ]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_escape_commas() {
        let image = GuestImage {
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
        };
        let args = qemu_args(
            "a,b",
            Some("0f2c0c1e-8d7a-4a3c-9d0b-2f5d6a7b8c9d"),
            &image,
            &GuestPlan::default(),
            2,
            Some(Path::new("/tmp/x,y.raw")),
            Path::new("/tmp/c.log"),
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("-name guest=a,,b,debug-threads=on"),
            "{joined}"
        );
        assert!(joined.contains("-uuid 0f2c0c1e-"), "{joined}");
        assert!(
            joined.contains("file=/tmp/x,,y.raw,if=virtio,format=raw,cache=none,aio=native"),
            "{joined}"
        );
        assert!(joined.contains("-smp 2 "), "{joined}");
    }
}
