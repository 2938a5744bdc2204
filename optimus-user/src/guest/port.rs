//! The guest end of the channel: the virtio-serial port `org.optimus.agent.0`.
//!
//! udev names it `/dev/virtio-ports/org.optimus.agent.0`; without udev (a minimal image)
//! only `/dev/vportNpM` exists, and its name is in `/sys/class/virtio-ports/vportNpM/name`,
//! which is searched when the default path is missing.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::channel::protocol::PORT_NAME;

/// Where udev links the port.
pub const DEFAULT_PORT: &str = "/dev/virtio-ports/org.optimus.agent.0";

/// Why the port cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("no virtio-serial port {PORT_NAME} in this VM ({DEFAULT_PORT} is missing and no /sys/class/virtio-ports/*/name says {PORT_NAME}): add the channel to the VM (README \"Guest channel\"), load the virtio_console module, or pass --port")]
    NotFound,
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The port's device: `path` if it exists, else (for the default) the `vportNpM` whose sysfs
/// name is [`PORT_NAME`], looked up under `sys` and `dev`.
pub fn resolve(path: &Path, sys: &Path, dev: &Path) -> Result<PathBuf, PortError> {
    if path.exists() || path != Path::new(DEFAULT_PORT) {
        return Ok(path.to_path_buf());
    }
    let ports =
        std::fs::read_dir(sys.join("class/virtio-ports")).map_err(|_| PortError::NotFound)?;
    for entry in ports.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Ok(dev.join(entry.file_name()));
        }
    }
    Err(PortError::NotFound)
}

/// Opens the port for reading and writing (two handles of one open file).
pub fn open(path: &Path) -> Result<(File, File), PortError> {
    let err = |source| PortError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    let writer = file.try_clone().map_err(err)?;
    Ok((file, writer))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_its_sysfs_name() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        for (port, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport2p1", PORT_NAME),
        ] {
            let d = sys.join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
        let dev = tmp.path().join("dev");
        assert_eq!(
            resolve(Path::new(DEFAULT_PORT), &sys, &dev).unwrap(),
            dev.join("vport2p1")
        );
        assert_eq!(
            resolve(Path::new("/given"), &sys, &dev).unwrap(),
            PathBuf::from("/given")
        );
        let none = resolve(Path::new(DEFAULT_PORT), &tmp.path().join("nosys"), &dev);
        assert!(none
            .unwrap_err()
            .to_string()
            .contains("load the virtio_console module"));
    }
}
