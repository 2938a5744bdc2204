//! Carbon part of a sample: each interval's VM energy times the grid intensity in force
//! during that interval, times the PUE, accumulated per VM.

use std::collections::BTreeMap;

use crate::carbon::{grams, CarbonSource};
use crate::discovery::VmId;

/// Carbon part of a snapshot; absent when no intensity source is configured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CarbonSnapshot {
    /// The intensity in force (g/kWh), its zone and source labels; `None` until the first
    /// good value.
    pub intensity: Option<(f64, String, &'static str)>,
    /// Seconds since the intensity was last fetched (APIs only).
    pub age_seconds: Option<f64>,
    /// Cumulative grams CO2eq per running VM.
    pub vm_grams: BTreeMap<VmId, f64>,
    /// Failed refreshes by kind (`http_429`, `timeout`, `malformed`, ...).
    pub errors: BTreeMap<&'static str, u64>,
    /// Forecast intensity `(hours ahead, g/kWh)`, 1 to 48 h where the provider covers it;
    /// empty for a static value or before the first forecast.
    pub forecast: Vec<(u32, f64)>,
}

/// The intensity source and the per-VM grams ledger.
pub struct CarbonState {
    source: CarbonSource,
    forecast: Option<crate::carbon::forecast::ForecastSource>,
    pue: f64,
    vm_grams: BTreeMap<VmId, f64>,
}

impl CarbonState {
    pub fn new(source: CarbonSource, pue: f64) -> Self {
        Self {
            source,
            forecast: None,
            pue,
            vm_grams: BTreeMap::new(),
        }
    }

    /// Also exports the forecast of `forecast`.
    #[must_use]
    pub fn with_forecast(mut self, forecast: crate::carbon::forecast::ForecastSource) -> Self {
        self.forecast = Some(forecast);
        self
    }

    /// Adds one interval: `vm_joules` is each running VM's energy in the interval.
    pub fn step(&mut self, vm_joules: &BTreeMap<VmId, f64>) -> CarbonSnapshot {
        let status = self.source.status();
        let current = status.current;
        // VMs that are gone take their series with them.
        self.vm_grams.retain(|id, _| vm_joules.contains_key(id));
        for (id, j) in vm_joules {
            let g = self.vm_grams.entry(id.clone()).or_default();
            if let Some(i) = &current {
                *g += grams(*j, i.g_per_kwh, self.pue);
            }
        }
        CarbonSnapshot {
            intensity: current.map(|i| (i.g_per_kwh, i.zone, i.source)),
            age_seconds: status.age.map(|a| a.as_secs_f64()),
            vm_grams: self.vm_grams.clone(),
            errors: status.errors,
            forecast: self
                .forecast
                .as_ref()
                .map(crate::carbon::forecast::ForecastSource::hourly)
                .unwrap_or_default(),
        }
    }
}
