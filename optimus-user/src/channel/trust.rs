//! A guest's GPU energy claims, judged: readings in, accepted microjoules per GPU out.
//!
//! A claim is accepted only when all of these hold (README "Guest channel"):
//! - the GPU is one the domain passes through to this VM ([`OwnedGpu`]): its guest-side PCI
//!   address equals the reading's `pci_bus_id`, and, where the host knows the GPU's UUID,
//!   the UUIDs agree;
//! - the energy is a non-negative integer of millijoules, not lower than the last accepted
//!   reading of that GPU (`non_monotonic`);
//! - the energy claimed since the GPU's first reading of the session is at most
//!   `max_watts × (host seconds since that reading + 1 s)`: on average the GPU drew no more
//!   than `--guest-gpu-max-watts`. Judging the total rather than each step keeps an honest
//!   guest whose messages arrive bunched (a busy host) from being refused, and bounds a
//!   lying one all the same; the 1 s is the interval before the first reading.
//!
//! The first reading of a session is the baseline: it charges nothing.

use std::collections::BTreeMap;

use super::protocol::{normalize_pci, ErrorKind, GpuReading};

/// Grace added to the elapsed time of the wattage bound, seconds.
const GRACE_S: f64 = 1.0;

/// A GPU that the domain passes through to the VM.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedGpu {
    /// Its PCI address inside the guest, normalised (`0000:00:05.0`).
    pub guest_pci: String,
    /// Its PCI address on the host, normalised: the GPU's identity on the node.
    pub host_pci: String,
    /// Its NVML UUID, when the domain names it.
    pub uuid: Option<String>,
}

impl OwnedGpu {
    /// The `device` label of its energy series: `pci-<host address>`.
    pub fn device(&self) -> String {
        format!("pci-{}", self.host_pci)
    }
}

#[derive(Clone, Debug, PartialEq)]
struct GpuState {
    first_mj: u64,
    first_at_s: f64,
    last_mj: u64,
}

/// One VM's accepted GPU energy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuClaims {
    /// By device label.
    state: BTreeMap<String, GpuState>,
    /// Accepted and not yet taken, microjoules by device label.
    pending: BTreeMap<String, u64>,
}

impl GpuClaims {
    /// A new session (the guest said hello): the next readings are baselines again.
    pub fn reset(&mut self) {
        self.state.clear();
    }

    /// Judges one reading received at host time `now_s` (monotonic seconds).
    pub fn claim(
        &mut self,
        owned: &[OwnedGpu],
        reading: &GpuReading,
        max_watts: f64,
        now_s: f64,
    ) -> Result<(), ErrorKind> {
        let mj = reading.energy_mj.as_u64().ok_or(ErrorKind::InvalidValue)?;
        let pci = normalize_pci(&reading.pci_bus_id).ok_or(ErrorKind::InvalidValue)?;
        let gpu = owned
            .iter()
            .find(|g| {
                g.guest_pci == pci
                    && g.uuid
                        .as_ref()
                        .is_none_or(|u| u.eq_ignore_ascii_case(reading.uuid.trim()))
            })
            .ok_or(ErrorKind::NotOwned)?;
        let device = gpu.device();
        let Some(s) = self.state.get_mut(&device) else {
            self.state.insert(
                device,
                GpuState {
                    first_mj: mj,
                    first_at_s: now_s,
                    last_mj: mj,
                },
            );
            return Ok(());
        };
        if mj < s.last_mj {
            return Err(ErrorKind::NonMonotonic);
        }
        #[expect(clippy::cast_precision_loss, reason = "millijoules, far below 2^53")]
        let since_first_j = (mj - s.first_mj) as f64 / 1e3;
        let allowed_j = max_watts * ((now_s - s.first_at_s).max(0.0) + GRACE_S);
        if since_first_j > allowed_j {
            return Err(ErrorKind::OverMaxWatts);
        }
        let delta_uj = (mj - s.last_mj).saturating_mul(1000);
        s.last_mj = mj;
        *self.pending.entry(device).or_default() += delta_uj;
        Ok(())
    }

    /// The last accepted reading of each GPU this session, millijoules by device label.
    pub fn last_readings(&self) -> BTreeMap<String, u64> {
        self.state
            .iter()
            .map(|(d, s)| (d.clone(), s.last_mj))
            .collect()
    }

    /// Accepted microjoules per device since the last call.
    pub fn take(&mut self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn owned() -> Vec<OwnedGpu> {
        vec![OwnedGpu {
            guest_pci: "0000:00:05.0".into(),
            host_pci: "0000:65:00.0".into(),
            uuid: Some("GPU-abc".into()),
        }]
    }

    fn reading(pci: &str, uuid: &str, mj: i64) -> GpuReading {
        GpuReading {
            uuid: uuid.into(),
            pci_bus_id: pci.into(),
            energy_mj: mj.into(),
            method: "counter".into(),
        }
    }

    #[test]
    fn baseline_then_deltas() {
        let mut c = GpuClaims::default();
        let o = owned();
        let ok = |c: &mut GpuClaims, mj, t| {
            c.claim(&o, &reading("00000000:00:05.0", "gpu-ABC", mj), 1000.0, t)
        };
        ok(&mut c, 1_000_000, 0.0).unwrap();
        assert!(c.take().is_empty(), "the baseline charges nothing");
        ok(&mut c, 1_005_000, 1.0).unwrap();
        ok(&mut c, 1_010_000, 2.0).unwrap();
        assert_eq!(
            c.take(),
            [("pci-0000:65:00.0".to_owned(), 10_000_000)].into()
        );
        assert_eq!(ok(&mut c, 1_009_999, 3.0), Err(ErrorKind::NonMonotonic));
        // 1000 W for 4 s plus 1 s grace: 5000 J since the first reading at most.
        assert_eq!(
            ok(&mut c, 1_000_000 + 5_000_001, 4.0),
            Err(ErrorKind::OverMaxWatts)
        );
        ok(&mut c, 1_000_000 + 5_000_000, 4.0).unwrap();
        assert_eq!(
            c.take(),
            [("pci-0000:65:00.0".to_owned(), 4_990_000_000)].into()
        );
        c.reset();
        ok(&mut c, 3, 5.0).unwrap();
        assert!(
            c.take().is_empty(),
            "a new session starts from a new baseline"
        );
    }

    #[test]
    fn refusals() {
        let mut c = GpuClaims::default();
        let o = owned();
        let mut claim = |r: GpuReading| c.claim(&o, &r, 1000.0, 0.0);
        assert_eq!(
            claim(reading("0000:00:06.0", "GPU-abc", 1)),
            Err(ErrorKind::NotOwned)
        );
        assert_eq!(
            claim(reading("0000:00:05.0", "GPU-other", 1)),
            Err(ErrorKind::NotOwned)
        );
        assert_eq!(
            claim(reading("0000:00:05.0", "GPU-abc", -1)),
            Err(ErrorKind::InvalidValue)
        );
        assert_eq!(
            claim(reading("nonsense", "GPU-abc", 1)),
            Err(ErrorKind::InvalidValue)
        );
        let mut frac = reading("0000:00:05.0", "GPU-abc", 0);
        frac.energy_mj = serde_json::Number::from_f64(1.5).unwrap();
        assert_eq!(claim(frac), Err(ErrorKind::InvalidValue));
        assert_eq!(c.take(), BTreeMap::new());
    }

    #[test]
    fn device_label() {
        assert_eq!(owned()[0].device(), "pci-0000:65:00.0");
    }
}
