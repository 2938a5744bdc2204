//! A real RAPL meter, where the host has one: a powercap root in (`/sys/class/powercap`, or
//! `--rapl-root` for a fixture tree); whether it is usable, and its package energy
//! (Σ of the `package-N` zones, wraps corrected) as the run goes, out. With it the report
//! also gives the estimate's and the model's error against a real meter.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// What the run found.
#[derive(Clone, Debug, Serialize)]
pub struct Rapl {
    pub present: bool,
    pub detail: String,
    /// The package zones' directories (empty when not present).
    #[serde(skip)]
    pub zones: Vec<PathBuf>,
}

/// Looks for readable RAPL package zones under `root` (top-level `intel-rapl:N` /
/// `amd-rapl:N` style directories whose `name` starts with `package`).
pub fn detect(root: &Path) -> Rapl {
    let absent = |detail: String| Rapl {
        present: false,
        detail,
        zones: Vec::new(),
    };
    let Ok(dir) = std::fs::read_dir(root) else {
        return absent(format!(
            "{} does not exist: no powercap driver, so no RAPL meter",
            root.display()
        ));
    };
    let mut zones = Vec::new();
    let mut unreadable = None;
    let mut entries: Vec<PathBuf> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let name = std::fs::read_to_string(path.join("name")).unwrap_or_default();
        if !name.trim().starts_with("package") {
            continue;
        }
        match std::fs::read_to_string(path.join("energy_uj")) {
            Ok(_) => zones.push(path),
            Err(e) => unreadable = Some(format!("{}/energy_uj: {e}", path.display())),
        }
    }
    if zones.is_empty() {
        return absent(unreadable.map_or_else(
            || format!("{} has no RAPL package zone", root.display()),
            |u| format!("a RAPL package zone exists but cannot be read ({u})"),
        ));
    }
    Rapl {
        present: true,
        detail: format!("{} package zone(s) under {}", zones.len(), root.display()),
        zones,
    }
}

/// Cumulative package energy of the real meter, wraps corrected.
#[derive(Debug)]
pub struct Counter {
    zones: Vec<(PathBuf, u64, Option<u64>)>,
    /// Joules since the counter started.
    pub joules: f64,
}

impl Counter {
    pub fn new(rapl: &Rapl) -> Self {
        let zones = rapl
            .zones
            .iter()
            .map(|z| {
                let range = read_u64(&z.join("max_energy_range_uj")).unwrap_or(u64::from(u32::MAX));
                (z.clone(), range, read_u64(&z.join("energy_uj")))
            })
            .collect();
        Self { zones, joules: 0.0 }
    }

    /// Reads every zone and adds what each advanced (a counter that went down wrapped once).
    pub fn advance(&mut self) {
        for (path, range, last) in &mut self.zones {
            let Some(now) = read_u64(&path.join("energy_uj")) else {
                continue;
            };
            if let Some(before) = *last {
                let delta = if now >= before {
                    now - before
                } else {
                    (*range - before).saturating_add(now)
                };
                #[expect(clippy::cast_precision_loss, reason = "microjoules of one step")]
                let j = delta as f64 / 1e6;
                self.joules += j;
            }
            *last = Some(now);
        }
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a test's panic is its failure report")]
mod tests {
    use std::fs;

    #[test]
    fn finds_package_zones_and_counts_across_a_wrap() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!super::detect(&tmp.path().join("none")).present);
        assert!(!super::detect(tmp.path()).present);
        let z = tmp.path().join("intel-rapl:0");
        fs::create_dir_all(z.join("intel-rapl:0:0")).unwrap();
        fs::write(z.join("name"), "package-0\n").unwrap();
        fs::write(z.join("max_energy_range_uj"), "1000000\n").unwrap();
        fs::write(z.join("energy_uj"), "900000\n").unwrap();
        let r = super::detect(tmp.path());
        assert!(r.present, "{r:?}");
        let mut c = super::Counter::new(&r);
        fs::write(z.join("energy_uj"), "950000\n").unwrap();
        c.advance();
        fs::write(z.join("energy_uj"), "50000\n").unwrap();
        c.advance();
        assert!((c.joules - 0.15).abs() < 1e-9, "{}", c.joules);
    }
}
