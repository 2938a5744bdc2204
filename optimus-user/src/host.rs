//! The one injectable root for every read of `/proc`, `/sys` and `/run`, so tests can point
//! the agent at a fixture tree (node_exporter's `--path.procfs` / `--path.sysfs` model).

use std::path::{Path, PathBuf};

/// Where the host's pseudo-filesystems are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPaths {
    /// procfs, normally `/proc`.
    pub proc: PathBuf,
    /// sysfs, normally `/sys`.
    pub sys: PathBuf,
    /// runtime state, normally `/run` (libvirt keeps its domain status files there).
    pub run: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            proc: PathBuf::from("/proc"),
            sys: PathBuf::from("/sys"),
            run: PathBuf::from("/run"),
        }
    }
}

impl HostPaths {
    /// All three under one fixture root: `<root>/proc`, `<root>/sys`, `<root>/run`.
    pub fn under(root: &Path) -> Self {
        Self {
            proc: root.join("proc"),
            sys: root.join("sys"),
            run: root.join("run"),
        }
    }

    /// `<proc>/<pid>`.
    pub fn pid_dir(&self, pid: u32) -> PathBuf {
        self.proc.join(pid.to_string())
    }

    /// `<proc>/<pid>/task/<tid>`.
    pub fn task_dir(&self, pid: u32, tid: u32) -> PathBuf {
        self.pid_dir(pid).join("task").join(tid.to_string())
    }
}

/// `PF_KTHREAD` from include/linux/sched.h: the task is a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What `<proc>/<pid>/stat` says about a process, if it still exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessKind {
    Kernel,
    User,
}

impl HostPaths {
    /// Kernel thread or user process, from the flags in `<proc>/<pid>/stat`; `None` when
    /// the process is gone (or the file unreadable).
    pub fn process_kind(&self, pid: u32) -> Option<ProcessKind> {
        let stat = std::fs::read_to_string(self.pid_dir(pid).join("stat")).ok()?;
        // The command name is in parentheses and may contain spaces or parentheses itself.
        let rest = &stat[stat.rfind(')')? + 1..];
        // After `)`: state ppid pgrp session tty_nr tpgid flags (field 9 of the file).
        let flags: u64 = rest.split_whitespace().nth(6)?.parse().ok()?;
        Some(if flags & PF_KTHREAD != 0 {
            ProcessKind::Kernel
        } else {
            ProcessKind::User
        })
    }

    /// The kernel's name of a block device from its tracepoint device number
    /// (`major << 20 | minor`), partitions folded into their disk (`vda1` → `vda`); the
    /// `MAJ:MIN` text when sysfs does not know it (a device that vanished).
    pub fn block_device_name(&self, dev: u32) -> String {
        let (major, minor) = (dev >> 20, dev & 0xf_ffff);
        let node = self.sys.join(format!("dev/block/{major}:{minor}"));
        let name = std::fs::canonicalize(&node).ok().and_then(|path| {
            let path = if node.join("partition").exists() {
                path.parent()?.to_path_buf()
            } else {
                path
            };
            Some(path.file_name()?.to_string_lossy().into_owned())
        });
        name.unwrap_or_else(|| format!("{major}:{minor}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn process_kind_from_stat_flags() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::under(dir.path());
        for (pid, stat) in [
            (2, "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0"),
            (90, "90 (qemu (odd) name) S 1 90 90 0 -1 4194560 0 0"),
            (91, "garbage"),
        ] {
            std::fs::create_dir_all(paths.pid_dir(pid)).unwrap();
            std::fs::write(paths.pid_dir(pid).join("stat"), stat).unwrap();
        }
        assert_eq!(paths.process_kind(2), Some(ProcessKind::Kernel));
        assert_eq!(paths.process_kind(90), Some(ProcessKind::User));
        assert_eq!(paths.process_kind(91), None);
        assert_eq!(paths.process_kind(4242), None);
    }

    #[test]
    fn block_devices_fold_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::under(dir.path());
        let disk = dir.path().join("sys/devices/virtual/block/vda");
        std::fs::create_dir_all(disk.join("vda1")).unwrap();
        std::fs::write(disk.join("vda1/partition"), "1\n").unwrap();
        std::fs::create_dir_all(dir.path().join("sys/dev/block")).unwrap();
        std::os::unix::fs::symlink(&disk, dir.path().join("sys/dev/block/253:0")).unwrap();
        std::os::unix::fs::symlink(disk.join("vda1"), dir.path().join("sys/dev/block/253:1"))
            .unwrap();
        assert_eq!(paths.block_device_name(253 << 20), "vda");
        assert_eq!(paths.block_device_name((253 << 20) | 1), "vda");
        assert_eq!(paths.block_device_name((8 << 20) | 16), "8:16");
    }
}
