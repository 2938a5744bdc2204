//! A second libvirtd on this machine standing for another host: libvirtd and its virtlogd
//! in their own mount namespaces over private copies of `/run/libvirt`, `/var/lib/libvirt`,
//! `/etc/libvirt`, `/var/log/libvirt` and `/var/cache/libvirt`, with a host UUID of its
//! own, so that libvirt migrates between it and the harness's libvirtd as between hosts.
//!
//! The private directories live in a temp dir that the root namespace sees too: the
//! daemon's socket, `<temp>/run/libvirt/libvirt-sock`, is reachable from here (and from the
//! first libvirtd, which connects to it peer to peer) by its real path, and `<temp>/run`
//! stands for that host's `/run` (libvirt's status files are in `libvirt/qemu/` below it).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use super::daemon::{
    ensure_qemu_user, patch_file, spawn_logged_cmd, wait_answers, ConfBlock, LIBVIRTD_CONF_BLOCK,
    QEMU_CONF_BLOCK,
};
use super::{virsh_cmd, wait_until, VIRSH_TIMEOUT};
use crate::env::require_tools;
use crate::proc::{file_tail, find_pids_by_args, run, run_ok, signal, wait_gone, ChildGuard};

/// Private directory (under the temp dir) → the path it replaces inside the namespace.
const BINDS: [(&str, &str); 5] = [
    ("run/libvirt", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("etc", "/etc/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// Keys of the second daemon's qemu.conf block: the harness's own and the ones below.
const QEMU_KEYS: [&str; 6] = [
    "user",
    "group",
    "security_driver",
    "cgroup_controllers",
    "migration_address",
    "migration_host",
];

/// What the second daemon needs beyond [`QEMU_CONF_BLOCK`].
const QEMU_EXTRA: &str =
    "# Second libvirtd (tests/src/libvirt/second.rs): no cgroups, since both daemons\n\
     # would name a domain's cgroup machine/qemu-<id>-<name>.libvirt-qemu alike; incoming\n\
     # migrations listen on loopback only. libvirt refuses 127.0.0.1 (and `localhost`) as\n\
     # migration_host, meant for other machines to reach; 127.0.0.2 is loopback too.\n\
     cgroup_controllers = [ ]\nmigration_address = \"127.0.0.2\"\nmigration_host = \"127.0.0.2\"\n";

/// A second libvirtd (with its own virtlogd) playing another host; on drop its domains
/// are destroyed (and undefined), their QEMU processes checked gone, the daemons stopped
/// and the private directories removed. Its namespaces, and the bind mounts in them, end
/// with its processes.
#[derive(Debug)]
pub struct SecondLibvirtd {
    uri: String,
    host_uuid: String,
    root: PathBuf,
    libvirtd: Option<ChildGuard>,
    virtlogd: Option<ChildGuard>,
    dir: Option<TempDir>,
}

impl SecondLibvirtd {
    /// Copies `/etc/libvirt` (and libvirt's QEMU capabilities cache, which saves a probe
    /// of QEMU) into a temp dir, sets a new random `host_uuid` in its `libvirtd.conf` and in
    /// its `qemu.conf` the harness's settings plus `cgroup_controllers = [ ]` and
    /// `migration_address`/`migration_host = "127.0.0.2"`, then starts virtlogd and
    /// libvirtd in mount namespaces of their own over the private directories, and waits
    /// (30 s at most) until libvirtd answers on [`uri`](Self::uri). Needs root.
    pub fn start() -> anyhow::Result<SecondLibvirtd> {
        require_tools(&[
            ("virsh", "libvirt-clients"),
            ("libvirtd", "libvirt-daemon"),
            ("virtlogd", "libvirt-daemon"),
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("cp", "coreutils"),
        ])?;
        ensure_qemu_user()?;
        let dir = tempfile::Builder::new()
            .prefix("optimus-libvirtd2-")
            .tempdir()
            .context("create a temp dir for the second libvirtd")?;
        let root = dir.path().to_path_buf();
        for (private, target) in BINDS {
            // The mount point must exist in the root namespace; creating an empty
            // libvirt directory there is harmless.
            std::fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
            if private != "etc" {
                let path = root.join(private);
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("create {}", path.display()))?;
            }
        }
        for sub in ["lib/qemu", "log/qemu"] {
            let path = root.join(sub);
            std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        }
        if Path::new("/etc/libvirt").is_dir() {
            copy_tree(Path::new("/etc/libvirt"), &root.join("etc"))?;
        } else {
            std::fs::create_dir(root.join("etc")).context("create the private /etc/libvirt")?;
        }
        if Path::new("/var/cache/libvirt/qemu").is_dir() {
            copy_tree(
                Path::new("/var/cache/libvirt/qemu"),
                &root.join("cache").join("qemu"),
            )?;
        }
        let host_uuid = super::domain::new_uuid()?;
        let qemu_body = format!("{}{QEMU_EXTRA}", QEMU_CONF_BLOCK.body);
        patch_file(
            &root.join("etc/qemu.conf").to_string_lossy(),
            &ConfBlock {
                keys: &QEMU_KEYS,
                body: &qemu_body,
            },
        )?;
        let libvirtd_body = format!(
            "{}# A host UUID of its own: libvirt refuses to migrate to a host with its own.\n\
             host_uuid = \"{host_uuid}\"\n",
            LIBVIRTD_CONF_BLOCK.body
        );
        patch_file(
            &root.join("etc/libvirtd.conf").to_string_lossy(),
            &ConfBlock {
                keys: &["auth_unix_ro", "host_uuid"],
                body: &libvirtd_body,
            },
        )?;
        let uri = format!(
            "qemu+unix:///system?socket={}",
            root.join("run/libvirt/libvirt-sock").display()
        );
        let mut second = SecondLibvirtd {
            uri,
            host_uuid,
            root,
            libvirtd: None,
            virtlogd: None,
            dir: Some(dir),
        };
        second.spawn_daemons()?;
        Ok(second)
    }

    fn spawn_daemons(&mut self) -> anyhow::Result<()> {
        let binds = BINDS
            .iter()
            .map(|(private, target)| {
                let src = self.root.join(private);
                Ok((
                    CString::new(src.as_os_str().as_bytes())
                        .with_context(|| format!("{} has a NUL byte", src.display()))?,
                    CString::new(*target).context("a bind target has a NUL byte")?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let log = self.root.join("virtlogd.log");
        let mut cmd = Command::new("virtlogd");
        cmd.arg("--pid-file").arg(self.root.join("virtlogd.pid"));
        in_own_mount_namespace(&mut cmd, binds.clone());
        let virtlogd = self.virtlogd.insert(spawn_logged_cmd(cmd, &log)?);
        let sock = self.root.join("run/libvirt/virtlogd-sock");
        wait_until(Duration::from_secs(10), || {
            if let Some(status) = virtlogd.try_wait()? {
                bail!("virtlogd exited ({status}); log:\n{}", file_tail(&log, 20));
            }
            Ok(UnixStream::connect(&sock).is_ok())
        })
        .context("start the second virtlogd")?;

        let log = self.root.join("libvirtd.log");
        let mut cmd = Command::new("libvirtd");
        cmd.arg("--pid-file").arg(self.root.join("libvirtd.pid"));
        in_own_mount_namespace(&mut cmd, binds);
        let libvirtd = self.libvirtd.insert(spawn_logged_cmd(cmd, &log)?);
        wait_answers(libvirtd, &self.uri, &log).context("start the second libvirtd")
    }

    /// Its connection URI, `qemu+unix:///system?socket=<temp>/run/libvirt/libvirt-sock`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The `host_uuid` it was given.
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// The real directory behind its `/run/libvirt` (holds `libvirt-sock`, and its QEMU
    /// domains' status files under `qemu/`).
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run/libvirt")
    }

    /// What its host's `/run` would be, as far as libvirt goes: [`run_dir`](Self::run_dir)
    /// is its `libvirt` (for an agent's `--run-root`).
    pub fn run_root(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Pid of its libvirtd.
    pub fn pid(&self) -> Option<u32> {
        self.libvirtd.as_ref().map(ChildGuard::pid)
    }

    /// The last `lines` of its libvirtd's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.root.join("libvirtd.log"), lines)
    }

    /// A `virsh -c <uri>` command with the C locale.
    pub fn virsh(&self) -> Command {
        virsh_cmd(&self.uri)
    }

    /// Destroys (and undefines) every domain it has and makes sure their QEMU processes
    /// are gone; returns what went wrong, if anything.
    fn clear_domains(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let uuids = match run_ok(
            self.virsh().args(["list", "--all", "--uuid"]),
            VIRSH_TIMEOUT,
        ) {
            Ok(out) => out
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
            Err(e) => {
                problems.push(format!("cannot list its domains: {e:#}"));
                Vec::new()
            }
        };
        for uuid in uuids {
            let pids = find_pids_by_args(&["-uuid", &uuid]).unwrap_or_default();
            let _ = run(self.virsh().args(["destroy", &uuid]), None, VIRSH_TIMEOUT);
            let _ = run(self.virsh().args(["undefine", &uuid]), None, VIRSH_TIMEOUT);
            for pid in pids {
                if !wait_gone(pid, Duration::from_secs(10)) {
                    signal(pid, libc::SIGKILL);
                    wait_gone(pid, Duration::from_secs(5));
                    problems.push(format!(
                        "QEMU {pid} of domain {uuid} outlived virsh destroy and was SIGKILLed"
                    ));
                }
            }
        }
        problems
    }
}

impl Drop for SecondLibvirtd {
    fn drop(&mut self) {
        // QEMU outlives a stopped libvirtd: domains first.
        if self.libvirtd.is_some() {
            for problem in self.clear_domains() {
                eprintln!("optimus-tests: second libvirtd: {problem}");
            }
        }
        drop(self.libvirtd.take());
        drop(self.virtlogd.take());
        drop(self.dir.take());
    }
}

/// Runs `cmd` in a new mount namespace (private propagation, so nothing leaks back) with
/// each `(source, target)` of `binds` bind-mounted over its target.
fn in_own_mount_namespace(cmd: &mut Command, binds: Vec<(CString, CString)>) {
    // SAFETY: the closure runs in the child between fork and exec; it makes only the
    // unshare(2) and mount(2) system calls (async-signal-safe) on C strings allocated
    // before the fork, and builds its error from errno without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let none = std::ptr::null();
            if libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for (source, target) in &binds {
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// `cp -a from to`: a recursive copy keeping modes (libvirt wants its files 0600).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    run_ok(
        Command::new("cp").arg("-a").arg(from).arg(to),
        VIRSH_TIMEOUT,
    )
    .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}
