//! Command-line interface. Flags are documented here and in the README; defaults are the
//! safe ones (listen on loopback, libvirt at qemu:///system, 1 s sampling).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Optimus: energy, CO2 and CPU time of each VM on this host, traced with eBPF and exported
/// to Prometheus.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: trace, sample and serve /metrics (the default).
    Run(RunArgs),
    /// Tell what works on this host and what does not, why, and the fix.
    Check(CheckArgs),
}

/// Where to find the host's data sources.
#[derive(Clone, Debug, Args)]
pub struct HostArgs {
    /// libvirt connection URI; an empty string disables libvirt (VMs are still found in /proc).
    #[arg(long, default_value = "qemu:///system", value_name = "URI")]
    pub libvirt_uri: String,
    /// Root of procfs (for containers and tests).
    #[arg(long, default_value = "/proc", value_name = "DIR")]
    pub proc_root: PathBuf,
    /// Root of sysfs (for containers and tests).
    #[arg(long, default_value = "/sys", value_name = "DIR")]
    pub sys_root: PathBuf,
    /// Root of the runtime state directory.
    #[arg(long, default_value = "/run", value_name = "DIR")]
    pub run_root: PathBuf,
}

impl HostArgs {
    /// The libvirt URI, or `None` when disabled.
    pub fn libvirt(&self) -> Option<String> {
        (!self.libvirt_uri.trim().is_empty()).then(|| self.libvirt_uri.clone())
    }

    pub fn paths(&self) -> crate::host::HostPaths {
        crate::host::HostPaths {
            proc: self.proc_root.clone(),
            sys: self.sys_root.clone(),
            run: self.run_root.clone(),
        }
    }
}

/// Where the energy meters are and how to estimate without one.
#[derive(Clone, Debug, Args)]
pub struct EnergyArgs {
    /// Root of the powercap tree (RAPL); for tests and containers.
    #[arg(long, value_name = "DIR")]
    pub powercap_root: Option<PathBuf>,
    /// Load this libnvidia-ml.so instead of the system's.
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
    /// Do not look for NVIDIA GPUs.
    #[arg(long)]
    pub no_nvml: bool,
    /// Never estimate CPU energy, even where no meter exists.
    #[arg(long)]
    pub no_estimate: bool,
    /// Watts per logical CPU for the estimate, idle and busy (`MIN,MAX`), instead of Cloud
    /// Carbon Footprint's table.
    #[arg(long, value_name = "MIN,MAX", value_parser = parse_watts)]
    pub estimate_watts: Option<(f64, f64)>,
}

impl EnergyArgs {
    /// The meters' configuration under the host roots.
    pub fn config(&self, host: &HostArgs) -> crate::energy::EnergyConfig {
        let mut cfg = crate::energy::EnergyConfig::under(&host.sys_root, &host.proc_root);
        if let Some(root) = &self.powercap_root {
            cfg.powercap_root.clone_from(root);
        }
        cfg.nvml = match (&self.nvml_library, self.no_nvml) {
            (_, true) => crate::energy::NvmlConfig::Disabled,
            (Some(path), false) => crate::energy::NvmlConfig::LibPath(path.clone()),
            (None, false) => crate::energy::NvmlConfig::Default,
        };
        cfg.allow_estimate = !self.no_estimate;
        if let Some((min_w, max_w)) = self.estimate_watts {
            cfg.estimate.watts = Some(crate::energy::CpuWatts { min_w, max_w });
        }
        cfg
    }
}

/// Where grid carbon intensity comes from. Nothing set: no carbon metrics (not zeros).
#[derive(Clone, Debug, Args)]
pub struct CarbonArgs {
    /// A fixed grid carbon intensity, grams CO2eq per kWh.
    #[arg(long, value_name = "G_PER_KWH", group = "carbon_source")]
    pub carbon_intensity: Option<f64>,
    /// Electricity Maps zone (e.g. DE, FR, US-CAL-CISO); token from ELECTRICITYMAPS_TOKEN.
    #[arg(long, value_name = "ZONE", group = "carbon_source")]
    pub electricitymaps_zone: Option<String>,
    /// Electricity Maps API base URL.
    #[arg(long, value_name = "URL", default_value = crate::carbon::DEFAULT_ELECTRICITY_MAPS_URL)]
    pub electricitymaps_url: String,
    /// Great Britain's national grid intensity from the UK Carbon Intensity API.
    #[arg(long, group = "carbon_source")]
    pub uk_grid: bool,
    /// UK Carbon Intensity API base URL.
    #[arg(long, value_name = "URL", default_value = crate::carbon::DEFAULT_UK_GRID_URL)]
    pub uk_grid_url: String,
    /// Power usage effectiveness of the data centre (1.0 to 10), multiplies every gram.
    #[arg(long, default_value = "1.0", value_name = "PUE")]
    pub pue: f64,
    /// How often to refresh an API's intensity.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub carbon_refresh: Duration,
}

impl CarbonArgs {
    /// The carbon source's configuration.
    pub fn config(&self) -> crate::carbon::CarbonConfig {
        use crate::carbon::CarbonConfig;
        if let Some(g_per_kwh) = self.carbon_intensity {
            CarbonConfig::Static { g_per_kwh }
        } else if let Some(zone) = &self.electricitymaps_zone {
            CarbonConfig::ElectricityMaps {
                zone: zone.clone(),
                token: crate::carbon::token_from_env(),
                base_url: self.electricitymaps_url.clone(),
            }
        } else if self.uk_grid {
            CarbonConfig::UkGrid {
                base_url: self.uk_grid_url.clone(),
            }
        } else {
            CarbonConfig::None
        }
    }
}

/// Flags of `optimus check`.
#[derive(Clone, Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub host: HostArgs,
    #[command(flatten)]
    pub energy: EnergyArgs,
}

/// Flags of `optimus run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Address to serve /metrics on. Loopback by default: expose it on purpose.
    #[arg(long, default_value = "127.0.0.1:9947", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Sampling interval, e.g. `1s`, `500ms` (independent of scrapes).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Duration,
    /// Charge every thread on the host, not only VM threads (costs a little more per switch).
    #[arg(long)]
    pub track_all: bool,
    /// Do not trace block I/O.
    #[arg(long)]
    pub no_block_io: bool,
    /// Also attach an empty sched_switch program (the baseline of `cargo xtask bench`).
    #[arg(long, hide = true)]
    pub bench_baseline: bool,
    #[command(flatten)]
    pub energy: EnergyArgs,
    #[command(flatten)]
    pub carbon: CarbonArgs,
    /// Spread idle energy over running VMs: by vCPU count, by memory size, or not at all.
    #[arg(long, value_enum, default_value = "none")]
    pub idle_policy: crate::attribution::IdlePolicy,
}

impl Default for RunArgs {
    fn default() -> Self {
        match Cli::try_parse_from(["optimus", "run"]) {
            Ok(Cli {
                command: Some(Command::Run(args)),
                ..
            }) => args,
            _ => unreachable!("`optimus run` with no flags always parses"),
        }
    }
}

/// Parses `MIN,MAX` watts, `0 <= MIN <= MAX <= 1000`.
pub fn parse_watts(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("`{s}` is not MIN,MAX watts; write e.g. 0.74,3.5"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|w| w.is_finite() && (0.0..=1000.0).contains(w))
            .ok_or_else(|| format!("`{v}` is not a wattage between 0 and 1000"))
    };
    let (min, max) = (parse(a)?, parse(b)?);
    if min > max {
        return Err(format!("idle watts {min} exceed busy watts {max}"));
    }
    Ok((min, max))
}

/// Parses `1s`, `250ms`, `2m` or a bare number of seconds; 10 ms to 1 h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| (&s[..i], s[i..].trim()));
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. 1s or 500ms"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit `{unit}` in `{s}`; use ms, s or m")),
    };
    if !(0.01..=3600.0).contains(&secs) {
        return Err(format!("`{s}` is out of range; use 10ms to 1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1h").is_err());
    }

    #[test]
    fn watts() {
        assert_eq!(parse_watts("0.74,3.5").unwrap(), (0.74, 3.5));
        assert!(parse_watts("3.5,0.74").is_err());
        assert!(parse_watts("1").is_err());
        assert!(parse_watts("nan,1").is_err());
    }

    #[test]
    fn defaults_are_safe() {
        let args = RunArgs::default();
        assert!(args.listen.ip().is_loopback());
        assert_eq!(args.listen.port(), 9947);
        assert_eq!(args.interval, Duration::from_secs(1));
        assert_eq!(args.host.libvirt().as_deref(), Some("qemu:///system"));
        assert_eq!(args.carbon.config(), crate::carbon::CarbonConfig::None);
    }

    #[test]
    fn one_carbon_source_at_a_time() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["optimus", "run"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        assert!(parse(&["--carbon-intensity", "200", "--uk-grid"]).is_err());
        let Ok(Cli {
            command: Some(Command::Run(args)),
            ..
        }) = parse(&["--electricitymaps-zone", "DE"])
        else {
            panic!("did not parse");
        };
        assert!(matches!(
            args.carbon.config(),
            crate::carbon::CarbonConfig::ElectricityMaps { zone, .. } if zone == "DE"
        ));
    }
}
