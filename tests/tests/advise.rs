//! `optimus advise` against a real fleet on this machine: several agent processes, each
//! playing one host (its own `--carbon-intensity` or a loopback UK-API server, its own real
//! TCG guests picked by `--vm-filter`), a broken exporter serving a NaN intensity, and a
//! real Prometheus scraping them all under distinct `instance` labels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{advise, Agent};
use optimus_tests::guest::{GuestImage, GuestPlan, READY_MARKER};
use optimus_tests::http::sample;
use optimus_tests::libvirt::{Domain, Libvirtd};
use optimus_tests::prometheus::{value, Prometheus};
use serde_json::Value;

/// A loopback HTTP server answering each request with `reply(path, nth request)`; stopped
/// on drop.
struct FakeServer {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Reply = Box<dyn Fn(&str, usize) -> (u16, String) + Send>;

impl FakeServer {
    fn start(reply: Reply) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = AtomicUsize::new(0);
        let stop_in = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop_in.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let path = path.split('?').next().unwrap_or("/").to_owned();
                let (status, body) = reply(&path, seen.fetch_add(1, Ordering::SeqCst));
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn utc(t: i64) -> String {
    // The UK API's form, `2026-12-01T12:30Z`, from days-since-epoch arithmetic.
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A UK-API answer of half-hour periods from the current half hour, valued by `g(i)`.
fn uk_periods(first: i64, n: i64, g: impl Fn(i64) -> f64) -> String {
    let periods: Vec<String> = (0..n)
        .map(|i| {
            let from = first + i * 1800;
            format!(
                r#"{{"from":"{}","to":"{}","intensity":{{"forecast":{},"actual":null,"index":"moderate"}}}}"#,
                utc(from),
                utc(from + 1800),
                g(i)
            )
        })
        .collect();
    format!(r#"{{"data":[{}]}}"#, periods.join(","))
}

fn host<'a>(j: &'a Value, name: &str) -> &'a Value {
    j["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {j}"))
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        err <= tol,
        "{what}: advise says {got}, computed {want} ({:.3} % off)",
        err * 100.0
    );
    eprintln!(
        "{what}: advise {got:.6}, computed {want:.6} ({:.4} % off)",
        err * 100.0
    );
}

#[test]
fn advise_moves_the_busy_vm_to_the_cleanest_host_with_room() {
    if optimus_tests::env::require_root("advise_moves_the_busy_vm").is_err() {
        return;
    }
    let image = GuestImage::ensure().unwrap();
    let libvirtd = Libvirtd::start().unwrap();
    let uri = libvirtd.uri().to_owned();
    let busy = Domain::create(
        &libvirtd,
        "adv-dirty-busy",
        &image,
        &GuestPlan {
            busy_vcpus: vec![0],
            io: None,
        },
        1,
        None,
    )
    .unwrap();
    // Fills the cleanest host: 2 vCPUs on a 2-CPU host leave no room.
    let _full = Domain::create(
        &libvirtd,
        "adv-clean-full",
        &image,
        &GuestPlan {
            busy_vcpus: vec![],
            io: None,
        },
        2,
        None,
    )
    .unwrap();
    // One good answer, then failures: that host's intensity goes stale.
    let answered = AtomicUsize::new(0);
    let stale = FakeServer::start(Box::new(move |path, _| {
        let t = now() - now().rem_euclid(1800);
        if path == "/intensity" && answered.fetch_add(1, Ordering::SeqCst) == 0 {
            (200, uk_periods(t, 1, |_| 100.0))
        } else {
            (503, "down".to_owned())
        }
    }));
    // A broken exporter: an agent's names, a NaN intensity.
    let broken = FakeServer::start(Box::new(|_, _| {
        (
            200,
            "optimus_build_info{version=\"0\"} 1\noptimus_grid_carbon_intensity_grams_per_kwh{zone=\"static\",source=\"static\"} NaN\noptimus_node_cpus 64\noptimus_node_memory_available_bytes 1e12\n".to_owned(),
        )
    }));
    let agent = |filter: &str, carbon: &[&str]| {
        let mut args = vec!["--libvirt-uri", uri.as_str(), "--vm-filter", filter];
        args.extend_from_slice(carbon);
        Agent::start(&args)
    };
    let dirty = agent("adv-dirty-.*", &["--carbon-intensity", "900"]);
    let clean = agent("adv-clean-.*", &["--carbon-intensity", "20"]);
    let medium = agent("adv-none-.*", &["--carbon-intensity", "100"]);
    let stale_url = stale.url();
    let old = agent(
        "adv-none-.*",
        &[
            "--uk-grid",
            "--uk-grid-url",
            &stale_url,
            "--carbon-refresh",
            "1s",
        ],
    );
    // --vm-filter: each agent exports only its own VMs.
    let m = dirty.wait_for(Duration::from_secs(20), "the busy VM", |m| {
        m.contains("adv-dirty-busy")
    });
    assert!(
        !m.contains("adv-clean-full"),
        "--vm-filter let another host's VM through"
    );
    assert!(!medium.scrape().contains("vm_name=\"adv-"));

    let targets = [
        dirty.addr.as_str(),
        clean.addr.as_str(),
        medium.addr.as_str(),
        old.addr.as_str(),
        broken.addr.as_str(),
    ];
    let prom = Prometheus::start_many(&targets, Duration::from_secs(1), "").unwrap();
    let scraping_since = Instant::now();
    busy.wait_for_console(READY_MARKER, Duration::from_secs(120))
        .unwrap();
    let power_q = "sum(rate(optimus_vm_energy_joules_total{zone=~\"package|dram|gpu\",vm_name=\"adv-dirty-busy\"}[20s]))";
    prom.query_until(power_q, Duration::from_secs(60), |r| {
        r.first().and_then(value).is_some_and(|v| v > 0.0)
    })
    .unwrap();
    // rate() over the window needs a window's worth of samples, or it reads low.
    let full_window = Duration::from_secs(23);
    std::thread::sleep(full_window.saturating_sub(scraping_since.elapsed()));
    // The stale host's one good value is now more than 5 s old.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample(
        &old.scrape(),
        "optimus_grid_carbon_intensity_age_seconds",
        &[("zone", "GB"), ("source", "ukgrid")],
    )
    .is_none_or(|age| age < 7.0)
    {
        assert!(Instant::now() < deadline, "the UK-API host never aged");
        std::thread::sleep(Duration::from_millis(500));
    }

    let url = format!("http://{}", prom.addr());
    // The fleet's advice, the same settings for the JSON and the table. The network
    // energy is a sixtieth of the default: the estimate gives a TCG guest a few watts
    // only, and a loaded CI machine gives it less; the arithmetic is the same.
    let fleet_advice = |more: &[&str]| {
        let mut args = vec![
            "--prometheus",
            url.as_str(),
            "--window",
            "20s",
            "--max-intensity-age",
            "5s",
            "--network-kwh-per-gb",
            "0.001",
        ];
        args.extend_from_slice(more);
        advise(&args)
    };
    let (code, out, err) = fleet_advice(&["--json"]);
    assert_eq!(code, 0, "advise failed: {err}");
    let j: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    eprintln!("{}", serde_json::to_string_pretty(&j).unwrap());
    for h in [&dirty, &clean, &medium] {
        assert_eq!(host(&j, &h.addr)["excluded"], Value::Null, "{j}");
    }
    let why = host(&j, &old.addr)["excluded"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(why.contains("stale"), "stale host: {why}");
    let why = host(&j, &broken.addr)["excluded"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(why.contains("invalid"), "NaN host: {why}");
    assert_eq!(host(&j, &clean.addr)["cpus_free"].as_f64(), Some(0.0));
    let recs = j["recommendations"].as_array().unwrap();
    assert_eq!(recs.len(), 1, "{j}");
    let r = &recs[0];
    assert_eq!(r["vm_name"], "adv-dirty-busy");
    assert_eq!(r["vm_uuid"], busy.uuid());
    assert_eq!(r["from"], dirty.addr.as_str());
    assert_eq!(
        r["to"],
        medium.addr.as_str(),
        "the cleanest host is full: the next one"
    );
    assert_eq!(r["confidence"], "current-only");

    // The same figures, computed here from the same metrics at the same instant.
    let t = chrono_free_parse(j["generated_at"].as_str().unwrap());
    let power = value(&prom.query_at(power_q, t).unwrap()[0]).unwrap();
    let mem = value(
        &prom
            .query_at("optimus_vm_memory_bytes{vm_name=\"adv-dirty-busy\"}", t)
            .unwrap()[0],
    )
    .unwrap();
    assert_eq!(mem, 256.0 * 1024.0 * 1024.0);
    let saving = power / 1000.0 * (900.0 - 100.0);
    let migration = mem / 1e9 * 1.5 * 0.001 * (900.0 + 100.0) / 2.0;
    close(
        "power_watts",
        r["power_watts"].as_f64().unwrap(),
        power,
        0.01,
    );
    close(
        "saving_grams_per_hour",
        r["saving_grams_per_hour"].as_f64().unwrap(),
        saving,
        0.01,
    );
    close(
        "migration_grams",
        r["migration_grams"].as_f64().unwrap(),
        migration,
        0.01,
    );
    close(
        "break_even_hours",
        r["break_even_hours"].as_f64().unwrap(),
        migration / saving,
        0.01,
    );
    close(
        "horizon_saving_grams",
        r["horizon_saving_grams"].as_f64().unwrap(),
        saving * 24.0 - migration,
        0.01,
    );

    // The table says the same for a person.
    let (code, table, _) = fleet_advice(&[]);
    assert_eq!(code, 0);
    assert!(
        table.contains("adv-dirty-busy") && table.contains("excluded: carbon intensity is stale"),
        "{table}"
    );
    assert!(table.contains("dry run"), "{table}");

    // Bad input: Prometheus down, and a Prometheus that scrapes no agent.
    let (code, out, err) = advise(&["--prometheus", "http://127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cannot reach Prometheus"), "{err}");
    drop(prom);
    let empty = Prometheus::start_many(&["127.0.0.1:1"], Duration::from_secs(1), "").unwrap();
    let (code, _, err) = advise(&["--prometheus", &format!("http://{}", empty.addr())]);
    assert_eq!(code, 1);
    assert!(err.contains("knows no Optimus agent"), "{err}");
}

/// `2026-12-01T12:00:00Z` → unix seconds (the test has no date crate).
fn chrono_free_parse(s: &str) -> i64 {
    let (date, time) = s.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let t: Vec<i64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    // Days from civil (inverse of civil_from_days).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + t[0] * 3600 + t[1] * 60 + t.get(2).copied().unwrap_or(0)
}

#[test]
fn time_shifting_picks_the_forecast_minimum_and_agents_export_the_forecast() {
    if optimus_tests::env::require_root("time_shifting_picks_the_forecast_minimum").is_err() {
        return;
    }
    // 48 h of half hours at 300 g/kWh, with one clean hour (40) 10 h from the current half hour.
    let first = now() - now().rem_euclid(1800);
    let server = FakeServer::start(Box::new(move |path, _| {
        let curve = |i: i64| if i == 20 || i == 21 { 40.0 } else { 300.0 };
        if path == "/intensity" {
            (200, uk_periods(first, 1, curve))
        } else if path.starts_with("/intensity/") && path.ends_with("/fw48h") {
            (200, uk_periods(first, 96, curve))
        } else {
            (404, "not found".to_owned())
        }
    }));
    // Every run asks the loopback UK API for zone GB's forecast.
    let url = server.url();
    let shift = |more: &[&str]| {
        let mut args = vec!["--zone", "GB", "--uk-grid-url", url.as_str()];
        args.extend_from_slice(more);
        advise(&args)
    };
    let (code, out, err) = shift(&[
        "--job-kwh",
        "2",
        "--duration",
        "1h",
        "--deadline",
        "24h",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        chrono_free_parse(j["best_start"].as_str().unwrap()),
        first + 20 * 1800,
        "{j}"
    );
    close(
        "emissions_grams",
        j["emissions_grams"].as_f64().unwrap(),
        80.0,
        1e-9,
    );
    close(
        "emissions_now_grams",
        j["emissions_now_grams"].as_f64().unwrap(),
        600.0,
        1e-9,
    );
    close(
        "saving_grams",
        j["saving_grams"].as_f64().unwrap(),
        520.0,
        1e-9,
    );
    // A deadline before the clean hour: the best is to start now.
    let (_, out, _) = shift(&[
        "--job-kwh",
        "2",
        "--duration",
        "1h",
        "--deadline",
        "5h",
        "--json",
    ]);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert!(chrono_free_parse(j["best_start"].as_str().unwrap()) <= now());
    // E and D from an earlier `optimus measure --json`.
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("run.json");
    std::fs::write(
        &job,
        r#"{"command":["train"],"exit_code":0,"wall_seconds":3600.0,"cpu_seconds":3500.0,
            "energy_joules":{"package":5400000.0,"dram":1800000.0},"node_energy_joules":{"package":6000000.0},
            "energy_source":"rapl-powercap","carbon_grams":null,"phases":[]}"#,
    )
    .unwrap();
    let (code, out, err) = shift(&[
        "--job-json",
        job.to_str().unwrap(),
        "--deadline",
        "24h",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    close(
        "job_kwh from measure",
        j["job_kwh"].as_f64().unwrap(),
        2.0,
        1e-9,
    );
    close(
        "duration from measure",
        j["duration_hours"].as_f64().unwrap(),
        1.0,
        1e-9,
    );
    // Bad input: a deadline too close for the job.
    let (code, _, err) = shift(&["--job-kwh", "2", "--duration", "3h", "--deadline", "1h"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("error: the job"), "{err}");

    // The agent exports the same forecast, hour by hour.
    let agent = Agent::start(&[
        "--libvirt-uri",
        "",
        "--uk-grid",
        "--uk-grid-url",
        &server.url(),
        "--carbon-refresh",
        "1s",
    ]);
    let horizon = |m: &str, h: &str| {
        sample(
            m,
            "optimus_grid_carbon_intensity_forecast_grams_per_kwh",
            &[("zone", "GB"), ("source", "ukgrid"), ("horizon", h)],
        )
    };
    // Its family's HELP line is there from the start: wait for a value.
    let m = agent.wait_for(Duration::from_secs(30), "the forecast", |m| {
        horizon(m, "1h").is_some()
    });
    assert_eq!(horizon(&m, "1h"), Some(300.0));
    // now is within the half hour from `first`, so now + 10 h is in the clean hour
    // (first + 10 h to first + 11 h) and now + 9 h is not.
    assert_eq!(horizon(&m, "10h"), Some(40.0), "{m}");
    assert_eq!(horizon(&m, "9h"), Some(300.0), "{m}");
    assert!(horizon(&m, "47h").is_some());
}
