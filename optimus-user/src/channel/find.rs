//! Where a VM's guest channel is, and which GPUs it owns: from the libvirt domain XML (in
//! libvirt's status files, `<run>/libvirt/qemu/*.xml`) or from QEMU's command line.
//!
//! - Channel: `<channel type='unix'>` whose `<target type='virtio' name='org.optimus.agent.0'/>`,
//!   its `<source path=…>` (libvirt fills the path in when the XML gave none); or
//!   `-chardev socket,id=ID,path=PATH,…` with a
//!   `-device virtserialport,chardev=ID,name=org.optimus.agent.0`.
//! - GPUs: each `<hostdev type='pci'>` (host address in `<source><address …/>`, guest address
//!   in its own `<address type='pci' …/>`); each `<optimus:gpu host_pci=… guest_pci=…
//!   [uuid=…]/>` under `<metadata><optimus:guest xmlns:optimus='urn:optimus:guest:1'>`, for
//!   a GPU the XML does not show as a hostdev (set by the operator, never by the guest);
//!   and each `-device vfio-pci,host=ADDR[,addr=SLOT[.FN]]` on QEMU's root bus.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::protocol::{normalize_pci, PORT_NAME};
use super::trust::OwnedGpu;
use crate::discovery::cmdline::split_argv;

/// The XML namespace of Optimus' domain metadata.
pub const METADATA_NS: &str = "urn:optimus:guest:1";
/// Largest status file read.
const MAX_XML_BYTES: u64 = 4 << 20;

/// What a VM's definition says about its guest channel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelSpec {
    /// The UNIX socket QEMU listens on for the channel; `None`: the VM has no channel.
    pub socket: Option<PathBuf>,
    /// GPUs passed through to the VM.
    pub gpus: Vec<OwnedGpu>,
}

fn hex_attr(node: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    let v = node.attribute(name)?.trim();
    Some(v.strip_prefix("0x").unwrap_or(v).to_owned())
}

/// `dddd:bb:ss.f` of a libvirt `<address domain bus slot function/>`.
fn libvirt_pci(node: roxmltree::Node<'_, '_>) -> Option<String> {
    normalize_pci(&format!(
        "{}:{}:{}.{}",
        hex_attr(node, "domain").unwrap_or_else(|| "0".into()),
        hex_attr(node, "bus")?,
        hex_attr(node, "slot")?,
        hex_attr(node, "function").unwrap_or_else(|| "0".into()),
    ))
}

/// The channel and GPUs of a `<domain>` element.
fn from_domain(domain: roxmltree::Node<'_, '_>) -> ChannelSpec {
    let mut spec = ChannelSpec::default();
    let Some(devices) = domain.children().find(|n| n.has_tag_name("devices")) else {
        return spec;
    };
    for dev in devices.children().filter(roxmltree::Node::is_element) {
        if dev.has_tag_name("channel") && dev.attribute("type") == Some("unix") {
            let ours = dev.children().any(|t| {
                t.has_tag_name("target")
                    && t.attribute("type") == Some("virtio")
                    && t.attribute("name") == Some(PORT_NAME)
            });
            let path = dev
                .children()
                .find(|s| s.has_tag_name("source"))
                .and_then(|s| s.attribute("path"));
            if let (true, Some(path)) = (ours, path) {
                spec.socket.get_or_insert_with(|| PathBuf::from(path));
            }
        }
        if dev.has_tag_name("hostdev")
            && dev.attribute("type") == Some("pci")
            && dev.attribute("mode").is_none_or(|m| m == "subsystem")
        {
            let host = dev
                .children()
                .find(|s| s.has_tag_name("source"))
                .and_then(|s| s.children().find(|a| a.has_tag_name("address")))
                .and_then(libvirt_pci);
            let guest = dev
                .children()
                .find(|a| a.has_tag_name("address") && a.attribute("type") == Some("pci"))
                .and_then(libvirt_pci);
            if let (Some(host_pci), Some(guest_pci)) = (host, guest) {
                spec.gpus.push(OwnedGpu {
                    guest_pci,
                    host_pci,
                    uuid: None,
                });
            }
        }
    }
    let declared = domain
        .children()
        .filter(|m| m.has_tag_name("metadata"))
        .flat_map(|m| m.children())
        .filter(|g| g.has_tag_name((METADATA_NS, "guest")))
        .flat_map(|g| g.children())
        .filter(|g| g.has_tag_name((METADATA_NS, "gpu")));
    for gpu in declared {
        let pci = |name| gpu.attribute(name).and_then(normalize_pci);
        if let (Some(host_pci), Some(guest_pci)) = (pci("host_pci"), pci("guest_pci")) {
            spec.gpus.push(OwnedGpu {
                guest_pci,
                host_pci,
                uuid: gpu.attribute("uuid").map(|u| u.trim().to_owned()),
            });
        }
    }
    spec.gpus.sort();
    spec.gpus.dedup_by(|a, b| a.host_pci == b.host_pci);
    spec
}

/// The (lowercase) UUID and channel of the domain in a domain XML or libvirt status file
/// (`<domstatus>` around the `<domain>`).
pub fn parse_domain_xml(xml: &str) -> Option<(String, ChannelSpec)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let domain = doc.descendants().find(|n| n.has_tag_name("domain"))?;
    let own = domain
        .children()
        .find(|n| n.has_tag_name("uuid"))?
        .text()?
        .trim()
        .to_ascii_lowercase();
    Some((own, from_domain(domain)))
}

/// The channel of the domain with `uuid` in a domain XML; `None` when the XML is of
/// another domain.
pub fn from_domain_xml(xml: &str, uuid: &str) -> Option<ChannelSpec> {
    parse_domain_xml(xml)
        .filter(|(own, _)| own.eq_ignore_ascii_case(uuid))
        .map(|(_, spec)| spec)
}

/// Every running domain's channel from libvirt's status files under `<run>/libvirt/qemu`,
/// by lowercase UUID (one read of the directory for all VMs).
pub fn status_dir_specs(run: &Path) -> HashMap<String, ChannelSpec> {
    use std::io::Read as _;
    let Ok(entries) = std::fs::read_dir(run.join("libvirt/qemu")) else {
        return HashMap::new();
    };
    let mut out = HashMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("xml") {
            continue;
        }
        let mut text = String::new();
        let read = std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_XML_BYTES).read_to_string(&mut text));
        if let Some((uuid, spec)) = read.ok().and_then(|_| parse_domain_xml(&text)) {
            out.insert(uuid, spec);
        }
    }
    out
}

/// `key=value` pairs of a QEMU option string (`,,` is a literal comma); a leading bare
/// word is returned under the key `""`.
fn qemu_opts(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut fields = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                fields.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    fields.push(cur);
    for (i, f) in fields.into_iter().enumerate() {
        match f.split_once('=') {
            Some((k, v)) => out.push((k.to_owned(), v.to_owned())),
            None if i == 0 => out.push((String::new(), f)),
            None => out.push((f, "on".to_owned())),
        }
    }
    out
}

/// A `-device` value as key/value pairs, in QEMU's option syntax or its JSON form.
fn device_opts(value: &str) -> Vec<(String, String)> {
    if value.trim_start().starts_with('{') {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(value) else {
            return Vec::new();
        };
        return map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (if k == "driver" { String::new() } else { k }, v)
            })
            .collect();
    }
    qemu_opts(value)
}

fn get<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The guest PCI address of a device on QEMU's root bus (`addr=0x5`, `addr=05.1`).
fn root_bus_addr(opts: &[(String, String)]) -> Option<String> {
    if get(opts, "bus").is_some_and(|b| b != "pci.0" && b != "pcie.0") {
        return None;
    }
    let addr = get(opts, "addr")?;
    let (slot, func) = addr.split_once('.').unwrap_or((addr, "0"));
    let (slot, func) = (slot.trim_start_matches("0x"), func.trim_start_matches("0x"));
    normalize_pci(&format!("0000:00:{slot}.{func}"))
}

/// The channel and GPUs from a QEMU command line (`/proc/<pid>/cmdline`).
pub fn from_cmdline(raw: &[u8]) -> ChannelSpec {
    let args: Vec<String> = split_argv(raw)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut chardevs: Vec<(String, String)> = Vec::new();
    let mut port_chardev = None;
    let mut spec = ChannelSpec::default();
    for pair in args.windows(2) {
        let (flag, value) = (pair[0].as_str(), pair[1].as_str());
        match flag {
            "-chardev" => {
                let opts = qemu_opts(value);
                if get(&opts, "") == Some("socket") {
                    if let (Some(id), Some(path)) = (get(&opts, "id"), get(&opts, "path")) {
                        chardevs.push((id.to_owned(), path.to_owned()));
                    }
                }
            }
            "-device" => {
                let opts = device_opts(value);
                match get(&opts, "") {
                    Some("virtserialport") if get(&opts, "name") == Some(PORT_NAME) => {
                        port_chardev = get(&opts, "chardev").map(str::to_owned);
                    }
                    Some("vfio-pci") => {
                        let host = get(&opts, "host").and_then(normalize_pci);
                        if let (Some(host_pci), Some(guest_pci)) = (host, root_bus_addr(&opts)) {
                            spec.gpus.push(OwnedGpu {
                                guest_pci,
                                host_pci,
                                uuid: None,
                            });
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    spec.socket = port_chardev.and_then(|id| {
        chardevs
            .into_iter()
            .find(|(c, _)| *c == id)
            .map(|(_, p)| PathBuf::from(p))
    });
    spec
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gpu(guest: &str, host: &str, uuid: Option<&str>) -> OwnedGpu {
        OwnedGpu {
            guest_pci: guest.into(),
            host_pci: host.into(),
            uuid: uuid.map(Into::into),
        }
    }

    const STATUS: &str = r#"<domstatus state='running' pid='100'>
  <domain type='qemu' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <name>gpu-vm</name>
    <uuid>6C0F2A1E-3B4D-4E5F-8A9B-0C1D2E3F4A5B</uuid>
    <metadata>
      <optimus:guest xmlns:optimus='urn:optimus:guest:1'>
        <optimus:gpu host_pci='0000:81:00.0' guest_pci='00:07.0' uuid='GPU-x'/>
        <optimus:gpu host_pci='bogus' guest_pci='00:08.0'/>
      </optimus:guest>
      <other:gpu xmlns:other='urn:other' host_pci='0000:82:00.0' guest_pci='00:09.0'/>
    </metadata>
    <devices>
      <channel type='unix'>
        <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-gpu-vm/org.qemu.guest_agent.0'/>
        <target type='virtio' name='org.qemu.guest_agent.0'/>
      </channel>
      <channel type='unix'>
        <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-gpu-vm/org.optimus.agent.0'/>
        <target type='virtio' name='org.optimus.agent.0' state='connected'/>
      </channel>
      <hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x65' slot='0x00' function='0x0'/></source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
      </hostdev>
      <hostdev mode='subsystem' type='usb'>
        <source><vendor id='0x1234'/></source>
      </hostdev>
    </devices>
  </domain>
</domstatus>"#;

    #[test]
    fn libvirt_status_file() {
        let spec = from_domain_xml(STATUS, "6c0f2a1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert_eq!(
            spec.socket.as_deref(),
            Some(Path::new(
                "/var/lib/libvirt/qemu/channel/target/domain-3-gpu-vm/org.optimus.agent.0"
            ))
        );
        assert_eq!(
            spec.gpus,
            vec![
                gpu("0000:00:05.0", "0000:65:00.0", None),
                gpu("0000:00:07.0", "0000:81:00.0", Some("GPU-x")),
            ]
        );
        assert_eq!(from_domain_xml(STATUS, "another-uuid"), None);
        assert_eq!(from_domain_xml("<not xml", "x"), None);
    }

    #[test]
    fn status_dir_search() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("libvirt/qemu");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("gpu-vm.xml"), STATUS).unwrap();
        std::fs::write(dir.join("other.xml"), "<domstatus/>").unwrap();
        let specs = status_dir_specs(tmp.path());
        assert_eq!(specs.len(), 1, "{specs:?}");
        assert!(specs["6c0f2a1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"]
            .socket
            .is_some());
        assert!(status_dir_specs(&tmp.path().join("none")).is_empty());
    }

    #[test]
    fn no_channel_in_a_plain_domain() {
        let xml = "<domain><uuid>u</uuid><devices><channel type='pty'><target type='virtio' name='org.optimus.agent.0'/></channel></devices></domain>";
        assert_eq!(from_domain_xml(xml, "u"), Some(ChannelSpec::default()));
    }

    fn argv(args: &[&str]) -> Vec<u8> {
        let mut raw = Vec::new();
        for a in args {
            raw.extend_from_slice(a.as_bytes());
            raw.push(0);
        }
        raw
    }

    #[test]
    fn qemu_command_line() {
        let raw = argv(&[
            "qemu-system-x86_64",
            "-chardev",
            "socket,id=other,path=/tmp/x.sock,server=on",
            "-chardev",
            "socket,id=ch0,path=/tmp/odd,,name.sock,server=on,wait=off",
            "-device",
            "virtio-serial-pci",
            "-device",
            "virtserialport,chardev=ch0,name=org.optimus.agent.0",
            "-device",
            "vfio-pci,host=0000:65:00.0,addr=0x5",
            "-device",
            r#"{"driver":"vfio-pci","host":"81:00.0","bus":"pci.0","addr":"0x6.0x1"}"#,
            "-device",
            "vfio-pci,host=0000:82:00.0,bus=bridge1,addr=0x1",
        ]);
        let spec = from_cmdline(&raw);
        assert_eq!(
            spec.socket.as_deref(),
            Some(Path::new("/tmp/odd,name.sock"))
        );
        assert_eq!(
            spec.gpus,
            vec![
                gpu("0000:00:05.0", "0000:65:00.0", None),
                gpu("0000:00:06.1", "0000:81:00.0", None)
            ]
        );
        let none = from_cmdline(&argv(&[
            "qemu-system-x86_64",
            "-chardev",
            "socket,id=c,path=/p",
        ]));
        assert_eq!(none, ChannelSpec::default());
    }
}
