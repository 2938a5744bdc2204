//! Phase marks inside the VM: a FIFO that any process of the tenant writes phase lines to
//! (`echo "train epoch=3" > "$OPTIMUS_PHASE"`, the line protocol of `optimus measure`), and
//! `optimus guest phase NAME`, which writes one line to it.
//!
//! The guest agent holds the FIFO open for reading and writing, so a writer never blocks
//! for want of a reader and the last writer closing is not an end of file.

use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Where `optimus guest` serves the FIFO unless `--phase-path` says otherwise.
pub const DEFAULT_PHASE_PATH: &str = "/run/optimus-guest/phase";

/// Errors of the phase FIFO.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a FIFO served by `optimus guest`: is it running (with this --phase-path)?", path.display())]
    NotServed { path: PathBuf },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PhaseError + 'a {
    move |source| PhaseError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The served FIFO; removed on drop.
#[derive(Debug)]
pub struct PhaseFifo {
    path: PathBuf,
    file: File,
}

impl PhaseFifo {
    /// Creates the FIFO at `path` (its directory 0755, the FIFO 0622: any local user may
    /// mark phases, only root reads them), replacing a stale one, and opens it.
    pub fn create(path: &Path) -> Result<Self, PhaseError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove the stale", path)(e)),
        }
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            io("create", path)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "path with a NUL byte",
            ))
        })?;
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(io("create the FIFO", path)(std::io::Error::last_os_error()));
        }
        // chmod after mkfifo: the umask must not narrow who may write.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o622))
            .map_err(io("chmod", path))?;
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// A handle to read lines from.
    pub fn reader(&self) -> Result<File, PhaseError> {
        self.file.try_clone().map_err(io("open", &self.path))
    }
}

impl Drop for PhaseFifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes one phase line to the FIFO at `path`; fails at once when nobody serves it.
pub fn send(path: &Path, line: &str) -> Result<(), PhaseError> {
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt as _;
        m.file_type().is_fifo()
    });
    if !is_fifo {
        return Err(PhaseError::NotServed {
            path: path.to_path_buf(),
        });
    }
    // Non-blocking: without a reader the open fails (ENXIO) instead of hanging.
    let mut f = File::options()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENXIO) {
                PhaseError::NotServed {
                    path: path.to_path_buf(),
                }
            } else {
                io("open", path)(e)
            }
        })?;
    f.write_all(format!("{line}\n").as_bytes())
        .map_err(io("write", path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn fifo_roundtrip_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d/phase");
        assert!(matches!(
            send(&path, "x"),
            Err(PhaseError::NotServed { .. })
        ));
        let fifo = PhaseFifo::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o622);
        send(&path, "train epoch=1").unwrap();
        let mut buf = [0u8; 64];
        let n = fifo.reader().unwrap().read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"train epoch=1\n");
        drop(fifo);
        assert!(!path.exists());
    }
}
