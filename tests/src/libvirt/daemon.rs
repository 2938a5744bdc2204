//! Starting libvirtd by hand (no systemd) and sharing it between harness users.
//!
//! Several processes may use the harness at once (a test binary and `cargo xtask demo-vm`,
//! say). The first that finds no libvirtd starts one and records its pids in [`STATE`];
//! every user holds a shared `flock` on [`SHARE_LOCK`] while it uses libvirtd. The last
//! one to leave (the one that gets the lock exclusively) stops the recorded daemons, unless
//! domains it did not create still run. A libvirtd not started by the harness (no state
//! file) is never stopped.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use super::{virsh_cmd, virsh_version, wait_until, URI, VIRSH_TIMEOUT};
use crate::env::require_tools;
use crate::proc::{alive, file_tail, run_ok, signal, wait_gone, ChildGuard};

const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";
/// Held shared by every harness user of libvirtd, exclusively while starting or stopping it.
const SHARE_LOCK: &str = "/run/optimus-tests-libvirtd.lock";
/// `libvirtd=<pid>` and `virtlogd=<pid>` lines for daemons the harness started.
const STATE: &str = "/run/optimus-tests-libvirtd.pids";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A reachable libvirtd on [`URI`]. One that was running already is reused; one started
/// here (with virtlogd if needed) is stopped when the last harness user of it, in any
/// process, lets go: this guard and every [`super::Domain`] made through it hold it.
#[derive(Debug, Clone)]
pub struct Libvirtd {
    pub(super) daemon: std::sync::Arc<Daemon>,
}

#[derive(Debug)]
pub(super) struct Daemon {
    pub(super) uri: String,
    /// Our shared flock on [`SHARE_LOCK`].
    share: File,
    /// Processes this guard started; `None` when it reuses a running libvirtd.
    owned: Option<Owned>,
}

#[derive(Debug)]
struct Owned {
    // Field order is drop order: libvirtd, then virtlogd, then the log directory.
    libvirtd: ChildGuard,
    virtlogd: Option<ChildGuard>,
    _logs: TempDir,
}

impl Libvirtd {
    /// Reuses a running libvirtd if `virsh -c qemu:///system version` works. Otherwise
    /// prepares the host (`/var/log/libvirt`, `/run/libvirt`, the `kvm` and
    /// `libvirt-qemu` groups and `libvirt-qemu` user, and in `/etc/libvirt/qemu.conf`
    /// `user`/`group = "root"` and `security_driver = "none"` in a marked block, and in
    /// `/etc/libvirt/libvirtd.conf` `auth_unix_ro = "none"` for non-root read-only clients), starts
    /// `virtlogd` (unless its socket answers) and `libvirtd` as child processes, and waits
    /// up to 30 s for libvirtd to answer; the error then carries its log tail.
    pub fn start() -> anyhow::Result<Libvirtd> {
        require_tools(&[
            ("virsh", "libvirt-clients"),
            ("libvirtd", "libvirt-daemon"),
            ("virtlogd", "libvirt-daemon"),
            ("qemu-system-x86_64", "qemu-system-x86"),
        ])?;
        let share = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(SHARE_LOCK)
            .with_context(|| format!("open {SHARE_LOCK}"))?;
        flock(&share, libc::LOCK_EX).with_context(|| format!("lock {SHARE_LOCK}"))?;
        let owned = if virsh_version(URI).is_ok() {
            None
        } else {
            Some(start_daemons()?)
        };
        // Downgrade: from now on we are one user among others.
        flock(&share, libc::LOCK_SH).with_context(|| format!("lock {SHARE_LOCK}"))?;
        Ok(Libvirtd {
            daemon: std::sync::Arc::new(Daemon {
                uri: URI.to_owned(),
                share,
                owned,
            }),
        })
    }

    /// Connection URI, `"qemu:///system"`.
    pub fn uri(&self) -> &str {
        &self.daemon.uri
    }

    /// Whether this guard started libvirtd rather than reusing a running one.
    pub fn started_here(&self) -> bool {
        self.daemon.owned.is_some()
    }

    /// Pid of libvirtd if this guard started it.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.owned.as_ref().map(|o| o.libvirtd.pid())
    }

    /// A `virsh -c <uri>` command with the C locale (stable messages).
    pub fn virsh(&self) -> Command {
        virsh_cmd(self.uri())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let owned = self.owned.take();
        // Exclusive only if no other harness user holds the shared lock.
        let last = flock(&self.share, libc::LOCK_EX | libc::LOCK_NB).is_ok();
        let running = if last {
            running_domains(&self.uri)
        } else {
            Vec::new()
        };
        if last && running.is_empty() {
            let state = read_state();
            let ours = owned.is_some() || !state.is_empty();
            match owned {
                Some(owned) => drop(owned),
                // Started by another harness process that has left since.
                None => state
                    .iter()
                    .for_each(|(name, pid)| stop_foreign(name, *pid)),
            }
            if ours {
                let _ = std::fs::remove_file(STATE);
            }
        } else if let Some(owned) = owned {
            let pid = owned.libvirtd.detach();
            if let Some(v) = owned.virtlogd {
                v.detach();
            }
            let why = if last {
                format!("domains still run: {}", running.join(", "))
            } else {
                "another harness process still uses it".to_owned()
            };
            eprintln!("optimus-tests: leaving libvirtd {pid} running ({why})");
        }
    }
}

fn start_daemons() -> anyhow::Result<Owned> {
    prepare_host()?;
    let logs = tempfile::Builder::new()
        .prefix("optimus-libvirtd-")
        .tempdir()
        .context("create a temp dir for libvirtd logs")?;
    let virtlogd = if UnixStream::connect(VIRTLOGD_SOCK).is_ok() {
        None
    } else {
        let log = logs.path().join("virtlogd.log");
        let mut child = spawn_logged("virtlogd", &log)?;
        wait_until(Duration::from_secs(10), || {
            if let Some(status) = child.try_wait()? {
                bail!("virtlogd exited ({status}); log:\n{}", file_tail(&log, 20));
            }
            Ok(UnixStream::connect(VIRTLOGD_SOCK).is_ok())
        })
        .context("start virtlogd")?;
        Some(child)
    };
    let log = logs.path().join("libvirtd.log");
    let mut libvirtd = spawn_logged("libvirtd", &log)?;
    wait_answers(&mut libvirtd, URI, &log)?;
    let mut state = format!("libvirtd={}\n", libvirtd.pid());
    if let Some(v) = &virtlogd {
        state.push_str(&format!("virtlogd={}\n", v.pid()));
    }
    std::fs::write(STATE, state).with_context(|| format!("write {STATE}"))?;
    Ok(Owned {
        libvirtd,
        virtlogd,
        _logs: logs,
    })
}

/// Waits up to 30 s until the libvirtd in `child` answers on `uri`; fails at once if it
/// exits, and either way quotes the tail of its `log`.
pub(super) fn wait_answers(child: &mut ChildGuard, uri: &str, log: &Path) -> anyhow::Result<()> {
    let mut last_err = String::new();
    wait_until(START_TIMEOUT, || {
        if let Some(status) = child.try_wait()? {
            bail!(
                "libvirtd exited ({status}); log tail:\n{}",
                file_tail(log, 30)
            );
        }
        match virsh_version(uri) {
            Ok(_) => Ok(true),
            Err(e) => {
                last_err = format!("{e:#}");
                Ok(false)
            }
        }
    })
    .with_context(|| {
        format!(
            "libvirtd did not answer on {uri} (last virsh error: {last_err}); log tail:\n{}",
            file_tail(log, 30)
        )
    })
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock(2) on a file descriptor that `file` keeps open during the call.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `(daemon name, pid)` recorded in [`STATE`], only those still running under that name.
fn read_state() -> Vec<(String, u32)> {
    let text = std::fs::read_to_string(STATE).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once('=')?;
            let pid: u32 = pid.trim().parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim_end() == name && alive(pid)).then(|| (name.to_owned(), pid))
        })
        .collect()
}

/// Stops a daemon we did not spawn (so cannot reap): SIGTERM, then SIGKILL after 5 s.
fn stop_foreign(name: &str, pid: u32) {
    signal(pid, libc::SIGTERM);
    if !wait_gone(pid, Duration::from_secs(5)) {
        eprintln!("optimus-tests: {name} {pid} ignored SIGTERM; killing it");
        signal(pid, libc::SIGKILL);
        wait_gone(pid, Duration::from_secs(5));
    }
}

/// Names of running domains (empty if libvirtd cannot say).
fn running_domains(uri: &str) -> Vec<String> {
    run_ok(virsh_cmd(uri).args(["list", "--name"]), VIRSH_TIMEOUT)
        .map(|out| {
            out.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn spawn_logged(program: &str, log: &Path) -> anyhow::Result<ChildGuard> {
    spawn_logged_cmd(Command::new(program), log)
}

/// Spawns a daemon in the foreground with stdout and stderr to `log`.
pub(super) fn spawn_logged_cmd(mut cmd: Command, log: &Path) -> anyhow::Result<ChildGuard> {
    let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("dup {}", log.display()))?;
    // Own process group: a terminal Ctrl-C meant for the test or demo must not kill the
    // daemons before the guards have destroyed their domains.
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    ChildGuard::spawn(cmd)
}

/// What libvirtd needs on a host without systemd units or AppArmor set up for it.
fn prepare_host() -> anyhow::Result<()> {
    for dir in [
        "/var/log/libvirt",
        "/var/log/libvirt/qemu",
        "/var/run/libvirt",
        "/var/lib/libvirt/qemu",
        "/etc/libvirt",
    ] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {dir}"))?;
    }
    ensure_qemu_user()?;
    patch_file(QEMU_CONF, &QEMU_CONF_BLOCK)?;
    patch_file(LIBVIRTD_CONF, &LIBVIRTD_CONF_BLOCK)
}

/// The `kvm` and `libvirt-qemu` groups and the `libvirt-qemu` user, created if missing.
pub(super) fn ensure_qemu_user() -> anyhow::Result<()> {
    let getent = |db: &str, key: &str| {
        Command::new("getent")
            .args([db, key])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // Debian's libvirtd resolves its compiled-in QEMU user and group (both
    // `libvirt-qemu`) before it reads qemu.conf, so both must exist even though qemu.conf
    // then says root.
    for group in ["kvm", "libvirt-qemu"] {
        if !getent("group", group) {
            require_tools(&[("groupadd", "passwd")])?;
            run_ok(
                Command::new("groupadd").args(["--system", group]),
                VIRSH_TIMEOUT,
            )
            .with_context(|| format!("create group {group}"))?;
        }
    }
    if !getent("passwd", "libvirt-qemu") {
        require_tools(&[("useradd", "passwd")])?;
        run_ok(
            Command::new("useradd").args([
                "--system",
                "--gid",
                "kvm",
                "--no-create-home",
                "--home-dir",
                "/var/lib/libvirt",
                "--shell",
                "/usr/sbin/nologin",
                "libvirt-qemu",
            ]),
            VIRSH_TIMEOUT,
        )
        .context("create user libvirt-qemu")?;
    }
    Ok(())
}

/// Writes `block` into the config file at `path` (created if missing) unless it is there.
pub(super) fn patch_file(path: &str, block: &ConfBlock<'_>) -> anyhow::Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {path}")),
    };
    let patched = patch_conf(&existing, block);
    if patched != existing {
        std::fs::write(path, patched).with_context(|| format!("write {path}"))?;
    }
    Ok(())
}

/// Settings the harness owns in one libvirt config file.
pub(super) struct ConfBlock<'a> {
    /// Keys whose other active settings are commented out.
    pub(super) keys: &'a [&'a str],
    /// Comment lines (each starting `# `) and `key = value` lines.
    pub(super) body: &'a str,
}

pub(super) const QEMU_CONF_BLOCK: ConfBlock<'static> = ConfBlock {
    keys: &["user", "group", "security_driver"],
    body: "# Added by optimus-tests (tests/src/libvirt/daemon.rs, Libvirtd::start) so libvirtd\n\
           # runs QEMU on a host without AppArmor or systemd set up for it: QEMU as root, no\n\
           # security driver. Lines marked #optimus-tests# were disabled by it. Safe to remove.\n\
           user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n",
};

/// Debian's libvirt asks polkit before it lets a non-root user use even the read-only
/// socket, and polkit needs the D-Bus system bus, which this machine does not run. What the
/// packaged polkit policy grants (any local user may monitor) is what `none` grants: the
/// non-root agent tests connect read-only, as the agent always does.
pub(super) const LIBVIRTD_CONF_BLOCK: ConfBlock<'static> = ConfBlock {
    keys: &["auth_unix_ro"],
    body: "# Added by optimus-tests (tests/src/libvirt/daemon.rs, Libvirtd::start): without\n\
           # D-Bus and polkit, a non-root read-only client (the Optimus agent as its own user)\n\
           # is refused; libvirt's polkit policy would let any local user monitor. Safe to remove.\n\
           auth_unix_ro = \"none\"\n",
};

const LIBVIRTD_CONF: &str = "/etc/libvirt/libvirtd.conf";

const CONF_BEGIN: &str = "# BEGIN optimus-tests";
const CONF_END: &str = "# END optimus-tests";
const CONF_DISABLED: &str = "#optimus-tests# ";

/// `existing` with `block` in one marked block at the end and any other active setting of
/// its keys commented out (marked, so a person can see why). Idempotent: patching twice
/// changes nothing.
fn patch_conf(existing: &str, block: &ConfBlock<'_>) -> String {
    let mut out = String::with_capacity(existing.len() + 512);
    let mut in_block = false;
    for line in existing.lines() {
        let trimmed = line.trim();
        if trimmed == CONF_BEGIN {
            in_block = true;
            continue;
        }
        if in_block {
            if trimmed == CONF_END {
                in_block = false;
            }
            continue;
        }
        let key = trimmed.split('=').next().unwrap_or_default().trim();
        if !trimmed.starts_with('#') && trimmed.contains('=') && block.keys.contains(&key) {
            out.push_str(CONF_DISABLED);
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(CONF_BEGIN);
    out.push('\n');
    out.push_str(block.body);
    out.push_str(CONF_END);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_conf_patch_is_idempotent() {
        let original = "# user = \"qemu\"\nuser = \"libvirt-qemu\"\nvnc_listen = \"0.0.0.0\"\nsecurity_driver=\"apparmor\"\n";
        let once = patch_conf(original, &QEMU_CONF_BLOCK);
        assert_eq!(patch_conf(&once, &QEMU_CONF_BLOCK), once);
        assert!(once.contains("#optimus-tests# user = \"libvirt-qemu\""));
        assert!(once.contains("#optimus-tests# security_driver=\"apparmor\""));
        assert!(once.starts_with("# user = \"qemu\"\n"));
        assert!(once.contains("vnc_listen = \"0.0.0.0\"\n"));
        assert!(once.ends_with(
            "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n# END optimus-tests\n"
        ));
        assert_eq!(once.matches(CONF_BEGIN).count(), 1);
        let empty = patch_conf("", &QEMU_CONF_BLOCK);
        assert_eq!(patch_conf(&empty, &QEMU_CONF_BLOCK), empty);
        let ro = patch_conf("auth_unix_ro = \"polkit\"\n", &LIBVIRTD_CONF_BLOCK);
        assert!(ro.starts_with("#optimus-tests# auth_unix_ro = \"polkit\"\n"));
        assert!(ro.ends_with("auth_unix_ro = \"none\"\n# END optimus-tests\n"));
    }
}
