//! What a QEMU command line (`/proc/<pid>/cmdline`) says about the VM it runs.
//!
//! Mostly `-name` and `-uuid` matter here (plus `-m`, and the mediated devices of `-device`). `-name` is a QemuOpts list whose implied first key is
//! `guest`, so `-name foo`, `-name foo,process=bar` and `-name guest=foo,debug-threads=on` all
//! name the guest `foo`; in a value `,,` stands for one `,` (QEMU's `get_opt_value` in
//! `util/qemu-option.c`). Bytes are kept as bytes until the end and converted lossily, since a
//! command line need not be UTF-8.

/// The identity a QEMU command line gives its VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuArgs {
    /// The `guest` value of `-name`, if given and not empty.
    pub name: Option<String>,
    /// The `-uuid` value as lowercase hyphenated text, if given and well formed.
    pub uuid: Option<String>,
    /// Guest memory from `-m` (`-m 256`, `-m 4G`, `-m size=262144k`), bytes.
    pub memory_bytes: Option<u64>,
    /// The Kubernetes namespace of a KubeVirt VM, whose virt-launcher names the guest
    /// `<namespace>_<name>` (`name` is then the VM's own name); `None` for any other QEMU.
    pub namespace: Option<String>,
    /// Lowercase UUIDs of the mediated devices (vGPUs) given with `-device`
    /// (`vfio-pci,sysfsdev=/sys/bus/mdev/devices/<uuid>`, or libvirt's JSON form).
    pub mdev_uuids: Vec<String>,
}

/// Splits the raw NUL-separated contents of `/proc/<pid>/cmdline` into arguments.
///
/// The kernel ends every argument with a NUL, so one trailing NUL is dropped; empty arguments
/// in the middle (`-name ''`) are kept.
pub fn split_argv(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = raw.strip_suffix(b"\0").unwrap_or(raw);
    // An empty command line (kernel thread, zombie) has no arguments, not one empty one.
    let skip_all = body.is_empty();
    body.split(|&b| b == 0).filter(move |_| !skip_all)
}

/// Whether `argv0` runs QEMU: its basename starts with `qemu-system-` or is `qemu-kvm`
/// (RHEL's `/usr/libexec/qemu-kvm`, Debian's `kvm` wrappers exec `qemu-system-*`).
pub fn is_qemu_binary(argv0: &[u8]) -> bool {
    let base = argv0.rsplit(|&b| b == b'/').next().unwrap_or(argv0);
    base.starts_with(b"qemu-system-") || base == b"qemu-kvm"
}

/// Parses a raw `/proc/<pid>/cmdline`; `None` when argv[0] is not QEMU.
///
/// Options may start with `-` or `--`, as QEMU accepts both. When an option is repeated the
/// last one wins, as in QEMU (`-name` lists are merged, later keys override earlier ones).
/// Limit: the arity of other options is not known, so an argument whose value is literally
/// `-name` or `-uuid` (`-append -name`) would be misread; QEMU itself would reject most such
/// command lines.
pub fn parse_qemu_cmdline(raw: &[u8]) -> Option<QemuArgs> {
    let mut argv = split_argv(raw);
    if !is_qemu_binary(argv.next()?) {
        return None;
    }
    let mut args = QemuArgs::default();
    let mut kubevirt = false;
    while let Some(arg) = argv.next() {
        let Some(opt) = option_name(arg) else {
            kubevirt |= is_kubevirt_value(arg);
            continue;
        };
        match opt {
            b"name" => {
                if let Some(guest) = argv.next().and_then(guest_from_name_opts) {
                    args.name =
                        (!guest.is_empty()).then(|| String::from_utf8_lossy(&guest).into_owned());
                }
            }
            b"uuid" => {
                if let Some(value) = argv.next() {
                    args.uuid = normalize_uuid(&String::from_utf8_lossy(value));
                }
            }
            b"m" => {
                if let Some(value) = argv.next() {
                    args.memory_bytes = memory_size(&String::from_utf8_lossy(value));
                }
            }
            b"device" => {
                if let Some(value) = argv.next() {
                    for uuid in mdev_uuids(value) {
                        if args.mdev_uuids.len() < MAX_MDEVS && !args.mdev_uuids.contains(&uuid) {
                            args.mdev_uuids.push(uuid);
                        }
                    }
                }
            }
            // The guest kernel's command line: text the guest's owner chose, no marker.
            b"append" => {
                argv.next();
            }
            _ => {}
        }
    }
    if kubevirt {
        if let Some((namespace, name)) = args.name.as_deref().and_then(kubevirt_name) {
            args.namespace = Some(namespace.to_owned());
            args.name = Some(name.to_owned());
        }
    }
    Some(args)
}

/// Where the kernel lists mediated devices; QEMU opens an mdev (an NVIDIA vGPU) only by
/// this path (`sysfsdev=`), so its UUID follows it in the `-device` value.
const MDEV_SYSFS: &[u8] = b"/sys/bus/mdev/devices/";

/// Most mdevs kept per VM: a GPU host gives a VM a handful; a command line is no place to
/// grow an unbounded list.
const MAX_MDEVS: usize = 16;

/// The mdev UUIDs named in one `-device` value (`vfio-pci,sysfsdev=/sys/bus/mdev/devices/U`
/// or `{"driver":"vfio-pci","sysfsdev":"/sys/bus/mdev/devices/U",...}`).
fn mdev_uuids(value: &[u8]) -> impl Iterator<Item = String> + '_ {
    value
        .windows(MDEV_SYSFS.len())
        .enumerate()
        .filter(|(_, w)| *w == MDEV_SYSFS)
        .filter_map(move |(i, _)| {
            let start = i + MDEV_SYSFS.len();
            let uuid = value.get(start..start + 36)?;
            normalize_uuid(std::str::from_utf8(uuid).ok()?)
        })
}

/// Whether an option value shows virt-launcher started this QEMU: a path under KubeVirt's
/// runtime directories (`/var/run/kubevirt`, `-private`, `-ephemeral-disks`, ...: disks,
/// VNC and serial sockets) or the `-smbios type=1` KubeVirt sets by default.
fn is_kubevirt_value(value: &[u8]) -> bool {
    const MARKERS: [&[u8]; 3] = [
        b"/run/kubevirt",
        b"family=KubeVirt",
        b"manufacturer=KubeVirt",
    ];
    MARKERS
        .iter()
        .any(|m| value.windows(m.len()).any(|w| w == *m))
}

/// `<namespace>_<name>` → (namespace, name) when both are what Kubernetes allows (a
/// namespace is a DNS label, a VM name a DNS subdomain: neither can hold `_`, so the split
/// is unambiguous); anything else is not a KubeVirt domain name.
pub fn kubevirt_name(guest: &str) -> Option<(&str, &str)> {
    let (namespace, name) = guest.split_once('_')?;
    let dns = |s: &str, max: usize, dots: bool| {
        let inner_ok = s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
        });
        let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        !s.is_empty()
            && s.len() <= max
            && inner_ok
            && alnum(s.bytes().next())
            && alnum(s.bytes().last())
    };
    (dns(namespace, 63, false) && dns(name, 253, true)).then_some((namespace, name))
}

/// QEMU's `-m` value in bytes: `[size=]N[KMGT]` (no suffix: MiB), other keys ignored.
pub fn memory_size(opts: &str) -> Option<u64> {
    let size = opts
        .split(',')
        .find_map(|kv| match kv.split_once('=') {
            Some(("size", v)) => Some(v),
            Some(_) => None,
            None => Some(kv),
        })?
        .trim();
    let (num, unit) = size.split_at(
        size.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len()),
    );
    let n: u64 = num.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" => 20,
        "k" | "kb" => 10,
        "g" | "gb" => 30,
        "t" | "tb" => 40,
        "b" => 0,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// `-foo` or `--foo` → `foo`; anything else (a disk image path, an option value) → `None`.
fn option_name(arg: &[u8]) -> Option<&[u8]> {
    let rest = arg.strip_prefix(b"-")?;
    Some(rest.strip_prefix(b"-").unwrap_or(rest))
}

/// The `guest` value of a `-name` argument (`foo`, `foo,process=x`, `guest=foo,debug-threads=on`),
/// with `,,` unescaped; `None` if it names no guest (`process=x` alone).
pub fn guest_from_name_opts(opts: &[u8]) -> Option<Vec<u8>> {
    let mut guest = None;
    let mut rest = opts;
    let mut first = true;
    while !rest.is_empty() {
        let key_end = rest
            .iter()
            .position(|&b| b == b'=' || b == b',')
            .unwrap_or(rest.len());
        let (key, value, after) = if rest.get(key_end) == Some(&b'=') {
            let (value, after) = opt_value(&rest[key_end + 1..]);
            (&rest[..key_end], Some(value), after)
        } else if first {
            // QEMU's implied first key: `-name foo` is `-name guest=foo`.
            let (value, after) = opt_value(rest);
            (&b"guest"[..], Some(value), after)
        } else {
            // A bare flag (`debug-threads`); its name cannot contain `,`.
            (
                &rest[..key_end],
                None,
                rest.get(key_end + 1..).unwrap_or_default(),
            )
        };
        if key == b"guest" {
            if let Some(value) = value {
                guest = Some(value);
            }
        }
        rest = after;
        first = false;
    }
    guest
}

/// Reads one option value up to a single `,`, turning each `,,` into `,`; returns the value and
/// what follows the separating comma.
fn opt_value(mut s: &[u8]) -> (Vec<u8>, &[u8]) {
    let mut value = Vec::with_capacity(s.len());
    loop {
        match s.iter().position(|&b| b == b',') {
            None => {
                value.extend_from_slice(s);
                return (value, &[]);
            }
            Some(i) if s.get(i + 1) == Some(&b',') => {
                value.extend_from_slice(&s[..=i]);
                s = &s[i + 2..];
            }
            Some(i) => {
                value.extend_from_slice(&s[..i]);
                return (value, &s[i + 1..]);
            }
        }
    }
}

/// `8-4-4-4-12` hex digits, any case → lowercase; anything else → `None` (QEMU refuses to
/// start with a malformed `-uuid`, so this only guards against garbage).
pub fn normalize_uuid(text: &str) -> Option<String> {
    let text = text.trim();
    let well_formed = text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    well_formed.then(|| text.to_ascii_lowercase())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Joins arguments the way the kernel lays out `/proc/<pid>/cmdline`.
    fn raw(args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for arg in args {
            out.extend_from_slice(arg);
            out.push(0);
        }
        out
    }

    fn name_of(args: &[&[u8]]) -> Option<String> {
        parse_qemu_cmdline(&raw(args)).unwrap().name
    }

    #[test]
    fn recognises_qemu_binaries() {
        for argv0 in [
            &b"/usr/bin/qemu-system-x86_64"[..],
            b"qemu-system-aarch64",
            b"/usr/libexec/qemu-kvm",
            b"qemu-kvm",
        ] {
            assert!(is_qemu_binary(argv0), "{}", String::from_utf8_lossy(argv0));
        }
        for argv0 in [
            &b"/usr/bin/qemu-img"[..],
            b"/usr/bin/qemu-kvm-wrapper",
            b"/opt/qemu-system-x86_64/bin/bash",
            b"",
            b"/usr/sbin/libvirtd",
        ] {
            assert!(!is_qemu_binary(argv0), "{}", String::from_utf8_lossy(argv0));
        }
        assert_eq!(
            parse_qemu_cmdline(&raw(&[b"/bin/bash", b"-name", b"x"])),
            None
        );
        assert_eq!(parse_qemu_cmdline(b""), None);
    }

    #[test]
    fn libvirt_style_name_and_uuid() {
        let args = parse_qemu_cmdline(&raw(&[
            b"/usr/bin/qemu-system-x86_64",
            b"-name",
            b"guest=web-01,debug-threads=on",
            b"-S",
            b"-uuid",
            b"6695EB01-F6A4-8304-79AA-97F2502E193F",
        ]))
        .unwrap();
        assert_eq!(args.name.as_deref(), Some("web-01"));
        assert_eq!(
            args.uuid.as_deref(),
            Some("6695eb01-f6a4-8304-79aa-97f2502e193f")
        );
    }

    #[test]
    fn plain_and_implied_names() {
        let q = b"qemu-system-x86_64";
        assert_eq!(name_of(&[q, b"-name", b"vm1"]).as_deref(), Some("vm1"));
        assert_eq!(
            name_of(&[q, b"-name", b"vm1,process=qemu-vm1"]).as_deref(),
            Some("vm1")
        );
        assert_eq!(name_of(&[q, b"--name", b"vm2"]).as_deref(), Some("vm2"));
        // Keys in another order, a flag without value, and a name containing `=`.
        assert_eq!(
            name_of(&[q, b"-name", b"debug-threads=on,guest=a=b"]).as_deref(),
            Some("a=b")
        );
        assert_eq!(
            name_of(&[q, b"-name", b"guest=x,debug-threads"]).as_deref(),
            Some("x")
        );
        // The last -name wins, as QEMU merges the lists.
        assert_eq!(
            name_of(&[q, b"-name", b"first", b"-name", b"guest=second"]).as_deref(),
            Some("second")
        );
        // `-name process=x` alone names no guest.
        assert_eq!(name_of(&[q, b"-name", b"process=x"]), None);
    }

    #[test]
    fn odd_names() {
        let q = b"qemu-system-x86_64";
        let cases: &[(&[u8], &str)] = &[
            (b"guest=a,,b,,,,c,debug-threads=on", "a,b,,c"),
            (b"guest=trailing,,", "trailing,"),
            (b"guest=it's \"quoted\",debug-threads=on", "it's \"quoted\""),
            (br"guest=back\slash\\,debug-threads=on", r"back\slash\\"),
            (b"guest=with spaces  inside", "with spaces  inside"),
            (
                "guest=caf\u{e9}-\u{1f680},debug-threads=on".as_bytes(),
                "caf\u{e9}-\u{1f680}",
            ),
            (b"guest=bad\xff\xfeutf8", "bad\u{fffd}\u{fffd}utf8"),
            (b"implied,,comma,debug-threads=on", "implied,comma"),
            (b",,lead", ",lead"),
        ];
        for (opts, want) in cases {
            assert_eq!(
                name_of(&[q, b"-name", opts]).as_deref(),
                Some(*want),
                "{}",
                String::from_utf8_lossy(opts)
            );
        }
    }

    #[test]
    fn missing_or_empty_name_and_uuid() {
        let q = b"qemu-system-x86_64";
        assert_eq!(
            parse_qemu_cmdline(&raw(&[q, b"-m", b"512"])).unwrap(),
            QemuArgs {
                memory_bytes: Some(512 << 20),
                ..QemuArgs::default()
            }
        );
        assert_eq!(name_of(&[q, b"-name", b"guest=,debug-threads=on"]), None);
        assert_eq!(name_of(&[q, b"-name", b""]), None);
        // A trailing option without its value.
        assert_eq!(name_of(&[q, b"-name"]), None);
        let args = parse_qemu_cmdline(&raw(&[q, b"-uuid", b"not-a-uuid"])).unwrap();
        assert_eq!(args.uuid, None);
        let args = parse_qemu_cmdline(&raw(&[q, b"-uuid"])).unwrap();
        assert_eq!(args.uuid, None);
    }

    #[test]
    fn option_values_are_not_options() {
        // The kernel command line is one argument: `-name` inside it is not QEMU's `-name`.
        let q = b"qemu-system-x86_64";
        let args = parse_qemu_cmdline(&raw(&[
            q,
            b"-append",
            b"console=ttyS0 -name fake -uuid 00000000-0000-0000-0000-000000000000",
            b"-name",
            b"real",
            b"disk.img",
        ]))
        .unwrap();
        assert_eq!(args.name.as_deref(), Some("real"));
        assert_eq!(args.uuid, None);
    }

    #[test]
    fn split_keeps_inner_empty_arguments() {
        let parts: Vec<&[u8]> = split_argv(b"a\0\0b\0").collect();
        assert_eq!(parts, vec![&b"a"[..], b"", b"b"]);
        // Without a trailing NUL (a process that rewrote its argv) the last part is kept.
        let parts: Vec<&[u8]> = split_argv(b"a\0b").collect();
        assert_eq!(parts, vec![&b"a"[..], b"b"]);
        assert_eq!(split_argv(b"").count(), 0);
    }

    #[test]
    fn uuid_normalisation() {
        assert_eq!(
            normalize_uuid(" 6695EB01-f6a4-8304-79aa-97f2502e193f\n").as_deref(),
            Some("6695eb01-f6a4-8304-79aa-97f2502e193f")
        );
        assert_eq!(normalize_uuid("6695eb01f6a4830479aa97f2502e193f"), None);
        assert_eq!(normalize_uuid("6695eb01-f6a4-8304-79aa-97f2502e193g"), None);
        assert_eq!(normalize_uuid(""), None);
    }

    /// A real virt-launcher command line (tests/fixtures/kubevirt), one argument per line.
    fn virt_launcher_cmdline() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/kubevirt/virt-launcher-cmdline.txt"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let args: Vec<&[u8]> = text.lines().map(str::as_bytes).collect();
        raw(&args)
    }

    #[test]
    fn kubevirt_vm_named_by_namespace_and_name() {
        let args = parse_qemu_cmdline(&virt_launcher_cmdline()).unwrap();
        assert_eq!(args.namespace.as_deref(), Some("default"));
        assert_eq!(args.name.as_deref(), Some("vm-ubuntu-1"));
        assert_eq!(
            args.uuid.as_deref(),
            Some("bc8c54d2-dd77-5f22-b862-c33d929c03ea")
        );
        assert_eq!(args.memory_bytes, Some(977 << 20));
    }

    #[test]
    fn kubevirt_needs_a_marker_and_a_kubernetes_name() {
        let q = b"/usr/libexec/qemu-kvm";
        let disk = b"{\"driver\":\"file\",\"filename\":\"/var/run/kubevirt-private/vmi-disks/d/disk.img\"}";
        let smbios = b"type=1,manufacturer=KubeVirt,product=None,family=KubeVirt";
        let parse = |args: &[&[u8]]| parse_qemu_cmdline(&raw(args)).unwrap();
        // An underscore alone is not KubeVirt: libvirt and plain QEMU names keep it.
        let plain = parse(&[q, b"-name", b"guest=web_01,debug-threads=on"]);
        assert_eq!(
            (plain.name.as_deref(), plain.namespace),
            (Some("web_01"), None)
        );
        // Either marker, with a valid name.
        for marker in [&[&b"-blockdev"[..], disk][..], &[b"-smbios", smbios]] {
            let mut argv: Vec<&[u8]> = vec![q, b"-name", b"guest=prod-eu_db.primary"];
            argv.extend_from_slice(marker);
            let a = parse(&argv);
            assert_eq!(a.namespace.as_deref(), Some("prod-eu"));
            assert_eq!(a.name.as_deref(), Some("db.primary"));
        }
        // A marker, but names Kubernetes would refuse: left as they are.
        for guest in [
            &b"guest=Default_vm"[..],
            b"guest=ns_",
            b"guest=_vm",
            b"guest=ns_vm_x",
            b"guest=n.s_vm",
            b"guest=ns_-vm",
        ] {
            let a = parse(&[q, b"-name", guest, b"-smbios", smbios]);
            assert_eq!(a.namespace, None, "{}", String::from_utf8_lossy(guest));
        }
        // The guest's kernel command line is the guest's to write: it marks nothing.
        let a = parse(&[
            q,
            b"-name",
            b"guest=my_vm",
            b"-append",
            b"root=/run/kubevirt",
        ]);
        assert_eq!((a.name.as_deref(), a.namespace), (Some("my_vm"), None));
        assert_eq!(kubevirt_name(&format!("{}_{}", "a".repeat(64), "vm")), None);
        assert_eq!(
            kubevirt_name(&format!("{}_{}", "a".repeat(63), "vm")).map(|p| p.1),
            Some("vm")
        );
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(memory_size("256"), Some(256 << 20));
        assert_eq!(memory_size("4G"), Some(4 << 30));
        assert_eq!(memory_size("size=262144k"), Some(256 << 20));
        assert_eq!(memory_size("size=1G,slots=4,maxmem=8G"), Some(1 << 30));
        assert_eq!(memory_size("lots"), None);
        let raw = b"qemu-system-x86_64\0-m\0size=262144k\0-name\0x\0";
        assert_eq!(
            parse_qemu_cmdline(raw).unwrap().memory_bytes,
            Some(256 << 20)
        );
    }

    #[test]
    fn mediated_devices_from_device_values() {
        let q = b"qemu-system-x86_64";
        let a = "4b20d080-1b54-4048-85b3-a6a62d165c01";
        let b = "B1AE8BF6-38B0-4C81-9D44-78CE3F520496";
        let plain = format!("vfio-pci,sysfsdev=/sys/bus/mdev/devices/{a},display=off");
        // libvirt 7+ passes -device as JSON.
        let json = format!(
            r#"{{"driver":"vfio-pci","id":"hostdev0","sysfsdev":"/sys/bus/mdev/devices/{b}","bus":"pci.0"}}"#
        );
        let args = parse_qemu_cmdline(&raw(&[
            q,
            b"-device",
            plain.as_bytes(),
            b"-device",
            json.as_bytes(),
            // The same device twice is one device; a truncated or malformed one is none.
            b"-device",
            plain.as_bytes(),
            b"-device",
            b"vfio-pci,sysfsdev=/sys/bus/mdev/devices/4b20d080-1b54",
            b"-device",
            b"virtio-blk-pci,drive=d0",
            // Not a -device value: the guest's own kernel command line.
            b"-append",
            b"sysfsdev=/sys/bus/mdev/devices/11111111-2222-3333-4444-555555555555",
        ]))
        .unwrap();
        assert_eq!(args.mdev_uuids, vec![a.to_owned(), b.to_ascii_lowercase()]);
        // Bounded however many a command line lists.
        let many: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    "vfio-pci,sysfsdev=/sys/bus/mdev/devices/{i:08x}-0000-0000-0000-000000000000"
                )
            })
            .collect();
        let mut argv: Vec<&[u8]> = vec![q];
        for d in &many {
            argv.extend([&b"-device"[..], d.as_bytes()]);
        }
        assert_eq!(
            parse_qemu_cmdline(&raw(&argv)).unwrap().mdev_uuids.len(),
            MAX_MDEVS
        );
    }
}
