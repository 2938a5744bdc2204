//! libvirtd (reused if running, else started by hand the ENGINEERING.md way) and transient
//! TCG domains running the test guest.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::console::wait_for_marker;
use crate::env::{find_tool, require_tools};
use crate::guest::{GuestImage, GuestPlan};
use crate::proc::{alive, file_tail, find_pids_by_args, run, run_ok, wait_gone, ChildGuard};

/// The system connection URI the harness uses.
pub const URI: &str = "qemu:///system";
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

/// A reachable libvirtd on [`URI`]. If one was already running it is reused and left
/// alone; otherwise the one started here (with virtlogd if needed) is stopped once this
/// guard and every [`Domain`] created through it are dropped.
#[derive(Debug, Clone)]
pub struct Libvirtd {
    daemon: Arc<Daemon>,
}

#[derive(Debug)]
struct Daemon {
    uri: String,
    /// Processes started here; `None` when an already running libvirtd is reused.
    owned: Option<Owned>,
}

#[derive(Debug)]
struct Owned {
    // Field order is drop order: libvirtd, then virtlogd, then the log directory.
    _libvirtd: ChildGuard,
    _virtlogd: Option<ChildGuard>,
    _logs: TempDir,
}

impl Libvirtd {
    /// Reuses a running libvirtd if `virsh -c qemu:///system version` works. Otherwise
    /// prepares the host (`/var/log/libvirt`, `/run/libvirt`, the `kvm` group and
    /// `libvirt-qemu` user, and in `/etc/libvirt/qemu.conf` `user`/`group = "root"` and
    /// `security_driver = "none"`, in a marked block), starts `virtlogd` (unless its socket
    /// answers) and `libvirtd` as child processes, and waits up to 30 s for them to answer.
    pub fn start() -> anyhow::Result<Libvirtd> {
        require_tools(&[
            ("virsh", "libvirt-clients"),
            ("libvirtd", "libvirt-daemon"),
            ("virtlogd", "libvirt-daemon"),
            ("qemu-system-x86_64", "qemu-system-x86"),
        ])?;
        if virsh_version(URI).is_ok() {
            return Ok(Libvirtd {
                daemon: Arc::new(Daemon {
                    uri: URI.to_owned(),
                    owned: None,
                }),
            });
        }
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
        let mut last_err = String::new();
        wait_until(START_TIMEOUT, || {
            if let Some(status) = libvirtd.try_wait()? {
                bail!("libvirtd exited ({status}); log:\n{}", file_tail(&log, 30));
            }
            match virsh_version(URI) {
                Ok(_) => Ok(true),
                Err(e) => {
                    last_err = format!("{e:#}");
                    Ok(false)
                }
            }
        })
        .with_context(|| {
            format!(
                "libvirtd did not answer on {URI} (last virsh error: {last_err}); log tail:\n{}",
                file_tail(&log, 30)
            )
        })?;
        Ok(Libvirtd {
            daemon: Arc::new(Daemon {
                uri: URI.to_owned(),
                owned: Some(Owned {
                    _libvirtd: libvirtd,
                    _virtlogd: virtlogd,
                    _logs: logs,
                }),
            }),
        })
    }

    /// Connection URI, `"qemu:///system"`.
    pub fn uri(&self) -> &str {
        &self.daemon.uri
    }

    /// Whether this guard started libvirtd (and will stop it) rather than reusing one.
    pub fn started_here(&self) -> bool {
        self.daemon.owned.is_some()
    }

    /// A `virsh -c <uri>` command with the C locale (stable messages).
    pub fn virsh(&self) -> Command {
        virsh_cmd(self.uri())
    }
}

fn virsh_cmd(uri: &str) -> Command {
    let mut cmd = Command::new("virsh");
    cmd.env("LC_ALL", "C").args(["-c", uri]);
    cmd
}

fn virsh_version(uri: &str) -> anyhow::Result<String> {
    run_ok(virsh_cmd(uri).arg("version"), Duration::from_secs(10))
}

fn spawn_logged(program: &str, log: &Path) -> anyhow::Result<ChildGuard> {
    let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("dup {}", log.display()))?;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    ChildGuard::spawn(cmd)
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
    let path = Path::new(QEMU_CONF);
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {QEMU_CONF}")),
    };
    let patched = patch_qemu_conf(&existing);
    if patched != existing {
        std::fs::write(path, patched).with_context(|| format!("write {QEMU_CONF}"))?;
    }
    Ok(())
}

const CONF_BEGIN: &str = "# BEGIN optimus-tests";
const CONF_END: &str = "# END optimus-tests";
const CONF_DISABLED: &str = "#optimus-tests# ";
const CONF_KEYS: [&str; 3] = ["user", "group", "security_driver"];

/// `qemu.conf` with our settings in one marked block at the end and any other active
/// setting of the same keys commented out (marked, so a person can see why).
/// Idempotent: patching twice changes nothing.
fn patch_qemu_conf(existing: &str) -> String {
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
        if !trimmed.starts_with('#') && trimmed.contains('=') && CONF_KEYS.contains(&key) {
            out.push_str(CONF_DISABLED);
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(CONF_BEGIN);
    out.push_str(
        "\n# Added by optimus-tests (tests/src/libvirt.rs, Libvirtd::start) so libvirtd runs\n\
         # QEMU on a host without AppArmor or systemd set up for it: QEMU as root, no\n\
         # security driver. Lines marked #optimus-tests# were disabled by it. Safe to remove.\n\
         user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n",
    );
    out.push_str(CONF_END);
    out.push('\n');
    out
}

/// A transient libvirt domain running the test guest; `virsh destroy`ed (undefined if it
/// turned persistent) on drop, and its QEMU killed if libvirt cannot do it.
#[derive(Debug)]
pub struct Domain {
    daemon: Arc<Daemon>,
    name: String,
    uuid: String,
    qemu_pid: Option<u32>,
    console_log: PathBuf,
    destroyed: bool,
    _dir: TempDir,
}

impl Domain {
    /// Creates and starts a transient `<domain type='qemu'>` (TCG): `vcpus` vCPUs,
    /// 256 MiB, the guest image's kernel and initramfs with the plan's command line, the
    /// serial console to a log file in a temp dir and, if `disk` is given, that raw file as
    /// virtio disk `vda` with `cache='none' io='native'`. Any name libvirt accepts works
    /// (it is XML-escaped; only `/` is refused by libvirt).
    pub fn create(
        libvirtd: &Libvirtd,
        name: &str,
        image: &GuestImage,
        plan: &GuestPlan,
        vcpus: u32,
        disk: Option<&Path>,
    ) -> anyhow::Result<Domain> {
        let uuid = new_uuid()?;
        let dir = tempfile::Builder::new()
            .prefix("optimus-domain-")
            .tempdir()
            .context("create a temp dir for the domain")?;
        // Readable by a reused libvirtd that runs QEMU as an unprivileged user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", dir.path().display()))?;
        let console_log = dir.path().join("console.log");
        let emulator = find_tool("qemu-system-x86_64");
        let xml = domain_xml(&DomainSpec {
            name,
            uuid: &uuid,
            vcpus,
            image,
            cmdline: &plan.kernel_cmdline(),
            console_log: &console_log,
            disk,
            emulator: emulator.as_deref(),
        });
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, &xml)
            .with_context(|| format!("write {}", xml_path.display()))?;
        run_ok(
            libvirtd.virsh().arg("create").arg(&xml_path),
            VIRSH_TIMEOUT,
        )
        .with_context(|| format!("virsh create domain {name:?}; XML:\n{xml}"))?;
        let mut domain = Domain {
            daemon: Arc::clone(&libvirtd.daemon),
            name: name.to_owned(),
            uuid,
            qemu_pid: None,
            console_log,
            destroyed: false,
            _dir: dir,
        };
        let mut found = None;
        // `virsh create` returns once QEMU runs, but allow for a slow /proc view.
        let _ = wait_until(Duration::from_secs(10), || {
            found = domain.qemu_pid().ok();
            Ok(found.is_some())
        });
        domain.qemu_pid = Some(
            found.with_context(|| format!("no QEMU process with -uuid {}", domain.uuid))?,
        );
        Ok(domain)
    }

    /// Domain name, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Domain UUID (generated here), as in QEMU's `-uuid`.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The serial console log file.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Pid of the QEMU process whose command line has `-uuid <uuid>` (searched in `/proc`).
    pub fn qemu_pid(&self) -> anyhow::Result<u32> {
        let pids = find_pids_by_args(&["-uuid", &self.uuid])?;
        match pids.as_slice() {
            [pid] => Ok(*pid),
            [] => bail!("no process has -uuid {} on its command line", self.uuid),
            many => bail!("several processes have -uuid {}: {many:?}", self.uuid),
        }
    }

    /// Waits until the serial console shows `marker`; fails at once if QEMU exits, and
    /// on timeout quotes the console tail.
    pub fn wait_for_console(&self, marker: &str, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.qemu_pid;
        wait_for_marker(&self.console_log, marker, timeout, || match pid {
            Some(pid) if !alive(pid) => Some(format!("QEMU process {pid} exited")),
            _ => None,
        })
    }

    /// Destroys the domain now and checks that libvirt no longer lists it and its QEMU
    /// process is gone.
    pub fn destroy(mut self) -> anyhow::Result<()> {
        self.destroyed = true;
        self.destroy_inner()
    }

    fn destroy_inner(&mut self) -> anyhow::Result<()> {
        let uri = self.daemon.uri.clone();
        let out = run(
            virsh_cmd(&uri).args(["destroy", &self.uuid]),
            None,
            VIRSH_TIMEOUT,
        );
        let virsh_err = match &out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
            Err(e) => Some(format!("{e:#}")),
        };
        // A domain that turned persistent (someone defined it) stays listed: undefine it.
        if self.listed(&uri)? {
            let _ = run(
                virsh_cmd(&uri).args(["undefine", &self.uuid]),
                None,
                VIRSH_TIMEOUT,
            );
        }
        let mut problems = Vec::new();
        if let Some(pid) = self.qemu_pid {
            if !wait_gone(pid, Duration::from_secs(10)) {
                crate::proc::signal(pid, libc::SIGKILL);
                wait_gone(pid, Duration::from_secs(5));
                problems.push(format!(
                    "QEMU process {pid} outlived virsh destroy and was SIGKILLed"
                ));
            }
        }
        if self.listed(&uri)? {
            problems.push(format!(
                "virsh still lists the domain after destroy ({})",
                virsh_err.as_deref().unwrap_or("virsh destroy succeeded")
            ));
        } else if let Some(err) = virsh_err {
            // Already gone (e.g. the guest powered off): not a problem.
            if !err.contains("not found") && !err.contains("not running") {
                problems.push(format!("virsh destroy: {err}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "destroying domain {:?} ({}): {}",
                self.name,
                self.uuid,
                problems.join("; ")
            )
        }
    }

    /// Whether `virsh list --all` shows this domain (by UUID).
    fn listed(&self, uri: &str) -> anyhow::Result<bool> {
        let out = run_ok(
            virsh_cmd(uri).args(["list", "--all", "--uuid"]),
            VIRSH_TIMEOUT,
        )?;
        Ok(out.lines().any(|l| l.trim() == self.uuid))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        if let Err(e) = self.destroy_inner() {
            eprintln!("optimus-tests: {e:#}");
        }
    }
}

struct DomainSpec<'a> {
    name: &'a str,
    uuid: &'a str,
    vcpus: u32,
    image: &'a GuestImage,
    cmdline: &'a str,
    console_log: &'a Path,
    disk: Option<&'a Path>,
    emulator: Option<&'a Path>,
}

fn domain_xml(spec: &DomainSpec<'_>) -> String {
    let path = |p: &Path| xml_escape(&p.to_string_lossy());
    let emulator = spec
        .emulator
        .map(|e| format!("    <emulator>{}</emulator>\n", path(e)))
        .unwrap_or_default();
    let disk = spec
        .disk
        .map(|d| {
            format!(
                "    <disk type='file' device='disk'>\n      \
                 <driver name='qemu' type='raw' cache='none' io='native'/>\n      \
                 <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
                path(d)
            )
        })
        .unwrap_or_default();
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  \
         <memory unit='MiB'>256</memory>\n  <vcpu placement='static'>{vcpus}</vcpu>\n  \
         <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    \
         <kernel>{kernel}</kernel>\n    <initrd>{initrd}</initrd>\n    \
         <cmdline>{cmdline}</cmdline>\n  </os>\n  <features><acpi/></features>\n  \
         <clock offset='utc'/>\n  <on_poweroff>destroy</on_poweroff>\n  \
         <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n\
         {emulator}{disk}    <serial type='file'>\n      <source path='{console}'/>\n      \
         <target port='0'/>\n    </serial>\n    <memballoon model='none'/>\n  </devices>\n\
         </domain>\n",
        name = xml_escape(spec.name),
        uuid = xml_escape(spec.uuid),
        vcpus = spec.vcpus,
        kernel = path(&spec.image.kernel),
        initrd = path(&spec.image.initrd),
        cmdline = xml_escape(spec.cmdline),
        console = path(spec.console_log),
    )
}

/// Escapes text for XML element content and single- or double-quoted attributes.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A random (version 4) UUID from the kernel.
fn new_uuid() -> anyhow::Result<String> {
    let path = "/proc/sys/kernel/random/uuid";
    let uuid = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    Ok(uuid.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_conf_patch_is_idempotent() {
        let original = "# user = \"qemu\"\nuser = \"libvirt-qemu\"\nvnc_listen = \"0.0.0.0\"\nsecurity_driver=\"apparmor\"\n";
        let once = patch_qemu_conf(original);
        assert_eq!(patch_qemu_conf(&once), once);
        assert!(once.contains("#optimus-tests# user = \"libvirt-qemu\""));
        assert!(once.contains("#optimus-tests# security_driver=\"apparmor\""));
        assert!(once.contains("\n# user = \"qemu\"\n") || once.starts_with("# user = \"qemu\"\n"));
        assert!(once.contains("vnc_listen = \"0.0.0.0\"\n"));
        assert!(once.ends_with(
            "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n# END optimus-tests\n"
        ));
        assert_eq!(once.matches(CONF_BEGIN).count(), 1);
        let empty = patch_qemu_conf("");
        assert_eq!(patch_qemu_conf(&empty), empty);
    }

    #[test]
    fn xml_is_escaped() {
        let image = GuestImage {
            kernel: PathBuf::from("/c/k&<"),
            initrd: PathBuf::from("/c/i'"),
        };
        let xml = domain_xml(&DomainSpec {
            name: "optimus test \"ü\" <&>",
            uuid: "u",
            vcpus: 2,
            image: &image,
            cmdline: "console=ttyS0",
            console_log: Path::new("/t/c.log"),
            disk: Some(Path::new("/t/d.raw")),
            emulator: None,
        });
        assert!(xml.contains("<name>optimus test &quot;ü&quot; &lt;&amp;&gt;</name>"));
        assert!(xml.contains("<kernel>/c/k&amp;&lt;</kernel>"));
        assert!(xml.contains("<initrd>/c/i&apos;</initrd>"));
        assert!(xml.contains("cache='none' io='native'"));
        assert!(xml.contains("<source file='/t/d.raw'/>"));
    }

    #[test]
    fn uuid() {
        let u = new_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_ne!(u, new_uuid().unwrap());
    }
}
