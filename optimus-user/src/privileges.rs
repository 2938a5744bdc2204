//! Dropping privileges once the eBPF programs are loaded and the meters opened.
//!
//! The agent keeps uid 0 (so root-owned files it reads by owner permission stay readable)
//! but gives up every capability except `CAP_DAC_READ_SEARCH` (re-reading root-only files
//! such as RAPL's `energy_uj` and other users' /proc entries) and sets `no_new_privs`.
//! Already-open eBPF map and perf descriptors keep working without capabilities.

/// `CAP_DAC_READ_SEARCH` from linux/capability.h.
const CAP_DAC_READ_SEARCH: u32 = 2;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Keeps only `CAP_DAC_READ_SEARCH` and forbids gaining privileges again.
pub fn drop_privileges() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes only integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let keep = 1u32 << CAP_DAC_READ_SEARCH;
    let data = [
        CapData {
            effective: keep,
            permitted: keep,
            inheritable: 0,
        },
        CapData::default(),
    ];
    // SAFETY: capset reads a v3 header and two data words, both of which we own and which
    // live across the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Effective capabilities of this process (`CapEff` in /proc/self/status).
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Whether the caps can load and attach tracing programs: CAP_SYS_ADMIN, or CAP_BPF with
/// CAP_PERFMON.
pub fn can_trace(caps: u64) -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let has = |c: u32| caps & (1u64 << c) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_capeff() {
        let s = "Name:\toptimus\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(s), Some(0x1ff_ffff_ffff));
        assert!(can_trace(0x1ff_ffff_ffff));
        assert!(!can_trace(1 << 2));
        assert!(can_trace((1 << 39) | (1 << 38)));
        assert_eq!(effective_caps("garbage"), None);
    }
}
