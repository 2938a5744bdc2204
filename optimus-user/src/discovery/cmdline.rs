//! What a QEMU command line (`/proc/<pid>/cmdline`) says about the VM it runs.
//!
//! Only `-name` and `-uuid` matter here. `-name` is a QemuOpts list whose implied first key is
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
    while let Some(arg) = argv.next() {
        let Some(opt) = option_name(arg) else {
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
            _ => {}
        }
    }
    Some(args)
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
}
