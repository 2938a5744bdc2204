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

/// Raises the soft limit on open files to the hard limit, so a burst of connections or of
/// /proc reads does not starve sampling at the default soft limit (often 1024); logs the
/// outcome. Returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        log::warn!(
            "cannot read the open-files limit: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit struct; raising soft up to hard needs no
        // privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            log::warn!(
                "cannot raise the open-files limit from {before} to {}: {}",
                lim.rlim_max,
                std::io::Error::last_os_error()
            );
            return Some(before);
        }
        log::debug!("open-files limit raised from {before} to {}", lim.rlim_max);
    }
    Some(lim.rlim_cur)
}

/// `PF_KTHREAD` from include/linux/sched.h: the task is a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Field 9 (`flags`) of a `<proc>/<pid>/stat` text: the one reader of it, so that every
/// part of the agent agrees on what is a kernel thread. The comm in field 2 may hold spaces
/// and parentheses, so fields are counted after its last `)`, split on the ASCII blanks the
/// kernel writes.
pub fn stat_flags(stat: &str) -> Option<u64> {
    let after_comm = stat.get(stat.rfind(')')? + 1..)?;
    // After `)`: state ppid pgrp session tty_nr tpgid flags.
    after_comm.split_ascii_whitespace().nth(6)?.parse().ok()
}

/// Kernel thread or user process, from the flags in a `<proc>/<pid>/stat` text; `None`
/// when the text has no flags field.
pub fn process_kind_of_stat(stat: &str) -> Option<ProcessKind> {
    let flags = stat_flags(stat)?;
    Some(if flags & PF_KTHREAD != 0 {
        ProcessKind::Kernel
    } else {
        ProcessKind::User
    })
}

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
        process_kind_of_stat(&stat)
    }

    /// The process (tgid) thread `tid` belongs to, from `<proc>/<tid>/status` (procfs
    /// serves any thread id at the top level, listed or not); `None` when it is gone.
    pub fn thread_group(&self, tid: u32) -> Option<u32> {
        let status = std::fs::read_to_string(self.pid_dir(tid).join("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok())
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

/// Memory of the host from `<proc>/meminfo`, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total: Option<u64>,
    /// The kernel's estimate of memory available without swapping (`MemAvailable`).
    pub available: Option<u64>,
}

impl HostPaths {
    /// `MemTotal` and `MemAvailable`; each `None` when absent or unreadable.
    pub fn meminfo(&self) -> MemInfo {
        let Ok(text) = std::fs::read_to_string(self.proc.join("meminfo")) else {
            return MemInfo::default();
        };
        parse_meminfo(&text)
    }
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> MemInfo {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?.trim();
            let kib: u64 = rest.strip_suffix("kB")?.trim().parse().ok()?;
            kib.checked_mul(1024)
        })
    };
    MemInfo {
        total: field("MemTotal"),
        available: field("MemAvailable"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::under(dir.path());
        assert_eq!(paths.meminfo(), MemInfo::default());
        std::fs::create_dir_all(&paths.proc).unwrap();
        std::fs::write(
            paths.proc.join("meminfo"),
            "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n",
        )
        .unwrap();
        let m = paths.meminfo();
        assert_eq!(m.total, Some(24_000_000 * 1024));
        assert_eq!(m.available, Some(20_000_000 * 1024));
        std::fs::write(paths.proc.join("meminfo"), "MemTotal: lots\n").unwrap();
        assert_eq!(paths.meminfo(), MemInfo::default());
    }

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        let soft = raise_fd_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
        assert_eq!(rc, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(soft, lim.rlim_cur);
    }

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
    fn parses_stat_flags_after_odd_comm() {
        assert_eq!(
            stat_flags("42 (a) b (c)) S 2 0 0 0 -1 2129984 0 0"),
            Some(2_129_984)
        );
        assert_eq!(stat_flags("42 (x"), None);
        assert_eq!(stat_flags(""), None);
        // Found by fuzzing: a vertical tab is no field separator, for every reader (one of
        // three copies of this parser took it for one and found a different flags field).
        assert_eq!(stat_flags("7 (a) R 1 2 3 4 5\u{b}6 7"), Some(7));
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
