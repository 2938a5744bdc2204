//! VM discovery: which QEMU processes run on this host, which VM each one is, and which of
//! its threads do what (vCPU, emulator, I/O thread, vhost worker).
//!
//! Two sources: libvirt (through the `virt` crate and its status files) names the VMs it
//! manages and is authoritative for them: the QEMU pid in its status file is that domain,
//! whatever else claims its UUID. Every other `qemu-system-*` / `qemu-kvm` process in /proc
//! counts as a VM only if [`trust::QemuTrust`] accepts it (a root-owned QEMU binary run as
//! root or a QEMU user). Two processes claiming one identity are never merged: libvirt's
//! (else the lowest pid) wins, the other stays unattributed and is counted as an identity
//! conflict. At most `max_vms` VMs are returned. Discovery holds no kernel state: the tracer
//! is told which thread ids to watch from what `scan` returns.
//!
//! [`Discovery::scan`] blocks: it reads procfs and, when a libvirt URI is set, makes libvirt
//! RPC calls. See [`procfs`] for what a scan costs.

pub mod cgroup;
pub mod cmdline;
pub mod libvirt;
pub mod libvirt_status;
pub mod procfs;
pub mod qmp;
#[cfg(test)]
mod testutil;
pub mod trust;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::host::HostPaths;
use libvirt::LibvirtClient;
use libvirt_status::{DomainStatus, StatusDir};
use procfs::{Candidate, ProcScanner};
use trust::{QemuTrust, Untrusted};

/// Where a VM's identity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmSource {
    /// A libvirt domain (name and UUID from libvirt).
    Libvirt,
    /// A QEMU process found in /proc without libvirt (name and UUID from its command line).
    Proc,
}

impl VmSource {
    /// The `source` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            VmSource::Libvirt => "libvirt",
            VmSource::Proc => "proc",
        }
    }
}

/// What a QEMU thread does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// A vCPU thread (`CPU N/KVM`, `CPU N/TCG`) with its vCPU index.
    Vcpu(u32),
    /// QEMU's main loop and every other helper thread.
    Emulator,
    /// An I/O thread (`IO <id>`).
    IoThread,
    /// A kernel vhost worker serving the VM (`vhost-<qemu pid>`).
    Vhost,
    /// A thread of a QEMU whose vCPU threads cannot be told apart from its other threads
    /// (no `debug-threads=on`, no libvirt status file): vCPU and helper time together.
    Unclassified,
}

impl ThreadKind {
    /// The `thread_kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            ThreadKind::Vcpu(_) => "vcpu",
            ThreadKind::Emulator => "emulator",
            ThreadKind::IoThread => "iothread",
            ThreadKind::Vhost => "vhost",
            ThreadKind::Unclassified => "unclassified",
        }
    }
}

/// One thread of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VmThread {
    /// Kernel thread id.
    pub tid: u32,
    pub kind: ThreadKind,
}

/// Stable identity of a VM: what its metric series are keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId {
    pub name: String,
    /// UUID as lowercase hyphenated text; for a QEMU process without `-uuid`, `pid-<pid>`.
    pub uuid: String,
}

/// A running VM and its threads at the time of the scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub id: VmId,
    pub source: VmSource,
    /// Process id of its QEMU process.
    pub pid: u32,
    /// Guest memory size from QEMU's `-m`, bytes (for the memory idle policy).
    pub memory_bytes: Option<u64>,
    /// Every thread of the QEMU process, plus vhost workers that serve it.
    pub threads: Vec<VmThread>,
    /// Kubernetes namespace of a KubeVirt VM (its `vm_namespace` label); `None` elsewhere.
    pub namespace: Option<String>,
    /// Lowercase UUIDs of its mediated devices (vGPUs): from QEMU's `-device ...sysfsdev=`
    /// and, for a libvirt domain, its `<hostdev type='mdev'>`s.
    pub mdev_uuids: Vec<String>,
}

/// How long an unreachable libvirt is left alone before the next connection attempt.
pub const LIBVIRT_RETRY: Duration = Duration::from_secs(30);

/// `--max-vms` when not given: well above what one host runs, well below what would make a
/// scrape too large (about 2 KiB of series per VM).
pub const DEFAULT_MAX_VMS: usize = 1024;

/// What discovery accepts as a VM, and how many.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    pub trust: QemuTrust,
    /// At most this many VMs are returned; the others are left out (and counted).
    pub max_vms: usize,
}

impl Default for DiscoveryConfig {
    /// The QEMU users of [`trust::DEFAULT_QEMU_USERS`] that exist here, [`DEFAULT_MAX_VMS`].
    fn default() -> Self {
        Self {
            trust: QemuTrust {
                qemu_uids: trust::resolve_users(trust::DEFAULT_QEMU_USERS).0,
                exe_owner: 0,
            },
            max_vms: DEFAULT_MAX_VMS,
        }
    }
}

/// A QEMU-looking process that is not charged as a VM, for `optimus check` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    pub pid: u32,
    /// The name its command line gives (untrusted text: escape it before printing).
    pub name: String,
    pub why: IgnoredWhy,
}

/// Why a process is not a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IgnoredWhy {
    /// It fails the trust rules.
    Untrusted(Untrusted),
    /// It claims the identity of a VM that another process (this pid) already is.
    Conflict { winner: u32 },
    /// `--max-vms` was reached.
    OverLimit,
}

impl std::fmt::Display for IgnoredWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IgnoredWhy::Untrusted(why) => write!(f, "not trusted: {why}"),
            IgnoredWhy::Conflict { winner } => {
                write!(f, "claims the UUID of the VM run by pid {winner}")
            }
            IgnoredWhy::OverLimit => f.write_str("--max-vms reached"),
        }
    }
}

/// Shows control characters of untrusted text (VM names come from command lines) as
/// escapes, so printing it cannot drive a terminal: `\x1b[31m` stays visible as text.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let n = u32::from(c);
            if n < 0x100 {
                out.push_str(&format!("\\x{n:02x}"));
            } else {
                out.push_str(&format!("\\u{{{n:x}}}"));
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether discovery is using libvirt, for `optimus check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LibvirtStatus {
    /// No libvirt URI was given: /proc only.
    Disabled,
    /// Connected; the last call worked.
    Connected,
    /// The last attempt failed, with libvirt's message; /proc only until a retry works.
    Unreachable(String),
}

/// Finds the VMs running on this host on every [`scan`](Self::scan): QEMU processes from
/// /proc, named by libvirt when it manages them.
#[derive(Debug)]
pub struct Discovery {
    procfs: ProcScanner,
    libvirt: Libvirt,
    /// libvirt's status files (QEMU pid and vCPU threads of each running domain).
    status: StatusDir,
    /// Domains libvirt last listed as running. Kept while libvirt is unreachable (only those
    /// still running per /proc), so a libvirt restart does not rename VMs or flip their source.
    domains: Vec<VmId>,
    /// Whether the last /proc scan failed, so the failure is logged once, not every scan.
    proc_failing: bool,
    max_vms: usize,
    /// What the last good scan returned: kept when a scan fails.
    last_vms: Vec<Vm>,
    /// Failed reads and scans since start, by source (`proc`, `libvirt`).
    errors: BTreeMap<&'static str, u64>,
    /// (UUID, pid) pairs already counted and warned about as identity conflicts.
    conflicts_seen: HashSet<(String, u32)>,
    conflicts: u64,
    /// VMs returned by the last scan, kept first when `max_vms` is reached.
    admitted: HashSet<VmId>,
    /// VMs left out by the cap in the current streak (counted once each).
    over_limit_seen: HashSet<VmId>,
    over_limit: u64,
    /// Processes of the last scan that are not VMs, and why.
    ignored: Vec<Ignored>,
    /// Untrusted pids already logged.
    untrusted_logged: HashSet<u32>,
    qmp: QmpCache,
    /// When /proc was last listed in full (`None`: never, or a read failed since).
    last_full: Option<Instant>,
    /// Processes that changed at the last scan: looked at once more, as a process reported
    /// exiting can still be in /proc for an instant.
    recheck: HashSet<u32>,
    /// What the full rescans found that the change events had missed, since start.
    rescan_missed: u64,
}

/// How often /proc is listed in full when the kernel's change events drive discovery:
/// the safety net for whatever the events cannot see (a vhost kernel worker, a lost event).
pub const FULL_RESCAN: Duration = Duration::from_secs(30);

/// QMP answers per QEMU pid: its vCPU threads (index, tid), or when the last query failed.
type QmpCache = HashMap<u32, Result<Vec<(u32, u32)>, Instant>>;

/// How long a QMP monitor that did not answer is left alone.
const QMP_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum Libvirt {
    Disabled,
    Connected(LibvirtClient),
    Unreachable {
        uri: String,
        cause: String,
        /// `None`: try at the next scan.
        last_attempt: Option<Instant>,
        /// Whether this outage was already logged as a warning.
        warned: bool,
        /// Whether a working connection broke (rather than never opened).
        lost_connection: bool,
    },
}

/// A change in libvirt reachability that deserves one log line.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LibvirtEvent {
    /// First connection opened (debug).
    Connected,
    /// Unreachable, first failure of this outage (warn).
    Lost { cause: String },
    /// Reachable again after a logged outage (info).
    Back,
    /// A call on a working connection failed and an immediate reconnect worked (info).
    Reconnected { cause: String },
}

impl Discovery {
    /// Discovery reading procfs under `paths` and, if `libvirt_uri` is set and not empty,
    /// asking libvirt at that URI (`qemu:///system` normally). Tries libvirt right away, so
    /// [`libvirt_status`](Self::libvirt_status) is meaningful at once; an unreachable libvirt
    /// is logged once and retried every [`LIBVIRT_RETRY`] by later scans, never an error.
    pub fn new(paths: HostPaths, libvirt_uri: Option<String>) -> Self {
        Self::with_config(paths, libvirt_uri, DiscoveryConfig::default())
    }

    /// [`Discovery::new`] with explicit trust rules and VM cap.
    pub fn with_config(
        paths: HostPaths,
        libvirt_uri: Option<String>,
        cfg: DiscoveryConfig,
    ) -> Self {
        let libvirt = match libvirt_uri.filter(|uri| !uri.trim().is_empty()) {
            None => Libvirt::Disabled,
            Some(uri) => Libvirt::Unreachable {
                uri,
                cause: "not connected yet".to_owned(),
                last_attempt: None,
                warned: false,
                lost_connection: false,
            },
        };
        let mut discovery = Self {
            procfs: ProcScanner::new(paths.proc, cfg.trust),
            libvirt,
            status: StatusDir::new(&paths.run),
            domains: Vec::new(),
            proc_failing: false,
            max_vms: cfg.max_vms,
            last_vms: Vec::new(),
            errors: BTreeMap::new(),
            conflicts_seen: HashSet::new(),
            conflicts: 0,
            admitted: HashSet::new(),
            over_limit_seen: HashSet::new(),
            over_limit: 0,
            ignored: Vec::new(),
            untrusted_logged: HashSet::new(),
            qmp: HashMap::new(),
            last_full: None,
            recheck: HashSet::new(),
            rescan_missed: 0,
        };
        for event in discovery.refresh_libvirt(Instant::now()) {
            discovery.log(&event);
        }
        discovery
    }

    /// The VMs running now, sorted by [`VmId`], ids unique. libvirt's QEMU processes (by
    /// the pid in its status files, else a trusted process with a running domain's UUID)
    /// get libvirt's name and [`VmSource::Libvirt`]; other trusted QEMU processes get their
    /// identity from their command line and [`VmSource::Proc`]. Never fails: an unreadable
    /// /proc keeps the last known VMs (counted in [`Self::errors`], logged once), an
    /// unreachable libvirt yields /proc-only identities.
    ///
    /// Two processes never share an id: when a second one claims it (a spoofed `-uuid`, or
    /// an incoming migration on the same host), the first keeps it and the second is left
    /// out, listed in [`Self::ignored`] and counted in [`Self::identity_conflicts`].
    pub fn scan(&mut self) -> Vec<Vm> {
        self.scan_at(Instant::now(), None)
    }

    /// [`scan`](Self::scan), re-reading in /proc only the processes in `changed` (the
    /// kernel's change events since the last scan; `None`: unknown, list everything). Every
    /// [`FULL_RESCAN`] it lists /proc in full anyway, and counts in
    /// [`rescan_missed`](Self::rescan_missed) what that found that the events had missed.
    pub fn scan_changes(&mut self, changed: Option<&HashSet<u32>>) -> Vec<Vm> {
        self.scan_at(Instant::now(), changed)
    }

    /// Processes or thread lists that a full rescan found different from what the change
    /// events had kept up to date, since start.
    pub fn rescan_missed(&self) -> u64 {
        self.rescan_missed
    }

    /// The /proc part of a scan: in full, or only what changed (see [`Self::scan_changes`]).
    fn scan_proc(
        &mut self,
        now: Instant,
        changed: Option<&HashSet<u32>>,
    ) -> Result<procfs::ProcScan, procfs::ProcError> {
        let Some(changed) = changed else {
            self.recheck.clear();
            let scan = self.procfs.scan();
            self.last_full = scan.as_ref().ok().map(|_| now);
            return scan;
        };
        let mut pids = std::mem::replace(&mut self.recheck, changed.clone());
        pids.extend(changed);
        let incremental = match self.procfs.rescan(&pids) {
            Ok(scan) => scan,
            Err(e) => {
                // Read everything again once /proc is back.
                self.last_full = None;
                self.recheck = pids;
                return Err(e);
            }
        };
        let due = self
            .last_full
            .is_none_or(|at| now.duration_since(at) >= FULL_RESCAN);
        if !due {
            if incremental.errors > 0 {
                // Something could not be read: list everything next time.
                self.last_full = None;
            }
            return Ok(incremental);
        }
        let full = self.procfs.scan();
        if let (Ok(full), Some(_)) = (&full, self.last_full) {
            let missed = procfs::differences(&incremental.found, &full.found);
            if missed > 0 {
                log::debug!("the full /proc rescan found {missed} change(s) the events missed");
            }
            self.rescan_missed += missed;
        }
        self.last_full = full.as_ref().ok().map(|_| now);
        full
    }

    /// Failed /proc reads or scans and failed libvirt calls since start, by source.
    pub fn errors(&self) -> &BTreeMap<&'static str, u64> {
        &self.errors
    }

    /// Processes that claimed the identity of another VM, since start (each counted once).
    pub fn identity_conflicts(&self) -> u64 {
        self.conflicts
    }

    /// VMs left out because `max_vms` was reached, since start (each counted once per
    /// stretch over the cap).
    pub fn vms_over_limit(&self) -> u64 {
        self.over_limit
    }

    /// QEMU-looking processes of the last scan that are not VMs, and why.
    pub fn ignored(&self) -> &[Ignored] {
        &self.ignored
    }

    /// libvirt's state after the last scan (or construction).
    pub fn libvirt_status(&self) -> LibvirtStatus {
        match &self.libvirt {
            Libvirt::Disabled => LibvirtStatus::Disabled,
            Libvirt::Connected(_) => LibvirtStatus::Connected,
            Libvirt::Unreachable { cause, .. } => LibvirtStatus::Unreachable(cause.clone()),
        }
    }

    /// The libvirt URI in use, if any.
    pub fn libvirt_uri(&self) -> Option<&str> {
        match &self.libvirt {
            Libvirt::Disabled => None,
            Libvirt::Connected(client) => Some(client.uri()),
            Libvirt::Unreachable { uri, .. } => Some(uri),
        }
    }

    /// Running domains as libvirt last listed them (whether or not a QEMU process was found
    /// for them: a remote URI or the test driver has none), sorted.
    pub fn libvirt_domains(&self) -> &[VmId] {
        &self.domains
    }

    fn scan_at(&mut self, now: Instant, changed: Option<&HashSet<u32>>) -> Vec<Vm> {
        // /proc before libvirt: libvirt marks a domain active before it starts its QEMU, so
        // every process seen here is already listed, and a starting VM does not show up
        // under its /proc identity for one scan.
        let found = match self.scan_proc(now, changed) {
            Ok(scan) => {
                if scan.errors > 0 {
                    *self.errors.entry("proc").or_default() += scan.errors;
                }
                self.proc_failing = false;
                scan.found
            }
            Err(e) => {
                *self.errors.entry("proc").or_default() += 1;
                if !self.proc_failing {
                    log::warn!(
                        "cannot scan for QEMU processes: {}; keeping the last known {} VM(s) \
                         until a scan works",
                        error_chain(&e),
                        self.last_vms.len()
                    );
                }
                self.proc_failing = true;
                return self.last_vms.clone();
            }
        };
        for event in self.refresh_libvirt(now) {
            self.log(&event);
        }
        let status = if matches!(self.libvirt, Libvirt::Disabled) {
            HashMap::new()
        } else {
            self.status.read()
        };
        if !matches!(self.libvirt, Libvirt::Connected(_)) {
            let running: HashSet<&str> = found.iter().map(|c| c.vm.id.uuid.as_str()).collect();
            self.domains
                .retain(|d| running.contains(d.uuid.as_str()) || status.contains_key(&d.uuid));
        }
        let alive: HashSet<u32> = found.iter().map(|c| c.vm.pid).collect();
        self.qmp.retain(|pid, _| alive.contains(pid));
        let cache = &mut self.qmp;
        let (vms, ignored) = resolve(found, &self.domains, &status, |pid, path| {
            qmp_vcpus(cache, pid, path, now)
        });
        self.ignored = ignored;
        self.note_ignored();
        let mut vms = self.cap(vms);
        vms.sort_by(|a, b| a.id.cmp(&b.id).then(a.pid.cmp(&b.pid)));
        self.last_vms.clone_from(&vms);
        vms
    }

    /// Logs and counts what [`resolve`] left out: one warning per identity conflict, one
    /// debug line per untrusted process.
    fn note_ignored(&mut self) {
        let alive: HashSet<u32> = self.ignored.iter().map(|i| i.pid).collect();
        self.conflicts_seen.retain(|(_, pid)| alive.contains(pid));
        self.untrusted_logged.retain(|pid| alive.contains(pid));
        for i in &self.ignored {
            match &i.why {
                IgnoredWhy::Conflict { winner } => {
                    let key = (i.name.clone(), i.pid);
                    if self.conflicts_seen.insert(key) {
                        self.conflicts += 1;
                        log::warn!(
                            "pid {} claims to be VM \"{}\", which pid {winner} already is: not \
                             merged; its CPU time stays unattributed",
                            i.pid,
                            escape_controls(&i.name)
                        );
                    }
                }
                IgnoredWhy::Untrusted(why) => {
                    if self.untrusted_logged.insert(i.pid) {
                        // Bounded: a hostile user can start thousands of them.
                        let level = if self.untrusted_logged.len() <= 10 {
                            log::Level::Info
                        } else {
                            log::Level::Debug
                        };
                        log::log!(
                            level,
                            "pid {} looks like QEMU (\"{}\") but is not counted as a VM: {why}{}",
                            i.pid,
                            escape_controls(&i.name),
                            if self.untrusted_logged.len() == 10 {
                                " (further ones are logged at debug level)"
                            } else {
                                ""
                            }
                        );
                    }
                }
                IgnoredWhy::OverLimit => {}
            }
        }
    }

    /// Keeps at most `max_vms` VMs: those already admitted first, then libvirt's, then by
    /// id. The rest are listed as ignored and counted once each; one warning per stretch
    /// over the cap.
    fn cap(&mut self, mut vms: Vec<Vm>) -> Vec<Vm> {
        if vms.len() <= self.max_vms {
            self.over_limit_seen.clear();
            self.admitted = vms.iter().map(|vm| vm.id.clone()).collect();
            return vms;
        }
        vms.sort_by(|a, b| {
            let rank = |vm: &Vm| {
                (
                    !self.admitted.contains(&vm.id),
                    vm.source != VmSource::Libvirt,
                )
            };
            rank(a).cmp(&rank(b)).then(a.id.cmp(&b.id))
        });
        let left_out = vms.split_off(self.max_vms);
        if self.over_limit_seen.is_empty() {
            log::warn!(
                "{} VMs found, more than --max-vms {}: the other {} are not exported (raise \
                 --max-vms if this host really runs that many)",
                self.max_vms + left_out.len(),
                self.max_vms,
                left_out.len()
            );
        }
        for vm in &left_out {
            if self.over_limit_seen.insert(vm.id.clone()) {
                self.over_limit += 1;
            }
            self.ignored.push(Ignored {
                pid: vm.pid,
                name: vm.id.name.clone(),
                why: IgnoredWhy::OverLimit,
            });
        }
        self.admitted = vms.iter().map(|vm| vm.id.clone()).collect();
        vms
    }

    /// Lists libvirt's domains into `self.domains` if it can, (re)connecting when due, and
    /// says what changed. At most one connection attempt per [`LIBVIRT_RETRY`], except one
    /// immediate attempt when a working connection fails (libvirtd restarted).
    fn refresh_libvirt(&mut self, now: Instant) -> Vec<LibvirtEvent> {
        let mut events = Vec::new();
        if let Libvirt::Connected(client) = &self.libvirt {
            match client.active_domains() {
                Ok(domains) => {
                    self.domains = domains;
                    return events;
                }
                Err(e) => {
                    *self.errors.entry("libvirt").or_default() += 1;
                    self.libvirt = Libvirt::Unreachable {
                        uri: client.uri().to_owned(),
                        cause: e.cause().to_owned(),
                        last_attempt: None,
                        warned: false,
                        lost_connection: true,
                    };
                }
            }
        }
        let Libvirt::Unreachable {
            uri,
            cause,
            last_attempt,
            warned,
            lost_connection,
        } = &mut self.libvirt
        else {
            return events;
        };
        if last_attempt.is_some_and(|t| now.saturating_duration_since(t) < LIBVIRT_RETRY) {
            return events;
        }
        *last_attempt = Some(now);
        let listed = LibvirtClient::connect(uri)
            .and_then(|client| client.active_domains().map(|domains| (client, domains)));
        match listed {
            Ok((client, domains)) => {
                events.push(if *warned {
                    LibvirtEvent::Back
                } else if *lost_connection {
                    LibvirtEvent::Reconnected {
                        cause: cause.clone(),
                    }
                } else {
                    LibvirtEvent::Connected
                });
                self.libvirt = Libvirt::Connected(client);
                self.domains = domains;
            }
            Err(e) => {
                *cause = e.cause().to_owned();
                if !*warned {
                    *warned = true;
                    events.push(LibvirtEvent::Lost {
                        cause: cause.clone(),
                    });
                }
            }
        }
        events
    }

    fn log(&self, event: &LibvirtEvent) {
        let uri = self.libvirt_uri().unwrap_or_default();
        match event {
            LibvirtEvent::Connected => log::debug!("connected to libvirt at {uri}"),
            LibvirtEvent::Lost { cause } => log::warn!(
                "libvirt at {uri} unreachable: {cause}; using /proc only, will retry every {} s \
                 (start libvirtd, or pass --libvirt-uri '' to go without it)",
                LIBVIRT_RETRY.as_secs()
            ),
            LibvirtEvent::Back => log::info!("libvirt at {uri} reachable again"),
            LibvirtEvent::Reconnected { cause } => {
                log::info!("libvirt at {uri}: connection lost ({cause}); reconnected")
            }
        }
    }
}

/// Decides which candidates are VMs and under which identity (see [`Discovery::scan`]):
/// libvirt's pids first, then trusted processes; a second claim on an id is a conflict.
fn resolve(
    found: Vec<Candidate>,
    domains: &[VmId],
    status: &HashMap<String, DomainStatus>,
    mut qmp_vcpus: impl FnMut(u32, &std::path::Path) -> Option<Vec<(u32, u32)>>,
) -> (Vec<Vm>, Vec<Ignored>) {
    let name_of: HashMap<&str, &str> = domains
        .iter()
        .map(|d| (d.uuid.as_str(), d.name.as_str()))
        .collect();
    let by_pid: HashMap<u32, &DomainStatus> = status.values().map(|d| (d.pid, d)).collect();
    let mut ignored = Vec::new();
    // libvirt's own processes first, so they win any conflict; then by pid.
    let mut ranked: Vec<(bool, Candidate)> = found
        .into_iter()
        .map(|c| (by_pid.contains_key(&c.vm.pid), c))
        .collect();
    ranked.sort_by_key(|(libvirt, c)| (!*libvirt, c.vm.pid));
    // By UUID: looking an owner up by scanning every owner was quadratic (500,000 UUID
    // comparisons per scan at a thousand VMs, most of the agent's CPU there).
    let mut owner: HashMap<String, u32> = HashMap::new();
    let mut vms = Vec::new();
    for (_, c) in ranked {
        let mut vm = c.vm;
        if let Some(d) = by_pid.get(&vm.pid) {
            let name = name_of.get(d.uuid.as_str()).map_or(d.name.as_str(), |n| *n);
            vm.id = VmId {
                name: name.to_owned(),
                uuid: d.uuid.clone(),
            };
            vm.source = VmSource::Libvirt;
            apply_vcpu_tids(&mut vm, &d.vcpus);
            for uuid in &d.mdev_uuids {
                if !vm.mdev_uuids.contains(uuid) {
                    vm.mdev_uuids.push(uuid.clone());
                }
            }
        } else {
            if let Err(why) = c.trusted {
                ignored.push(Ignored {
                    pid: vm.pid,
                    name: vm.id.name,
                    why: IgnoredWhy::Untrusted(why),
                });
                continue;
            }
            if let Some(d) = status.get(&vm.id.uuid) {
                // libvirt runs this domain under another pid.
                ignored.push(Ignored {
                    pid: vm.pid,
                    name: vm.id.name,
                    why: IgnoredWhy::Conflict { winner: d.pid },
                });
                continue;
            }
            if let Some(name) = name_of.get(vm.id.uuid.as_str()) {
                (*name).clone_into(&mut vm.id.name);
                vm.source = VmSource::Libvirt;
            }
        }
        // Matched on UUID alone: a spoofer may give the real name, or another.
        let claimed = owner.get(&vm.id.uuid).copied();
        if let Some(winner) = claimed {
            ignored.push(Ignored {
                pid: vm.pid,
                name: vm.id.name,
                why: IgnoredWhy::Conflict { winner },
            });
            continue;
        }
        if !vm
            .threads
            .iter()
            .any(|t| matches!(t.kind, ThreadKind::Vcpu(_)))
        {
            if let Some(vcpus) = c.qmp.as_deref().and_then(|p| qmp_vcpus(vm.pid, p)) {
                apply_vcpu_tids(&mut vm, &vcpus);
            }
        }
        classify_unknown_vcpus(&mut vm);
        owner.insert(vm.id.uuid.clone(), vm.pid);
        vms.push(vm);
    }
    (vms, ignored)
}

/// The vCPU threads QMP reports for `pid`: cached once known, a failed query retried after
/// [`QMP_RETRY`].
fn qmp_vcpus(
    cache: &mut QmpCache,
    pid: u32,
    path: &std::path::Path,
    now: Instant,
) -> Option<Vec<(u32, u32)>> {
    match cache.get(&pid) {
        Some(Ok(vcpus)) => return Some(vcpus.clone()),
        Some(Err(at)) if now.saturating_duration_since(*at) < QMP_RETRY => return None,
        _ => {}
    }
    match qmp::vcpu_threads(path) {
        Ok(vcpus) if !vcpus.is_empty() => {
            log::debug!("pid {pid}: vCPU threads from QMP at {}", path.display());
            cache.insert(pid, Ok(vcpus.clone()));
            Some(vcpus)
        }
        Ok(_) => {
            cache.insert(pid, Err(now));
            None
        }
        Err(e) => {
            log::debug!("pid {pid}: no vCPU threads from QMP: {}", error_chain(&e));
            cache.insert(pid, Err(now));
            None
        }
    }
}

/// Marks the threads libvirt lists as vCPUs (QEMU without `debug-threads=on` names them all
/// after the binary).
fn apply_vcpu_tids(vm: &mut Vm, vcpus: &[(u32, u32)]) {
    let by_tid: HashMap<u32, u32> = vcpus.iter().map(|&(id, tid)| (tid, id)).collect();
    for t in &mut vm.threads {
        if let Some(&id) = by_tid.get(&t.tid) {
            t.kind = ThreadKind::Vcpu(id);
        }
    }
}

/// A VM with no thread known to be a vCPU (QEMU without `debug-threads=on` and no libvirt
/// status file): its threads other than the main loop are vCPUs and helpers mixed, so they
/// are [`ThreadKind::Unclassified`] rather than emulator time next to a vCPU time of zero.
fn classify_unknown_vcpus(vm: &mut Vm) {
    if vm
        .threads
        .iter()
        .any(|t| matches!(t.kind, ThreadKind::Vcpu(_)))
    {
        return;
    }
    let pid = vm.pid;
    for t in &mut vm.threads {
        if t.kind == ThreadKind::Emulator && t.tid != pid {
            t.kind = ThreadKind::Unclassified;
        }
    }
}

/// `error: cause: cause...`, for a log line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testutil::{fixture_proc, trust, FakeProc};
    use super::*;
    use std::path::PathBuf;

    const TEST_URI: &str = "test:///default";
    /// The UUID of the test driver's `test` domain, also pid 1000's `-uuid` in the fixture.
    const TEST_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    const UNREACHABLE_URI: &str = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";

    fn paths(proc: PathBuf) -> HostPaths {
        HostPaths {
            proc,
            sys: PathBuf::from("/nonexistent/sys"),
            run: PathBuf::from("/nonexistent/run"),
        }
    }

    fn discovery_for(proc: PathBuf, uri: Option<String>) -> Discovery {
        Discovery::with_config(
            paths(proc),
            uri,
            DiscoveryConfig {
                trust: trust(),
                max_vms: DEFAULT_MAX_VMS,
            },
        )
    }

    fn summary(vms: &[Vm]) -> Vec<(String, String, VmSource, u32)> {
        vms.iter()
            .map(|vm| (vm.id.name.clone(), vm.id.uuid.clone(), vm.source, vm.pid))
            .collect()
    }

    /// A `test://` node file with one running domain.
    fn write_node(path: &std::path::Path, name: &str, uuid: &str) {
        std::fs::write(
            path,
            format!(
                "<node><domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
                 <memory>8192</memory><os><type>hvm</type></os></domain></node>"
            ),
        )
        .unwrap();
    }

    #[test]
    fn proc_only_without_libvirt() {
        for uri in [None, Some(String::new()), Some("  ".to_owned())] {
            let mut discovery = discovery_for(fixture_proc(), uri);
            assert_eq!(discovery.libvirt_status(), LibvirtStatus::Disabled);
            assert_eq!(discovery.libvirt_uri(), None);
            let vms = discovery.scan();
            // Sorted by id: name first.
            assert_eq!(
                summary(&vms),
                vec![
                    (
                        "bad\u{fffd}name".into(),
                        "pid-3000".into(),
                        VmSource::Proc,
                        3000
                    ),
                    ("qemu-2000".into(), "pid-2000".into(), VmSource::Proc, 2000),
                    (
                        "renamed".into(),
                        "4a9e3b0c-1d2e-4f60-8a7b-9c0d1e2f3a4b".into(),
                        VmSource::Proc,
                        4000
                    ),
                    (
                        "web \"prod\", eu\\1 caf\u{e9}".into(),
                        TEST_UUID.into(),
                        VmSource::Proc,
                        1000
                    ),
                ]
            );
        }
    }

    #[test]
    fn libvirt_names_the_process_with_its_uuid() {
        let mut discovery = discovery_for(fixture_proc(), Some(TEST_URI.into()));
        assert_eq!(discovery.libvirt_status(), LibvirtStatus::Connected);
        let vms = discovery.scan();
        let summary = summary(&vms);
        assert_eq!(summary.len(), 4);
        assert!(summary.contains(&("test".into(), TEST_UUID.into(), VmSource::Libvirt, 1000)));
        assert_eq!(
            vms.iter()
                .filter(|vm| vm.source == VmSource::Libvirt)
                .count(),
            1
        );
        // Threads come from /proc whatever names the VM.
        let test_vm = vms.iter().find(|vm| vm.pid == 1000).unwrap();
        assert_eq!(test_vm.threads.len(), 7);
        assert_eq!(
            discovery.libvirt_domains(),
            &[VmId {
                name: "test".into(),
                uuid: TEST_UUID.into()
            }]
        );
        assert_eq!(discovery.libvirt_status(), LibvirtStatus::Connected);
    }

    #[test]
    fn unreachable_libvirt_falls_back_to_proc() {
        let mut discovery = discovery_for(fixture_proc(), Some(UNREACHABLE_URI.into()));
        let LibvirtStatus::Unreachable(cause) = discovery.libvirt_status() else {
            panic!("{:?}", discovery.libvirt_status());
        };
        assert!(cause.contains("/nonexistent/libvirt-sock"), "{cause}");
        assert_eq!(discovery.libvirt_uri(), Some(UNREACHABLE_URI));
        let vms = discovery.scan();
        assert_eq!(vms.len(), 4);
        assert!(vms.iter().all(|vm| vm.source == VmSource::Proc));
        // Already warned in `new`: later failed retries stay quiet.
        let t0 = Instant::now();
        assert_eq!(discovery.refresh_libvirt(t0 + LIBVIRT_RETRY * 2), vec![]);
        assert_eq!(discovery.refresh_libvirt(t0 + LIBVIRT_RETRY * 4), vec![]);
    }

    #[test]
    fn warns_once_retries_every_30_s_and_says_when_back() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.xml");
        let uri = format!("test://{}", node.display());
        // A node file libvirt rejects stands for a daemon that is down (a missing file would
        // do too, but libxml2 then prints to stderr itself).
        std::fs::write(&node, "<down/>").unwrap();
        let fake = FakeProc::new();
        fake.process(
            7,
            &[
                b"qemu-system-x86_64",
                b"-name",
                b"guest=from-cmdline",
                b"-uuid",
                b"AAAAAAAA-0000-0000-0000-000000000001",
            ],
            &[(7, b"qemu-system-x86"), (8, b"CPU 0/KVM")],
        );
        let mut discovery = discovery_for(fake.path(), None);
        discovery.libvirt = Libvirt::Unreachable {
            uri,
            cause: String::new(),
            last_attempt: None,
            warned: false,
            lost_connection: false,
        };
        let t0 = Instant::now();
        assert!(matches!(
            discovery.refresh_libvirt(t0).as_slice(),
            [LibvirtEvent::Lost { .. }]
        ));
        assert_eq!(summary(&discovery.scan_at(t0, None))[0].2, VmSource::Proc);

        // libvirt comes up, but the next attempt waits for its 30 s.
        write_node(
            &node,
            "from-libvirt",
            "aaaaaaaa-0000-0000-0000-000000000001",
        );
        assert_eq!(
            discovery.refresh_libvirt(t0 + Duration::from_secs(29)),
            vec![]
        );
        assert!(matches!(
            discovery.libvirt_status(),
            LibvirtStatus::Unreachable(_)
        ));
        assert_eq!(
            discovery.refresh_libvirt(t0 + LIBVIRT_RETRY),
            vec![LibvirtEvent::Back]
        );
        assert_eq!(discovery.libvirt_status(), LibvirtStatus::Connected);
        let vms = discovery.scan_at(t0 + LIBVIRT_RETRY, None);
        assert_eq!(
            summary(&vms),
            vec![(
                "from-libvirt".into(),
                "aaaaaaaa-0000-0000-0000-000000000001".into(),
                VmSource::Libvirt,
                7
            )]
        );
    }

    #[test]
    fn broken_connection_is_reopened_at_once() {
        let mut discovery = discovery_for(fixture_proc(), None);
        discovery.libvirt = Libvirt::Unreachable {
            uri: TEST_URI.into(),
            cause: "end of file while reading data".into(),
            last_attempt: None,
            warned: false,
            lost_connection: true,
        };
        assert_eq!(
            discovery.refresh_libvirt(Instant::now()),
            vec![LibvirtEvent::Reconnected {
                cause: "end of file while reading data".into()
            }]
        );
        assert_eq!(discovery.libvirt_status(), LibvirtStatus::Connected);
    }

    #[test]
    fn known_domains_survive_a_libvirt_outage() {
        let fake = FakeProc::new();
        let qemu = |uuid: &'static [u8]| -> Vec<&'static [u8]> {
            vec![
                b"qemu-system-x86_64",
                b"-name",
                b"guest=cmdline-name",
                b"-uuid",
                uuid,
            ]
        };
        fake.process(7, &qemu(TEST_UUID.as_bytes()), &[(7, b"qemu-system-x86")]);
        let mut discovery = discovery_for(fake.path(), Some(TEST_URI.into()));
        let t0 = Instant::now();
        assert_eq!(summary(&discovery.scan_at(t0, None))[0].0, "test");

        discovery.libvirt = Libvirt::Unreachable {
            uri: UNREACHABLE_URI.into(),
            cause: String::new(),
            last_attempt: Some(t0),
            warned: true,
            lost_connection: true,
        };
        // Still running: keeps libvirt's identity.
        let vms = discovery.scan_at(t0, None);
        assert_eq!(
            summary(&vms)[0],
            ("test".into(), TEST_UUID.into(), VmSource::Libvirt, 7)
        );
        // Gone from /proc: forgotten, so a later process with that UUID is not named by a
        // stale libvirt answer.
        fake.remove_process(7);
        assert_eq!(discovery.scan_at(t0, None), vec![]);
        assert_eq!(discovery.libvirt_domains(), &[]);
        fake.process(7, &qemu(TEST_UUID.as_bytes()), &[(7, b"qemu-system-x86")]);
        assert_eq!(summary(&discovery.scan_at(t0, None))[0].2, VmSource::Proc);
    }

    #[test]
    fn unreadable_proc_gives_no_vms() {
        let mut discovery = discovery_for(PathBuf::from("/nonexistent/proc"), None);
        assert_eq!(discovery.scan(), vec![]);
        assert!(discovery.proc_failing);
        assert_eq!(discovery.scan(), vec![]);
    }

    const UUID_A: &[u8] = b"aaaaaaaa-0000-0000-0000-000000000001";

    fn qemu_claiming(name: &'static [u8]) -> Vec<&'static [u8]> {
        vec![b"qemu-system-x86_64", b"-name", name, b"-uuid", UUID_A]
    }

    /// A libvirt status file saying `pid` runs the domain with UUID_A, vCPUs as given.
    fn libvirt_status(run: &std::path::Path, pid: u32, vcpus: &[(u32, u32)]) {
        let dir = run.join("libvirt/qemu");
        std::fs::create_dir_all(&dir).unwrap();
        let vcpus: String = vcpus
            .iter()
            .map(|(id, tid)| format!("<vcpu id='{id}' pid='{tid}'/>"))
            .collect();
        std::fs::write(
            dir.join("real.xml"),
            format!(
                "<domstatus state='running' pid='{pid}'><vcpus>{vcpus}</vcpus>\
                 <domain type='qemu'><name>real</name><uuid>{}</uuid></domain></domstatus>",
                String::from_utf8_lossy(UUID_A)
            ),
        )
        .unwrap();
    }

    fn with_run(fake: &FakeProc, run: &std::path::Path, max_vms: usize) -> Discovery {
        Discovery::with_config(
            HostPaths {
                proc: fake.path(),
                sys: PathBuf::from("/nonexistent/sys"),
                run: run.to_path_buf(),
            },
            // libvirt enabled (so its status files are read) but unreachable.
            Some(UNREACHABLE_URI.into()),
            DiscoveryConfig {
                trust: trust(),
                max_vms,
            },
        )
    }

    #[test]
    fn an_unprivileged_spoofer_is_not_a_vm() {
        let fake = FakeProc::new();
        fake.process(7, &qemu_claiming(b"guest=real"), &[(7, b"qemu-system-x86")]);
        fake.process_as(
            9,
            65534,
            &qemu_claiming(b"guest=real"),
            &[(9, b"qemu-system-x86"), (10, b"qemu-system-x86")],
        );
        let mut d = discovery_for(fake.path(), None);
        let vms = d.scan();
        assert_eq!(summary(&vms).len(), 1);
        assert_eq!(vms[0].pid, 7);
        assert_eq!(d.identity_conflicts(), 0, "untrusted: not even a claim");
        assert!(matches!(
            d.ignored(),
            [Ignored {
                pid: 9,
                why: IgnoredWhy::Untrusted(trust::Untrusted::User { uid: 65534 }),
                ..
            }]
        ));
    }

    #[test]
    fn libvirt_pid_wins_and_a_trusted_claimant_is_a_conflict_counted_once() {
        let fake = FakeProc::new();
        let run = tempfile::tempdir().unwrap();
        // Root's own copy claims the domain first (lower pid), libvirt's QEMU is pid 20.
        fake.process(5, &qemu_claiming(b"guest=real"), &[(5, b"qemu-system-x86")]);
        fake.process(
            20,
            &qemu_claiming(b"guest=real"),
            &[
                (20, b"qemu-system-x86"),
                (21, b"qemu-system-x86"),
                (22, b"qemu-system-x86"),
            ],
        );
        libvirt_status(run.path(), 20, &[(0, 21), (1, 22)]);
        let mut d = with_run(&fake, run.path(), DEFAULT_MAX_VMS);
        for _ in 0..3 {
            let vms = d.scan();
            assert_eq!(
                summary(&vms),
                vec![(
                    "real".into(),
                    String::from_utf8_lossy(UUID_A).into_owned(),
                    VmSource::Libvirt,
                    20
                )]
            );
            // Without debug-threads, libvirt's status file names the vCPU threads.
            assert_eq!(
                vms[0].threads.iter().map(|t| t.kind).collect::<Vec<_>>(),
                vec![
                    ThreadKind::Emulator,
                    ThreadKind::Vcpu(0),
                    ThreadKind::Vcpu(1)
                ]
            );
        }
        assert_eq!(d.identity_conflicts(), 1);
        assert!(matches!(
            d.ignored(),
            [Ignored {
                pid: 5,
                why: IgnoredWhy::Conflict { winner: 20 },
                ..
            }]
        ));
    }

    #[test]
    fn two_claims_without_libvirt_are_never_merged() {
        let fake = FakeProc::new();
        fake.process(30, &qemu_claiming(b"guest=a"), &[(30, b"qemu-system-x86")]);
        fake.process(31, &qemu_claiming(b"guest=b"), &[(31, b"qemu-system-x86")]);
        let mut d = discovery_for(fake.path(), None);
        let vms = d.scan();
        assert_eq!(vms.len(), 1);
        assert_eq!((vms[0].pid, vms[0].threads.len()), (30, 1), "not merged");
        assert_eq!(d.identity_conflicts(), 1);
    }

    #[test]
    fn no_known_vcpu_threads_means_unclassified() {
        let fake = FakeProc::new();
        fake.process(
            40,
            &[b"qemu-system-x86_64", b"-name", b"plain"],
            &[
                (40, b"qemu-system-x86"),
                (41, b"qemu-system-x86"),
                (42, b"IO iothread0"),
            ],
        );
        let vms = discovery_for(fake.path(), None).scan();
        assert_eq!(
            vms[0].threads.iter().map(|t| t.kind).collect::<Vec<_>>(),
            vec![
                ThreadKind::Emulator,
                ThreadKind::Unclassified,
                ThreadKind::IoThread
            ]
        );
    }

    #[test]
    fn a_failed_scan_keeps_the_last_vms_and_counts_an_error() {
        let fake = FakeProc::new();
        fake.process(50, &qemu_claiming(b"guest=a"), &[(50, b"qemu-system-x86")]);
        let root = tempfile::tempdir().unwrap();
        let link = root.path().join("proc");
        std::os::unix::fs::symlink(fake.path(), &link).unwrap();
        let mut d = discovery_for(link.clone(), None);
        let before = d.scan();
        assert_eq!(before.len(), 1);
        // The proc root becomes unlistable.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("/nonexistent/proc", &link).unwrap();
        assert_eq!(d.scan(), before, "no series vanish because a scan failed");
        assert_eq!(d.scan(), before);
        assert_eq!(d.errors().get("proc"), Some(&2));
    }

    #[test]
    fn a_failed_read_of_one_process_keeps_it_and_counts_an_error() {
        let fake = FakeProc::new();
        fake.process(
            60,
            &qemu_claiming(b"guest=a"),
            &[(60, b"qemu-system-x86"), (61, b"CPU 0/KVM")],
        );
        let mut d = discovery_for(fake.path(), None);
        let before = d.scan();
        // comm replaced by a directory: EISDIR, a real read error that is not an exit.
        std::fs::remove_file(fake.path().join("60/comm")).unwrap();
        std::fs::create_dir(fake.path().join("60/comm")).unwrap();
        assert_eq!(d.scan(), before);
        assert_eq!(d.errors().get("proc"), Some(&1));
        // A process that really exits is gone, without an error.
        fake.remove_process(60);
        assert_eq!(d.scan(), vec![]);
        assert_eq!(d.errors().get("proc"), Some(&1));
    }

    #[test]
    fn max_vms_caps_and_counts_once_and_keeps_the_admitted() {
        let fake = FakeProc::new();
        let run = tempfile::tempdir().unwrap();
        for pid in [70u32, 71, 72] {
            let name = format!("guest=vm{pid}").into_bytes().leak();
            fake.process(
                pid,
                &[b"qemu-system-x86_64", b"-name", name],
                &[(pid, b"qemu-system-x86")],
            );
        }
        let mut d = with_run(&fake, run.path(), 2);
        let first: Vec<u32> = d.scan().iter().map(|vm| vm.pid).collect();
        assert_eq!(first, vec![70, 71]);
        assert_eq!(d.vms_over_limit(), 1);
        // A new VM does not push out an admitted one; counted once each, not per scan.
        fake.process(
            69,
            &[b"qemu-system-x86_64", b"-name", b"guest=vm069"],
            &[(69, b"qemu-system-x86")],
        );
        let again: Vec<u32> = d.scan().iter().map(|vm| vm.pid).collect();
        assert_eq!(again, vec![70, 71]);
        d.scan();
        assert_eq!(d.vms_over_limit(), 2);
        assert_eq!(
            d.ignored()
                .iter()
                .filter(|i| i.why == IgnoredWhy::OverLimit)
                .count(),
            2
        );
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(
            escape_controls("\u{1b}[31mRED\u{1b}]0;pwned\u{7}"),
            "\\x1b[31mRED\\x1b]0;pwned\\x07"
        );
        assert_eq!(escape_controls("a\nb\u{9b}c"), "a\\x0ab\\x9bc");
        assert_eq!(escape_controls("caf\u{e9}"), "caf\u{e9}");
    }

    #[test]
    fn discovery_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Discovery>();
    }
}
