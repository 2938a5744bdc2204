//! Test helpers shared by the discovery tests.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

/// The checked-in fixture `/proc` of a small host with odd QEMU processes (see its README.md).
pub fn fixture_proc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/proc/host1")
}

/// Trust as on a real host, except that the QEMU binary must belong to whoever runs the
/// tests (a fixture tree is theirs, not root's).
pub fn trust() -> super::trust::QemuTrust {
    super::trust::QemuTrust {
        qemu_uids: std::collections::BTreeSet::from([0]),
        // SAFETY: geteuid has no preconditions.
        exe_owner: unsafe { libc::geteuid() },
    }
}

/// Builds procfs trees in a temporary directory.
pub struct FakeProc {
    pub dir: tempfile::TempDir,
}

impl FakeProc {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// A process with `cmdline` args (NUL-terminated each) and threads `(tid, comm)`; the
    /// first thread's comm is also the process comm. It runs as root a binary named like
    /// argv[0] that belongs to the test's user (see [`trust`]).
    pub fn process(&self, pid: u32, args: &[&[u8]], threads: &[(u32, &[u8])]) {
        self.process_as(pid, 0, args, threads);
    }

    /// [`Self::process`] running as `uid`.
    pub fn process_as(&self, pid: u32, uid: u32, args: &[&[u8]], threads: &[(u32, &[u8])]) {
        let dir = self.dir.path().join(pid.to_string());
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let argv0 = args.first().map_or(&b"unknown"[..], |a| a);
        let base = String::from_utf8_lossy(argv0.rsplit(|&b| b == b'/').next().unwrap_or(argv0))
            .into_owned();
        let bin = self
            .dir
            .path()
            .join("bin")
            .join(if base.is_empty() { "unknown" } else { &base });
        fs::create_dir_all(bin.parent().unwrap()).unwrap();
        fs::write(&bin, b"\x7fELF").unwrap();
        std::os::unix::fs::symlink(&bin, dir.join("exe")).unwrap();
        fs::write(
            dir.join("status"),
            format!("Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
        )
        .unwrap();
        let mut raw = Vec::new();
        for a in args {
            raw.extend_from_slice(a);
            raw.push(0);
        }
        fs::write(dir.join("cmdline"), raw).unwrap();
        let comm = threads.first().map_or(&b"?"[..], |t| t.1);
        fs::write(dir.join("comm"), [comm, b"\n"].concat()).unwrap();
        fs::write(
            dir.join("stat"),
            format!("{pid} (x) S 1 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 {pid}00 0 0"),
        )
        .unwrap();
        for (tid, comm) in threads {
            self.thread(pid, *tid, comm);
        }
    }

    pub fn thread(&self, pid: u32, tid: u32, comm: &[u8]) {
        let dir = self.dir.path().join(format!("{pid}/task/{tid}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("comm"), [comm, b"\n"].concat()).unwrap();
    }

    pub fn remove_thread(&self, pid: u32, tid: u32) {
        fs::remove_dir_all(self.dir.path().join(format!("{pid}/task/{tid}"))).unwrap();
    }

    pub fn remove_process(&self, pid: u32) {
        fs::remove_dir_all(self.dir.path().join(pid.to_string())).unwrap();
    }
}
