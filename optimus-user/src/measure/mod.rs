//! `optimus measure [OPTIONS] -- CMD [ARGS...]`: runs CMD, follows its whole process tree
//! in the kernel ([`tree`]), reads the tree's counters and the energy meters at every phase
//! boundary (lines on `$OPTIMUS_PHASE`, [`fifo`]) and every second, splits energy the way
//! the agent splits it between VMs ([`account`]), and reports by phase ([`report`]).
//! In: a command line and meter/carbon flags. Out: a table on stderr, `--json`, `--csv`,
//! and CMD's exit status.

pub mod account;
pub mod child;
pub mod fifo;
pub mod report;
pub mod tree;

use std::fs::File;
use std::io::{Seek as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::carbon::{CarbonConfig, CarbonSource};
use crate::cli::MeasureArgs;
use crate::energy::{EnergyMeters, EnergySample};
use crate::phase::{self, LineSplitter, Mark, PhaseLedger, Piece, Switched};
use account::{Accountant, CarbonRate};
use report::{CarbonNote, Exit, Report};
use tree::{TreeReading, TreeTracer};

/// How often counters and meters are read between boundaries (keeps 32-bit RAPL counters
/// far from wrapping unseen).
const TICK: Duration = Duration::from_secs(1);
/// Occurrences kept for `--json`/`--csv`; older ones stay in the per-phase totals.
const HISTORY: usize = 10_000;
/// Bad phase lines quoted on stderr before they are only counted.
const MAX_WARNINGS: u64 = 20;
/// How long to wait for a carbon API's first intensity before starting the command.
const CARBON_WAIT: Duration = Duration::from_secs(5);

/// Exit status when measure itself fails (as `env`, `timeout`, `nice` do).
const EXIT_MEASURE_FAILED: u8 = 125;
/// Exit status of a usage error (clap's).
const EXIT_USAGE: u8 = 2;

/// Runs `optimus measure`; every failure of its own ends as one `error:` line.
pub fn main(args: &MeasureArgs) -> ExitCode {
    // The meters' start-up notes are for an agent's log; here the table says it all.
    if std::env::var_os("RUST_LOG").is_none() && log::max_level() == log::LevelFilter::Info {
        log::set_max_level(log::LevelFilter::Warn);
    }
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, message }) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

struct Failure {
    code: u8,
    message: String,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_MEASURE_FAILED,
        message: message.into(),
    }
}

/// An output file opened (and so checked) before the command starts, written at the end.
struct Output {
    path: PathBuf,
    file: File,
}

impl Output {
    fn open(flag: &str, path: &Path, owner: Option<(u32, u32)>) -> Result<Self, Failure> {
        let existed = path.exists();
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| {
                fail(format!(
                    "cannot write {flag} {}: {e}; choose a writable path (nothing was run)",
                    path.display()
                ))
            })?;
        if let (false, Some((uid, gid))) = (existed, owner) {
            // The results belong to whoever ran sudo, like the command's own files.
            let _ = std::os::unix::fs::fchown(&file, Some(uid), Some(gid));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(mut self, text: &str) -> std::io::Result<PathBuf> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()?;
        Ok(self.path)
    }
}

fn run(args: &MeasureArgs) -> Result<u8, Failure> {
    let argv = &args.command;
    if argv.first().is_none_or(|c| c.is_empty()) {
        return Err(Failure {
            code: EXIT_USAGE,
            message:
                "empty command: give it after `--`, e.g. `optimus measure -- python3 train.py`"
                    .into(),
        });
    }
    let command: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // Settings first: a typo costs nothing, before anything is loaded or run.
    args.energy.validate().map_err(fail)?;
    args.carbon.validate().map_err(fail)?;
    let pue = crate::carbon::check_pue(args.carbon.pue())
        .map_err(|e| fail(format!("{e}: pass --pue between 1.0 and 10")))?;
    let carbon_cfg = args.carbon.config();
    carbon_cfg
        .validate()
        .map_err(|e| fail(format!("{e}: fix the carbon intensity flags")))?;
    let run_as = if args.as_root {
        None
    } else {
        child::invoking_user().map_err(fail)?
    };
    let owner = run_as.as_ref().map(|u| (u.uid, u.gid));
    let json_out = args
        .json
        .as_deref()
        .map(|p| Output::open("--json", p, owner))
        .transpose()?;
    let csv_out = args
        .csv
        .as_deref()
        .map(|p| Output::open("--csv", p, owner))
        .transpose()?;
    let signals =
        Signals::block().map_err(|e| fail(format!("cannot set up signal handling: {e}")))?;

    // The meters' default roots (`optimus run`'s): measure has no host-root flags.
    let host = crate::cli::RunArgs::default().host;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::privileges::effective_caps(&s))
        .unwrap_or(0);
    if euid != 0 && !crate::privileges::can_trace(caps) {
        return Err(fail(
            "optimus measure needs root (or CAP_BPF + CAP_PERFMON) to load its eBPF programs: run it with sudo (the command still runs as you)",
        ));
    }
    let mut tracer = TreeTracer::load(&host.sys_root.join("kernel/btf/vmlinux"))
        .map_err(|e| fail(format!("starting the eBPF tracer: {}", chain(&e))))?;
    // Loading parsed the kernel's BTF (megabytes): give the freed heap back.
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    unsafe { libc::malloc_trim(0) };
    if let Err(why) = tracer.block_io() {
        eprintln!("optimus measure: warning: block I/O not counted: {why}");
    }
    let mut meters = EnergyMeters::open(&args.energy.config(&host));
    let ncpus = aya::util::nr_cpus().unwrap_or(1);
    let cpu_package = crate::energy::package_of_cpus(&host.sys_root, ncpus);
    let carbon = start_carbon(carbon_cfg)?;
    let fifo = fifo::PhaseFifo::create(&std::env::temp_dir(), owner).map_err(|e| {
        fail(format!(
            "cannot create the phase FIFO in {}: {e}; set TMPDIR to a writable directory",
            std::env::temp_dir().display()
        ))
    })?;

    // The baseline: meters and counters as the command starts.
    meters.sample();
    let base = tracer
        .read()
        .map_err(|e| fail(format!("reading the eBPF counters: {}", chain(&e))))?;
    let start_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    // SAFETY: gettid has no preconditions.
    let me = u32::try_from(unsafe { libc::gettid() }).unwrap_or(0);
    tracer
        .seed(me)
        .map_err(|e| fail(format!("seeding the process tree: {}", chain(&e))))?;
    let spawned = child::command(argv, fifo.path(), run_as.as_ref()).spawn();
    tracer.unseed(me);
    let mut proc = match spawned {
        Ok(c) => c,
        Err(e) => {
            let (code, what) = match e.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found".to_owned()),
                std::io::ErrorKind::PermissionDenied => (126, "permission denied".to_owned()),
                _ => (126, e.to_string()),
            };
            return Err(Failure {
                code,
                message: format!("cannot run `{}`: {what}", command[0]),
            });
        }
    };
    let pid = proc.id();
    let pidfd = pidfd_open(pid).map_err(|e| fail(format!("pidfd_open({pid}): {e}")))?;

    let mut m = Measurement {
        tracer,
        meters,
        carbon: carbon.map(|c| (c, pue)),
        acc: Accountant::new(&base, cpu_package, args.idle_policy),
        ledger: PhaseLedger::new(base.at_ns, phase::Usage::default(), HISTORY),
        bad_lines: 0,
        read_errors: 0,
        saw_intensity: None,
    };
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut next_tick = Instant::now() + TICK;
    loop {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        let ready = poll3(fifo.raw_fd(), pidfd.as_raw_fd(), signals.raw_fd(), timeout);
        if ready.signal {
            signals.forward(pid);
        }
        if ready.fifo {
            m.drain(&fifo, &mut splitter, &mut buf);
        }
        if ready.exited {
            break;
        }
        if Instant::now() >= next_tick {
            m.sample();
            next_tick += TICK;
        }
    }
    let status = proc
        .wait()
        .map_err(|e| fail(format!("waiting for the command: {e}")))?;
    // Lines written just before the end still count.
    m.drain(&fifo, &mut splitter, &mut buf);
    if let Some(piece) = splitter.finish() {
        m.apply(vec![piece]);
    }
    let end = m.sample();
    let exit = match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(n)) => Exit::Signal(n),
        (None, None) => Exit::Code(1),
    };
    let report = m.report(command, exit, start_unix_s, &base, end.as_ref());
    eprint!("{}", report.table());
    if let Some(dropped) = end.as_ref().map(|r| r.dropped).filter(|&d| d > 0) {
        eprintln!(
            "optimus measure: warning: {dropped} threads of the command could not be followed (more than {} alive at once): their CPU time and I/O are missing",
            optimus_common::MAX_MEASURED_THREADS
        );
    }
    if m.bad_lines > MAX_WARNINGS {
        eprintln!(
            "optimus measure: warning: {} bad phase lines ignored in all",
            m.bad_lines
        );
    }
    let mut failed = false;
    for (out, text) in [
        (
            json_out,
            serde_json::to_string_pretty(&report.json()).unwrap_or_default() + "\n",
        ),
        (csv_out, report.csv()),
    ] {
        if let Some(out) = out {
            let path = out.path.clone();
            if let Err(e) = out.write(&text) {
                eprintln!("error: cannot write {}: {e}", path.display());
                failed = true;
            }
        }
    }
    let code = u8::try_from(exit.code() & 0xff).unwrap_or(EXIT_MEASURE_FAILED);
    Ok(if failed && code == 0 {
        EXIT_MEASURE_FAILED
    } else {
        code
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    crate::energy::describe(e)
}

fn start_carbon(cfg: CarbonConfig) -> Result<Option<CarbonSource>, Failure> {
    if cfg == CarbonConfig::None {
        return Ok(None);
    }
    let api = !matches!(cfg, CarbonConfig::Static { .. });
    let source = CarbonSource::start(
        cfg,
        crate::carbon::DEFAULT_REFRESH,
        crate::carbon::DEFAULT_TIMEOUT,
    )
    .map_err(|e| fail(format!("configuring the carbon intensity source: {e}")))?;
    if api {
        let deadline = Instant::now() + CARBON_WAIT;
        while source.current().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if source.current().is_none() {
            eprintln!(
                "optimus measure: warning: no carbon intensity after {CARBON_WAIT:?}; starting anyway (grams cover only the time after it arrives)"
            );
        }
    }
    Ok(Some(source))
}

/// The state of one run between boundaries.
struct Measurement {
    tracer: TreeTracer,
    meters: EnergyMeters,
    carbon: Option<(CarbonSource, f64)>,
    acc: Accountant,
    ledger: PhaseLedger,
    bad_lines: u64,
    read_errors: u64,
    /// The last intensity seen (source, g/kWh).
    saw_intensity: Option<(&'static str, f64)>,
}

impl Measurement {
    /// Reads counters and meters now and folds them into the phase in progress. Returns
    /// the reading (`None` if the tracer could not be read).
    fn sample(&mut self) -> Option<TreeReading> {
        let reading = match self.tracer.read() {
            Ok(r) => r,
            Err(e) => {
                self.read_errors += 1;
                if self.read_errors == 1 {
                    eprintln!(
                        "optimus measure: warning: cannot read the eBPF counters: {}",
                        chain(&e)
                    );
                }
                return None;
            }
        };
        let energy: EnergySample = self.meters.sample();
        let gpu_pids: Vec<u32> = energy
            .gpu_processes
            .iter()
            .map(|p| p.pid)
            .filter(|&p| self.tracer.contains(p))
            .collect();
        let rate = self.carbon.as_ref().and_then(|(source, pue)| {
            let i = source.current()?;
            Some((
                i.source,
                CarbonRate {
                    g_per_kwh: i.g_per_kwh,
                    pue: *pue,
                },
            ))
        });
        if let Some((source, r)) = rate {
            self.saw_intensity = Some((source, r.g_per_kwh));
        }
        let usage = self
            .acc
            .step(&reading, &energy, &gpu_pids, rate.map(|(_, r)| r));
        self.ledger.observe(reading.at_ns, usage);
        Some(reading)
    }

    /// Reads everything the FIFO holds and applies its lines.
    fn drain(&mut self, fifo: &fifo::PhaseFifo, splitter: &mut LineSplitter, buf: &mut [u8]) {
        let mut pieces = Vec::new();
        loop {
            match fifo.read(buf) {
                Ok(0) => break,
                Ok(n) => splitter.feed(&buf[..n], &mut pieces),
                Err(e) => {
                    eprintln!("optimus measure: warning: reading the phase FIFO: {e}");
                    break;
                }
            }
            // Bounded work per wake-up: a flood is applied in batches.
            if pieces.len() >= 4096 {
                break;
            }
        }
        self.apply(pieces);
    }

    /// Applies lines that arrived together: one boundary reading for all of them.
    fn apply(&mut self, pieces: Vec<Piece>) {
        let mut marks: Vec<Mark> = Vec::new();
        for piece in &pieces {
            match piece.parse() {
                Ok(Some(mark)) => marks.push(mark),
                Ok(None) => {}
                Err((quoted, why)) => {
                    self.bad_lines += 1;
                    if self.bad_lines <= MAX_WARNINGS {
                        eprintln!("optimus measure: warning: ignored phase line {quoted}: {why}");
                    }
                    if self.bad_lines == MAX_WARNINGS {
                        eprintln!(
                            "optimus measure: warning: more bad phase lines are counted, not shown"
                        );
                    }
                }
            }
        }
        if marks.is_empty() {
            return;
        }
        let Some(reading) = self.sample() else {
            return;
        };
        for mark in marks {
            if self.ledger.switch(reading.at_ns, mark) == Switched::Overflow {
                eprintln!(
                    "optimus measure: warning: more than {} phase names; further new names count as `{}`",
                    phase::MAX_NAMES,
                    phase::OTHER
                );
            }
        }
    }

    fn report(
        &self,
        command: Vec<String>,
        exit: Exit,
        start_unix_s: f64,
        base: &TreeReading,
        end: Option<&TreeReading>,
    ) -> Report {
        let end_ns = end.map_or(self.ledger.current().end_ns, |r| r.at_ns);
        let mut occurrences: Vec<phase::Occurrence> =
            self.ledger.history().iter().cloned().collect();
        occurrences.push(self.ledger.current().clone());
        let carbon = self
            .carbon
            .as_ref()
            .zip(self.saw_intensity)
            .map(|((_, pue), (source, g))| CarbonNote {
                source,
                g_per_kwh: g,
                pue: *pue,
            });
        if carbon.is_some() && self.acc.uncovered_carbon_joules() > 0.0 {
            eprintln!(
                "optimus measure: warning: {:.3} J were spent before the carbon intensity was known and have no grams",
                self.acc.uncovered_carbon_joules()
            );
        }
        Report {
            command,
            exit,
            start_unix_s,
            origin_ns: base.at_ns,
            wall_ns: end_ns.saturating_sub(base.at_ns),
            total: self.ledger.total().usage,
            node_uj: self.acc.node_uj().clone(),
            carbon,
            occurrences,
            dropped: self.ledger.dropped(),
            totals: self.ledger.totals(),
            run_id: uuid4(),
        }
    }
}

/// A random (version 4) UUID, CodeCarbon's `run_id`.
fn uuid4() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into the array we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        // Unique enough without entropy: time and pid.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[derive(Default)]
struct Ready {
    fifo: bool,
    exited: bool,
    signal: bool,
}

fn poll3(fifo: i32, pidfd: i32, sigfd: i32, timeout: Duration) -> Ready {
    let mut fds = [fifo, pidfd, sigfd].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(1000);
    // SAFETY: poll reads and writes the array we own, of the length passed.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
    if n <= 0 {
        return Ready::default();
    }
    let hit = |i: usize| fds[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    Ready {
        fifo: hit(0),
        exited: hit(1),
        signal: hit(2),
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT, blocked and read from a signalfd: measure lives on
/// to print what it measured, and passes on to the command what the terminal did not
/// already send it.
struct Signals {
    fd: OwnedFd,
}

const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

impl Signals {
    fn block() -> std::io::Result<Self> {
        // SAFETY: sigset operations on a set we own; pthread_sigmask and signalfd read it.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            for s in FORWARDED {
                libc::sigaddset(&mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Reads pending signals; sends each to `pid` unless the kernel sent it to the whole
    /// foreground process group (a terminal's Ctrl-C, which the command got already).
    fn forward(&self, pid: u32) {
        loop {
            let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads one record into the struct we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
            if usize::try_from(n).ok() != Some(size) {
                return;
            }
            // SAFETY: fully written by the read above.
            let info = unsafe { info.assume_init() };
            let from_tty = info.ssi_code == libc::SI_KERNEL;
            let (Ok(signo), Ok(pid)) = (
                libc::c_int::try_from(info.ssi_signo),
                libc::pid_t::try_from(pid),
            ) else {
                continue;
            };
            if !from_tty {
                // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
                unsafe { libc::kill(pid, signo) };
            }
        }
    }
}
