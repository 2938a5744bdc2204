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
