//! The snapshot document, the history ring's bounds and arithmetic, and the page's
//! self-containment (no external URL, no inline script or style).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::history::{MAX_POINTS, VMS_PER_POINT, WINDOW};
use super::*;
use crate::discovery::{VmId, VmSource};
use crate::energy::{MeterSource, Zone, ZoneKey};
use crate::sampler::blockio::Io;
use crate::sampler::carbon::CarbonSnapshot;
use crate::sampler::energy::{EnergySnapshot, NodeZone};
use crate::sampler::{AgentStats, VmSnapshot};

pub(crate) fn vm_id(name: &str) -> VmId {
    VmId {
        name: name.into(),
        uuid: format!("uuid-{name}"),
    }
}

/// A host at `t` seconds of steady state: package 20 W + dram 5 W; VM `alpha` 8 + 1 W,
/// `beta` 2 W (package), idle 10 + 3 W, host the rest (1 W); alpha's vCPU 0 90 % busy,
/// vCPU 1 10 %, writing 1 MB/s; 300 g/kWh.
pub(crate) fn fixture(t: f64) -> Snapshot {
    let (alpha, beta) = (vm_id("alpha"), vm_id("beta"));
    let zone = |zone, watts: f64, idle: f64, vms: f64| NodeZone {
        key: ZoneKey::new(zone, "package-0", MeterSource::RaplPowercap),
        joules: Some(watts * t),
        watts: Some(watts),
        wraps: 0,
        glitches: 0,
        idle_joules: idle * t,
        unattributed_joules: (watts - idle - vms) * t,
    };
    let vm = |id: &VmId, vcpus: &[f64], write_bps: f64| VmSnapshot {
        id: id.clone(),
        source: VmSource::Libvirt,
        cpu_seconds_by_kind: [vcpus.iter().sum::<f64>() * t, 0.0, 0.0, 0.0, 0.0],
        vcpu_seconds: vcpus
            .iter()
            .enumerate()
            .map(|(i, f)| (u32::try_from(i).unwrap(), f * t))
            .collect(),
        vcpus: Some(u32::try_from(vcpus.len()).unwrap()),
        memory_bytes: Some(1 << 30),
        namespace: None,
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "test"
        )]
        block_io: [
            Io::default(),
            Io {
                bytes: (write_bps * t) as u64,
                ops: (t * 10.0) as u64,
            },
        ],
    };
    let mut vms = BTreeMap::new();
    vms.insert(
        alpha.clone(),
        BTreeMap::from([
            ((Zone::Package, "rapl-powercap"), (8.0 * t, 8.0)),
            ((Zone::Dram, "rapl-powercap"), (t, 1.0)),
            // Core is inside package: never added to a VM's total.
            ((Zone::Core, "rapl-powercap"), (6.0 * t, 6.0)),
        ]),
    );
    vms.insert(
        beta.clone(),
        BTreeMap::from([((Zone::Package, "rapl-powercap"), (2.0 * t, 2.0))]),
    );
    Snapshot {
        vms: vec![vm(&alpha, &[0.9, 0.1], 1e6), vm(&beta, &[0.2], 0.0)],
        carbon: Some(CarbonSnapshot {
            intensity: Some((300.0, "static".into(), "static")),
            age_seconds: None,
            vm_grams: BTreeMap::from([
                (alpha, 9.0 * t / 3.6e6 * 300.0),
                (beta, 2.0 * t / 3.6e6 * 300.0),
            ]),
            errors: BTreeMap::new(),
            forecast: Vec::new(),
        }),
        energy: Some(EnergySnapshot {
            zones: vec![
                zone(Zone::Package, 20.0, 10.0, 10.0),
                zone(Zone::Dram, 5.0, 3.0, 1.0),
                zone(Zone::Core, 12.0, 0.0, 6.0),
            ],
            vms,
            vm_interval_joules: BTreeMap::new(),
            meters: Vec::new(),
            model: Vec::new(),
            forecasts: BTreeMap::new(),
            forecast_error: [None, None],
        }),
        block_devices: BTreeMap::new(),
        node: crate::sampler::NodeSnapshot::default(),
        agent: AgentStats {
            samples: 7,
            ..AgentStats::default()
        },
        phases: BTreeMap::new(),
        guest_channels: BTreeMap::new(),
        guest_view: None,
    }
}

/// A history fed one snapshot a second for `n` seconds from `start`.
pub(crate) fn history(start: Instant, n: u32) -> History {
    let h = History::new();
    for i in 0..=n {
        let t = f64::from(i) + 100.0;
        h.push_at(
            &fixture(t),
            start + Duration::from_secs(u64::from(i)),
            1.7e9 + t,
        );
    }
    h
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9 * b.abs().max(1.0)
}

#[test]
fn document_adds_up_and_uses_only_non_overlapping_zones() {
    let h = history(Instant::now(), 3);
    let doc = SnapshotDoc::new(&fixture(103.0), &h, None);
    assert_eq!(doc.node.power_watts, Some(25.0));
    assert!(close(doc.node.energy_joules.unwrap(), 25.0 * 103.0));
    let s = doc.node.split_watts.unwrap();
    assert!(
        close(s.vms, 11.0) && close(s.idle, 13.0) && close(s.host, 1.0),
        "{s:?}"
    );
    let alpha = &doc.vms[0];
    assert_eq!(alpha.name, "alpha");
    assert!(
        close(alpha.power_watts, 9.0),
        "core must not be added: {alpha:?}"
    );
    assert!(close(alpha.energy_joules, 9.0 * 103.0));
    assert!(close(
        alpha.carbon_grams.unwrap(),
        9.0 * 103.0 / 3.6e6 * 300.0
    ));
    let busy: Vec<f64> = alpha.vcpus.iter().map(|v| v.busy.unwrap()).collect();
    assert!(close(busy[0], 0.9) && close(busy[1], 0.1), "{busy:?}");
    assert!(close(alpha.block_io.write_bytes_per_second.unwrap(), 1e6));
    assert_eq!(alpha.block_io.read_bytes_per_second, Some(0.0));
    assert_eq!(
        doc.carbon.as_ref().unwrap().intensity_g_per_kwh,
        Some(300.0)
    );
    assert!(doc.node.zones.iter().all(|z| z.measured && z.available));
    assert_eq!(doc.agent.samples, 7);
    assert_eq!(doc.time, Some(1.7e9 + 103.0));
    assert_eq!(doc.history.points.len(), 4);
    assert_eq!(doc.history.names["uuid-alpha"], "alpha");
}

#[test]
fn first_sample_has_no_rates_and_no_split() {
    let h = History::new();
    h.push_at(&fixture(1.0), Instant::now(), 1.7e9);
    let doc = SnapshotDoc::new(&fixture(1.0), &h, None);
    assert_eq!(doc.node.split_watts, None);
    assert_eq!(doc.vms[0].vcpus[0].busy, None);
    assert_eq!(doc.vms[0].block_io.write_bytes_per_second, None);
    assert_eq!(doc.node.power_watts, Some(25.0));
}

#[test]
fn json_field_names_are_the_documented_ones() {
    let h = history(Instant::now(), 2);
    let v = snapshot_json(&fixture(102.0), &h, None);
    for key in [
        "version", "time", "node", "carbon", "vms", "agent", "history",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    let vm = &v["vms"][0];
    for key in [
        "name",
        "uuid",
        "source",
        "power_watts",
        "energy_joules",
        "carbon_grams",
        "cpu_seconds",
        "vcpus",
        "block_io",
        "phase",
    ] {
        assert!(vm.get(key).is_some(), "missing vms[].{key} in {vm}");
    }
    assert!(v["node"]["split_watts"]["idle"].is_f64());
    assert!(v["history"]["points"][0]["vm"]["uuid-alpha"].is_f64());
    // The same type reads it back (what `optimus top` does).
    let back: SnapshotDoc = serde_json::from_value(v).unwrap();
    assert_eq!(back.vms.len(), 2);
}

#[test]
fn since_returns_only_newer_points() {
    let h = history(Instant::now(), 10);
    let all = h.points_since(None);
    assert_eq!(all.len(), 11);
    let newer = h.points_since(Some(all[7].t));
    assert_eq!(newer.len(), 3);
    assert!(newer.iter().all(|p| p.t > all[7].t));
    assert!(h.points_since(Some(1e300)).is_empty());
    assert_eq!(since_param("a=1&since=1700000000.5"), Some(1_700_000_000.5));
    assert_eq!(since_param("since=NaN"), None);
    assert_eq!(since_param("since=x"), None);
    assert_eq!(since_param(""), None);
}

#[test]
fn ring_is_bounded_by_time_count_and_vms() {
    let start = Instant::now();
    let h = History::new();
    // One snapshot every 100 ms for 20 minutes: points at least 0.5 s apart, at most
    // 15 minutes old, never more than MAX_POINTS.
    for i in 0..12_000u32 {
        let t = f64::from(i) / 10.0;
        h.push_at(
            &fixture(t + 1.0),
            start + Duration::from_millis(u64::from(i) * 100),
            1.7e9 + t,
        );
        assert!(h.len() <= MAX_POINTS);
    }
    let pts = h.points_since(None);
    let span = pts.last().unwrap().t - pts[0].t;
    assert!(
        span <= WINDOW.as_secs_f64() && span > WINDOW.as_secs_f64() - 1.0,
        "{span}"
    );
    assert!(pts.windows(2).all(|w| w[1].t - w[0].t >= 0.5 - 1e-9));
    assert_eq!(pts.len(), MAX_POINTS);

    // 20 VMs: only the most powerful VMS_PER_POINT are charted, all count in vms_w.
    let mut many = fixture(200.0);
    let energy = many.energy.as_mut().unwrap();
    for i in 0..20u32 {
        let id = vm_id(&format!("vm{i:02}"));
        energy.vms.insert(
            id.clone(),
            BTreeMap::from([((Zone::Package, "rapl-powercap"), (1.0, f64::from(i)))]),
        );
        let mut vm = many.vms[1].clone();
        vm.id = id;
        many.vms.push(vm);
    }
    let h = History::new();
    h.push_at(&many, start, 1.7e9);
    let p = &h.points_since(None)[0];
    assert_eq!(p.vm_w.len(), VMS_PER_POINT);
    assert_eq!(p.vm_w[0].0.name, "vm19");
    assert!(close(p.vms_w, 11.0 + f64::from((0..20).sum::<u32>())));
}

#[test]
fn page_is_self_contained_and_small() {
    let total: usize = ASSETS.iter().map(|a| a.body.len()).sum();
    assert!(total < 32 * 1024, "page is {total} bytes");
    for a in ASSETS {
        for bad in ["http://", "https://", "//cdn", "@import", "url("] {
            // The only absolute URL allowed is the SVG namespace, which is not fetched.
            let hits = a.body.matches(bad).count()
                - usize::from(bad == "http://" && a.body.contains("http://www.w3.org/2000/svg"));
            assert_eq!(hits, 0, "{} contains {bad}", a.path);
        }
        assert!(!a.body.contains("innerHTML"), "{} uses innerHTML", a.path);
    }
    let html = asset("/").unwrap().body;
    assert!(!html.contains("<script>") && !html.contains(" style="));
    assert!(html.contains("<script src=\"/app.js\" defer></script>"));
    assert!(html.contains("href=\"/style.css\""));
    assert_eq!(asset("/index.html"), asset("/"));
    assert!(asset("/nope").is_none());
    assert!(CSP.starts_with("default-src 'none'"));
    assert!(!CSP.contains("unsafe"));
}

#[test]
fn routes_serve_the_page_and_the_api_with_the_csp() {
    use std::sync::{Arc, RwLock};

    use hyper::header::HeaderMap;
    use hyper::{Method, StatusCode};

    use crate::http::routes::{route, AppState};

    let start = Instant::now();
    let app = AppState {
        snapshot: Arc::new(RwLock::new(Arc::new(fixture(105.0)))),
        history: Arc::new(history(start, 5)),
    };
    let get = |path: &str, query: &str| route(&Method::GET, path, query, &HeaderMap::new(), &app);
    let csp = |r: &crate::http::routes::Reply| {
        r.headers
            .iter()
            .find(|(n, _)| n == "content-security-policy")
            .map(|(_, v)| v.to_str().unwrap().to_owned())
    };
    for (path, ctype) in [
        ("/", "text/html"),
        ("/index.html", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let r = get(path, "");
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(
            r.content_type.starts_with(ctype),
            "{path}: {}",
            r.content_type
        );
        assert_eq!(csp(&r).as_deref(), Some(CSP), "{path}");
    }
    let r = get("/api/v1/snapshot", "");
    assert_eq!(
        (r.status, r.content_type),
        (StatusCode::OK, "application/json")
    );
    assert_eq!(csp(&r).as_deref(), Some(CSP));
    let doc: SnapshotDoc = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(doc.vms.len(), 2);
    assert_eq!(doc.history.points.len(), 6);
    let last = doc.history.points[3].t;
    let r = get("/api/v1/snapshot", &format!("since={last}"));
    let doc: SnapshotDoc = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(doc.history.points.len(), 2);
    assert_eq!(get("/app.js.map", "").status, StatusCode::NOT_FOUND);
}
