//! `optimus guest`: the agent inside a VM. No eBPF, no libvirt, no root beyond reading
//! NVML. In: the host agent's figures for this VM over the virtio-serial port
//! `org.optimus.agent.0` ([`port`]), NVML readings of passthrough GPUs ([`gpu`]) and phase
//! lines from the tenant's jobs ([`phase`]). Out: those readings and phases to the host, and
//! the VM's own figures on `127.0.0.1:9947/metrics` under the host agent's metric names
//! ([`metrics`]). The wire format is [`crate::channel::protocol`].

pub mod gpu;
pub mod metrics;
pub mod phase;
pub mod port;

use std::io::{Read as _, Write as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::channel::protocol::{decode, encode, GuestMessage, HostMessage, MAX_LINE_BYTES};
use crate::cli::{GuestArgs, GuestCommand};
use crate::phase::{LineSplitter, Piece};
use crate::sampler::Snapshot;
use metrics::GuestView;

/// Lines waiting for the port; a host that does not read makes the newest ones drop.
const QUEUE: usize = 64;
/// Figures older than this many host intervals make the view stale.
const FRESH_INTERVALS: f64 = 5.0;

/// `optimus guest [phase ...]`.
pub fn main(args: &GuestArgs) -> ExitCode {
    let result = match &args.command {
        Some(GuestCommand::Phase { phase, phase_path }) => {
            let path = phase_path.clone().unwrap_or_else(|| {
                std::env::var_os("OPTIMUS_PHASE")
                    .map_or_else(|| phase::DEFAULT_PHASE_PATH.into(), Into::into)
            });
            send_phase(&path, phase)
        }
        None => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn send_phase(path: &std::path::Path, words: &[String]) -> anyhow::Result<()> {
    let mark = crate::phase::parse_words(words)
        .map_err(|e| anyhow::anyhow!("bad phase: {e}"))?
        .context("bad phase: give NAME [key=value ...] or -")?;
    phase::send(path, &crate::phase::format_mark(&mark))?;
    Ok(())
}

/// The SMBIOS system UUID QEMU gives the guest (the VM's UUID), lowercase.
fn own_uuid() -> Option<String> {
    let text = std::fs::read_to_string("/sys/class/dmi/id/product_uuid").ok()?;
    crate::discovery::cmdline::normalize_uuid(text.trim())
}

fn queue(tx: &SyncSender<Vec<u8>>, message: &GuestMessage) {
    if let Ok(line) = encode(message) {
        // Full: the host is not reading; this message is dropped.
        let _ = tx.try_send(line);
    }
}

struct State {
    view: GuestView,
    received_at: Option<Instant>,
    shared: crate::sampler::SharedSnapshot,
}

impl State {
    fn publish(&mut self) {
        let interval = self
            .view
            .figures
            .as_ref()
            .map_or(1.0, |f| f.interval_seconds.max(0.01));
        self.view.fresh = self
            .received_at
            .is_some_and(|t| t.elapsed().as_secs_f64() <= FRESH_INTERVALS * interval);
        let snapshot = Snapshot {
            guest_view: Some(self.view.clone()),
            ..Snapshot::default()
        };
        match self.shared.write() {
            Ok(mut g) => *g = Arc::new(snapshot),
            Err(p) => *p.into_inner() = Arc::new(snapshot),
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run(args: &GuestArgs) -> anyhow::Result<()> {
    let path = port::resolve(
        &args.port,
        std::path::Path::new("/sys"),
        std::path::Path::new("/dev"),
    )?;
    let (port_rx, port_tx) = port::open(&path)?;
    let vm_uuid = own_uuid();
    let session = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
    let hello = GuestMessage::Hello {
        agent: format!("optimus {} session={session}", env!("CARGO_PKG_VERSION")),
        vm_uuid: vm_uuid.clone(),
    };
    let gpus = if args.no_nvml {
        None
    } else {
        match gpu::Gpus::open(args.nvml_library.as_deref()) {
            Ok(g) => {
                log::info!("NVML: {} GPU(s) in this VM", g.len());
                Some(g)
            }
            Err(e) => {
                log::info!("no GPU readings (NVML: {e}); phases and figures only");
                None
            }
        }
    };
    let fifo = phase::PhaseFifo::create(&args.phase_path)?;
    log::info!(
        "guest channel {}; phase marks: export OPTIMUS_PHASE={}",
        path.display(),
        args.phase_path.display()
    );

    let shared = Arc::new(RwLock::new(Arc::new(Snapshot::default())));
    let state = Arc::new(Mutex::new(State {
        view: GuestView::default(),
        received_at: None,
        shared: shared.clone(),
    }));
    lock(&state).publish();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
    // Only the newest GPU reading is worth sending (the counters are cumulative): after a
    // stall the host gets one message, not a backlog.
    let latest_gpu: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    {
        let latest = latest_gpu.clone();
        spawn("optimus-guest-tx", move || {
            write_port(port_tx, &rx, &latest)
        })?;
    }
    queue(&tx, &hello);
    {
        let (tx, state, stop) = (tx.clone(), state.clone(), stop.clone());
        let hello = hello.clone();
        spawn("optimus-guest-rx", move || {
            read_port(port_rx, &tx, &hello, &state, &stop)
        })?;
    }
    {
        let (tx, reader, uuid) = (tx.clone(), fifo.reader()?, vm_uuid.clone());
        spawn("optimus-guest-phase", move || {
            read_phases(reader, &tx, uuid.as_ref())
        })?;
    }
    if let Some(mut gpus) = gpus.filter(|g| !g.is_empty()) {
        let (tx, state, stop, every) = (tx.clone(), state.clone(), stop.clone(), args.interval);
        spawn("optimus-guest-gpu", move || {
            while !stop.load(Ordering::Relaxed) {
                let readings = gpus.read();
                let message = GuestMessage::Gpu {
                    vm_uuid: vm_uuid.clone(),
                    gpus: readings.clone(),
                };
                if let Ok(line) = encode(&message) {
                    *latest_gpu
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(line);
                    // An empty line wakes the writer to send the newest reading.
                    let _ = tx.try_send(Vec::new());
                }
                let mut s = lock(&state);
                s.view.gpus = readings;
                s.publish();
                drop(s);
                std::thread::sleep(every);
            }
        })?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let listener = crate::http::bind(args.listen)
            .await
            .map_err(anyhow::Error::msg)?;
        log::info!(
            "serving this VM's figures on http://{}/metrics",
            args.listen
        );
        let app = crate::http::routes::AppState {
            snapshot: shared,
            history: Arc::new(crate::web::History::new()),
        };
        let server = tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::Security::none(),
            crate::http::ServeOptions {
                max_connections: 32,
            },
        ));
        let _ = tokio::signal::ctrl_c().await;
        server.abort();
        anyhow::Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    drop(fifo);
    result
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .with_context(|| format!("starting thread {name}"))?;
    Ok(())
}

/// Writes queued lines to the port. A write blocks while the host is not connected
/// (virtio_console); only this thread waits, and the queue in front of it drops.
fn write_port(
    mut port: std::fs::File,
    rx: &Receiver<Vec<u8>>,
    latest_gpu: &Mutex<Option<Vec<u8>>>,
) {
    for line in rx {
        let gpu = latest_gpu
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        for l in [Some(line), gpu]
            .into_iter()
            .flatten()
            .filter(|l| !l.is_empty())
        {
            if let Err(e) = port.write_all(&l) {
                log::debug!("writing to the guest channel: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Reads the host's lines: figures update the view, a hello is answered with ours. A read
/// of 0 bytes means the host is not connected (virtio_console): try again shortly.
fn read_port(
    mut port: std::fs::File,
    tx: &SyncSender<Vec<u8>>,
    hello: &GuestMessage,
    state: &Mutex<State>,
    stop: &AtomicBool,
) {
    let mut lines = LineSplitter::with_limit(MAX_LINE_BYTES);
    let mut buf = vec![0u8; 16 * 1024];
    let mut pieces = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = match port.read(&mut buf) {
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("reading the guest channel: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        lines.feed(&buf[..n], &mut pieces);
        for p in pieces.drain(..) {
            let Piece::Line(l) = p else { continue };
            match decode::<HostMessage>(&l) {
                Ok(HostMessage::Hello { agent }) => {
                    log::info!("host agent {agent:?} connected");
                    queue(tx, hello);
                }
                Ok(HostMessage::Figures(f)) => {
                    let mut s = lock(state);
                    s.view.figures = Some(*f);
                    s.received_at = Some(Instant::now());
                    s.publish();
                }
                Err(kind) => log::debug!("a line from the host was refused: {kind}"),
            }
        }
    }
}

/// Forwards valid phase lines from the FIFO to the host; a bad one gets one warning.
fn read_phases(mut fifo: std::fs::File, tx: &SyncSender<Vec<u8>>, vm_uuid: Option<&String>) {
    let mut lines = LineSplitter::default();
    let mut buf = [0u8; 4096];
    let mut pieces = Vec::new();
    loop {
        let n = match fifo.read(&mut buf) {
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("reading the phase FIFO: {e}; phase marks stop");
                return;
            }
        };
        lines.feed(&buf[..n], &mut pieces);
        for p in pieces.drain(..) {
            match p.parse() {
                Ok(Some(_)) => {
                    let Piece::Line(l) = &p else { continue };
                    let line = String::from_utf8_lossy(l).trim().to_owned();
                    log::info!("phase {line}");
                    queue(
                        tx,
                        &GuestMessage::Phase {
                            vm_uuid: vm_uuid.cloned(),
                            line,
                        },
                    );
                }
                Ok(None) => {}
                Err((q, e)) => log::warn!("bad phase line {q}: {e}"),
            }
        }
    }
}
