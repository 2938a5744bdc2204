//! What a person sees: the live page at `/` rendered by a real headless Chromium, and
//! `optimus top` driven in a real tmux at 80×24, both reading a real agent beside two real
//! TCG guests (one busy, one idle) with a fixture powercap tree. The page must show the
//! busy guest's name and numbers that agree with /metrics, with no CSP violation; top must
//! show both rows with plausible numbers, sort and filter on keys, colour only without
//! `NO_COLOR`, and quit on `q` within 1 s with the terminal restored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{binary, Agent};
use optimus_tests::env::require_tools;
use optimus_tests::fakes::FakeRapl;
use optimus_tests::guest::{GuestImage, GuestPlan, READY_MARKER};
use optimus_tests::http::{parse, sample};
use optimus_tests::proc::run;
use optimus_tests::qemu::PlainQemu;

const BUSY: &str = "zeta-busy";
const BUSY_UUID: &str = "5e0a7c2b-1d3f-4a6b-9c8d-7e6f5a4b3c2d";
const IDLE: &str = "alpha-idle";
const IDLE_UUID: &str = "a1b2c3d4-0000-4e5f-8a9b-0c1d2e3f4a5b";

/// package + dram joules, watts or grams of a VM on one scrape.
fn vm_sum(m: &str, metric: &str, uuid: &str) -> f64 {
    parse(m)
        .iter()
        .filter(|s| {
            s.name == metric
                && s.labels.get("vm_uuid").map(String::as_str) == Some(uuid)
                && s.labels
                    .get("zone")
                    .is_none_or(|z| matches!(z.as_str(), "package" | "dram" | "gpu"))
        })
        .map(|s| s.value)
        .sum()
}

/// A number with its unit as the page and top print it (`12.3 J`, `1.05 kJ`, `0.5 kWh`),
/// in base units.
fn quantity(value: &str, unit: &str) -> f64 {
    let v: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {value:?}"));
    v * match unit {
        "J" | "W" | "g" | "B/s" => 1.0,
        "kJ" | "kB/s" => 1e3,
        "MB/s" => 1e6,
        "kWh" => 3.6e6,
        "kg" => 1e3,
        other => panic!("unknown unit {other:?}"),
    }
}

/// The text of the first `<td class="… CLASS">` after `from` in `html`.
fn cell<'a>(html: &'a str, from: usize, class: &str) -> &'a str {
    let rest = &html[from..];
    let end_row = rest.find("</tr>").unwrap();
    let row = &rest[..end_row];
    let at = row
        .find(&format!("{class}\">"))
        .unwrap_or_else(|| panic!("no {class} cell in {row}"));
    let text = &row[at + class.len() + 2..];
    &text[..text.find("</td>").unwrap()]
}

fn split_unit(text: &str) -> (&str, &str) {
    text.split_once(' ')
        .unwrap_or_else(|| panic!("no unit in {text:?}"))
}

/// Scrapes /metrics every 50 ms in the background and keeps each sample's scrape, so a
/// number the page or top shows for sample N is compared with /metrics at sample N.
struct Recorder {
    scrapes: Arc<Mutex<BTreeMap<u64, String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start(addr: &str) -> Recorder {
        let scrapes = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, flag, addr) = (scrapes.clone(), stop.clone(), addr.to_owned());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if let Ok((200, body)) = optimus_tests::http::get(&addr, "/metrics") {
                    if let Some(n) = sample(&body, "optimus_samples_total", &[]) {
                        #[expect(
                            clippy::cast_possible_truncation,
                            clippy::cast_sign_loss,
                            reason = "a count"
                        )]
                        s.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .entry(n as u64)
                            .or_insert(body);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Recorder {
            scrapes,
            stop,
            thread: Some(thread),
        }
    }

    /// The scrape taken at sample `n`.
    fn at(&self, n: u64) -> String {
        let s = self
            .scrapes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.get(&n).cloned().unwrap_or_else(|| {
            panic!(
                "no scrape of sample {n}; have {:?}",
                s.keys().collect::<Vec<_>>()
            )
        })
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `|shown - truth|` within half the last printed digit (`decimals`).
fn agrees(what: &str, shown: f64, truth: f64, decimals: i32) {
    let half = 0.5 * 10f64.powi(-decimals) + 1e-9;
    assert!(
        (shown - truth).abs() <= half,
        "{what}: shows {shown}, /metrics at the same sample says {truth}"
    );
}

/// A vCPU's busy % over the interval ending at sample `n`, against its /metrics seconds
/// at samples n−1 and n. The agent divides by the interval it measured, this by the
/// nominal 1 s, so a loaded machine's late samples make them differ: within half, and
/// 5 points.
fn busy_agrees(what: &str, shown: f64, recorder: &Recorder, n: u64, vcpu: &str) {
    let secs = |m: &str| {
        sample(
            m,
            "optimus_vcpu_cpu_seconds_total",
            &[("vm_uuid", BUSY_UUID), ("vcpu", vcpu)],
        )
        .unwrap()
    };
    let est = 100.0 * (secs(&recorder.at(n)) - secs(&recorder.at(n - 1)));
    assert!(
        shown >= est * 0.5 - 5.0 && shown <= est * 1.5 + 5.0 && shown > 0.0,
        "{what}: shows {shown} %, /metrics says {est:.1} % over the same sample"
    );
    eprintln!("{what}: {shown} % (/metrics {est:.1} %)");
}

fn decimals(text: &str) -> i32 {
    text.split_once('.')
        .map_or(0, |(_, d)| i32::try_from(d.len()).unwrap())
}

fn chromium(args: &[&str], url: &str, profile: &Path) -> (String, String) {
    let out = run(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=8000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url),
        None,
        Duration::from_secs(90),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_page(agent: &Agent) {
    require_tools(&[("chromium", "chromium")]).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", agent.addr);
    let recorder = Recorder::start(&agent.addr);
    agent.next_sample();
    let (dom, log) = chromium(&["--dump-dom"], &url, profile.path());

    for bad in ["Content Security Policy", "Refused to", "Uncaught"] {
        assert!(!log.contains(bad), "the page logged {bad:?}:\n{log}");
    }
    assert!(
        dom.contains("class=\"status\">live"),
        "the page is not live:\n{dom}"
    );
    let row = dom
        .find(&format!("data-uuid=\"{BUSY_UUID}\""))
        .unwrap_or_else(|| panic!("no row for the busy guest in:\n{dom}"));
    assert!(
        cell(&dom, row, "name").starts_with(BUSY),
        "{}",
        cell(&dom, row, "name")
    );
    assert!(dom.contains(&format!("data-uuid=\"{IDLE_UUID}\"")));

    // Every number on the page is of one sample, which its footer names: compare each
    // with /metrics at that very sample.
    let n: u64 = dom
        .split("sample ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no sample number on the page:\n{dom}"));
    let m = recorder.at(n);
    let shown = |class: &str| {
        let (v, unit) = split_unit(cell(&dom, row, class));
        (quantity(v, unit), decimals(v), unit == "J")
    };
    let (energy, d, in_joules) = shown("energy");
    let e = vm_sum(&m, "optimus_vm_energy_joules_total", BUSY_UUID);
    agrees(
        "page energy (J)",
        energy,
        e,
        if in_joules { d } else { d - 3 },
    );
    let (grams, d, _) = shown("grams");
    let g = vm_sum(&m, "optimus_vm_carbon_grams_total", BUSY_UUID);
    agrees("page grams", grams, g, d);
    let (power, d, _) = shown("power");
    let p = vm_sum(&m, "optimus_vm_power_watts", BUSY_UUID);
    agrees("page power (W)", power, p, d);
    let node_total: f64 = dom
        .split("id=\"node-total\" class=\"big\">")
        .nth(1)
        .and_then(|s| s.split(" W<").next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let node: f64 = parse(&m)
        .iter()
        .filter(|s| {
            s.name == "optimus_node_power_watts"
                && matches!(
                    s.labels.get("zone").map(String::as_str),
                    Some("package" | "dram")
                )
        })
        .map(|s| s.value)
        .sum();
    agrees("page node power (W)", node_total, node, 2);
    // One interval's power: the fixture's writer thread is late at times on a loaded
    // machine, so an interval reads a little under or over its 25 W.
    assert!((node - 25.0).abs() < 5.0, "node {node} W, fixture 25 W");
    assert!(
        dom.contains("measured (rapl-powercap)"),
        "zones not marked measured"
    );
    let vcpus = cell(&dom, row, "vcpu");
    let busy: f64 = vcpus
        .split("vCPU 0 ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no vCPU 0 use in {vcpus:?}"));
    busy_agrees("page vCPU 0", busy, &recorder, n, "0");
    let vcpu1: f64 = vcpus
        .split("vCPU 1 ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no vCPU 1 use in {vcpus:?}"));
    assert!(
        vcpu1 < busy,
        "idle vCPU 1 at {vcpu1} %, busy vCPU 0 at {busy} %"
    );
    assert!(dom.contains("<polygon"), "no chart drawn");
    assert_eq!(cell(&dom, row, "phase"), "train", "the busy guest's phase");
    let idle_row = dom.find(&format!("data-uuid=\"{IDLE_UUID}\"")).unwrap();
    assert_eq!(
        cell(&dom, idle_row, "phase"),
        "–",
        "no phase on the idle guest"
    );
    eprintln!(
        "page at sample {n}: {BUSY} {power} W ({p:.4}), {energy} J ({e:.4}), {grams} g ({g:.6}), vCPU 0 {busy} %, node {node_total} W ({node:.4}); /metrics in brackets"
    );

    let shot = optimus_tests::env::workspace_root().join("target/live-page.png");
    chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1000,1200",
        ],
        &url,
        profile.path(),
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot of {} bytes",
        png.len()
    );
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());
}

/// A tmux server of its own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        require_tools(&[("tmux", "tmux")]).unwrap();
        Tmux {
            socket: format!("optimus-test-{}", std::process::id()),
        }
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = run(
            Command::new("tmux").args(["-L", &self.socket]).args(args),
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A detached 80×24 session running `sh`.
    fn session(&self, name: &str) {
        self.cmd(&[
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            "-s",
            name,
            "sh",
        ]);
    }

    fn send(&self, session: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", session];
        args.extend_from_slice(keys);
        self.cmd(&args);
    }

    fn screen(&self, session: &str) -> String {
        self.cmd(&["capture-pane", "-p", "-t", session])
    }

    fn screen_escapes(&self, session: &str) -> String {
        self.cmd(&["capture-pane", "-p", "-e", "-t", session])
    }

    fn wait(
        &self,
        session: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen(session);
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// Line index of the row naming `vm`.
fn row_of(screen: &str, vm: &str) -> Option<usize> {
    screen
        .lines()
        .position(|l| l.split_whitespace().next() == Some(vm))
}

/// Colour parameters (30–37, 38, 40–47, 48, 90–97, 100–107) in the SGR sequences.
fn colours(escaped: &str) -> usize {
    escaped
        .split("\x1b[")
        .skip(1)
        .filter_map(|s| s.split_once('m').map(|(params, _)| params))
        .flat_map(|p| p.split(';'))
        .filter_map(|n| n.parse::<u32>().ok())
        .filter(|n| matches!(n, 30..=38 | 40..=48 | 90..=97 | 100..=107))
        .count()
}

fn check_top(agent: &Agent) {
    let tmux = Tmux::new();
    let top = format!("{} top --url http://{}", binary().display(), agent.addr);
    // Recording from before top starts: its first screen's sample and the one before it.
    let recorder = Recorder::start(&agent.addr);
    agent.next_sample();
    tmux.session("top");
    tmux.send("top", &[&format!("{top}; echo TOP-EXIT-$?"), "Enter"]);
    let rows = |s: &str| row_of(s, BUSY).is_some() && row_of(s, IDLE).is_some();
    let screen = tmux.wait("top", Duration::from_secs(10), "both guests' rows", rows);
    // The title names the sample every number on screen is from.
    let n: u64 = screen
        .split("sample ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no sample number in the title:\n{screen}"));
    let m = recorder.at(n);
    eprintln!("top at 80x24:\n{screen}");
    assert!(screen.lines().count() <= 24 && screen.lines().all(|l| l.chars().count() <= 80));
    assert!(screen.contains("optimus top"), "{screen}");
    assert!(
        screen.contains("measured"),
        "zones not marked measured:\n{screen}"
    );
    assert!(screen.contains("grid 300 g/kWh"), "{screen}");

    // The busy guest's row: power, energy, grams, vCPU busy, I/O, phase.
    let line = screen.lines().nth(row_of(&screen, BUSY).unwrap()).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(f.len() >= 9, "short row {line:?}");
    let power: f64 = f[1].parse().unwrap();
    let energy = quantity(f[2], f[3]);
    let grams: f64 = f[4].parse().unwrap();
    let busy: f64 = f[5].trim_end_matches('%').parse().unwrap();
    let (p, e, g) = (
        vm_sum(&m, "optimus_vm_power_watts", BUSY_UUID),
        vm_sum(&m, "optimus_vm_energy_joules_total", BUSY_UUID),
        vm_sum(&m, "optimus_vm_carbon_grams_total", BUSY_UUID),
    );
    agrees("top power (W)", power, p, decimals(f[1]));
    let d = decimals(f[2]);
    agrees(
        "top energy (J)",
        energy,
        e,
        if f[3] == "J" { d } else { d - 3 },
    );
    agrees("top grams", grams, g, decimals(f[4]));
    assert!(power > 0.2, "the busy guest draws {power} W");
    busy_agrees("top vCPU", busy, &recorder, n, "0");
    assert_eq!(f[8], "train", "the busy guest's phase: {line:?}");
    let idle_line = screen.lines().nth(row_of(&screen, IDLE).unwrap()).unwrap();
    assert!(
        idle_line.trim_end().ends_with(" -"),
        "no phase on the idle guest: {idle_line:?}"
    );

    // Sorting: power puts the busy guest first, name puts alpha-idle first, n again
    // reverses, and e and c put the busy guest first again.
    let order = |s: &str| row_of(s, BUSY).unwrap() < row_of(s, IDLE).unwrap();
    assert!(order(&screen), "by power the busy guest leads:\n{screen}");
    for (key, busy_first) in [
        ("n", false),
        ("n", true),
        ("e", true),
        ("c", true),
        ("p", true),
    ] {
        tmux.send("top", &[key]);
        tmux.wait(
            "top",
            Duration::from_secs(3),
            &format!("order after {key}"),
            |s| rows(s) && order(s) == busy_first,
        );
    }
    // Filter: only alpha-idle; Esc brings both back.
    tmux.send("top", &["/", "alpha", "Enter"]);
    tmux.wait("top", Duration::from_secs(3), "the filter", |s| {
        row_of(s, IDLE).is_some() && row_of(s, BUSY).is_none()
    });
    tmux.send("top", &["Escape"]);
    tmux.wait("top", Duration::from_secs(3), "the filter cleared", rows);
    assert!(
        colours(&tmux.screen_escapes("top")) > 0,
        "no colour without NO_COLOR"
    );

    // q quits within a second, and the shell gets its terminal back.
    let t = Instant::now();
    tmux.send("top", &["q"]);
    let after = tmux.wait("top", Duration::from_secs(5), "top to exit", |s| {
        s.contains("TOP-EXIT-0")
    });
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "q took {took:?}");
    assert!(
        !after.contains("WATTS"),
        "the alternate screen was not left:\n{after}"
    );
    // Canonical mode and echo are back (raw mode undone).
    tmux.send(
        "top",
        &[
            "echo MODES $(stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(icanon|echo)')",
            "Enter",
        ],
    );
    let stty = tmux.wait("top", Duration::from_secs(5), "stty", |s| {
        s.lines().any(|l| l.starts_with("MODES "))
    });
    let modes = stty.lines().find(|l| l.starts_with("MODES ")).unwrap();
    assert!(
        modes.contains("icanon") && !modes.contains("-icanon") && !modes.contains("-echo"),
        "terminal modes after q: {modes:?}"
    );
    eprintln!(
        "top: q exited in {took:?}; terminal after: {}",
        modes.trim()
    );

    // NO_COLOR: the same screen, no colour at all.
    tmux.session("mono");
    tmux.send("mono", &[&format!("NO_COLOR=1 {top}"), "Enter"]);
    tmux.wait("mono", Duration::from_secs(10), "rows without colour", rows);
    let escaped = tmux.screen_escapes("mono");
    assert_eq!(
        colours(&escaped),
        0,
        "colour with NO_COLOR set:\n{escaped:?}"
    );
    tmux.send("mono", &["q"]);
}

#[test]
fn page_and_top_show_the_guests_live() {
    if optimus_tests::env::require_root("page_and_top_show_the_guests_live").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let rapl = FakeRapl::start(20.0, 5.0).unwrap();
    let busy = PlainQemu::spawn(
        BUSY,
        Some(BUSY_UUID),
        &image,
        &GuestPlan {
            busy_vcpus: vec![0],
            io: None,
        },
        2,
        None,
    )
    .unwrap();
    let idle = PlainQemu::spawn(
        IDLE,
        Some(IDLE_UUID),
        &image,
        &GuestPlan::default(),
        1,
        None,
    )
    .unwrap();
    for g in [&busy, &idle] {
        g.wait_for_console(READY_MARKER, Duration::from_secs(90))
            .unwrap();
    }
    let control = tempfile::tempdir().unwrap();
    let socket = control.path().join("control.sock");
    let agent = Agent::start(&[
        "--libvirt-uri",
        "",
        "--no-nvml",
        "--powercap-root",
        rapl.root().to_str().unwrap(),
        "--carbon-intensity",
        "300",
        "--vm-filter",
        &format!("{BUSY}|{IDLE}"),
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    // The busy guest is in a phase, the idle one in none.
    let out = run(
        Command::new(binary()).args([
            "phase",
            "--control-socket",
            socket.to_str().unwrap(),
            "--vm",
            BUSY,
            "train",
            "epoch=3",
        ]),
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "optimus phase: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_for(Duration::from_secs(15), "both guests' energy", |m| {
        [BUSY_UUID, IDLE_UUID].iter().all(|u| {
            sample(
                m,
                "optimus_vm_energy_joules_total",
                &[("vm_uuid", u), ("zone", "package")],
            )
            .is_some_and(|j| j > 0.0)
        })
    });
    // A few samples so rates and the chart have points.
    std::thread::sleep(Duration::from_secs(3));
    check_page(&agent);
    let (status, doc) =
        optimus_tests::http::get(&agent.addr, "/api/v1/snapshot?since=1e300").unwrap();
    assert_eq!(status, 200, "{doc}");
    eprintln!("GET /api/v1/snapshot?since=1e300:\n{doc}");
    check_top(&agent);

    // An agent that is not there: one line, exit status 1.
    let out = run(
        Command::new(binary()).args(["top", "--url", "http://127.0.0.1:1"]),
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot reach the agent at http://127.0.0.1:1"),
        "{err}"
    );
}
