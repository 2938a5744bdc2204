//! The host side of the guest channel: each VM's virtio-serial socket (found in its domain
//! XML or QEMU command line) in; accepted GPU energy claims, phase marks and error counts
//! out to the sampler, and each VM's own figures back to its guest. Wire format in
//! [`protocol`], trust rules in [`trust`].
//!
//! Nothing here can block the sampler: every VM has its own reader and writer threads
//! ([`conn`]), the sampler only locks a VM's counters for a moment and hands its figures to
//! a bounded queue with `try_send` (a full queue drops them). A VM without a channel, or
//! whose guest is silent, changes nothing else.

pub mod conn;
pub mod find;
pub mod probe;
pub mod protocol;
pub mod trust;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::PhaseRequest;
use crate::discovery::{Vm, VmId};
use crate::sampler::Snapshot;
use conn::{lock, Shared, VmContext};
use find::ChannelSpec;
use protocol::{encode, ErrorKind, Figures, HostMessage, ZoneFigure};

/// `--guest-gpu-max-watts` when not given.
pub const DEFAULT_MAX_GPU_WATTS: f64 = 1000.0;
/// How often a VM's definition is read again (a channel or GPU may be hot-plugged).
const REFRESH: Duration = Duration::from_secs(30);
/// Figures waiting for a VM's writer; more are dropped (a guest that does not read).
const QUEUE: usize = 4;

/// Settings of the host side.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Most average power a guest may claim per GPU, watts.
    pub max_gpu_watts: f64,
    /// Roots of procfs (QEMU command lines) and of `/run` (libvirt's status files).
    pub proc: PathBuf,
    pub run: PathBuf,
}

/// One VM's channel as exported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelStatus {
    /// Whether the agent is connected to the channel's socket now.
    pub connected: bool,
    /// Refused lines and claims by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Accepted messages by type.
    pub messages: BTreeMap<&'static str, u64>,
    /// Seconds since the guest's last accepted message; `None` before the first.
    pub last_message_age_s: Option<f64>,
    /// The guest agent's description from its hello.
    pub agent: Option<String>,
    /// The last accepted reading of each passthrough GPU, as the guest's NVML reported it,
    /// millijoules by device label.
    pub reported_mj: BTreeMap<String, u64>,
}

/// A live connection's handles; stopping it ends both threads within a poll period.
struct Link {
    socket: PathBuf,
    shared: Arc<Mutex<Shared>>,
    tx: SyncSender<Vec<u8>>,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let stream = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(s) = stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct VmChannel {
    spec: ChannelSpec,
    link: Option<Link>,
}

/// Every VM's channel.
pub struct Channels {
    config: ChannelConfig,
    epoch: Instant,
    phases: Option<Sender<PhaseRequest>>,
    all_phases: Arc<Mutex<conn::RateLimit>>,
    vms: HashMap<VmId, VmChannel>,
    /// When every VM's definition was last read again.
    refreshed_at: Option<Instant>,
    /// Each channel's state when its claims were last taken: a snapshot's counters and its
    /// charged energy describe the same messages.
    status: BTreeMap<VmId, ChannelStatus>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("vms", &self.vms.len())
            .finish_non_exhaustive()
    }
}

/// The channel of each VM: libvirt's record of it first (its status files read once for
/// all), then its QEMU command line.
pub fn specs_of<'a>(vms: &[&'a Vm], proc: &Path, run: &Path) -> Vec<(&'a Vm, ChannelSpec)> {
    let libvirt = vms
        .iter()
        .any(|vm| vm.source == crate::discovery::VmSource::Libvirt);
    let mut xml = if libvirt {
        find::status_dir_specs(run)
    } else {
        HashMap::new()
    };
    vms.iter()
        .map(|vm| {
            let from_xml = (vm.source == crate::discovery::VmSource::Libvirt)
                .then(|| xml.remove(&vm.id.uuid.to_ascii_lowercase()))
                .flatten()
                .filter(|s| s.socket.is_some());
            let spec = from_xml.unwrap_or_else(|| {
                std::fs::read(proc.join(vm.pid.to_string()).join("cmdline"))
                    .map(|raw| find::from_cmdline(&raw))
                    .unwrap_or_default()
            });
            (*vm, spec)
        })
        .collect()
}

impl Channels {
    /// Phase marks of guests go to `phases` (the sampler's request queue).
    pub fn new(config: ChannelConfig, phases: Option<Sender<PhaseRequest>>) -> Self {
        Self {
            config,
            epoch: Instant::now(),
            phases,
            all_phases: Arc::new(Mutex::new(conn::RateLimit::new(
                conn::MAX_PHASES_PER_SECOND_ALL,
            ))),
            vms: HashMap::new(),
            refreshed_at: None,
            status: BTreeMap::new(),
        }
    }

    /// Follows the VMs of a scan: channels of new VMs are looked up and connected, those of
    /// VMs that are gone closed; every [`REFRESH`] all are looked up again.
    pub fn sync(&mut self, vms: &[Vm]) {
        // A set, not a scan of `vms` per channel: quadratic at a thousand VMs.
        let live: std::collections::HashSet<&VmId> = vms.iter().map(|vm| &vm.id).collect();
        self.vms.retain(|id, _| live.contains(id));
        let all = self.refreshed_at.is_none_or(|t| t.elapsed() >= REFRESH);
        let todo: Vec<&Vm> = vms
            .iter()
            .filter(|vm| all || !self.vms.contains_key(&vm.id))
            .collect();
        if all {
            self.refreshed_at = Some(Instant::now());
        }
        if todo.is_empty() {
            return;
        }
        for (vm, spec) in specs_of(&todo, &self.config.proc, &self.config.run) {
            let keep = self.vms.get(&vm.id).is_some_and(|c| {
                // A status file caught mid-rewrite reads as no channel: a socket that is
                // still there keeps its connection (and its counters).
                c.spec == spec
                    || (spec.socket.is_none() && c.spec.socket.as_ref().is_some_and(|p| p.exists()))
            });
            if keep {
                continue;
            }
            let link = spec
                .socket
                .as_ref()
                .and_then(|socket| self.connect(vm, socket, &spec));
            // Replacing the entry drops (stops) an old link to a changed channel.
            self.vms.insert(vm.id.clone(), VmChannel { spec, link });
        }
    }

    fn connect(&self, vm: &Vm, socket: &Path, spec: &ChannelSpec) -> Option<Link> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(None));
        let (tx, rx) = sync_channel(QUEUE);
        let ctx = VmContext {
            uuid: vm.id.uuid.clone(),
            gpus: spec.gpus.clone(),
            max_gpu_watts: self.config.max_gpu_watts,
            phases: self.phases.clone(),
            epoch: self.epoch,
            all_phases: self.all_phases.clone(),
        };
        let hello = encode(&HostMessage::Hello {
            agent: format!("optimus {}", env!("CARGO_PKG_VERSION")),
        })
        .ok()?;
        let started = {
            let (socket, shared, current, stop) = (
                socket.to_path_buf(),
                shared.clone(),
                current.clone(),
                stop.clone(),
            );
            std::thread::Builder::new()
                .name("optimus-guest-rx".into())
                .spawn(move || conn::reader(socket, ctx, shared, current, hello, stop))
        }
        .and_then(|_| {
            let (current, stop) = (current.clone(), stop.clone());
            std::thread::Builder::new()
                .name("optimus-guest-tx".into())
                .spawn(move || conn::writer(rx, current, stop))
        });
        if let Err(e) = started {
            stop.store(true, Ordering::Relaxed);
            log::warn!(
                "cannot start the guest channel threads of VM {:?}: {e}",
                vm.id.name
            );
            return None;
        }
        log::info!(
            "VM {:?} has a guest channel at {} ({} passthrough GPU(s))",
            vm.id.name,
            socket.display(),
            spec.gpus.len()
        );
        Some(Link {
            socket: socket.to_path_buf(),
            shared,
            tx,
            stop,
            current,
        })
    }

    /// Accepted GPU energy since the last call: microjoules per VM and device. The
    /// channels' counters are read in the same moment (see [`Channels::status`]).
    pub fn take_gpu(&mut self) -> BTreeMap<VmId, BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        self.status.clear();
        for (id, c) in &self.vms {
            let Some(link) = &c.link else { continue };
            let mut s = lock(&link.shared);
            let taken = s.claims.take();
            if !taken.is_empty() {
                out.insert(id.clone(), taken);
            }
            self.status.insert(
                id.clone(),
                ChannelStatus {
                    connected: s.connected,
                    errors: s.errors.clone(),
                    messages: s.messages.clone(),
                    last_message_age_s: s.last_message.map(|t| t.elapsed().as_secs_f64()),
                    agent: s.agent.clone(),
                    reported_mj: s.claims.last_readings(),
                },
            );
        }
        out
    }

    /// Each channel's state (only VMs that have a channel) as of the last
    /// [`Channels::take_gpu`].
    pub fn status(&self) -> BTreeMap<VmId, ChannelStatus> {
        self.status.clone()
    }

    /// The socket of each VM's channel.
    pub fn sockets(&self) -> BTreeMap<VmId, PathBuf> {
        self.vms
            .iter()
            .filter_map(|(id, c)| Some((id.clone(), c.link.as_ref()?.socket.clone())))
            .collect()
    }

    /// Queues each connected VM's own figures from `snapshot` for its guest (never waits).
    pub fn send(&self, snapshot: &Snapshot, interval: Duration) {
        for (id, c) in &self.vms {
            let Some(link) = &c.link else { continue };
            if !lock(&link.shared).connected {
                continue;
            }
            let Some(figures) = figures(snapshot, id, interval) else {
                continue;
            };
            if let Ok(line) = encode(&HostMessage::Figures(Box::new(figures))) {
                // Full: the guest is not reading; these figures are dropped.
                let _ = link.tx.try_send(line);
            }
        }
    }
}

/// VM `id`'s own figures in `snapshot`; nothing of any other VM or of the host.
pub fn figures(snapshot: &Snapshot, id: &VmId, interval: Duration) -> Option<Figures> {
    let vm = snapshot.vms.iter().find(|v| &v.id == id)?;
    let energy = snapshot
        .energy
        .as_ref()
        .and_then(|e| e.vms.get(id))
        .map(|z| {
            z.iter()
                .map(|((zone, source), (joules, watts))| ZoneFigure {
                    zone: zone.label().to_owned(),
                    source: (*source).to_owned(),
                    joules: *joules,
                    watts: *watts,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Figures {
        interval: snapshot.agent.samples,
        interval_seconds: interval.as_secs_f64(),
        vm_name: id.name.clone(),
        vm_uuid: id.uuid.clone(),
        cpu_seconds: crate::sampler::cpu::KINDS
            .iter()
            .zip(vm.cpu_seconds_by_kind)
            .map(|(k, v)| ((*k).to_owned(), v))
            .collect(),
        vcpu_seconds: vm
            .vcpu_seconds
            .iter()
            .map(|(n, s)| (n.to_string(), *s))
            .collect(),
        energy,
        carbon_grams: snapshot
            .carbon
            .as_ref()
            .and_then(|c| c.vm_grams.get(id).copied()),
        phase: snapshot.phases.get(id).map(|l| l.current().name.clone()),
    })
}
