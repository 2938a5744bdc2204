//! `$OPTIMUS_PHASE`: a FIFO in a private directory that the command (and any of its
//! children) writes phase lines to. Measure holds it open read-write, so it always has a
//! writer: a workload's `echo ... > "$OPTIMUS_PHASE"` never blocks waiting for a reader, and
//! the last writer closing does not turn the FIFO into endless end-of-file.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// The FIFO and its directory, removed on drop.
#[derive(Debug)]
pub struct PhaseFifo {
    dir: PathBuf,
    path: PathBuf,
    fd: OwnedFd,
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

impl PhaseFifo {
    /// Creates `<tmp>/optimus-measure-XXXXXX/phase`, owned by `owner` (uid, gid) when given
    /// so that a command run as that user can write it; mode 0700 / 0600.
    pub fn create(tmp: &Path, owner: Option<(u32, u32)>) -> io::Result<PhaseFifo> {
        let template = cstring(&tmp.join("optimus-measure-XXXXXX"))?;
        let mut raw = template.into_bytes_with_nul();
        // SAFETY: mkdtemp rewrites the XXXXXX of the NUL-terminated buffer we own.
        let p = unsafe { libc::mkdtemp(raw.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        raw.pop();
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
        let path = dir.join("phase");
        let guard = DirGuard(dir.clone());
        let c = cstring(&path)?;
        // SAFETY: a NUL-terminated path we own.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some((uid, gid)) = owner {
            for p in [&dir, &path] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
            }
        }
        // SAFETY: a NUL-terminated path we own; O_RDWR on a FIFO opens at once on Linux
        // (fifo(7)) and makes us a writer too.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(guard);
        Ok(PhaseFifo {
            dir,
            path,
            // SAFETY: a descriptor open() just returned, owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// What `OPTIMUS_PHASE` is set to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor to poll.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Reads what is there now (non-blocking): `Ok(0)` when nothing is.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into the buffer we own, at most its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for PhaseFifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn writers_come_and_go_and_lines_arrive() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = PhaseFifo::create(tmp.path(), None).unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(fifo.read(&mut buf).unwrap(), 0);
        for line in ["a\n", "b x=1\n"] {
            let mut w = std::fs::OpenOptions::new()
                .write(true)
                .open(fifo.path())
                .unwrap();
            w.write_all(line.as_bytes()).unwrap();
        }
        let n = fifo.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"a\nb x=1\n");
        // All writers gone: no end-of-file storm, just nothing to read.
        assert_eq!(fifo.read(&mut buf).unwrap(), 0);
        let dir = fifo.path().parent().unwrap().to_path_buf();
        drop(fifo);
        assert!(!dir.exists());
    }
}
