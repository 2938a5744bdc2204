//! VM discovery: which QEMU processes run on this host, which VM each one is, and which of
//! its threads do what (vCPU, emulator, I/O thread, vhost worker).
//!
//! Two sources: libvirt (through the `virt` crate) names the VMs it manages; every
//! `qemu-system-*` / `qemu-kvm` process in /proc is found either way, and libvirt's domains
//! are matched to their process by UUID. Discovery holds no kernel state: the tracer is told
//! which thread ids to watch from what `scan` returns.
//!
//! [`Discovery::scan`] blocks: it reads procfs and, when a libvirt URI is set, makes libvirt
//! RPC calls. See [`procfs`] for what a scan costs.

pub mod cgroup;
pub mod cmdline;
pub mod libvirt;
pub mod procfs;
#[cfg(test)]
mod testutil;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::host::HostPaths;
use libvirt::LibvirtClient;
use procfs::ProcScanner;

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
}

impl ThreadKind {
    /// The `thread_kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            ThreadKind::Vcpu(_) => "vcpu",
            ThreadKind::Emulator => "emulator",
            ThreadKind::IoThread => "iothread",
            ThreadKind::Vhost => "vhost",
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
}

/// How long an unreachable libvirt is left alone before the next connection attempt.
pub const LIBVIRT_RETRY: Duration = Duration::from_secs(30);

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
    /// Domains libvirt last listed as running. Kept while libvirt is unreachable (only those
    /// still running per /proc), so a libvirt restart does not rename VMs or flip their source.
    domains: Vec<VmId>,
    /// Whether the last /proc scan failed, so the failure is logged once, not every scan.
    proc_failing: bool,
}

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
            procfs: ProcScanner::new(paths.proc),
            libvirt,
            domains: Vec::new(),
            proc_failing: false,
        };
        for event in discovery.refresh_libvirt(Instant::now()) {
            discovery.log(&event);
        }
        discovery
    }

    /// The VMs running now, sorted by [`VmId`] (then pid). A QEMU process whose `-uuid` is a
    /// running libvirt domain's gets libvirt's name and [`VmSource::Libvirt`]; any other gets
    /// its identity from its command line and [`VmSource::Proc`]. Never fails: an unreadable
    /// /proc yields no VMs (logged once), an unreachable libvirt yields /proc-only identities.
    ///
    /// Two processes can share an id (an incoming migration on the same host runs a second
    /// QEMU with the same UUID); both are returned.
    pub fn scan(&mut self) -> Vec<Vm> {
        self.scan_at(Instant::now())
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

    fn scan_at(&mut self, now: Instant) -> Vec<Vm> {
        // /proc before libvirt: libvirt marks a domain active before it starts its QEMU, so
        // every process seen here is already listed, and a starting VM does not show up
        // under its /proc identity for one scan.
        let mut vms = match self.procfs.scan() {
            Ok(vms) => {
                self.proc_failing = false;
                vms
            }
            Err(e) => {
                if !self.proc_failing {
                    log::warn!("cannot scan for QEMU processes: {}", error_chain(&e));
                }
                self.proc_failing = true;
                Vec::new()
            }
        };
        for event in self.refresh_libvirt(now) {
            self.log(&event);
        }
        if !matches!(self.libvirt, Libvirt::Connected(_)) {
            let running: HashSet<&str> = vms.iter().map(|vm| vm.id.uuid.as_str()).collect();
            self.domains.retain(|d| running.contains(d.uuid.as_str()));
        }
        join_libvirt(&mut vms, &self.domains);
        vms.sort_by(|a, b| a.id.cmp(&b.id).then(a.pid.cmp(&b.pid)));
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
                 (start libvirtd, or pass --libvirt-uri '' / --no-libvirt to go without it)",
                LIBVIRT_RETRY.as_secs()
            ),
            LibvirtEvent::Back => log::info!("libvirt at {uri} reachable again"),
            LibvirtEvent::Reconnected { cause } => {
                log::info!("libvirt at {uri}: connection lost ({cause}); reconnected")
            }
        }
    }
}

/// Gives each QEMU process whose UUID is one of libvirt's running domains that domain's name
/// and [`VmSource::Libvirt`]: libvirt is authoritative for identity.
fn join_libvirt(vms: &mut [Vm], domains: &[VmId]) {
    let name_of: HashMap<&str, &str> = domains
        .iter()
        .map(|d| (d.uuid.as_str(), d.name.as_str()))
        .collect();
    for vm in vms {
        if let Some(name) = name_of.get(vm.id.uuid.as_str()) {
            (*name).clone_into(&mut vm.id.name);
            vm.source = VmSource::Libvirt;
        }
    }
}

/// `error: cause: cause...`, for a log line.
fn error_chain(e: &dyn std::error::Error) -> String {
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
    use super::testutil::{fixture_proc, FakeProc};
    use super::*;
    use std::path::PathBuf;

    const TEST_URI: &str = "test:///default";
    /// The UUID of the test driver's `test` domain, also pid 1000's `-uuid` in the fixture.
    const TEST_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    const UNREACHABLE_URI: &str = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";

    fn paths(proc: PathBuf) -> HostPaths {
        HostPaths {
            proc,
            ..HostPaths::default()
        }
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
            let mut discovery = Discovery::new(paths(fixture_proc()), uri);
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
        let mut discovery = Discovery::new(paths(fixture_proc()), Some(TEST_URI.into()));
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
        let mut discovery = Discovery::new(paths(fixture_proc()), Some(UNREACHABLE_URI.into()));
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
        let mut discovery = Discovery::new(paths(fake.path()), None);
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
        assert_eq!(summary(&discovery.scan_at(t0))[0].2, VmSource::Proc);

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
        let vms = discovery.scan_at(t0 + LIBVIRT_RETRY);
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
        let mut discovery = Discovery::new(paths(fixture_proc()), None);
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
        let mut discovery = Discovery::new(paths(fake.path()), Some(TEST_URI.into()));
        let t0 = Instant::now();
        assert_eq!(summary(&discovery.scan_at(t0))[0].0, "test");

        discovery.libvirt = Libvirt::Unreachable {
            uri: UNREACHABLE_URI.into(),
            cause: String::new(),
            last_attempt: Some(t0),
            warned: true,
            lost_connection: true,
        };
        // Still running: keeps libvirt's identity.
        let vms = discovery.scan_at(t0);
        assert_eq!(
            summary(&vms)[0],
            ("test".into(), TEST_UUID.into(), VmSource::Libvirt, 7)
        );
        // Gone from /proc: forgotten, so a later process with that UUID is not named by a
        // stale libvirt answer.
        fake.remove_process(7);
        assert_eq!(discovery.scan_at(t0), vec![]);
        assert_eq!(discovery.libvirt_domains(), &[]);
        fake.process(7, &qemu(TEST_UUID.as_bytes()), &[(7, b"qemu-system-x86")]);
        assert_eq!(summary(&discovery.scan_at(t0))[0].2, VmSource::Proc);
    }

    #[test]
    fn unreadable_proc_gives_no_vms() {
        let mut discovery = Discovery::new(paths(PathBuf::from("/nonexistent/proc")), None);
        assert_eq!(discovery.scan(), vec![]);
        assert!(discovery.proc_failing);
        assert_eq!(discovery.scan(), vec![]);
    }

    #[test]
    fn discovery_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Discovery>();
    }
}
