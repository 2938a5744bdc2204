//! Test helpers shared by the discovery tests.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

/// The checked-in fixture `/proc` of a small host with odd QEMU processes (see its README.md).
pub fn fixture_proc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/proc/host1")
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
    /// first thread's comm is also the process comm.
    pub fn process(&self, pid: u32, args: &[&[u8]], threads: &[(u32, &[u8])]) {
        let dir = self.dir.path().join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
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
            format!("{pid} (x) S 1 1 1 0 -1 4194560 0"),
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
