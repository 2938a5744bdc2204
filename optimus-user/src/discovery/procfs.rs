//! Finds QEMU processes and their threads in a procfs tree.
//!
//! Cost, since the agent rescans every few seconds: each scan reads `<proc>/<pid>/comm` of
//! every process (one open and one ≤16-byte read). Only a process whose comm looks like QEMU
//! (`qemu-system-*`, `qemu-kvm`; comm is the executable's basename cut to 15 bytes) has its
//! `cmdline` and per-thread `comm`s read on every scan. QEMU's main thread keeps that comm even
//! with `debug-threads=on`, but `-name ...,process=X` renames it, so a process whose comm does
//! not look like QEMU has its `cmdline` checked once and the verdict remembered for as long as
//! the same pid keeps the same comm. In steady state a scan is therefore one small read per
//! process plus a few per QEMU thread, and never touches the `cmdline` of other processes
//! (reading it takes the target's mmap lock and can stall behind a stuck process).
//!
//! Anything that vanishes mid-scan (`ENOENT`, `ESRCH`) is skipped silently: processes come and
//! go between `readdir` and `read`. Any other failed read (`EMFILE` when the agent is out of
//! file descriptors, `EACCES`) is counted in [`ProcScan::errors`] and the process keeps what
//! the last scan knew of it, so a VM's series never vanish because one read failed.
//!
//! Each QEMU-looking process is checked against [`QemuTrust`] once per (pid, start time),
//! so a pid reused by another process is examined afresh.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::cmdline::{self, QemuArgs};
use super::trust::{QemuTrust, Untrusted};
use super::{ThreadKind, Vm, VmId, VmSource, VmThread};

/// Why a procfs scan could not run at all. Per-process trouble is never an error: the process
/// is skipped.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A QEMU process found in /proc, and whether it may be charged as a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its identity from the command line, source [`VmSource::Proc`], and its threads.
    pub vm: Vm,
    /// The [`QemuTrust`] verdict.
    pub trusted: Result<(), Untrusted>,
    /// Its QMP control socket, if its command line has one.
    pub qmp: Option<PathBuf>,
}

/// What one scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcScan {
    /// QEMU processes, trusted or not, sorted by pid.
    pub found: Vec<Candidate>,
    /// Reads that failed for another reason than the process exiting; the processes they
    /// concern keep what the previous scan knew.
    pub errors: u64,
}

impl ProcScan {
    /// Every process found, trusted or not, as VMs.
    pub fn vms(self) -> Vec<Vm> {
        self.found.into_iter().map(|c| c.vm).collect()
    }
}

/// What is remembered of a QEMU process while it lives.
#[derive(Clone, Debug)]
struct Known {
    /// Field 22 of `stat`: with the pid, names one process for good.
    start_time: u64,
    args: QemuArgs,
    trusted: Result<(), Untrusted>,
    qmp: Option<PathBuf>,
}

/// Scans a procfs tree for QEMU processes, remembering which processes it already ruled out so
/// that a rescan stays cheap (see the module doc).
#[derive(Debug)]
pub struct ProcScanner {
    proc: PathBuf,
    trust: QemuTrust,
    /// pid → comm it had when its command line showed it is not QEMU.
    not_qemu: HashMap<u32, Vec<u8>>,
    /// QEMU pid → its parsed command line and trust verdict (neither changes while the
    /// process lives).
    qemu_args: HashMap<u32, Known>,
    /// QEMU pid → its threads' kinds, and how many scans each has been seen in.
    threads: HashMap<u32, HashMap<u32, (ThreadKind, u8)>>,
    /// What the last scan returned, per pid: kept for a process whose reads fail.
    last: HashMap<u32, Candidate>,
    /// Failed reads of the scan in progress.
    errors: u64,
}

/// Full scans during which a new thread's `comm` is re-read: QEMU names a thread just after
/// creating it, so the first read can still show the process name. A re-read on the
/// kernel's change events settles it at once (a rename is an event of its own), so at a
/// thousand new VMs the safety-net scans do not re-read 8,000 names three times.
const SETTLE_SCANS: u8 = 3;

/// A top-level process of interest found by one pass over `<proc>`.
enum Found {
    Qemu {
        pid: u32,
        known: Known,
    },
    /// A QEMU process of the last scan whose reads failed this time.
    Kept(u32),
    /// A kernel vhost worker (`vhost-<owner tid>`, kernels before 6.4).
    VhostKthread {
        pid: u32,
        owner: u32,
    },
}

impl ProcScanner {
    /// A scanner of the procfs mounted at `proc` (normally `/proc`), judging processes by
    /// `trust`.
    pub fn new(proc: PathBuf, trust: QemuTrust) -> Self {
        Self {
            proc,
            trust,
            not_qemu: HashMap::new(),
            qemu_args: HashMap::new(),
            threads: HashMap::new(),
            last: HashMap::new(),
            errors: 0,
        }
    }

    /// Every QEMU process with its threads and trust verdict, identity taken from its
    /// command line (name from `-name`, else `qemu-<pid>`; uuid from `-uuid`, else
    /// `pid-<pid>`), source [`VmSource::Proc`], threads sorted by tid; sorted by pid.
    ///
    /// Fails only when `<proc>` itself cannot be listed.
    pub fn scan(&mut self) -> Result<ProcScan, ProcError> {
        self.errors = 0;
        let entries = fs::read_dir(&self.proc).map_err(|source| ProcError::Io {
            op: "list",
            path: self.proc.clone(),
            source,
        })?;
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        for entry in entries {
            let Ok(entry) = entry else {
                self.errors += 1;
                continue;
            };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            seen.insert(pid);
            if let Some(f) = self.examine(pid) {
                found.push(f);
            }
        }
        self.not_qemu.retain(|pid, _| seen.contains(pid));
        self.qemu_args.retain(|pid, _| seen.contains(pid));
        self.threads.retain(|pid, _| seen.contains(pid));

        let mut out = Vec::new();
        let mut vhost = Vec::new();
        for f in found {
            match f {
                Found::Qemu { pid, known } => {
                    if let Some(c) = self.read_vm(pid, known, false) {
                        out.push(c);
                    }
                }
                Found::Kept(pid) => out.extend(self.last.get(&pid).cloned()),
                Found::VhostKthread { pid, owner } => vhost.push((pid, owner)),
            }
        }
        let mut vms: Vec<Vm> = out.iter().map(|c| c.vm.clone()).collect();
        attach_vhost_kthreads(&mut vms, &vhost);
        for (c, vm) in out.iter_mut().zip(vms) {
            c.vm = vm;
        }
        out.sort_by_key(|c| c.vm.pid);
        self.last = out.iter().map(|c| (c.vm.pid, c.clone())).collect();
        Ok(ProcScan {
            found: out,
            errors: self.errors,
        })
    }

    /// [`scan`](Self::scan)'s result from the last scan plus a re-read of only the
    /// processes in `changed` (the kernel's change events): each is examined afresh (its
    /// threads' names re-read), dropped if gone, added if it became QEMU. Nothing else in
    /// `<proc>` is read, so its cost follows what changed, not what exists. A vhost kernel
    /// worker started since the last full scan is not among the events: the full scan
    /// that discovery runs as a safety net finds it.
    ///
    /// Fails, like [`scan`](Self::scan), when `<proc>` itself cannot be opened (one open, no
    /// listing), so an unreadable /proc is noticed at every interval all the same.
    pub fn rescan(&mut self, changed: &HashSet<u32>) -> Result<ProcScan, ProcError> {
        fs::read_dir(&self.proc).map_err(|source| ProcError::Io {
            op: "list",
            path: self.proc.clone(),
            source,
        })?;
        self.errors = 0;
        for &pid in changed {
            // Every thread name is re-read: a rename is one of the changes.
            self.threads.remove(&pid);
            let found = match self.examine(pid) {
                // Settled at once: the events re-read a process at every change of it,
                // renames included, so no full scan needs to read these names again.
                Some(Found::Qemu { pid, known }) => self.read_vm(pid, known, true),
                Some(Found::Kept(pid)) => self.last.get(&pid).cloned(),
                Some(Found::VhostKthread { .. }) | None => None,
            };
            match found {
                Some(mut c) => {
                    // Vhost kernel workers are processes of their own: keep those the last
                    // full scan attached while they live.
                    let vhost = self.last.get(&pid).into_iter().flat_map(|old| {
                        old.vm
                            .threads
                            .iter()
                            .filter(|t| t.kind == ThreadKind::Vhost)
                    });
                    let kept: Vec<VmThread> = vhost
                        .filter(|t| c.vm.threads.iter().all(|n| n.tid != t.tid))
                        .filter(|t| self.proc.join(t.tid.to_string()).exists())
                        .cloned()
                        .collect();
                    if !kept.is_empty() {
                        c.vm.threads.extend(kept);
                        c.vm.threads.sort_by_key(|t| t.tid);
                    }
                    self.last.insert(pid, c);
                }
                None => {
                    self.last.remove(&pid);
                    if !self.proc.join(pid.to_string()).exists() {
                        self.not_qemu.remove(&pid);
                        self.qemu_args.remove(&pid);
                        self.threads.remove(&pid);
                    }
                }
            }
        }
        let mut found: Vec<Candidate> = self.last.values().cloned().collect();
        found.sort_by_key(|c| c.vm.pid);
        Ok(ProcScan {
            found,
            errors: self.errors,
        })
    }

    /// Runs `read` on `path`; `None` when it fails. A vanished process (`ENOENT`, `ESRCH`)
    /// is expected and silent; anything else is counted as an error and logged at debug.
    fn read<'a, T>(
        &mut self,
        path: &'a Path,
        read: impl FnOnce(&'a Path) -> io::Result<T>,
    ) -> Result<T, Failed> {
        match read(path) {
            Ok(v) => Ok(v),
            Err(e) if vanished(&e) => Err(Failed::Gone),
            Err(e) => {
                self.errors += 1;
                log::debug!("cannot read {}: {e}", path.display());
                Err(Failed::Error)
            }
        }
    }

    /// Decides from `comm` (and, at most once per pid and comm, `cmdline`) what `pid` is.
    fn examine(&mut self, pid: u32) -> Option<Found> {
        let dir = self.proc.join(pid.to_string());
        let kept = |this: &Self, f: Failed| {
            (f == Failed::Error && this.last.contains_key(&pid)).then_some(Found::Kept(pid))
        };
        let comm = match self.read(&dir.join("comm"), read_comm) {
            Ok(c) => c,
            Err(f) => return kept(self, f),
        };
        if let Some(owner) = vhost_owner(&comm) {
            return is_kthread(&dir).then_some(Found::VhostKthread { pid, owner });
        }
        let qemu_comm = looks_like_qemu(&comm);
        if !qemu_comm && self.not_qemu.get(&pid) == Some(&comm) {
            return None;
        }
        let start_time = match self.read(&dir.join("stat"), fs::read_to_string) {
            Ok(stat) => stat_start_time(&stat).unwrap_or(0),
            Err(f) => return kept(self, f),
        };
        if let Some(known) = self.qemu_args.get(&pid) {
            if known.start_time == start_time {
                return Some(Found::Qemu {
                    pid,
                    known: known.clone(),
                });
            }
            // The pid now names another process.
            self.qemu_args.remove(&pid);
            self.threads.remove(&pid);
            self.last.remove(&pid);
        }
        let raw = match self.read(&dir.join("cmdline"), fs::read) {
            Ok(raw) => raw,
            Err(f) => return kept(self, f),
        };
        let Some(args) = cmdline::parse_qemu_cmdline(&raw) else {
            if !qemu_comm {
                // A QEMU-like comm is re-checked every scan anyway: there are few of them.
                self.not_qemu.insert(pid, comm);
            }
            return None;
        };
        self.not_qemu.remove(&pid);
        let argv0 = cmdline::split_argv(&raw).next().unwrap_or_default();
        let trusted = self.trust.check(&dir, argv0);
        if let Err(why) = &trusted {
            log::debug!("pid {pid} looks like QEMU but is not trusted to be a VM: {why}");
        }
        let argv: Vec<&[u8]> = cmdline::split_argv(&raw).collect();
        let known = Known {
            start_time,
            args,
            trusted,
            qmp: super::qmp::socket_of(&argv),
        };
        self.qemu_args.insert(pid, known.clone());
        Some(Found::Qemu { pid, known })
    }

    /// The VM run by QEMU process `pid`, or `None` if it exited meanwhile.
    /// `settle`: the names read now are final (an event-driven re-read; see
    /// [`rescan`](Self::rescan)), else a new thread's name is read again for
    /// [`SETTLE_SCANS`] scans.
    fn read_vm(&mut self, pid: u32, known: Known, settle: bool) -> Option<Candidate> {
        let Known {
            args, trusted, qmp, ..
        } = known;
        let task = self.proc.join(pid.to_string()).join("task");
        let entries = match self.read(&task, fs::read_dir) {
            Ok(e) => e,
            Err(Failed::Gone) => return None,
            Err(Failed::Error) => return self.last.get(&pid).cloned(),
        };
        let known = self.threads.remove(&pid).unwrap_or_default();
        let mut now_known = HashMap::with_capacity(known.len());
        let mut threads = Vec::new();
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // A settled thread's kind is remembered: no read per thread per scan.
            let kind = match known.get(&tid) {
                Some(&(kind, seen)) if seen >= SETTLE_SCANS => {
                    now_known.insert(tid, (kind, seen));
                    kind
                }
                prior => {
                    let comm = match self.read(&entry.path().join("comm"), read_comm) {
                        Ok(c) => c,
                        Err(Failed::Gone) => continue,
                        Err(Failed::Error) => {
                            // Keep what was known of it, if anything.
                            if let Some(&(kind, seen)) = prior {
                                now_known.insert(tid, (kind, seen));
                                threads.push(VmThread { tid, kind });
                            }
                            continue;
                        }
                    };
                    // The main thread runs QEMU's main loop whatever `process=` renamed it to.
                    let kind = if tid == pid {
                        ThreadKind::Emulator
                    } else {
                        classify_thread(&comm)
                    };
                    let seen = if settle {
                        SETTLE_SCANS
                    } else {
                        prior.map_or(1, |p| p.1 + 1)
                    };
                    now_known.insert(tid, (kind, seen));
                    kind
                }
            };
            threads.push(VmThread { tid, kind });
        }
        if threads.is_empty() {
            return None;
        }
        self.threads.insert(pid, now_known);
        threads.sort_by_key(|t| t.tid);
        Some(Candidate {
            vm: Vm {
                id: VmId {
                    name: args.name.unwrap_or_else(|| format!("qemu-{pid}")),
                    uuid: args.uuid.unwrap_or_else(|| format!("pid-{pid}")),
                },
                source: VmSource::Proc,
                pid,
                memory_bytes: args.memory_bytes,
                threads,
                namespace: args.namespace,
                mdev_uuids: args.mdev_uuids,
            },
            trusted,
            qmp,
        })
    }
}

/// Processes in one list and not the other, or in both with other threads (ids or kinds):
/// how far an event-driven view of /proc (`kept`) was from a full scan (`full`).
pub fn differences(kept: &[Candidate], full: &[Candidate]) -> u64 {
    let threads = |c: &Candidate| -> Vec<(u32, ThreadKind)> {
        c.vm.threads.iter().map(|t| (t.tid, t.kind)).collect()
    };
    let kept: HashMap<u32, Vec<(u32, ThreadKind)>> =
        kept.iter().map(|c| (c.vm.pid, threads(c))).collect();
    let full: HashMap<u32, Vec<(u32, ThreadKind)>> =
        full.iter().map(|c| (c.vm.pid, threads(c))).collect();
    let changed = full
        .iter()
        .filter(|(pid, t)| kept.get(pid) != Some(t))
        .count();
    let gone = kept.keys().filter(|pid| !full.contains_key(pid)).count();
    u64::try_from(changed + gone).unwrap_or(u64::MAX)
}

/// How a read of a process's file failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failed {
    /// The process or thread exited: expected, not an error.
    Gone,
    /// Anything else: counted.
    Error,
}

/// Field 22 (`starttime`, clock ticks after boot) of a `/proc/<pid>/stat` line.
fn stat_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Adds each kernel vhost worker to the VM whose thread created it. The kernel names the worker
/// after the *thread* id that issued `VHOST_SET_OWNER` (normally QEMU's main thread, so its
/// pid); a worker whose owner thread has exited since cannot be matched and is left out.
fn attach_vhost_kthreads(vms: &mut [Vm], vhost: &[(u32, u32)]) {
    let owner_of: HashMap<u32, usize> = vms
        .iter()
        .enumerate()
        .flat_map(|(i, vm)| vm.threads.iter().map(move |t| (t.tid, i)))
        .collect();
    for &(pid, owner) in vhost {
        let Some(vm) = owner_of.get(&owner).and_then(|&i| vms.get_mut(i)) else {
            continue;
        };
        if vm.threads.iter().all(|t| t.tid != pid) {
            vm.threads.push(VmThread {
                tid: pid,
                kind: ThreadKind::Vhost,
            });
            vm.threads.sort_by_key(|t| t.tid);
        }
    }
}

/// What a QEMU thread does, from its comm (set by QEMU with `debug-threads=on`; without it every
/// thread is called after the binary and counts as emulator).
pub fn classify_thread(comm: &[u8]) -> ThreadKind {
    if let Some(n) = vcpu_index(comm) {
        ThreadKind::Vcpu(n)
    } else if comm.starts_with(b"IO ") {
        ThreadKind::IoThread
    } else if comm.starts_with(b"vhost-") {
        ThreadKind::Vhost
    } else {
        ThreadKind::Emulator
    }
}

/// `CPU <n>/KVM` or `CPU <n>/TCG` → `n`.
pub(crate) fn vcpu_index(comm: &[u8]) -> Option<u32> {
    let rest = comm.strip_prefix(b"CPU ")?;
    let digits = rest
        .strip_suffix(b"/KVM")
        .or_else(|| rest.strip_suffix(b"/TCG"))?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `vhost-<tid>` → `tid`.
pub(crate) fn vhost_owner(comm: &[u8]) -> Option<u32> {
    let digits = comm.strip_prefix(b"vhost-")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether a process comm is that of a QEMU binary (cut to 15 bytes by the kernel).
pub(crate) fn looks_like_qemu(comm: &[u8]) -> bool {
    comm.starts_with(b"qemu-system-") || comm.starts_with(b"qemu-kvm")
}

/// Whether `<proc>/<pid>` is a kernel thread, so a user process calling itself `vhost-<n>`
/// cannot get its CPU time charged to a VM. Unreadable or vanished → no.
fn is_kthread(pid_dir: &Path) -> bool {
    read_or_skip(&pid_dir.join("stat"), fs::read_to_string)
        .and_then(|stat| crate::host::process_kind_of_stat(&stat))
        .is_some_and(|kind| kind == crate::host::ProcessKind::Kernel)
}

/// Reads a `comm` file: at most 64 bytes, trailing newline dropped. One `read` on procfs.
fn read_comm(path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(64);
    File::open(path)?.take(64).read_to_end(&mut buf)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    Ok(buf)
}

/// Runs `read` on `path`; `None` if it fails. A vanished process or thread (`ENOENT`, `ESRCH`)
/// is expected and silent; anything else is logged at debug level and skipped too, as one
/// unreadable process must not hide the others.
fn read_or_skip<'a, T>(path: &'a Path, read: impl FnOnce(&'a Path) -> io::Result<T>) -> Option<T> {
    match read(path) {
        Ok(v) => Some(v),
        Err(e) if vanished(&e) => None,
        Err(e) => {
            log::debug!("skipping {}: {e}", path.display());
            None
        }
    }
}

fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::discovery::testutil::{fixture_proc, trust, FakeProc};

    fn kinds(vm: &Vm) -> Vec<(u32, ThreadKind)> {
        vm.threads.iter().map(|t| (t.tid, t.kind)).collect()
    }

    #[test]
    fn classifies_thread_comms() {
        assert_eq!(classify_thread(b"CPU 0/KVM"), ThreadKind::Vcpu(0));
        assert_eq!(classify_thread(b"CPU 17/TCG"), ThreadKind::Vcpu(17));
        assert_eq!(classify_thread(b"IO mon_iothread"), ThreadKind::IoThread);
        assert_eq!(classify_thread(b"IO iothread0"), ThreadKind::IoThread);
        assert_eq!(classify_thread(b"vhost-4242"), ThreadKind::Vhost);
        for comm in [
            &b"qemu-system-x86"[..],
            b"worker",
            b"call_rcu",
            b"CPU /KVM",
            b"CPU x/KVM",
            b"CPU 1/HVF",
            b"CPU 99999999999/KVM",
            b"IOthread",
            b"",
        ] {
            assert_eq!(
                classify_thread(comm),
                ThreadKind::Emulator,
                "{}",
                String::from_utf8_lossy(comm)
            );
        }
    }

    /// The checked-in tree: what it holds is described in its README.md.
    #[test]
    fn scans_fixture_host() {
        let vms = ProcScanner::new(fixture_proc(), trust())
            .scan()
            .unwrap()
            .vms();
        let ids: Vec<(u32, &str, &str)> = vms
            .iter()
            .map(|vm| (vm.pid, vm.id.name.as_str(), vm.id.uuid.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![
                (
                    1000,
                    "web \"prod\", eu\\1 caf\u{e9}",
                    "6695eb01-f6a4-8304-79aa-97f2502e193f"
                ),
                (2000, "qemu-2000", "pid-2000"),
                (3000, "bad\u{fffd}name", "pid-3000"),
                (4000, "renamed", "4a9e3b0c-1d2e-4f60-8a7b-9c0d1e2f3a4b"),
            ]
        );
        assert!(vms.iter().all(|vm| vm.source == VmSource::Proc));
        let web = &vms[0];
        assert_eq!(
            kinds(web),
            vec![
                (1000, ThreadKind::Emulator),
                (1001, ThreadKind::Emulator),
                (1002, ThreadKind::IoThread),
                (1003, ThreadKind::Vcpu(0)),
                (1004, ThreadKind::Vcpu(1)),
                (1006, ThreadKind::Vhost),
                // Task 1005 has no comm (the thread exited mid-scan): skipped.
                // The kernel vhost worker of an older kernel, a process of its own.
                (1500, ThreadKind::Vhost),
            ]
        );
        // Without debug-threads every thread is named after the binary.
        assert_eq!(
            kinds(&vms[1]),
            vec![(2000, ThreadKind::Emulator), (2001, ThreadKind::Emulator)]
        );
        // `process=CPU 0/KVM` renamed the main thread; it is still the emulator.
        assert_eq!(
            kinds(&vms[3]),
            vec![(4000, ThreadKind::Emulator), (4001, ThreadKind::Vcpu(0))]
        );
    }

    #[test]
    fn threads_and_processes_come_and_go() {
        let fake = FakeProc::new();
        let qemu: &[&[u8]] = &[
            b"/usr/bin/qemu-system-x86_64",
            b"-name",
            b"guest=a,debug-threads=on",
        ];
        fake.process(10, qemu, &[(10, b"qemu-system-x86"), (11, b"CPU 0/TCG")]);
        fake.process(20, &[b"/usr/bin/sleep", b"100"], &[(20, b"sleep")]);
        let mut scanner = ProcScanner::new(fake.path(), trust());

        let vms = scanner.scan().unwrap().vms();
        assert_eq!(vms.len(), 1);
        assert_eq!(
            kinds(&vms[0]),
            vec![(10, ThreadKind::Emulator), (11, ThreadKind::Vcpu(0))]
        );

        // A vCPU is hot-plugged, another thread exits.
        fake.thread(10, 12, b"CPU 1/TCG");
        fake.remove_thread(10, 11);
        let vms = scanner.scan().unwrap().vms();
        assert_eq!(
            kinds(&vms[0]),
            vec![(10, ThreadKind::Emulator), (12, ThreadKind::Vcpu(1))]
        );

        // A thread directory whose comm is already gone.
        fs::create_dir_all(fake.path().join("10/task/13")).unwrap();
        let vms = scanner.scan().unwrap().vms();
        assert_eq!(vms[0].threads.len(), 2);

        // The whole task directory gone (process exiting): the VM is skipped.
        fs::remove_dir_all(fake.path().join("10/task")).unwrap();
        assert_eq!(scanner.scan().unwrap().vms(), vec![]);

        fake.remove_process(10);
        assert_eq!(scanner.scan().unwrap().vms(), vec![]);
    }

    #[test]
    fn a_rescan_reads_only_the_changed_processes() {
        let fake = FakeProc::new();
        let qemu = |name: &'static [u8]| -> Vec<&'static [u8]> {
            vec![b"/usr/bin/qemu-system-x86_64", b"-name", name]
        };
        fake.process(
            10,
            &qemu(b"guest=a"),
            &[(10, b"qemu-system-x86"), (11, b"CPU 0/TCG")],
        );
        let mut scanner = ProcScanner::new(fake.path(), trust());
        let full = scanner.scan().unwrap();
        assert_eq!(full.found.len(), 1);

        // A hot-plugged vCPU and a new QEMU, neither reported: the rescan does not see them,
        // a full scan does (two differences: a changed thread list, a new process).
        fake.thread(10, 12, b"CPU 1/TCG");
        fake.process(
            30,
            &qemu(b"guest=b"),
            &[(30, b"qemu-system-x86"), (31, b"CPU 0/TCG")],
        );
        let kept = scanner.rescan(&HashSet::new()).unwrap();
        assert_eq!(kept.found, full.found);
        assert_eq!(differences(&kept.found, &scanner.scan().unwrap().found), 2);

        // Reported: the thread is renamed, the second QEMU exits, a pid names nobody.
        fake.thread(10, 12, b"IO iothread0");
        fake.remove_process(30);
        let vms = scanner.rescan(&HashSet::from([10, 30, 99])).unwrap().vms();
        assert_eq!(vms.len(), 1);
        assert_eq!(
            kinds(&vms[0]),
            vec![
                (10, ThreadKind::Emulator),
                (11, ThreadKind::Vcpu(0)),
                (12, ThreadKind::IoThread)
            ]
        );
        let kept = scanner.rescan(&HashSet::new()).unwrap();
        assert_eq!(differences(&kept.found, &scanner.scan().unwrap().found), 0);
        // An unreadable /proc fails a rescan as it fails a scan.
        let mut gone = ProcScanner::new(fake.path().join("gone"), trust());
        assert!(gone.rescan(&HashSet::new()).is_err());
    }

    #[test]
    fn renamed_qemu_is_found_and_verdicts_are_cached() {
        let fake = FakeProc::new();
        // Seen before exec: a forked libvirtd child.
        fake.process(30, &[b"/usr/sbin/libvirtd"], &[(30, b"rpc-libvirtd")]);
        let mut scanner = ProcScanner::new(fake.path(), trust());
        assert_eq!(scanner.scan().unwrap().vms(), vec![]);
        assert_eq!(
            scanner.not_qemu.get(&30).map(Vec::as_slice),
            Some(&b"rpc-libvirtd"[..])
        );

        // The cached verdict holds while the comm is unchanged: a cmdline that now says QEMU
        // is not re-read (this is what keeps rescans cheap).
        fs::write(fake.path().join("30/cmdline"), b"qemu-system-x86_64\0").unwrap();
        assert_eq!(scanner.scan().unwrap().vms(), vec![]);

        // exec + `process=guest-a` changes the comm: re-examined, found.
        fake.process(
            30,
            &[b"qemu-system-x86_64", b"-name", b"guest=a,process=guest-a"],
            &[(30, b"guest-a")],
        );
        let vms = scanner.scan().unwrap().vms();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].id.name, "a");
        assert!(!scanner.not_qemu.contains_key(&30));

        // Verdicts of exited processes are forgotten.
        fake.process(31, &[b"/bin/true"], &[(31, b"true")]);
        scanner.scan().unwrap().vms();
        assert!(scanner.not_qemu.contains_key(&31));
        fake.remove_process(31);
        scanner.scan().unwrap().vms();
        assert!(!scanner.not_qemu.contains_key(&31));
    }

    #[test]
    fn fake_vhost_and_foreign_processes_are_ignored() {
        let fake = FakeProc::new();
        fake.process(
            40,
            &[b"qemu-system-x86_64", b"-name", b"v"],
            &[(40, b"qemu-system-x86")],
        );
        // A user process calling itself vhost-40 (no PF_KTHREAD in its stat).
        fake.process(41, &[b"/tmp/evil"], &[(41, b"vhost-40")]);
        // A real vhost worker of a QEMU that is not running any more.
        fake.process(42, &[], &[(42, b"vhost-99")]);
        fs::write(
            fake.path().join("42/stat"),
            "42 (vhost-99) S 2 0 0 0 -1 2129984 0",
        )
        .unwrap();
        // A program called qemu-system-something that is not QEMU (a shell script).
        fake.process(
            43,
            &[b"/bin/sh", b"/usr/local/bin/qemu-system-wrap"],
            &[(43, b"qemu-system-wra")],
        );
        // Non-pid entries of /proc.
        fs::create_dir_all(fake.path().join("self")).unwrap();
        fs::write(fake.path().join("uptime"), "1.0 1.0\n").unwrap();

        let vms = ProcScanner::new(fake.path(), trust()).scan().unwrap().vms();
        assert_eq!(vms.len(), 1);
        assert_eq!(kinds(&vms[0]), vec![(40, ThreadKind::Emulator)]);
    }

    #[test]
    fn missing_proc_root_is_an_error() {
        let err = ProcScanner::new(PathBuf::from("/nonexistent/proc"), trust())
            .scan()
            .unwrap_err();
        assert_eq!(err.to_string(), "list /nonexistent/proc");
    }
}
