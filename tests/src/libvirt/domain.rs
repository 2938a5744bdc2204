//! Transient libvirt domains running the test guest.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use super::daemon::{Daemon, Libvirtd};
use super::{virsh_cmd, wait_until, VIRSH_TIMEOUT};
use crate::console::wait_for_marker;
use crate::env::find_tool;
use crate::guest::{GuestImage, GuestPlan};
use crate::proc::{alive, find_pids_by_args, run, run_ok, wait_gone};

/// A raw disk file attached as virtio `vda`.
#[derive(Debug, Clone, Copy)]
pub struct Disk<'a> {
    /// The raw image file on the host.
    pub path: &'a Path,
    /// How QEMU opens it.
    pub cache: DiskCache,
}

/// How QEMU opens the disk file on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCache {
    /// `cache='none' io='native'`: O_DIRECT, QEMU's threads submit the guest's I/O
    /// themselves.
    Direct,
    /// `cache='writeback'` (`io='threads'`): through the host page cache; kernel writeback
    /// threads write it out later.
    HostPageCache,
}

impl DiskCache {
    /// The `cache` and `io` attributes of the disk's `<driver>` element.
    fn driver_attrs(self) -> &'static str {
        match self {
            DiskCache::Direct => "cache='none' io='native'",
            DiskCache::HostPageCache => "cache='writeback' io='threads'",
        }
    }
}

/// More of a domain than [`Domain::create`] gives it.
#[derive(Debug, Clone, Default)]
pub struct DomainExtras {
    /// Memory, MiB (default 256; an agent image needs 768).
    pub memory_mib: Option<u32>,
    /// The kernel command line instead of the plan's (e.g. `guest::agent_cmdline`).
    pub cmdline: Option<String>,
    /// Give it the guest channel: `<channel type='unix'>` with target
    /// `org.optimus.agent.0`, its socket in the domain's temp dir.
    pub channel: bool,
    /// XML put inside `<metadata>` (e.g. Optimus' `<optimus:guest>` GPU declarations).
    pub metadata: Option<String>,
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
    channel: Option<PathBuf>,
    destroyed: bool,
    _dir: TempDir,
}

impl Domain {
    /// Creates and starts a transient `<domain type='qemu'>` (TCG): `vcpus` vCPUs,
    /// 256 MiB, the guest image's kernel and initramfs with the plan's command line, the
    /// serial console to a log file in a temp dir and, if `disk` is given, that raw file as
    /// virtio disk `vda`, opened the way its [`DiskCache`] says. Any name libvirt accepts
    /// works (it is XML-escaped; only `/` is refused by libvirt).
    pub fn create(
        libvirtd: &Libvirtd,
        name: &str,
        image: &GuestImage,
        plan: &GuestPlan,
        vcpus: u32,
        disk: Option<Disk<'_>>,
    ) -> anyhow::Result<Domain> {
        Self::create_with(
            libvirtd,
            name,
            image,
            plan,
            vcpus,
            disk,
            &DomainExtras::default(),
        )
    }

    /// [`Domain::create`] with [`DomainExtras`].
    pub fn create_with(
        libvirtd: &Libvirtd,
        name: &str,
        image: &GuestImage,
        plan: &GuestPlan,
        vcpus: u32,
        disk: Option<Disk<'_>>,
        extras: &DomainExtras,
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
        let channel = extras.channel.then(|| dir.path().join("agent.sock"));
        let emulator = find_tool("qemu-system-x86_64");
        let cmdline = extras
            .cmdline
            .clone()
            .unwrap_or_else(|| plan.kernel_cmdline());
        let xml = domain_xml(&DomainSpec {
            name,
            uuid: &uuid,
            vcpus,
            image,
            cmdline: &cmdline,
            console_log: &console_log,
            disk,
            emulator: emulator.as_deref(),
            memory_mib: extras.memory_mib.unwrap_or(256),
            channel: channel.as_deref(),
            metadata: extras.metadata.as_deref(),
        });
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, &xml).with_context(|| format!("write {}", xml_path.display()))?;
        run_ok(libvirtd.virsh().arg("create").arg(&xml_path), VIRSH_TIMEOUT)
            .with_context(|| format!("virsh create domain {name:?}; XML:\n{xml}"))?;
        let mut domain = Domain {
            daemon: Arc::clone(&libvirtd.daemon),
            name: name.to_owned(),
            uuid,
            qemu_pid: None,
            console_log,
            channel,
            destroyed: false,
            _dir: dir,
        };
        let mut found = None;
        // `virsh create` returns once QEMU runs, but allow for a slow /proc view.
        let _ = wait_until(Duration::from_secs(10), || {
            found = domain.qemu_pid().ok();
            Ok(found.is_some())
        });
        domain.qemu_pid =
            Some(found.with_context(|| format!("no QEMU process with -uuid {}", domain.uuid))?);
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

    /// The guest channel's socket (QEMU listens on it), when the domain has one.
    pub fn channel_socket(&self) -> Option<&Path> {
        self.channel.as_deref()
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
        if let Ok(true) = self.listed(&uri) {
            let _ = run(
                virsh_cmd(&uri).args(["undefine", &self.uuid]),
                None,
                VIRSH_TIMEOUT,
            );
        }
        let mut problems = Vec::new();
        // Whatever libvirt managed, QEMU must not outlive the guard.
        if let Some(pid) = self.qemu_pid {
            if !wait_gone(pid, Duration::from_secs(10)) {
                crate::proc::signal(pid, libc::SIGKILL);
                wait_gone(pid, Duration::from_secs(5));
                problems.push(format!(
                    "QEMU process {pid} outlived virsh destroy and was SIGKILLed"
                ));
            }
        }
        let destroy_result = virsh_err.as_deref().unwrap_or("virsh destroy succeeded");
        match self.listed(&uri) {
            Ok(true) => problems.push(format!(
                "virsh still lists the domain after destroy ({destroy_result})"
            )),
            Ok(false) => {
                // Already gone (e.g. the guest powered off) is not a problem.
                if let Some(err) = &virsh_err {
                    // Gone (migrated away, say): "failed to get domain" / "not found".
                    if !err.contains("not found")
                        && !err.contains("not running")
                        && !err.contains("failed to get domain")
                    {
                        problems.push(format!("virsh destroy: {err}"));
                    }
                }
            }
            Err(e) => problems.push(format!(
                "cannot list domains ({e:#}); virsh destroy: {destroy_result}"
            )),
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
    disk: Option<Disk<'a>>,
    emulator: Option<&'a Path>,
    memory_mib: u32,
    channel: Option<&'a Path>,
    metadata: Option<&'a str>,
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
                 <driver name='qemu' type='raw' {}/>\n      \
                 <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
                d.cache.driver_attrs(),
                path(d.path)
            )
        })
        .unwrap_or_default();
    let channel = spec
        .channel
        .map(|p| {
            format!(
                "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      \
                 <target type='virtio' name='org.optimus.agent.0'/>\n    </channel>\n",
                path(p)
            )
        })
        .unwrap_or_default();
    let metadata = spec
        .metadata
        .map(|m| format!("  <metadata>\n{m}\n  </metadata>\n"))
        .unwrap_or_default();
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n{metadata}  \
         <memory unit='MiB'>{memory}</memory>\n  <vcpu placement='static'>{vcpus}</vcpu>\n  \
         <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    \
         <kernel>{kernel}</kernel>\n    <initrd>{initrd}</initrd>\n    \
         <cmdline>{cmdline}</cmdline>\n  </os>\n  <features><acpi/></features>\n  \
         <clock offset='utc'/>\n  <on_poweroff>destroy</on_poweroff>\n  \
         <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n\
         {emulator}{disk}{channel}    <serial type='file'>\n      <source path='{console}'/>\n      \
         <target port='0'/>\n    </serial>\n    <memballoon model='none'/>\n  </devices>\n\
         </domain>\n",
        name = xml_escape(spec.name),
        uuid = xml_escape(spec.uuid),
        vcpus = spec.vcpus,
        kernel = path(&spec.image.kernel),
        initrd = path(&spec.image.initrd),
        cmdline = xml_escape(spec.cmdline),
        console = path(spec.console_log),
        memory = spec.memory_mib,
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
pub(super) fn new_uuid() -> anyhow::Result<String> {
    let path = "/proc/sys/kernel/random/uuid";
    let uuid = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    Ok(uuid.trim().to_owned())
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

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
            disk: Some(Disk {
                path: Path::new("/t/d&.raw"),
                cache: DiskCache::Direct,
            }),
            emulator: None,
            memory_mib: 256,
            channel: None,
            metadata: None,
        });
        assert!(xml.contains("<name>optimus test &quot;ü&quot; &lt;&amp;&gt;</name>"));
        assert!(xml.contains("<kernel>/c/k&amp;&lt;</kernel>"));
        assert!(xml.contains("<initrd>/c/i&apos;</initrd>"));
        assert!(xml.contains("<driver name='qemu' type='raw' cache='none' io='native'/>"));
        assert!(xml.contains("<source file='/t/d&amp;.raw'/>"));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"));
    }

    #[test]
    fn disk_cache_modes() {
        let image = GuestImage {
            kernel: PathBuf::from("/c/k"),
            initrd: PathBuf::from("/c/i"),
        };
        let xml = |disk| {
            domain_xml(&DomainSpec {
                name: "n",
                uuid: "u",
                vcpus: 1,
                image: &image,
                cmdline: "console=ttyS0",
                console_log: Path::new("/t/c.log"),
                disk,
                emulator: None,
                memory_mib: 256,
                channel: None,
                metadata: None,
            })
        };
        let cached = xml(Some(Disk {
            path: Path::new("/t/d.raw"),
            cache: DiskCache::HostPageCache,
        }));
        assert!(cached.contains("<driver name='qemu' type='raw' cache='writeback' io='threads'/>"));
        assert!(cached.contains("<source file='/t/d.raw'/>"));
        assert!(!cached.contains("cache='none'"));
        let none = xml(None);
        assert!(!none.contains("<disk"));
        assert!(!none.contains("<driver"));
    }

    #[test]
    fn uuid() {
        let u = new_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_ne!(u, new_uuid().unwrap());
    }
}
