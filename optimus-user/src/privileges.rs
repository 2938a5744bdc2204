//! Capabilities: what the agent holds (from `/proc/self/status`), what loading needs, and
//! dropping all but what sampling needs once the eBPF programs are loaded and the meters
//! opened (capabilities in, a smaller set and `no_new_privs` out).
//!
//! Loading needs `CAP_BPF` + `CAP_PERFMON` (or `CAP_SYS_ADMIN`, or root). Sampling needs
//! none of them: eBPF maps and perf events are used through descriptors opened at load.
//! A non-root agent keeps `CAP_DAC_READ_SEARCH` if it has it, to re-read root-only files
//! each interval (RAPL's `energy_uj`, 0400 since CVE-2020-8694, and libvirt's 0600 domain
//! status files under /run/libvirt/qemu); uid 0 owns those files and keeps nothing.
//! Capabilities belong to each thread (capset(2) changes only the caller's), so the drop
//! must run before any other thread is started: threads inherit the caller's set.
//! See capabilities(7) and `Documentation/userspace-api/no_new_privs.rst`.

use std::fmt;

/// A Linux capability the agent asks about, with its number from linux/capability.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    DacReadSearch = 2,
    Setpcap = 8,
    SysAdmin = 21,
    SysResource = 24,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    /// The name systemd and capabilities(7) use (`CAP_BPF`).
    pub fn name(self) -> &'static str {
        match self {
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::Setpcap => "CAP_SETPCAP",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::SysResource => "CAP_SYS_RESOURCE",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }

    /// This capability's bit in a `CapEff`-style mask.
    pub fn bit(self) -> u64 {
        1u64 << (self as u32)
    }
}

/// The capabilities the agent's unit grants, in the order the README's table lists them:
/// what each is for.
pub const UNIT_CAPS: [(Cap, &str); 3] = [
    (
        Cap::Bpf,
        "load the eBPF programs and create their maps (bpf(2))",
    ),
    (
        Cap::Perfmon,
        "attach tracing programs to raw tracepoints and open RAPL perf events",
    ),
    (
        Cap::DacReadSearch,
        "read root-only files: RAPL energy_uj (CVE-2020-8694) and libvirt's domain status files",
    ),
];

/// One thread's capability sets, as `/proc/<pid>/task/<tid>/status` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
    /// `NoNewPrivs: 1`.
    pub no_new_privs: bool,
}

impl CapSets {
    /// Parses the `Cap*:` and `NoNewPrivs:` lines of a `status` file; `None` if `CapEff` or
    /// `CapPrm` is missing or not hexadecimal (other sets default to 0).
    pub fn parse(status: &str) -> Option<Self> {
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        Some(Self {
            effective: field("CapEff:")?,
            permitted: field("CapPrm:")?,
            inheritable: field("CapInh:").unwrap_or(0),
            bounding: field("CapBnd:").unwrap_or(0),
            ambient: field("CapAmb:").unwrap_or(0),
            no_new_privs: status
                .lines()
                .find_map(|l| l.strip_prefix("NoNewPrivs:"))
                .is_some_and(|v| v.trim() == "1"),
        })
    }

    /// This thread's sets (the calling thread; capabilities are per thread).
    pub fn current() -> Result<Self, PrivilegeError> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let path = format!("/proc/self/task/{tid}/status");
        let text = std::fs::read_to_string(&path).map_err(|source| PrivilegeError::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        Self::parse(&text).ok_or(PrivilegeError::Unparsable { path })
    }

    /// Whether `cap` is effective.
    pub fn has(&self, cap: Cap) -> bool {
        self.effective & cap.bit() != 0
    }
}

/// Effective capabilities in a `status` file (`CapEff`).
pub fn effective_caps(status: &str) -> Option<u64> {
    CapSets::parse(status).map(|c| c.effective)
}

/// Whether the caps can load and attach tracing programs: CAP_SYS_ADMIN, or CAP_BPF with
/// CAP_PERFMON.
pub fn can_trace(caps: u64) -> bool {
    let has = |c: Cap| caps & c.bit() != 0;
    has(Cap::SysAdmin) || (has(Cap::Bpf) && has(Cap::Perfmon))
}

/// Names of the capabilities in `mask` (`cap_dac_read_search`; `cap_N` for any this module
/// does not name), comma-separated, or `none`.
pub fn cap_names(mask: u64) -> String {
    const NAMED: [Cap; 6] = [
        Cap::DacReadSearch,
        Cap::Setpcap,
        Cap::SysAdmin,
        Cap::SysResource,
        Cap::Perfmon,
        Cap::Bpf,
    ];
    let names: Vec<String> = (0..64u32)
        .filter(|n| mask & (1u64 << n) != 0)
        .map(|n| {
            NAMED
                .iter()
                .find(|c| **c as u32 == n)
                .map_or_else(|| format!("cap_{n}"), |c| c.name().to_ascii_lowercase())
        })
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(",")
    }
}

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no CapEff/CapPrm lines in {path}")]
    Unparsable { path: String },
    #[error("{call} failed")]
    Syscall {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("after dropping, the kernel still shows effective {effective} and permitted {permitted} (wanted {wanted})")]
    StillHeld {
        effective: String,
        permitted: String,
        wanted: String,
    },
}

/// What [`drop_after_load`] left the agent with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// The capabilities kept (effective = permitted), a mask.
    pub kept: u64,
    /// What the agent held before.
    pub before: u64,
    /// Whether the bounding set was cut down too (needs CAP_SETPCAP, so root only).
    pub bounding_dropped: bool,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "capabilities after load: {} (held before: {}); no_new_privs set",
            cap_names(self.kept),
            cap_names(self.before)
        )?;
        if self.bounding_dropped {
            write!(f, "; bounding set cut to the same")?;
        }
        Ok(())
    }
}

/// What sampling needs, of what `held` offers: `CAP_DAC_READ_SEARCH` for a non-root agent,
/// nothing for uid 0 (it owns the root-only files it re-reads).
pub fn sampling_needs(euid: u32, held: u64) -> u64 {
    if euid == 0 {
        0
    } else {
        held & Cap::DacReadSearch.bit()
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number to walk when cutting the bounding set (PR_CAPBSET_DROP of a
/// number the kernel does not know fails with EINVAL and ends the walk).
const CAP_LAST_GUESS: u32 = 63;
/// From linux/securebits.h: uid 0 gains no capability on execve, and no thread can raise an
/// ambient capability; each with its lock bit so neither can be undone.
const SECURE_BITS: libc::c_ulong = 0x01 | 0x02 | 0x40 | 0x80;

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

fn os_err(call: &'static str) -> PrivilegeError {
    PrivilegeError::Syscall {
        call,
        source: std::io::Error::last_os_error(),
    }
}

/// Drops every capability sampling does not need (see [`sampling_needs`]), in every mode:
/// root, a non-root user with ambient capabilities (systemd's `AmbientCapabilities=`,
/// `setpriv --ambient-caps`) or file capabilities. Clears the ambient and inheritable sets,
/// sets `no_new_privs`, and where CAP_SETPCAP is held (root) also cuts the bounding set and
/// locks the securebits so uid 0 cannot regain anything through execve. Then reads the
/// kernel's view back and fails unless it matches.
///
/// Affects the calling thread and the threads it starts afterwards only: call it before
/// any other thread exists.
pub fn drop_after_load() -> Result<Dropped, PrivilegeError> {
    let before = CapSets::current()?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let keep = sampling_needs(euid, before.permitted);

    let mut bounding_dropped = false;
    if before.has(Cap::Setpcap) {
        for cap in 0..=CAP_LAST_GUESS {
            if keep & (1u64 << cap) != 0 {
                continue;
            }
            // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes only integers.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0
            {
                // EINVAL: past the kernel's last capability.
                break;
            }
        }
        // SAFETY: prctl(PR_SET_SECUREBITS, bits) takes only integers.
        if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECURE_BITS, 0, 0, 0) } != 0 {
            return Err(os_err("prctl(PR_SET_SECUREBITS)"));
        }
        bounding_dropped = true;
    }
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) takes only integers.
    let cleared = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if cleared != 0 {
        return Err(os_err("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"));
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes only integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_err("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "v3 capsets are two 32-bit words: low and high halves"
    )]
    let (low, high) = (keep as u32, (keep >> 32) as u32);
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads a v3 header and two data words, both of which we own and which
    // live across the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(os_err("capset"));
    }

    let after = CapSets::current()?;
    if after.effective != keep || after.permitted != keep || after.ambient != 0 {
        return Err(PrivilegeError::StillHeld {
            effective: cap_names(after.effective),
            permitted: cap_names(after.permitted),
            wanted: cap_names(keep),
        });
    }
    Ok(Dropped {
        kept: keep,
        before: before.permitted,
        bounding_dropped,
    })
}

/// Other threads of this process that hold a capability outside `kept` (tid and names):
/// they were started before [`drop_after_load`] and kept their own sets.
pub fn threads_holding_more(kept: u64) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(e.path().join("status")).ok()?;
            let sets = CapSets::parse(&text)?;
            let extra = (sets.effective | sets.permitted) & !kept;
            (extra != 0).then(|| (tid, cap_names(extra)))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let s = "Name:\toptimus\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                 CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
                 NoNewPrivs:\t1\n";
        let c = CapSets::parse(s).unwrap();
        assert_eq!(c.effective, 0x1ff_ffff_ffff);
        assert_eq!(c.permitted, 0x1ff_ffff_ffff);
        assert!(c.no_new_privs);
        assert_eq!(effective_caps(s), Some(0x1ff_ffff_ffff));
        assert!(can_trace(0x1ff_ffff_ffff));
        assert!(!can_trace(Cap::DacReadSearch.bit()));
        assert!(!can_trace(Cap::Bpf.bit()));
        assert!(can_trace(Cap::Bpf.bit() | Cap::Perfmon.bit()));
        assert!(can_trace(Cap::SysAdmin.bit()));
        assert_eq!(effective_caps("garbage"), None);
        assert_eq!(CapSets::parse("CapEff:\tzz\nCapPrm:\t0\n"), None);
    }

    #[test]
    fn names() {
        assert_eq!(cap_names(0), "none");
        assert_eq!(
            cap_names(Cap::Bpf.bit() | Cap::Perfmon.bit()),
            "cap_perfmon,cap_bpf"
        );
        assert_eq!(cap_names(1), "cap_0");
        assert_eq!(Cap::DacReadSearch.bit(), 4);
    }

    #[test]
    fn root_keeps_nothing_others_keep_dac_read_search_if_held() {
        let all = 0x1ff_ffff_ffff;
        assert_eq!(sampling_needs(0, all), 0);
        assert_eq!(sampling_needs(65534, all), Cap::DacReadSearch.bit());
        assert_eq!(
            sampling_needs(65534, Cap::Bpf.bit() | Cap::Perfmon.bit()),
            0
        );
    }

    #[test]
    fn dropped_says_what_was_kept() {
        let d = Dropped {
            kept: Cap::DacReadSearch.bit(),
            before: Cap::DacReadSearch.bit() | Cap::Bpf.bit() | Cap::Perfmon.bit(),
            bounding_dropped: false,
        };
        assert_eq!(
            d.to_string(),
            "capabilities after load: cap_dac_read_search (held before: \
             cap_dac_read_search,cap_perfmon,cap_bpf); no_new_privs set"
        );
    }

    /// The real drop, in a thread of its own (capabilities are per thread, so the test
    /// process keeps its own): whatever this test runs as, the thread ends with exactly what
    /// sampling needs, and a thread it starts inherits that.
    #[test]
    fn drop_in_a_thread_leaves_what_sampling_needs() {
        let (dropped, child) = std::thread::spawn(|| {
            let dropped = drop_after_load().unwrap();
            let child = std::thread::spawn(|| CapSets::current().unwrap())
                .join()
                .unwrap();
            (dropped, child)
        })
        .join()
        .unwrap();
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(dropped.kept, sampling_needs(euid, dropped.before));
        assert_eq!(child.effective, dropped.kept);
        assert_eq!(child.permitted, dropped.kept);
        assert_eq!(child.ambient, 0);
        assert!(child.no_new_privs);
        if dropped.bounding_dropped {
            assert_eq!(child.bounding, dropped.kept);
        }
    }
}
