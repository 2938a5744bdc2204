//! The guest's own GPUs through NVML: one reading per GPU per interval, its energy counter
//! (millijoules) where the GPU has one, else its power integrated over time.

use std::path::Path;
use std::time::Instant;

use nvml_wrapper::Nvml;

use crate::channel::protocol::GpuReading;

struct Gpu {
    index: u32,
    uuid: String,
    pci_bus_id: String,
    /// For a GPU without an energy counter: the integral so far (mJ) and the last read.
    integrated_mj: f64,
    last: Option<(Instant, f64)>,
}

/// The GPUs NVML lists in this VM.
pub struct Gpus {
    nvml: Nvml,
    gpus: Vec<Gpu>,
}

impl Gpus {
    /// Loads NVML (`library` instead of the system's `libnvidia-ml.so.1` when given) and
    /// lists its GPUs.
    pub fn open(library: Option<&Path>) -> Result<Self, nvml_wrapper::error::NvmlError> {
        let nvml = match library {
            Some(path) => Nvml::builder().lib_path(path.as_os_str()).init()?,
            None => Nvml::init()?,
        };
        let count = nvml.device_count()?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let device = nvml.device_by_index(index)?;
            gpus.push(Gpu {
                index,
                uuid: device.uuid().unwrap_or_default(),
                pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                integrated_mj: 0.0,
                last: None,
            });
        }
        Ok(Self { nvml, gpus })
    }

    /// How many GPUs there are.
    pub fn len(&self) -> usize {
        self.gpus.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.gpus.is_empty()
    }

    /// One reading of every GPU that answers.
    pub fn read(&mut self) -> Vec<GpuReading> {
        let mut out = Vec::with_capacity(self.gpus.len());
        for g in &mut self.gpus {
            let Ok(device) = self.nvml.device_by_index(g.index) else {
                continue;
            };
            let (mj, method) = match device.total_energy_consumption() {
                Ok(mj) => (mj, "counter"),
                Err(_) => {
                    let Ok(mw) = device.power_usage() else {
                        continue;
                    };
                    let now = Instant::now();
                    let w = f64::from(mw) / 1e3;
                    if let Some((at, last_w)) = g.last {
                        // Trapezoid between two reads: W × s = J, × 1000 = mJ.
                        g.integrated_mj +=
                            (w + last_w) / 2.0 * now.duration_since(at).as_secs_f64() * 1e3;
                    }
                    g.last = Some((now, w));
                    (crate::energy::round_to_u64(g.integrated_mj), "power")
                }
            };
            out.push(GpuReading {
                uuid: g.uuid.clone(),
                pci_bus_id: g.pci_bus_id.clone(),
                energy_mj: mj.into(),
                method: method.to_owned(),
            });
        }
        out
    }
}
