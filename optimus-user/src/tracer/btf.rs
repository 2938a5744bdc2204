//! Just enough of a BTF reader to find a struct member's byte offset in the running kernel.
//!
//! Rust eBPF has no CO-RE here, so the one kernel struct field the tracer reads
//! (`task_struct::pid` of the task being switched in) is located at load time from
//! `/sys/kernel/btf/vmlinux` and handed to the program as a global. Format:
//! <https://docs.kernel.org/bpf/btf.html>.

use std::path::{Path, PathBuf};

/// Errors reading the kernel's BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF at {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("struct {strukt} has no member {member} in the kernel's BTF")]
    NotFound {
        strukt: &'static str,
        member: &'static str,
    },
    #[error("{strukt}::{member} is a bitfield, not a whole field")]
    Bitfield {
        strukt: &'static str,
        member: &'static str,
    },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// Byte offset of `member` in `struct strukt`, reading the BTF file at `path`.
pub fn member_offset(
    path: &Path,
    strukt: &'static str,
    member: &'static str,
) -> Result<u32, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    member_offset_in(&data, strukt, member)
}

/// Byte offset of `member` in `struct strukt` in BTF `data` (little-endian, as on x86_64
/// and arm64).
pub fn member_offset_in(
    data: &[u8],
    strukt: &'static str,
    member: &'static str,
) -> Result<u32, BtfError> {
    let u16_at = |off: usize| -> Option<u16> {
        Some(u16::from_le_bytes(data.get(off..off + 2)?.try_into().ok()?))
    };
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?))
    };
    let usize_at = |off: usize| -> Option<usize> { usize::try_from(u32_at(off)?).ok() };

    if u16_at(0) != Some(MAGIC) {
        return Err(BtfError::Malformed("bad magic (not little-endian BTF?)"));
    }
    let header = || -> Option<(usize, usize, usize, usize)> {
        let hdr_len = usize_at(4)?;
        Some((
            hdr_len + usize_at(8)?,
            usize_at(12)?,
            hdr_len + usize_at(16)?,
            usize_at(20)?,
        ))
    };
    let (type_off, type_len, str_off, str_len) =
        header().ok_or(BtfError::Malformed("truncated header"))?;
    let strings = data
        .get(str_off..str_off + str_len)
        .ok_or(BtfError::Malformed("string section out of bounds"))?;
    let name_at = |off: u32| -> Option<&[u8]> {
        let rest = strings.get(usize::try_from(off).ok()?..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..end])
    };

    let end = type_off + type_len;
    let mut pos = type_off;
    let truncated = BtfError::Malformed("truncated type section");
    while pos + 12 <= end {
        let name_off = u32_at(pos).ok_or(BtfError::Malformed("truncated type"))?;
        let info = u32_at(pos + 4).ok_or(BtfError::Malformed("truncated type"))?;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let vlen = usize::try_from(info & 0xffff).map_err(|_| BtfError::Malformed("vlen"))?;
        pos += 12;
        if kind == KIND_STRUCT && name_at(name_off) == Some(strukt.as_bytes()) {
            for i in 0..vlen {
                let m = pos + i * 12;
                let m_name = u32_at(m).ok_or(BtfError::Malformed("truncated member"))?;
                if name_at(m_name) != Some(member.as_bytes()) {
                    continue;
                }
                let raw = u32_at(m + 8).ok_or(BtfError::Malformed("truncated member"))?;
                // With kind_flag the low 24 bits are the bit offset, the high 8 a bitfield size.
                let (bits, bitfield) = if kind_flag {
                    (raw & 0x00ff_ffff, raw >> 24 != 0)
                } else {
                    (raw, false)
                };
                if bitfield || bits % 8 != 0 {
                    return Err(BtfError::Bitfield { strukt, member });
                }
                return Ok(bits / 8);
            }
            return Err(BtfError::NotFound { strukt, member });
        }
        pos += match kind {
            1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
            3 => 12,          // ARRAY
            KIND_STRUCT | KIND_UNION => vlen * 12,
            6 | 13 => vlen * 8,        // ENUM, FUNC_PROTO
            15 | 19 => vlen * 12,      // DATASEC, ENUM64
            2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF.., FUNC, FLOAT, TYPE_TAG
            _ => return Err(BtfError::Malformed("unknown type kind")),
        };
        if pos > end {
            return Err(truncated);
        }
    }
    Err(BtfError::NotFound { strukt, member })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `int` and `struct task_struct { int state; int pid; int tgid; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0task_struct\0state\0pid\0tgid\0";
        let name = |s: &str| -> u32 {
            let needle = format!("\0{s}\0");
            let i = strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap();
            u32::try_from(i + 1).unwrap()
        };
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] INT "int" size 4, encoding word
        push(name("int"));
        push(1 << 24);
        push(4);
        push(32);
        // [2] STRUCT task_struct, 3 members, size 12
        push(name("task_struct"));
        push((KIND_STRUCT << 24) | 3);
        push(12);
        for (m, off) in [("state", 0), ("pid", 32), ("tgid", 64)] {
            push(name(m));
            push(1);
            push(off);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, u32::try_from(types.len()).unwrap()] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            u32::try_from(types.len()).unwrap(),
            u32::try_from(strings.len()).unwrap(),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_member_offsets() {
        let b = blob();
        assert_eq!(member_offset_in(&b, "task_struct", "pid").unwrap(), 4);
        assert_eq!(member_offset_in(&b, "task_struct", "tgid").unwrap(), 8);
    }

    #[test]
    fn missing_member_and_garbage_are_errors() {
        let b = blob();
        assert!(matches!(
            member_offset_in(&b, "task_struct", "comm"),
            Err(BtfError::NotFound { .. })
        ));
        assert!(matches!(
            member_offset_in(&b[..30], "task_struct", "pid"),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            member_offset_in(b"garbage", "task_struct", "pid"),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn reads_the_running_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI host has no BTF"
            );
            eprintln!("SKIPPED reads_the_running_kernel: no {}", path.display());
            return;
        }
        let pid = member_offset(path, "task_struct", "pid").unwrap();
        let tgid = member_offset(path, "task_struct", "tgid").unwrap();
        // pid_t pid; pid_t tgid; are adjacent in every kernel since 2.6.
        assert_eq!(tgid, pid + 4);
        assert!(pid > 0);
    }
}
