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
/// Most struct members one lookup visits, anonymous ones' members included. A real
/// kernel's `task_struct` or `page` is a few hundred; without a bound, a blob whose
/// anonymous members point back at their own struct made a lookup take 20^8 steps (found
/// while writing the `btf` fuzz target; `fuzz/regressions/btf/` keeps the input).
const MEMBER_VISITS: u32 = 100_000;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// A parsed BTF blob: the type section indexed by type id, for member lookups.
pub struct Btf {
    data: Vec<u8>,
    /// Byte position of each type's record; index = type id - 1.
    types: Vec<usize>,
    str_off: usize,
    str_len: usize,
}

impl Btf {
    /// Reads and indexes the BTF file at `path` (normally `/sys/kernel/btf/vmlinux`).
    pub fn load(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Btf::parse(data)
    }

    /// Indexes BTF `data` (little-endian, as on x86_64 and arm64).
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let mut btf = Btf {
            data,
            types: Vec::new(),
            str_off: 0,
            str_len: 0,
        };
        if btf.u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF?)"));
        }
        let header = || -> Option<(usize, usize, usize, usize)> {
            let hdr_len = btf.usize_at(4)?;
            Some((
                hdr_len + btf.usize_at(8)?,
                btf.usize_at(12)?,
                hdr_len + btf.usize_at(16)?,
                btf.usize_at(20)?,
            ))
        };
        let (type_off, type_len, str_off, str_len) =
            header().ok_or(BtfError::Malformed("truncated header"))?;
        if btf.data.get(str_off..str_off + str_len).is_none() {
            return Err(BtfError::Malformed("string section out of bounds"));
        }
        btf.str_off = str_off;
        btf.str_len = str_len;
        let end = type_off + type_len;
        if end > btf.data.len() {
            return Err(BtfError::Malformed("type section out of bounds"));
        }
        let mut pos = type_off;
        while pos + 12 <= end {
            let info = btf
                .u32_at(pos + 4)
                .ok_or(BtfError::Malformed("truncated type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = usize::try_from(info & 0xffff).map_err(|_| BtfError::Malformed("vlen"))?;
            btf.types.push(pos);
            pos += 12;
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
                return Err(BtfError::Malformed("truncated type section"));
            }
        }
        Ok(btf)
    }

    /// Byte offset of `se.sum_exec_runtime` in `struct task_struct`: the scheduler's own
    /// on-CPU nanoseconds of a task, which schedstat and cgroups report.
    pub fn task_runtime_offset(&self) -> Result<u64, BtfError> {
        Ok(u64::from(self.member_offset("task_struct", "se")?)
            + u64::from(self.member_offset("sched_entity", "sum_exec_runtime")?))
    }

    /// Byte offset of `member` in `struct strukt`, looking into anonymous structs and
    /// unions too (`page::compound_head` sits in one).
    pub fn member_offset(
        &self,
        strukt: &'static str,
        member: &'static str,
    ) -> Result<u32, BtfError> {
        let not_found = BtfError::NotFound { strukt, member };
        let id = (1..=self.types.len())
            .find(|&id| {
                self.kind(id) == Some(KIND_STRUCT)
                    && self.name(id) == Some(strukt.as_bytes())
                    && self.vlen(id).is_some_and(|n| n > 0)
            })
            .ok_or(BtfError::NotFound { strukt, member })?;
        let mut budget = MEMBER_VISITS;
        match self.find_member(id, member.as_bytes(), 0, 0, &mut budget)? {
            Some((bits, false)) if bits % 8 == 0 => {
                u32::try_from(bits / 8).map_err(|_| BtfError::Malformed("offset"))
            }
            Some(_) => Err(BtfError::Bitfield { strukt, member }),
            None => Err(not_found),
        }
    }

    /// Bit offset of `member` in composite type `id` (plus `base`) and whether it is a
    /// bitfield, searching anonymous members depth first, visiting at most `budget`
    /// members in all.
    fn find_member(
        &self,
        id: usize,
        member: &[u8],
        base: u64,
        depth: u32,
        budget: &mut u32,
    ) -> Result<Option<(u64, bool)>, BtfError> {
        let pos = *self
            .types
            .get(id - 1)
            .ok_or(BtfError::Malformed("type id"))?;
        let info = self
            .u32_at(pos + 4)
            .ok_or(BtfError::Malformed("truncated type"))?;
        let kind_flag = info >> 31 == 1;
        let vlen = usize::try_from(info & 0xffff).map_err(|_| BtfError::Malformed("vlen"))?;
        for i in 0..vlen {
            *budget = budget
                .checked_sub(1)
                .ok_or(BtfError::Malformed("anonymous members nest too widely"))?;
            let m = pos + 12 + i * 12;
            let m_name = self
                .u32_at(m)
                .ok_or(BtfError::Malformed("truncated member"))?;
            let m_type = self
                .u32_at(m + 4)
                .ok_or(BtfError::Malformed("truncated member"))?;
            let raw = self
                .u32_at(m + 8)
                .ok_or(BtfError::Malformed("truncated member"))?;
            // With kind_flag the low 24 bits are the bit offset, the high 8 a bitfield size.
            let (bits, bitfield) = if kind_flag {
                (raw & 0x00ff_ffff, raw >> 24 != 0)
            } else {
                (raw, false)
            };
            let at = base + u64::from(bits);
            let name = self.str_at(m_name);
            if name == Some(member) {
                return Ok(Some((at, bitfield)));
            }
            if name == Some(b"") && depth < 8 {
                let inner = self
                    .resolve(usize::try_from(m_type).map_err(|_| BtfError::Malformed("type id"))?);
                if let Some(inner) = inner {
                    if let Some(found) = self.find_member(inner, member, at, depth + 1, budget)? {
                        return Ok(Some(found));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The struct or union type `id` names, through typedefs and qualifiers.
    fn resolve(&self, mut id: usize) -> Option<usize> {
        for _ in 0..16 {
            match self.kind(id)? {
                KIND_STRUCT | KIND_UNION => return Some(id),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    let pos = *self.types.get(id.checked_sub(1)?)?;
                    id = usize::try_from(self.u32_at(pos + 8)?).ok()?;
                }
                _ => return None,
            }
        }
        None
    }

    fn kind(&self, id: usize) -> Option<u32> {
        let pos = *self.types.get(id.checked_sub(1)?)?;
        Some((self.u32_at(pos + 4)? >> 24) & 0x1f)
    }

    fn vlen(&self, id: usize) -> Option<u32> {
        let pos = *self.types.get(id.checked_sub(1)?)?;
        Some(self.u32_at(pos + 4)? & 0xffff)
    }

    fn name(&self, id: usize) -> Option<&[u8]> {
        let pos = *self.types.get(id.checked_sub(1)?)?;
        self.str_at(self.u32_at(pos)?)
    }

    fn str_at(&self, off: u32) -> Option<&[u8]> {
        let strings = self.data.get(self.str_off..self.str_off + self.str_len)?;
        let rest = strings.get(usize::try_from(off).ok()?..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..end])
    }

    fn u16_at(&self, off: usize) -> Option<u16> {
        Some(u16::from_le_bytes(
            self.data.get(off..off + 2)?.try_into().ok()?,
        ))
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.data.get(off..off + 4)?.try_into().ok()?,
        ))
    }

    fn usize_at(&self, off: usize) -> Option<usize> {
        usize::try_from(self.u32_at(off)?).ok()
    }
}

/// Byte offset of `member` in `struct strukt`, reading the BTF file at `path`.
pub fn member_offset(
    path: &Path,
    strukt: &'static str,
    member: &'static str,
) -> Result<u32, BtfError> {
    Btf::load(path)?.member_offset(strukt, member)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A tiny BTF blob: `int`, `struct task_struct { int state; int pid; int tgid; }` and a
    /// `struct page` with an anonymous union.
    pub(crate) fn blob() -> Vec<u8> {
        let strings =
            b"\0int\0task_struct\0state\0pid\0tgid\0page\0flags\0compound_head\0memcg_data\0";
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
        // [3] anonymous STRUCT { int compound_head; }
        push(0);
        push((KIND_STRUCT << 24) | 1);
        push(4);
        push(name("compound_head"));
        push(1);
        push(0);
        // [4] anonymous UNION { [3]; }
        push(0);
        push((KIND_UNION << 24) | 1);
        push(4);
        push(0);
        push(3);
        push(0);
        // [5] TYPEDEF of [4] (anonymous members may come through one)
        push(0);
        push(KIND_TYPEDEF << 24);
        push(4);
        // [6] STRUCT page { int flags; [5] at byte 8; int memcg_data at byte 16; }
        push(name("page"));
        push((KIND_STRUCT << 24) | 3);
        push(20);
        push(name("flags"));
        push(1);
        push(0);
        push(0);
        push(5);
        push(64);
        push(name("memcg_data"));
        push(1);
        push(128);
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
        let b = Btf::parse(blob()).unwrap();
        assert_eq!(b.member_offset("task_struct", "pid").unwrap(), 4);
        assert_eq!(b.member_offset("task_struct", "tgid").unwrap(), 8);
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_structs() {
        let b = Btf::parse(blob()).unwrap();
        assert_eq!(b.member_offset("page", "compound_head").unwrap(), 8);
        assert_eq!(b.member_offset("page", "memcg_data").unwrap(), 16);
        assert!(matches!(
            b.member_offset("page", "lru"),
            Err(BtfError::NotFound { .. })
        ));
    }

    #[test]
    fn missing_member_and_garbage_are_errors() {
        let b = blob();
        assert!(matches!(
            Btf::parse(b.clone()).and_then(|b| b.member_offset("task_struct", "comm")),
            Err(BtfError::NotFound { .. })
        ));
        assert!(matches!(
            Btf::parse(b[..30].to_vec()).and_then(|b| b.member_offset("task_struct", "pid")),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            Btf::parse(b"garbage".to_vec()).and_then(|b| b.member_offset("task_struct", "pid")),
            Err(BtfError::Malformed(_))
        ));
    }

    /// A struct whose 20 anonymous members are the struct itself, 309 bytes of BTF.
    #[test]
    fn self_referencing_anonymous_members_end_quickly() {
        let strings = b"\0task_struct\0pid\0";
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        push(0);
        push(1 << 24);
        push(4);
        push(32);
        push(1);
        push((KIND_STRUCT << 24) | 20);
        push(4);
        for _ in 0..20 {
            push(0);
            push(2);
            push(0);
        }
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        let (types_len, strings_len) = (
            u32::try_from(types.len()).unwrap(),
            u32::try_from(strings.len()).unwrap(),
        );
        for v in [24, 0, types_len, types_len, strings_len] {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        let started = std::time::Instant::now();
        let got = Btf::parse(blob)
            .unwrap()
            .member_offset("task_struct", "pid");
        assert!(matches!(got, Err(BtfError::Malformed(_))), "{got:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
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
        // compound_head aliases lru.next, right after the flags word, on every 64-bit kernel.
        let btf = Btf::load(path).unwrap();
        assert_eq!(btf.member_offset("page", "compound_head").unwrap(), 8);
        assert_eq!(btf.member_offset("request", "q").unwrap(), 0);
    }
}
