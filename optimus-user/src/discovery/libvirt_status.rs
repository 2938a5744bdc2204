//! libvirt's own record of its running QEMU domains: `<run>/libvirt/qemu/<name>.xml`.
//!
//! In: the status files libvirtd writes while a domain runs. Out: per domain UUID, the QEMU
//! pid libvirt started, the thread id of each vCPU and the mediated devices (vGPUs) its
//! domain XML gives it (`<hostdev mode='subsystem' type='mdev'>` with
//! `<source><address uuid='…'/></source>`). This is what makes libvirt
//! authoritative for its domains: a process is that domain's QEMU because libvirt says so,
//! not because its command line carries the UUID. The file looks like
//!
//! ```text
//! <domstatus state='running' reason='booted' pid='25908'>
//!   <vcpus><vcpu id='0' pid='25914'/><vcpu id='1' pid='25915'/></vcpus>
//!   <domain type='qemu' id='1'><name>web</name><uuid>570e…</uuid>…</domain>
//! </domstatus>
//! ```
//!
//! Every `*.xml` of the directory is read (the file name is an escaped domain name, so a
//! name does not map back to a path); a file is re-parsed only when its size or mtime
//! changes. The files are root-only (0600): an agent without `CAP_DAC_READ_SEARCH` reads
//! none, and then libvirt domains are matched by UUID among trusted processes only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::cmdline::normalize_uuid;

/// Largest status file read; libvirt's are tens of KiB.
const MAX_STATUS_BYTES: u64 = 4 << 20;

/// What libvirt's status file says about one running domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainStatus {
    /// Lowercase UUID.
    pub uuid: String,
    /// The domain name as libvirt keeps it.
    pub name: String,
    /// The QEMU process libvirt started.
    pub pid: u32,
    /// vCPU index → thread id.
    pub vcpus: Vec<(u32, u32)>,
    /// Lowercase UUIDs of the domain's mdev hostdevs (its vGPUs).
    pub mdev_uuids: Vec<String>,
}

/// A file's size and mtime: when both are unchanged, so is the file.
type Stamp = (u64, Option<SystemTime>);

/// Reads libvirt's status directory, caching what did not change.
#[derive(Debug)]
pub struct StatusDir {
    dir: PathBuf,
    /// File → (size, mtime) it had when parsed, and what it held (`None`: not a usable
    /// status file).
    cache: HashMap<PathBuf, (Stamp, Option<DomainStatus>)>,
}

impl StatusDir {
    /// Status files under `<run>/libvirt/qemu`.
    pub fn new(run: &Path) -> Self {
        Self {
            dir: run.join("libvirt/qemu"),
            cache: HashMap::new(),
        }
    }

    /// Every running domain with a readable status file, keyed by UUID. An unreadable
    /// directory (no libvirt, no permission) gives none.
    pub fn read(&mut self) -> HashMap<String, DomainStatus> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            self.cache.clear();
            return HashMap::new();
        };
        let mut seen = HashMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "xml") {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let stamp = (meta.len(), meta.modified().ok());
            let parsed = match self.cache.get(&path) {
                Some((s, parsed)) if *s == stamp => parsed.clone(),
                _ => {
                    let parsed = (meta.len() <= MAX_STATUS_BYTES)
                        .then(|| std::fs::read_to_string(&path).ok())
                        .flatten()
                        .and_then(|text| parse_status(&text));
                    if parsed.is_none() {
                        log::debug!("{}: not a libvirt domain status file", path.display());
                    }
                    parsed
                }
            };
            seen.insert(path, (stamp, parsed));
        }
        self.cache = seen;
        self.cache
            .values()
            .filter_map(|(_, p)| p.clone())
            .map(|d| (d.uuid.clone(), d))
            .collect()
    }
}

/// Parses one status file; `None` unless it holds a running domain's pid and UUID.
pub fn parse_status(text: &str) -> Option<DomainStatus> {
    let doc = roxmltree::Document::parse(text).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "domstatus" {
        return None;
    }
    let pid: u32 = root.attribute("pid")?.parse().ok().filter(|&p| p > 0)?;
    let domain = root.children().find(|n| n.has_tag_name("domain"))?;
    let text_of = |tag: &str| {
        domain
            .children()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
    };
    let uuid = normalize_uuid(text_of("uuid")?)?;
    let name = text_of("name")?.to_owned();
    let vcpus = root
        .children()
        .filter(|n| n.has_tag_name("vcpus"))
        .flat_map(|n| n.children().filter(|c| c.has_tag_name("vcpu")))
        .filter_map(|v| {
            let id = v.attribute("id")?.parse().ok()?;
            let tid = v.attribute("pid")?.parse().ok()?;
            Some((id, tid))
        })
        .collect();
    let mdev_uuids = domain
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|n| n.children().filter(|c| c.has_tag_name("hostdev")))
        .filter(|h| h.attribute("mode") == Some("subsystem") && h.attribute("type") == Some("mdev"))
        .filter_map(|h| {
            let source = h.children().find(|n| n.has_tag_name("source"))?;
            let address = source.children().find(|n| n.has_tag_name("address"))?;
            normalize_uuid(address.attribute("uuid")?)
        })
        .collect();
    Some(DomainStatus {
        uuid,
        name,
        pid,
        vcpus,
        mdev_uuids,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STATUS: &str = r"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE.
-->

<domstatus state='running' reason='booted' pid='25908'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-1-web/monitor.sock' type='unix'/>
  <vcpus>
    <vcpu id='0' pid='25914'/>
    <vcpu id='1' pid='25915'/>
  </vcpus>
  <domain type='qemu' id='1'>
    <name>we&quot;b &lt;1&gt;</name>
    <uuid>570E8643-b9e7-4fca-8903-1654a153385b</uuid>
    <vcpu placement='static'>2</vcpu>
  </domain>
</domstatus>
";

    #[test]
    fn parses_pid_uuid_name_and_vcpu_threads() {
        assert_eq!(
            parse_status(STATUS),
            Some(DomainStatus {
                uuid: "570e8643-b9e7-4fca-8903-1654a153385b".into(),
                name: "we\"b <1>".into(),
                pid: 25908,
                vcpus: vec![(0, 25914), (1, 25915)],
                mdev_uuids: Vec::new(),
            })
        );
    }

    #[test]
    fn mdev_hostdevs_are_the_domains_vgpus() {
        // As libvirt writes a vGPU (NVIDIA's KVM guide); a PCI hostdev and a malformed
        // address are not mdevs.
        let devices = r"<devices>
      <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='off'>
        <source><address uuid='4B20D080-1b54-4048-85b3-a6a62d165c01'/></source>
        <alias name='hostdev0'/>
      </hostdev>
      <hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x65' slot='0x00' function='0x0'/></source>
      </hostdev>
      <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
        <source><address uuid='not-a-uuid'/></source>
      </hostdev>
    </devices>
  </domain>";
        let status = parse_status(&STATUS.replace("  </domain>", devices)).unwrap();
        assert_eq!(
            status.mdev_uuids,
            vec!["4b20d080-1b54-4048-85b3-a6a62d165c01".to_owned()]
        );
    }

    #[test]
    fn rejects_what_is_not_a_running_domain() {
        for text in [
            "",
            "<domain><name>x</name></domain>",
            "<domstatus pid='0'><domain><uuid>570e8643-b9e7-4fca-8903-1654a153385b</uuid><name>x</name></domain></domstatus>",
            "<domstatus pid='7'><domain><uuid>nope</uuid><name>x</name></domain></domstatus>",
            "<domstatus pid='7'>",
        ] {
            assert_eq!(parse_status(text), None, "{text}");
        }
    }

    #[test]
    fn reads_a_directory_and_follows_changes() {
        let run = tempfile::tempdir().unwrap();
        let dir = run.path().join("libvirt/qemu");
        let mut status = StatusDir::new(run.path());
        assert!(status.read().is_empty(), "no directory: no domains");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.xml"), STATUS).unwrap();
        std::fs::write(dir.join("web.pid"), "25908").unwrap();
        std::fs::write(dir.join("junk.xml"), "<<<").unwrap();
        let found = status.read();
        assert_eq!(found.len(), 1);
        assert_eq!(found["570e8643-b9e7-4fca-8903-1654a153385b"].pid, 25908);
        // Rewritten with another pid (a restarted domain): seen.
        std::fs::write(dir.join("web.xml"), STATUS.replace("25908", "31000")).unwrap();
        assert_eq!(
            status.read()["570e8643-b9e7-4fca-8903-1654a153385b"].pid,
            31000
        );
        std::fs::remove_file(dir.join("web.xml")).unwrap();
        assert!(status.read().is_empty());
    }
}
