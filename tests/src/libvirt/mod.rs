//! libvirtd (reused if running, else started by hand the ENGINEERING.md way), a second
//! libvirtd in its own mount namespace playing another host, and transient TCG domains
//! running the test guest.

mod daemon;
mod domain;
mod second;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;

pub use daemon::Libvirtd;
pub use domain::{xml_escape, Disk, DiskCache, Domain, DomainExtras};
pub use second::SecondLibvirtd;

use crate::proc::run_ok;

/// The system connection URI the harness uses.
pub const URI: &str = "qemu:///system";
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

fn virsh_cmd(uri: &str) -> Command {
    let mut cmd = Command::new("virsh");
    cmd.env("LC_ALL", "C").args(["-c", uri]);
    cmd
}

fn virsh_version(uri: &str) -> anyhow::Result<String> {
    run_ok(virsh_cmd(uri).arg("version"), Duration::from_secs(10))
}

/// Polls `ready` every 200 ms until it says true, errors, or `timeout` passes.
fn wait_until(
    timeout: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("not ready within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}
