//! `optimus measure` end to end, as root on the real kernel: a multi-phase workload whose
//! truth is the kernel's own accounting (getrusage, read by the workload at each boundary),
//! a fixture powercap tree at a known constant power, exit statuses and signals, the JSON
//! and CSV contracts (the CSV read back by Python's csv module), sudo, bad input and a
//! flood of phase switches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use optimus_tests::proc::run;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

fn fixture(name: &str) -> PathBuf {
    optimus_tests::env::workspace_root()
        .join("tests/fixtures/measure")
        .join(name)
}

fn measure(args: &[&str]) -> Output {
    let mut cmd = Command::new(common::binary());
    cmd.arg("measure")
        .args(args)
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID");
    run(&mut cmd, None, TIMEOUT).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A powercap tree with one package zone whose counter follows the wall clock at `watts`
/// (updated every millisecond), so the energy of any window is `watts × window`.
struct ConstantPower {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    /// Longest time between two writes, in ns: how stale a read of the counter can be
    /// (the writer is a thread, and a loaded machine can keep it off the CPU for a while).
    max_gap_ns: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConstantPower {
    fn start(watts: f64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let zone = dir.path().join("intel-rapl:0");
        std::fs::create_dir_all(&zone).unwrap();
        std::fs::write(zone.join("name"), "package-0\n").unwrap();
        std::fs::write(zone.join("max_energy_range_uj"), "262143328850\n").unwrap();
        std::fs::write(zone.join("energy_uj"), "1000\n").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let max_gap_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gap = max_gap_ns.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let tmp = zone.join("energy_uj.tmp");
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let ns = u64::try_from(last.elapsed().as_nanos()).unwrap_or(u64::MAX);
                gap.fetch_max(ns, Ordering::Relaxed);
                last = Instant::now();
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "µJ"
                )]
                let uj = 1000 + (t0.elapsed().as_secs_f64() * watts * 1e6) as u64;
                std::fs::write(&tmp, format!("{uj}\n")).unwrap();
                std::fs::rename(&tmp, zone.join("energy_uj")).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            dir,
            stop,
            max_gap_ns,
            thread: Some(thread),
        }
    }

    /// The longest time the counter went unwritten so far, in seconds.
    fn max_gap_s(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "ns of a test run")]
        let s = self.max_gap_ns.load(Ordering::Relaxed) as f64 / 1e9;
        s
    }

    fn root(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

impl Drop for ConstantPower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `|got - want| <= max(tol × want, floor)`.
fn assert_near(what: &str, got: f64, want: f64, tol: f64, floor: f64) {
    let allowed = (tol * want.abs()).max(floor);
    assert!(
        (got - want).abs() <= allowed,
        "{what}: measured {got:.6}, kernel {want:.6} (off {:.6}, allowed {allowed:.6})",
        (got - want).abs()
    );
    eprintln!("{what}: measured {got:.6}, kernel {want:.6}");
}

#[test]
fn workload_phases_match_the_kernel_and_a_constant_power_meter() {
    if optimus_tests::env::require_root("measure_workload").is_err() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (json, csv, truth) = (
        tmp.path().join("run.json"),
        tmp.path().join("run.csv"),
        tmp.path().join("truth.json"),
    );
    let watts = 25.0;
    let power = ConstantPower::start(watts);
    let out = measure(&[
        "--powercap-root",
        power.root(),
        "--no-nvml",
        "--carbon-intensity",
        "300",
        "--json",
        json.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--",
        "python3",
        fixture("workload.py").to_str().unwrap(),
        truth.to_str().unwrap(),
    ]);
    let stale_s = power.max_gap_s();
    drop(power);
    let err = stderr(&out);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("wall time") && err.contains("threads"),
        "no table: {err}"
    );

    let m = read_json(&json);
    for key in [
        "command",
        "exit_code",
        "wall_seconds",
        "cpu_seconds",
        "block_io_bytes",
        "energy_joules",
        "node_energy_joules",
        "energy_source",
        "carbon_grams",
        "phases",
    ] {
        assert!(m.get(key).is_some(), "--json lacks {key}: {m}");
    }
    assert_eq!(m["command"][0], "python3");
    assert_eq!(m["exit_code"], 0);
    assert_eq!(m["energy_source"], "rapl-powercap");
    assert!(m["block_io_bytes"]["read"].is_u64() && m["block_io_bytes"]["write"].is_u64());
    // No meter covers dram here: absent, never 0.
    assert!(m["energy_joules"].get("dram").is_none(), "{m}");
    assert!(m["node_energy_joules"].get("dram").is_none(), "{m}");

    // Per-phase and total CPU against the kernel's account, read by the workload itself.
    let truth: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&truth).unwrap()).unwrap();
    let phases = m["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "(none)",
            "busy",
            "sleeping",
            "children",
            "grandchild",
            "threads",
            "(none)"
        ]
    );
    assert_eq!(phases[3]["labels"]["count"], "200");
    for p in phases {
        for key in [
            "name",
            "labels",
            "start_seconds",
            "wall_seconds",
            "cpu_seconds",
            "block_io_bytes",
            "energy_joules",
            "carbon_grams",
        ] {
            assert!(p.get(key).is_some(), "phase lacks {key}: {p}");
        }
    }
    for (i, w) in truth.windows(2).enumerate().take(5) {
        let kernel = f(&w[1]["cpu_s"]) - f(&w[0]["cpu_s"]);
        let name = w[0]["line"].as_str().unwrap();
        // 2 %, or 3 ms for a phase that barely runs (sleeping).
        assert_near(
            &format!("phase {name} CPU s"),
            f(&phases[i + 1]["cpu_seconds"]),
            kernel,
            0.02,
            0.003,
        );
    }
    let kernel_total = f(&truth.last().unwrap()["cpu_s"]);
    // The total also holds the interpreter's exit after its last own reading (a few ms).
    assert_near(
        "total CPU s",
        f(&m["cpu_seconds"]),
        kernel_total,
        0.02,
        0.003,
    );

    // The phases sum to the total.
    let sum = |key: &str| phases.iter().map(|p| f(&p[key])).sum::<f64>();
    assert!((sum("cpu_seconds") - f(&m["cpu_seconds"])).abs() < 1e-6);
    assert!((sum("wall_seconds") - f(&m["wall_seconds"])).abs() < 1e-6);
    let pkg = |v: &Value| f(&v["energy_joules"]["package"]);
    let pkg_sum: f64 = phases.iter().map(pkg).sum();
    assert!((pkg_sum - pkg(&m)).abs() < 1e-5, "{pkg_sum} vs {}", pkg(&m));
    let grams: f64 = phases.iter().map(|p| f(&p["carbon_grams"])).sum();
    assert!((grams - f(&m["carbon_grams"])).abs() < 1e-8);

    // Node energy over the window is power × wall time; the command's share fits in it.
    let node = f(&m["node_energy_joules"]["package"]);
    // 1 %, widened by what the fixture itself can be off: each of the two end readings
    // can see a counter up to its longest write gap old (1 ms when the writer keeps up).
    let want = watts * f(&m["wall_seconds"]);
    assert_near(
        "node package J",
        node,
        want,
        0.01 + 2.0 * watts * stale_s / want,
        0.0,
    );
    assert!(
        pkg(&m) > 0.0 && pkg(&m) <= node,
        "command {} J, node {node} J",
        pkg(&m)
    );
    assert_near(
        "grams",
        f(&m["carbon_grams"]),
        pkg(&m) / 3.6e6 * 300.0,
        1e-4,
        1e-9,
    );

    // The CSV reads back through Python's csv module with CodeCarbon's names and units.
    let check = r#"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
need = ["timestamp", "project_name", "run_id", "duration", "emissions", "emissions_rate",
        "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed", "phase", "count", "kind", "workers"]
missing = [c for c in need if c not in rows[0]]
assert not missing, missing
total = rows[-1]
assert total["phase"] == "(total)", total
assert total["gpu_energy"] == "" and total["ram_energy"] == "", total
print(len(rows), float(total["duration"]), float(total["cpu_energy"]), float(total["emissions"]),
      sum(float(r["cpu_energy"]) for r in rows[:-1]))
"#;
    let out = run(
        Command::new("python3").args(["-c", check, csv.to_str().unwrap()]),
        None,
        TIMEOUT,
    )
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let fields: Vec<f64> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "a row count")]
    let rows = (phases.len() + 1) as f64;
    assert_eq!(fields[0], rows);
    assert!((fields[1] - f(&m["wall_seconds"])).abs() < 1e-6);
    assert_near(
        "CSV cpu_energy kWh",
        fields[2],
        pkg(&m) / 3.6e6,
        1e-6,
        1e-12,
    );
    assert_near(
        "CSV emissions kg",
        fields[3],
        f(&m["carbon_grams"]) / 1000.0,
        1e-6,
        1e-15,
    );
    assert_near(
        "CSV rows sum to the total",
        fields[4],
        fields[2],
        1e-6,
        1e-12,
    );
}

#[test]
fn exit_statuses_signals_and_ctrl_c() {
    if optimus_tests::env::require_root("measure_exit_statuses").is_err() {
        return;
    }
    let out = measure(&["--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = measure(&["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("killed by signal 15"),
        "{}",
        stderr(&out)
    );

    // A SIGINT sent to measure alone (not from a terminal) is passed on to the command;
    // what was measured is still printed.
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("int.json");
    let ready = tmp.path().join("ready");
    let script = format!("touch {}; exec sleep 30", ready.display());
    let mut cmd = Command::new(common::binary());
    cmd.args([
        "measure",
        "--json",
        json.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ])
    .env_remove("SUDO_UID")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Signal once the command runs (a signal before that is passed on as soon as it starts).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(optimus_tests::proc::signal(child.id(), libc::SIGINT));
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "measure did not stop"
    );
    assert_eq!(out.status.code(), Some(128 + 2), "{}", stderr(&out));
    assert!(stderr(&out).contains("wall time"), "{}", stderr(&out));
    let m = read_json(&json);
    assert_eq!(m["exit_code"], 130);
    assert!(f(&m["wall_seconds"]) > 0.5, "{m}");
}

#[test]
fn bad_commands_and_output_paths_are_refused() {
    if optimus_tests::env::require_root("measure_bad_commands").is_err() {
        return;
    }
    let out = measure(&["--", "no-such-command-xyz", "a"]);
    assert_eq!(out.status.code(), Some(127));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("no-such-command-xyz"),
        "{err}"
    );

    let out = measure(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = measure(&["--", ""]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: empty command"),
        "{}",
        stderr(&out)
    );

    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let script = format!("touch {}", marker.display());
    for flag in ["--json", "--csv"] {
        let out = measure(&[flag, "/nonexistent-dir/x/out", "--", "sh", "-c", &script]);
        assert_ne!(out.status.code(), Some(0));
        let err = stderr(&out);
        assert!(err.starts_with("error: cannot write"), "{err}");
        assert!(
            !marker.exists(),
            "the command ran despite the unwritable {flag} path"
        );
    }
}

#[test]
fn bad_phase_lines_warn_once_each_and_a_flood_stays_correct_and_bounded() {
    if optimus_tests::env::require_root("measure_bad_lines_flood").is_err() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("flood.json");
    let rss = tmp.path().join("rss.txt");
    let out = measure(&[
        "--json",
        json.to_str().unwrap(),
        "--",
        "python3",
        fixture("flood.py").to_str().unwrap(),
        rss.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("ignored phase line"))
        .collect();
    assert_eq!(warnings.len(), 2, "one warning per bad line: {err}");
    for w in &warnings {
        // The quote is cut to 80 bytes (escaped), never the whole 10 KB.
        assert!(w.len() < 80 * 4 + 200, "{w}");
    }
    assert!(
        warnings[0].contains("xxxxxxxx") && warnings[0].contains("..."),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1].contains("\\x"),
        "binary junk is escaped: {}",
        warnings[1]
    );

    let m = read_json(&json);
    let totals = m["phase_totals"].as_object().unwrap();
    let count = |name: &str| {
        totals
            .get(name)
            .map_or(0, |t| t["occurrences"].as_u64().unwrap())
    };
    assert_eq!(count("after-junk"), 1);
    assert_eq!(count("a") + count("b") + count("c"), 20_000);
    let wall: f64 = totals.values().map(|t| f(&t["wall_seconds"])).sum();
    let cpu: f64 = totals.values().map(|t| f(&t["cpu_seconds"])).sum();
    assert!(
        (wall - f(&m["wall_seconds"])).abs() < 1e-6,
        "{wall} vs {}",
        m["wall_seconds"]
    );
    assert!((cpu - f(&m["cpu_seconds"])).abs() < 1e-6);
    let listed = m["phases"].as_array().unwrap().len() as u64;
    assert!(listed <= 10_001, "{listed} occurrences listed");
    // (none), after-junk, then the 20,000 (the last one still open at the end).
    assert_eq!(listed + m["phases_dropped"].as_u64().unwrap(), 20_002);
    // Memory: measure's resident size before and after the flood, read by the workload.
    let rss: Vec<u64> = std::fs::read_to_string(&rss)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    eprintln!(
        "measure RSS before the flood {} KiB, after {} KiB",
        rss[0], rss[1]
    );
    assert!(
        rss[1] < rss[0] + 16 * 1024,
        "measure grew from {} KiB to {} KiB",
        rss[0],
        rss[1]
    );
}

#[test]
fn under_sudo_the_command_runs_as_the_invoking_user() {
    if optimus_tests::env::require_root("measure_sudo").is_err() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("sudo.json");
    let script = "id -u; id -g; echo \"as-user\" > \"$OPTIMUS_PHASE\"";
    let run_as = |extra: &[&str]| {
        let mut cmd = Command::new(common::binary());
        cmd.arg("measure")
            .args(extra)
            .args(["--json", json.to_str().unwrap(), "--", "sh", "-c", script])
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534");
        run(&mut cmd, None, TIMEOUT).unwrap()
    };
    let out = run_as(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n65534\n");
    let m = read_json(&json);
    assert_eq!(
        m["phases"][1]["name"], "as-user",
        "the user could not write $OPTIMUS_PHASE"
    );
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        std::fs::metadata(&json).unwrap().uid(),
        65534,
        "results belong to the user"
    );
    std::fs::remove_file(&json).unwrap();
    let out = run_as(&["--as-root"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n0\n");
}

#[test]
fn direct_block_io_of_the_command_is_counted() {
    if optimus_tests::env::require_root("measure_block_io").is_err() {
        return;
    }
    // On a real disk (the cache lives under target/), not tmpfs.
    let dir = optimus_tests::env::cache_dir();
    let file = dir.join(format!("measure-io-{}.bin", std::process::id()));
    let json = dir.join(format!("measure-io-{}.json", std::process::id()));
    let script = format!(
        "dd if=/dev/zero of={f} bs=1M count=8 oflag=direct status=none && dd if={f} of=/dev/null bs=1M iflag=direct status=none",
        f = file.display()
    );
    let out = measure(&["--json", json.to_str().unwrap(), "--", "sh", "-c", &script]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let m = read_json(&json);
    let _ = std::fs::remove_file(&json);
    let mib = 1024 * 1024;
    let (r, w) = (
        m["block_io_bytes"]["read"].as_u64().unwrap(),
        m["block_io_bytes"]["write"].as_u64().unwrap(),
    );
    eprintln!("block I/O: read {r} B, written {w} B");
    assert!(
        (8 * mib..=9 * mib).contains(&w),
        "written {w} B, dd wrote 8 MiB direct"
    );
    assert!(
        (8 * mib..=9 * mib).contains(&r),
        "read {r} B, dd read 8 MiB direct"
    );
}
