//! Fuzz entry points: arbitrary bytes in, the agent's real parsers of outside input called,
//! nothing out but a panic when one of them breaks. The cargo-fuzz targets under `fuzz/`
//! and the corpus replay test below call these same functions, so a reproducer found by
//! libFuzzer replays on stable in `cargo test`.
//!
//! Compiled for tests and behind the `fuzzing` feature only: the agent binary has none of it.
//! Each entry point also checks the properties its parser promises (a UUID is 36 lowercase
//! characters, a cgroup directory never leaves its mount, an intensity is in range), so a
//! fuzzer finds wrong answers as well as panics.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::discovery::{cgroup, cmdline, procfs, ThreadKind};
use crate::energy::{estimate, perf, powercap};
use crate::tracer::btf::Btf;

/// One fuzz target: its name (the cargo-fuzz binary and the corpus directory
/// `fuzz/corpus/<name>/`) and what it feeds the input to.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    /// Where the input comes from in the agent, for `cargo xtask fuzz` and the docs.
    pub what: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "qemu_cmdline",
        what: "/proc/<pid>/cmdline of a QEMU process (-name, -uuid, -m)",
        run: qemu_cmdline,
    },
    Target {
        name: "proc_comm",
        what: "/proc/<pid>/comm and task/<tid>/comm (QEMU thread names, vhost workers)",
        run: proc_comm,
    },
    Target {
        name: "proc_pid_stat",
        what: "/proc/<pid>/stat flags field (kernel thread or not)",
        run: proc_pid_stat,
    },
    Target {
        name: "proc_status",
        what: "/proc/self/status CapEff line",
        run: proc_status,
    },
    Target {
        name: "proc_stat",
        what: "/proc/stat per-CPU jiffies, two readings into the power estimate",
        run: proc_stat,
    },
    Target {
        name: "proc_cpuinfo",
        what: "/proc/cpuinfo CPU family detection",
        run: proc_cpuinfo,
    },
    Target {
        name: "proc_mountinfo",
        what: "/proc/self/mountinfo lines (memory cgroup mount)",
        run: proc_mountinfo,
    },
    Target {
        name: "proc_pid_cgroup",
        what: "/proc/<pid>/cgroup memory controller line and the directory it maps to",
        run: proc_pid_cgroup,
    },
    Target {
        name: "powercap_sysfs",
        what: "powercap zone names, energy_uj and max_energy_range_uj over several samples",
        run: powercap_sysfs,
    },
    Target {
        name: "perf_sysfs",
        what: "perf power PMU type, events/*, *.scale, *.unit and cpumask",
        run: perf_sysfs,
    },
    Target {
        name: "btf",
        what: "kernel BTF (/sys/kernel/btf/vmlinux) and the struct offsets looked up in it",
        run: btf,
    },
    Target {
        name: "carbon_json",
        what: "Electricity Maps and National Grid ESO API answers",
        run: carbon_json,
    },
    Target {
        name: "cli_values",
        what: "--interval style durations and --estimate-watts MIN,MAX",
        run: cli_values,
    },
    Target {
        name: "carbon_forecast",
        what: "National Grid ESO fw48h and Electricity Maps forecast answers",
        run: carbon_forecast,
    },
    Target {
        name: "proc_meminfo",
        what: "/proc/meminfo MemTotal and MemAvailable",
        run: proc_meminfo,
    },
    Target {
        name: "web_config",
        what: "--web.config.file YAML (exporter-toolkit), inline PEM certificates and keys",
        run: web_config,
    },
    Target {
        name: "http_request",
        what: "bytes a client sends to the agent's HTTP server (first byte: plain or basic auth)",
        run: http_request,
    },
    Target {
        name: "libvirt_status",
        what: "libvirt's domain status XML (<run>/libvirt/qemu/<name>.xml)",
        run: libvirt_status,
    },
    Target {
        name: "phase_line",
        what: "phase lines of `optimus measure` and `optimus phase` (NAME key=value, -)",
        run: phase_line,
    },
    Target {
        name: "control_request",
        what: "a request on the control socket, through its real connection handler",
        run: control_request,
    },
    Target {
        name: "qmp_answer",
        what: "what a QEMU's QMP monitor sends (greeting, replies, events) to query-cpus-fast",
        run: qmp_answer,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The raw bytes of a QEMU command line.
pub fn qemu_cmdline(data: &[u8]) {
    let _ = cmdline::split_argv(data).count();
    if let Some(args) = cmdline::parse_qemu_cmdline(data) {
        if let Some(uuid) = &args.uuid {
            assert_eq!(uuid.len(), 36, "{uuid:?}");
            assert_eq!(*uuid, uuid.to_ascii_lowercase());
        }
        assert_ne!(args.name.as_deref(), Some(""), "an empty name is no name");
    }
    let argv: Vec<&[u8]> = cmdline::split_argv(data).collect();
    let _ = crate::discovery::qmp::socket_of(&argv);
    let _ = cmdline::guest_from_name_opts(data);
    let text = String::from_utf8_lossy(data);
    let _ = cmdline::memory_size(&text);
    let _ = cmdline::normalize_uuid(&text);
}

/// A process or thread comm.
pub fn proc_comm(data: &[u8]) {
    let kind = procfs::classify_thread(data);
    if let ThreadKind::Vcpu(n) = kind {
        assert_eq!(procfs::vcpu_index(data), Some(n));
    }
    let _ = procfs::vhost_owner(data);
    let _ = procfs::looks_like_qemu(data);
    let _ = cmdline::is_qemu_binary(data);
}

/// A `/proc/<pid>/stat` text.
pub fn proc_pid_stat(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let flags = crate::host::stat_flags(&text);
    let kind = crate::host::process_kind_of_stat(&text);
    assert_eq!(flags.is_some(), kind.is_some(), "{text:?}");
}

/// A `/proc/<pid>/status` text.
pub fn proc_status(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(caps) = crate::privileges::effective_caps(&text) {
        let _ = crate::privileges::can_trace(caps);
    }
}

/// Two `/proc/stat` readings, NUL-separated, one second apart, into the power model.
pub fn proc_stat(data: &[u8]) {
    let mut halves = data.splitn(2, |&b| b == 0);
    let prev =
        estimate::parse_proc_stat(&String::from_utf8_lossy(halves.next().unwrap_or_default()));
    let now =
        estimate::parse_proc_stat(&String::from_utf8_lossy(halves.next().unwrap_or_default()));
    for t in now.values() {
        assert!(t.busy <= t.total, "{t:?}");
    }
    let packages: BTreeMap<u32, u32> = now.keys().map(|&cpu| (cpu, cpu % 2)).collect();
    let watts = estimate::CpuFamily::Unknown.ccf_watts();
    let _ = estimate::package_energy_uj(&prev, &now, &packages, watts, 1.0);
}

/// A `/proc/cpuinfo` text.
pub fn proc_cpuinfo(data: &[u8]) {
    let _ = estimate::CpuFamily::detect(&String::from_utf8_lossy(data)).ccf_watts();
}

/// A `/proc/self/mountinfo` text.
pub fn proc_mountinfo(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        if let Some(m) = cgroup::parse_mount(line) {
            let _ = cgroup::has_option(m.super_opts, b"memory");
            let _ = (m.root, m.mount_point, m.fstype);
        }
    }
    let _ = cgroup::lists_memory(&String::from_utf8_lossy(data));
}

/// A `/proc/<pid>/cgroup` text: the directory it leads to stays inside the mount.
pub fn proc_pid_cgroup(data: &[u8]) {
    for version in [cgroup::Version::V1, cgroup::Version::V2] {
        let Some(path) = cgroup::memory_cgroup_line(data, version) else {
            continue;
        };
        for root in ["/", "/machine"] {
            let mount = cgroup::MemoryMount {
                version,
                mount_point: PathBuf::from("/sys/fs/cgroup/memory"),
                root: PathBuf::from(root),
            };
            if let Ok(dir) = cgroup::cgroup_dir_in_mount(&mount, path) {
                assert!(dir.starts_with(&mount.mount_point), "{dir:?}");
                assert!(
                    dir.components().all(|c| !matches!(c, Component::ParentDir)),
                    "{dir:?} climbs out of the mount"
                );
            }
        }
    }
}

thread_local! {
    /// What the next reads of [`fake_read`] return, in order.
    static READS: RefCell<VecDeque<Vec<u8>>> = const { RefCell::new(VecDeque::new()) };
}

/// A sysfs whose file reads return the input's NUL-separated chunks in turn, whatever the
/// path: a chunk `!EACCES` fails as a root-only file does, `!ENOENT` as a vanished one, and
/// once the chunks run out every read fails with ENOENT. Directory listings stay real (the
/// fixture trees under `tests/fixtures`).
fn fake_read(_path: &Path) -> io::Result<String> {
    let chunk = READS.with(|r| r.borrow_mut().pop_front());
    match chunk.as_deref() {
        None | Some(b"!ENOENT") => Err(io::Error::from(io::ErrorKind::NotFound)),
        Some(b"!EACCES") => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
        // Like `fs::read_to_string`: invalid UTF-8 is an error.
        Some(bytes) => String::from_utf8(bytes.to_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
    }
}

fn load_reads(data: &[u8]) {
    READS.with(|r| {
        let mut r = r.borrow_mut();
        r.clear();
        r.extend(data.split(|&b| b == 0).map(<[u8]>::to_vec));
    });
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// Powercap files of a one-package AMD tree: zone names, ranges and counter values read in
/// turn by discovery, the baseline and up to eight samples.
pub fn powercap_sysfs(data: &[u8]) {
    let _ = powercap::parse_zone_dir_name(&String::from_utf8_lossy(data));
    load_reads(data);
    // One sample a second on a made-up clock: the glitch bound depends on the interval.
    let start = std::time::Instant::now();
    let (meter, _status) =
        powercap::PowercapMeter::open(&fixture("powercap/amd"), fake_read, None, start);
    if let Some(mut meter) = meter {
        for i in 1..=8 {
            let now = start + std::time::Duration::from_secs(i);
            for reading in meter.sample(now) {
                if let (Some(total), Some(delta)) = (reading.total_uj, reading.delta_uj) {
                    assert!(delta <= total, "{reading:?}");
                }
            }
        }
    }
}

/// The perf power PMU's sysfs files, read in turn (type, then per event its term, scale and
/// unit, then cpumask); the whole input as one event term and one CPU list too.
pub fn perf_sysfs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = perf::parse_event_term(&text);
    let _ = perf::parse_cpulist(&text);
    load_reads(data);
    if let Ok(Some(pmu)) = perf::parse_power_pmu(&fixture("perf/power"), fake_read) {
        for event in &pmu.events {
            assert!(event.scale.is_finite() && event.scale > 0.0, "{event:?}");
        }
    }
}

/// A BTF blob, and every offset the tracer looks up in it.
pub fn btf(data: &[u8]) {
    let Ok(btf) = Btf::parse(data.to_vec()) else {
        return;
    };
    let _ = btf.member_offset("task_struct", "pid");
    let _ = btf.member_offset("page", "compound_head");
    let _ = crate::tracer::block_offsets(&btf);
}

/// A carbon intensity API answer, for both providers.
pub fn carbon_json(data: &[u8]) {
    let in_range = |v: f64| v.is_finite() && (0.0..=5000.0).contains(&v);
    if let Ok(v) = crate::carbon::uk_grid::parse(data) {
        assert!(in_range(v), "{v}");
    }
    if let Ok(v) = crate::carbon::electricity_maps::parse(data, "DE") {
        assert!(in_range(v), "{v}");
    }
}

/// Command-line values.
pub fn cli_values(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = crate::cli::parse_duration(&text) {
        assert!(d.as_millis() >= 10 && d.as_secs() <= 3600, "{d:?}");
    }
    if let Ok((min, max)) = crate::cli::parse_watts(&text) {
        assert!(min <= max, "{min} {max}");
    }
}

/// A carbon intensity forecast answer, for both providers: periods come out sorted, in
/// range and non-empty.
pub fn carbon_forecast(data: &[u8]) {
    use crate::carbon::forecast;
    for periods in [
        forecast::parse_uk(data),
        forecast::parse_electricity_maps(data),
    ]
    .into_iter()
    .flatten()
    {
        assert!(!periods.is_empty());
        for p in &periods {
            assert!(p.end > p.start, "{p:?}");
            assert!(p.g_per_kwh.is_finite() && (0.0..=5000.0).contains(&p.g_per_kwh));
        }
        assert!(periods.windows(2).all(|w| w[0].start <= w[1].start));
        let now = periods[0].start;
        let _ = forecast::hourly(&periods, now);
    }
    let _ = forecast::parse_time(&String::from_utf8_lossy(data));
}

/// A `/proc/meminfo` text.
pub fn proc_meminfo(data: &[u8]) {
    let _ = crate::host::parse_meminfo(&String::from_utf8_lossy(data));
}

/// A web config file: parsed as `--web.config.file` is, then, when it holds inline PEM,
/// turned into the rustls configuration the server would use.
pub fn web_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = crate::http::config::WebConfig::parse(text, Path::new("/nonexistent")) else {
        return;
    };
    for user in cfg.users.keys() {
        assert!(!user.contains(':'), "{user:?}");
    }
    if let Some(tls) = &cfg.tls {
        let _ = crate::http::tls::server_config(tls);
    }
}

/// The thread (and tokio runtime) of the fuzzed HTTP servers, by name, so a panic in a
/// connection task is caught even where tokio would swallow it.
const HTTP_THREAD: &str = "optimus-fuzz-http";
/// Longest the server may take to answer one input, and then to close.
const HTTP_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
static HTTP_PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Two instances of the agent's real HTTP server (`http::serve`) on loopback: plain, and
/// with basic auth (user `prom`, password `s3cret`, bcrypt cost 4) and a configured header.
struct Servers {
    plain: std::net::SocketAddr,
    auth: std::net::SocketAddr,
}

fn servers() -> &'static Servers {
    static SERVERS: std::sync::OnceLock<Servers> = std::sync::OnceLock::new();
    SERVERS.get_or_init(start_servers)
}

#[expect(
    clippy::expect_used,
    reason = "setting up the harness: a failure here is a broken harness, not a finding"
)]
fn start_servers() -> Servers {
    use crate::http::{self, routes::AppState, Security, ServeOptions};
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(HTTP_THREAD) {
            HTTP_PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        previous(info);
    }));
    let hash = bcrypt::hash("s3cret", 4).expect("bcrypt hash");
    let config = std::env::temp_dir().join(format!("optimus-fuzz-web-{}.yml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "basic_auth_users:\n  prom: {hash}\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        ),
    )
    .expect("writing the web config");
    let auth = Security::from_file(&config).expect("the harness's web config");
    let _ = std::fs::remove_file(&config);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(HTTP_THREAD.to_owned())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(HTTP_THREAD)
                .build()
                .expect("a tokio runtime");
            rt.block_on(async move {
                let app = AppState {
                    snapshot: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(
                        crate::sampler::Snapshot::default(),
                    ))),
                    history: std::sync::Arc::new(crate::web::History::new()),
                };
                let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                let plain = http::bind(loopback).await.expect("binding loopback");
                let with_auth = http::bind(loopback).await.expect("binding loopback");
                let addrs = Servers {
                    plain: plain.local_addr().expect("local address"),
                    auth: with_auth.local_addr().expect("local address"),
                };
                let _ = tx.send(addrs);
                tokio::join!(
                    http::serve(
                        plain,
                        app.clone(),
                        Security::none(),
                        ServeOptions::default()
                    ),
                    http::serve(with_auth, app, auth, ServeOptions::default()),
                );
            });
        })
        .expect("spawning the server thread");
    rx.recv().expect("the servers' addresses")
}

/// Bytes a client sends on one connection to the real server (first byte, low bit: the
/// plain one or the one with basic auth). Whatever they are, the server answers HTTP/1.x
/// with a status below 500, or closes, within [`HTTP_REPLY_TIMEOUT`], without a panic.
#[expect(
    clippy::expect_used,
    reason = "a loopback connect failing is a broken harness, reported as such"
)]
pub fn http_request(data: &[u8]) {
    use std::io::{Read as _, Write as _};
    let Some((&selector, request)) = data.split_first() else {
        return;
    };
    let servers = servers();
    let addr = if selector & 1 == 0 {
        servers.plain
    } else {
        servers.auth
    };
    let mut conn = std::net::TcpStream::connect(addr).expect("connecting to the fuzzed server");
    let _ = conn.set_read_timeout(Some(HTTP_REPLY_TIMEOUT));
    let _ = conn.set_write_timeout(Some(HTTP_REPLY_TIMEOUT));
    // The server may answer and close before it has read everything (a 400 on a bad head).
    // Closing our side first leaves each connection in TIME_WAIT here; Linux reuses those
    // ports for new loopback connections (`net.ipv4.tcp_tw_reuse` is 2 by default).
    let _ = conn.write_all(request);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let read = (&mut conn).take(64 << 20).read_to_end(&mut reply);
    assert!(
        !HTTP_PANICKED.swap(false, std::sync::atomic::Ordering::SeqCst),
        "the HTTP server panicked on this input"
    );
    if let Err(e) = read {
        assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "no answer and no close within {HTTP_REPLY_TIMEOUT:?}"
        );
    }
    if !reply.is_empty() {
        // hyper answers an HTTP/1.0 request in kind.
        assert!(
            reply.starts_with(b"HTTP/1.1 ") || reply.starts_with(b"HTTP/1.0 "),
            "not an HTTP/1.x answer: {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(64)])
        );
        let status = reply.get(9).copied().unwrap_or(b'?');
        assert!(
            (b'1'..=b'4').contains(&status),
            "server error: {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(64)])
        );
    }
}

/// A libvirt domain status file (`<run>/libvirt/qemu/<name>.xml`).
pub fn libvirt_status(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(d) = crate::discovery::libvirt_status::parse_status(text) {
        assert!(d.pid > 0, "{d:?}");
        assert_eq!(d.uuid.len(), 36, "{d:?}");
        assert_eq!(d.uuid, d.uuid.to_ascii_lowercase());
    }
}

/// Phase lines (`NAME [key=value ...]` or `-`), as `optimus measure` reads them from a
/// program's output: whole, and split into lines at arbitrary chunk boundaries. A parsed
/// line written back with `format_mark` parses to the same mark.
pub fn phase_line(data: &[u8]) {
    use crate::phase::{format_mark, parse_line, quote, LineSplitter};
    if let Ok(Some(mark)) = parse_line(data) {
        let again = parse_line(format_mark(&mark).as_bytes());
        assert_eq!(again, Ok(Some(mark)), "{}", quote(data));
    }
    // The first byte says where to cut the rest into the chunks a pipe delivers.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let split = |step: usize| {
        let mut splitter = LineSplitter::default();
        let mut pieces = Vec::new();
        for chunk in rest.chunks(step) {
            splitter.feed(chunk, &mut pieces);
        }
        pieces.extend(splitter.finish());
        pieces
    };
    let pieces = split(usize::from(cut).max(1));
    assert_eq!(
        pieces,
        split(rest.len().max(1)),
        "the chunking changed the lines"
    );
    for piece in &pieces {
        let _ = piece.parse();
    }
}

/// One request on the agent's control socket, through the real connection handler; the
/// sampler's side is played by a thread that accepts every phase switch.
#[expect(
    clippy::expect_used,
    reason = "a socket pair or a thread failing is a broken harness, not a finding"
)]
pub fn control_request(data: &[u8]) {
    use crate::control::{self, PhaseRequest, Reply};
    use std::io::{Read as _, Write as _};
    let (mut client, server) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
    let (tx, rx) = std::sync::mpsc::channel::<PhaseRequest>();
    let handler = std::thread::spawn(move || control::handle(server, &tx));
    // The handler reads at most one line of 4 KiB + 1; the rest may not be taken.
    let _ = client.set_write_timeout(Some(HTTP_REPLY_TIMEOUT));
    let _ = client.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    if let Ok(req) = rx.recv_timeout(HTTP_REPLY_TIMEOUT) {
        let _ = req.reply.send(Reply {
            ok: true,
            vm_name: Some(req.vm.clone()),
            vm_uuid: None,
            phase: Some(crate::phase::format_mark(&req.mark)),
            error: None,
        });
    }
    let _ = client.set_read_timeout(Some(HTTP_REPLY_TIMEOUT));
    let mut reply = Vec::new();
    let read = client.take(1 << 20).read_to_end(&mut reply);
    assert!(
        read.is_ok(),
        "no reply within {HTTP_REPLY_TIMEOUT:?}: {read:?}"
    );
    handler.join().expect("the control handler panicked");
    let line = reply
        .strip_suffix(b"\n")
        .expect("one reply line, newline-terminated");
    assert!(!line.contains(&b'\n'), "more than one reply line");
    let parsed: Result<Reply, _> = serde_json::from_slice(line);
    assert!(
        parsed.is_ok(),
        "reply is not a Reply: {}",
        String::from_utf8_lossy(line)
    );
}

/// What the fake QMP monitor of [`qmp_answer`] sends on its next connection.
static QMP_SCRIPT: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// A Unix socket that plays a QEMU monitor: on each connection it sends [`QMP_SCRIPT`] and
/// closes once the client has sent its commands.
#[expect(
    clippy::expect_used,
    reason = "setting up the harness: a failure here is a broken harness, not a finding"
)]
fn qmp_monitor() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("optimus-fuzz-qmp-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener =
            std::os::unix::net::UnixListener::bind(&path).expect("binding the fake QMP socket");
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let script = QMP_SCRIPT
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let _ = conn.write_all(&script);
                let _ = conn.shutdown(std::net::Shutdown::Write);
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(1)));
                let _ = conn.read_to_end(&mut Vec::new());
            }
        });
        path
    })
}

/// A QMP monitor's output, to the real `query-cpus-fast` client: it returns (vCPU threads
/// or an error) within a few QMP timeouts, whatever the monitor says.
pub fn qmp_answer(data: &[u8]) {
    let path = qmp_monitor();
    *QMP_SCRIPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = data.to_vec();
    let started = std::time::Instant::now();
    let _ = crate::discovery::qmp::vcpu_threads(path);
    assert!(
        started.elapsed() < crate::discovery::qmp::QMP_TIMEOUT * 8,
        "the QMP client took {:?}",
        started.elapsed()
    );
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test's panic is its failure report"
)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Longest a single input may take (debug build, loaded machine): a parser that takes
    /// longer on a few KiB is a hang libFuzzer would report.
    const PER_INPUT: Duration = Duration::from_secs(2);

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
    }

    fn inputs(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// Runs `target` on `input` in a thread of its own: `Err` says it panicked or ran over
    /// [`PER_INPUT`] (the thread is then left behind; the test fails anyway).
    fn replay(target: &'static Target, input: Vec<u8>) -> Result<Duration, String> {
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            (target.run)(&input);
            let _ = tx.send(start.elapsed());
        });
        match rx.recv_timeout(PER_INPUT) {
            Ok(took) => {
                handle.join().map_err(|_| "panicked".to_owned())?;
                Ok(took)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("still running after {PER_INPUT:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
                Err("panicked".to_owned())
            }
        }
    }

    /// Every committed corpus and regression input of every target returns, without a
    /// panic, within the time bound: what libFuzzer checked, replayed on stable.
    #[test]
    fn corpus_replays() {
        let mut failures = Vec::new();
        let mut total = 0;
        for target in TARGETS {
            let corpus = inputs(&fuzz_dir().join("corpus").join(target.name));
            assert!(
                !corpus.is_empty(),
                "fuzz/corpus/{} is empty or missing: every target needs its seeds",
                target.name
            );
            let regressions = inputs(&fuzz_dir().join("regressions").join(target.name));
            let mut slowest = Duration::ZERO;
            for path in corpus.iter().chain(&regressions) {
                let input = std::fs::read(path).unwrap();
                match replay(target, input) {
                    Ok(took) => slowest = slowest.max(took),
                    Err(why) => failures.push(format!("{}: {why}", path.display())),
                }
                total += 1;
            }
            eprintln!(
                "{}: {} corpus + {} regression inputs, slowest {slowest:?}",
                target.name,
                corpus.len(),
                regressions.len()
            );
        }
        assert!(
            failures.is_empty(),
            "{} of {total} inputs failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// The fuzz crate has one binary per target and no other (a target added here without
    /// its `fuzz/fuzz_targets/<name>.rs` would never be fuzzed).
    #[test]
    fn fuzz_crate_lists_every_target() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "optimus-fuzz")
            .collect();
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        assert_eq!(bins, names);
        for name in names {
            let src = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
            let text = std::fs::read_to_string(&src).unwrap();
            assert!(
                text.contains(&format!("optimus::fuzzing::{name}(data)")),
                "{} does not call optimus::fuzzing::{name}",
                src.display()
            );
        }
    }

    #[test]
    fn fake_sysfs_serves_chunks_in_turn() {
        load_reads(b"package-0\0!EACCES\0\xff");
        let p = Path::new("/any");
        assert_eq!(fake_read(p).unwrap(), "package-0");
        assert_eq!(
            fake_read(p).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!(fake_read(p).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(fake_read(p).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
