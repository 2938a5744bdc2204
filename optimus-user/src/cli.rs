//! Command-line interface. Flags are documented here and in the README; defaults are the
//! safe ones (listen on loopback, libvirt at qemu:///system, 1 s sampling).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Optimus: energy, CO2 and CPU time of each VM on this host, traced with eBPF and exported
/// to Prometheus.
#[derive(Debug, Parser)]
#[command(name = "optimus", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: trace, sample and serve /metrics (the default).
    Run(Box<RunArgs>),
    /// Tell what works on this host and what does not, why, and the fix.
    Check(CheckArgs),
    /// Write the man pages (optimus.1, optimus-run.1, optimus-check.1) into DIR, for
    /// packaging (`cargo xtask deb`).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Carbon-aware advice from Prometheus: which VM to move to which host, when to run a job.
    Advise(Box<AdviseArgs>),
    /// Live terminal view of a running agent: node power, grid intensity, one row per VM.
    Top(TopArgs),
    /// Run a command and report its CPU time, block I/O, energy and CO2, by phase.
    #[command(override_usage = "optimus measure [OPTIONS] -- CMD [ARGS...]")]
    Measure(MeasureArgs),
    /// Start or end a phase of a VM on the running agent.
    #[command(
        override_usage = "optimus phase [OPTIONS] --vm NAME|UUID NAME [key=value ...]\n       optimus phase [OPTIONS] --vm NAME|UUID -"
    )]
    Phase(PhaseArgs),
    /// Work with power model files (`optimus model show FILE`).
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Predict a host's power from a power model file, for a given load.
    Predict(PredictArgs),
    /// Run inside a VM: talk to the host agent over the virtio-serial guest channel, serve
    /// this VM's own figures on /metrics, report passthrough GPUs and phases to the host.
    Guest(Box<GuestArgs>),
}

/// Flags of `optimus guest`.
#[derive(Clone, Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GuestArgs {
    #[command(subcommand)]
    pub command: Option<GuestCommand>,
    /// The virtio-serial port of the channel (without udev: found by its name in
    /// /sys/class/virtio-ports).
    #[arg(long, default_value = crate::guest::port::DEFAULT_PORT, value_name = "PATH")]
    pub port: PathBuf,
    /// Address to serve this VM's /metrics on (IP:PORT), inside the VM.
    #[arg(long, default_value = "127.0.0.1:9947", value_name = "ADDR", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// The FIFO that jobs write phase lines to (point OPTIMUS_PHASE at it).
    #[arg(long, default_value = crate::guest::phase::DEFAULT_PHASE_PATH, value_name = "PATH")]
    pub phase_path: PathBuf,
    /// How often the GPUs are read and reported.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Duration,
    /// Load this libnvidia-ml.so instead of the system's.
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
    /// Do not look for NVIDIA GPUs.
    #[arg(long)]
    pub no_nvml: bool,
}

/// Subcommands of `optimus guest`.
#[derive(Clone, Debug, Subcommand)]
pub enum GuestCommand {
    /// Start a phase (`NAME [key=value ...]`) or end the current one (`-`) of this VM's
    /// job, through the running `optimus guest`.
    #[command(
        override_usage = "optimus guest phase NAME [key=value ...]\n       optimus guest phase -"
    )]
    Phase {
        /// The guest agent's phase FIFO (default: $OPTIMUS_PHASE, else /run/optimus-guest/phase).
        #[arg(long, value_name = "PATH")]
        phase_path: Option<PathBuf>,
        /// `NAME [key=value ...]`, or `-`.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "PHASE"
        )]
        phase: Vec<String>,
    },
}

/// Subcommands of `optimus model`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print a power model file readably: where it was trained, its coefficients, the
    /// feature ranges it saw and its error.
    Show {
        /// The model file (the agent writes `power-model.json` under `--state-dir`).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Fit a model file offline from recorded intervals, with the agent's fitter (a CSV
    /// with columns busy_cpus, busy_cpu_ghz, block_io_mb_per_second, watts; what `cargo
    /// xtask validate` uses for held-out scores).
    Fit {
        /// The recorded intervals (CSV with a header row).
        #[arg(long, value_name = "CSV")]
        samples: PathBuf,
        /// Where to write the model file.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Score a model file on recorded intervals: JSON with the rows, the MAPE, how many
    /// were extrapolated and each row's predicted watts.
    Score {
        /// The power model file.
        #[arg(long, value_name = "FILE")]
        model: PathBuf,
        /// The recorded intervals (same CSV as `optimus model fit`).
        #[arg(long, value_name = "CSV")]
        samples: PathBuf,
    },
}

/// Flags of `optimus predict`.
#[derive(Clone, Debug, Args)]
pub struct PredictArgs {
    /// The power model file.
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// Busy CPUs on the host (e.g. 3.5: three and a half CPUs' worth of busy time),
    /// spread evenly over its packages.
    #[arg(long, value_name = "X", value_parser = parse_non_negative)]
    pub busy_cpus: f64,
    /// SM utilisation of each GPU in index order, 0 to 1 (`--gpu-util 0.8 0.1`); GPUs not
    /// given are idle.
    #[arg(long, value_name = "U", num_args = 1.., value_parser = parse_fraction)]
    pub gpu_util: Vec<f64>,
    /// Block I/O of the host, MB/s (default: the mean the model was trained on).
    #[arg(long, value_name = "MB_PER_S", value_parser = parse_non_negative)]
    pub io_mb_per_second: Option<f64>,
}

/// A number in 0..=1.
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a fraction between 0 and 1 (write 0.75 for 75 %)"
        )),
    }
}

/// Flags of `optimus top`.
#[derive(Clone, Debug, Args)]
pub struct TopArgs {
    /// Root URL of the agent to read (its `/api/v1/snapshot`); `host:port` means http://.
    #[arg(long, default_value = "http://127.0.0.1:9947", value_name = "URL", value_parser = parse_agent_url)]
    pub url: String,
    /// How often to read it.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub refresh: Duration,
    /// Trust only the CA certificates in this PEM file for an https:// agent (one behind a
    /// private CA, as `--web.config.file` usually sets up); the public web roots otherwise.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
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
    /// Users a QEMU process found in /proc may run as to count as a VM (names or uids,
    /// comma separated; root always counts). libvirt's own domains need not be listed.
    #[arg(long, default_value = crate::discovery::trust::DEFAULT_QEMU_USERS, value_name = "USERS")]
    pub qemu_users: String,
    /// At most this many VMs are exported; past it one warning, and the rest are counted in
    /// optimus_vms_over_limit_total.
    #[arg(long, default_value_t = crate::discovery::DEFAULT_MAX_VMS, value_name = "N", value_parser = parse_max_vms)]
    pub max_vms: usize,
}

impl HostArgs {
    /// The libvirt URI, or `None` when disabled.
    pub fn libvirt(&self) -> Option<String> {
        (!self.libvirt_uri.trim().is_empty()).then(|| self.libvirt_uri.clone())
    }

    /// Discovery's trust rules and VM cap; logs the `--qemu-users` this host does not know.
    pub fn discovery_config(&self) -> crate::discovery::DiscoveryConfig {
        let (qemu_uids, unknown) = crate::discovery::trust::resolve_users(&self.qemu_users);
        if !unknown.is_empty() {
            log::debug!("--qemu-users: no such user here: {}", unknown.join(", "));
        }
        crate::discovery::DiscoveryConfig {
            trust: crate::discovery::trust::QemuTrust {
                qemu_uids,
                exe_owner: 0,
            },
            max_vms: self.max_vms,
        }
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
    /// Largest plausible power of one energy zone, watts: a counter step implying more is a
    /// glitch, not energy. Default: from the zone's powercap constraints, else 5000 W.
    #[arg(long, value_name = "WATTS", value_parser = parse_zone_watts)]
    pub max_zone_watts: Option<f64>,
    /// A power model file trained on a host with a meter (`optimus model show` describes
    /// it): where no RAPL meter exists it predicts CPU energy instead of the estimate,
    /// exported with source="model". A file that cannot be trusted is refused with the
    /// reason and the estimate is used.
    #[arg(long, value_name = "FILE")]
    pub power_model: Option<PathBuf>,
    /// Use --power-model even when it was trained on another CPU model.
    #[arg(long, requires = "power_model")]
    pub power_model_any_cpu: bool,
}

impl EnergyArgs {
    /// Refuses flags that contradict each other, with the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.no_estimate && self.estimate_watts.is_some() {
            return Err(
                "--estimate-watts and --no-estimate contradict each other: drop --no-estimate \
                 to estimate with those watts, or drop --estimate-watts to never estimate"
                    .to_owned(),
            );
        }
        Ok(())
    }

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
        cfg.max_zone_watts = self.max_zone_watts;
        if let Some(path) = &self.power_model {
            let here = crate::model::HostIdentity::detect(&host.proc_root);
            let checked = crate::model::ModelFile::load(path).and_then(|f| {
                f.check_host(&here, path, self.power_model_any_cpu)
                    .map(|()| f)
            });
            match checked {
                Ok(file) => {
                    if file.host.cpu_model != here.cpu_model {
                        log::warn!(
                            "--power-model {} was trained on {:?}, used on {:?} as --power-model-any-cpu asks",
                            path.display(),
                            file.host.cpu_model,
                            here.cpu_model
                        );
                    }
                    cfg.power_model = Some((path.clone(), file));
                }
                Err(e) => log::warn!(
                    "--power-model refused: {}; using the estimate instead",
                    crate::energy::describe(&e)
                ),
            }
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
    /// Power usage effectiveness of the data centre (1.0 to 10, default 1.0), multiplies
    /// every gram; needs a carbon source.
    #[arg(long, value_name = "PUE")]
    pub pue: Option<f64>,
    /// How often to refresh an API's intensity.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub carbon_refresh: Duration,
}

impl CarbonArgs {
    /// The PUE in force: `--pue`, else 1.0.
    pub fn pue(&self) -> f64 {
        self.pue.unwrap_or(1.0)
    }

    /// Refuses `--pue` without a carbon source (it would multiply nothing), with the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.pue.is_some() && self.config() == crate::carbon::CarbonConfig::None {
            return Err(
                "--pue needs a carbon source: add --carbon-intensity G_PER_KWH, \
                 --electricitymaps-zone ZONE or --uk-grid, or drop --pue"
                    .to_owned(),
            );
        }
        Ok(())
    }

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
    /// Address to serve /metrics on (IP:PORT). Loopback by default: expose it on purpose.
    #[arg(long, default_value = "127.0.0.1:9947", value_name = "ADDR", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// exporter-toolkit web config file (TLS, basic auth, headers), as node_exporter's.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// Most concurrent HTTP connections; at the cap the longest-idle one is closed to admit
    /// a new one. Also held to a quarter of the open-file limit.
    #[arg(long = "web.max-connections", default_value = "256", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub web_max_connections: u32,
    /// Sampling interval, e.g. `1s`, `500ms` (independent of scrapes).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Duration,
    /// Charge every thread on the host, not only VM threads (costs a little more per switch).
    #[arg(long)]
    pub track_all: bool,
    /// Do not trace block I/O.
    #[arg(long)]
    pub no_block_io: bool,
    /// Track and export only the VMs whose names match this regular expression (others'
    /// threads count as host processes).
    #[arg(long, value_name = "REGEX", value_parser = parse_vm_filter)]
    pub vm_filter: Option<regex::Regex>,
    /// The control socket `optimus phase` talks to (root-only); `''` disables it.
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET, value_name = "PATH",
          value_parser = path_or_empty)]
    pub control_socket: PathBuf,
    /// Track and export only the VMs libvirt runs (QEMU processes it does not know count as
    /// host processes); needs `--libvirt-uri`.
    #[arg(long)]
    pub libvirt_only: bool,
    /// Also attach an empty sched_switch program (the baseline of `cargo xtask bench`).
    #[arg(long, hide = true)]
    pub bench_baseline: bool,
    /// Attach only the empty sched_switch program (the floor of `cargo xtask bench`).
    #[arg(long, hide = true, conflicts_with = "bench_baseline")]
    pub bench_baseline_only: bool,
    #[command(flatten)]
    pub energy: EnergyArgs,
    #[command(flatten)]
    pub carbon: CarbonArgs,
    /// Spread idle energy over running VMs: by vCPU count, by memory size, or not at all.
    #[arg(long, value_enum, default_value = "none")]
    pub idle_policy: crate::attribution::IdlePolicy,
    /// Where the agent keeps state across restarts: the power model it trains beside a
    /// meter (`power-model.json`, saved every 5 minutes and on exit).
    #[arg(long, default_value = "/var/lib/optimus", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Most average power a guest may claim for one passthrough GPU over the guest channel,
    /// watts; a claim above it is refused (and counted).
    #[arg(long, default_value = "1000", value_name = "WATTS", value_parser = parse_zone_watts)]
    pub guest_gpu_max_watts: f64,
    /// Do not connect to the VMs' guest channels.
    #[arg(long)]
    pub no_guest_channel: bool,
}

/// Flags of `optimus measure`.
#[derive(Clone, Debug, Args)]
pub struct MeasureArgs {
    #[command(flatten)]
    pub energy: EnergyArgs,
    #[command(flatten)]
    pub carbon: CarbonArgs,
    /// Charge the command with the node's idle energy too, or not (it is the only consumer
    /// measured: `vcpus` and `memory` both give it all idle energy).
    #[arg(long, value_enum, default_value = "none")]
    pub idle_policy: crate::attribution::IdlePolicy,
    /// Write the results as JSON to FILE (checked writable before the command starts).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write one CodeCarbon-style CSV row per phase occurrence plus a total row to FILE.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Under sudo, run the command as root instead of the invoking user.
    #[arg(long)]
    pub as_root: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<std::ffi::OsString>,
}

/// Flags of `optimus phase`.
#[derive(Clone, Debug, Args)]
pub struct PhaseArgs {
    /// The VM, by libvirt/QEMU name or UUID.
    #[arg(long, value_name = "NAME|UUID")]
    pub vm: String,
    /// The agent's control socket.
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// `NAME [key=value ...]` to start a phase, or `-` to end the current one.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PHASE"
    )]
    pub phase: Vec<String>,
}

impl Default for RunArgs {
    fn default() -> Self {
        match Cli::try_parse_from(["optimus", "run"]) {
            Ok(Cli {
                command: Some(Command::Run(args)),
                ..
            }) => *args,
            _ => unreachable!("`optimus run` with no flags always parses"),
        }
    }
}

/// A path where `''` is allowed and means "none" (clap's own path parser refuses it).
#[expect(clippy::unnecessary_wraps, reason = "clap's value_parser signature")]
fn path_or_empty(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// A `--vm-filter` regular expression, anchored so it matches whole names.
pub fn parse_vm_filter(s: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| {
        let why = e.to_string().lines().last().unwrap_or("").trim().to_owned();
        format!("`{s}` is not a regular expression ({why}); write e.g. 'web-.*'")
    })
}

/// Flags of `optimus advise`.
#[derive(Clone, Debug, Args)]
#[command(group(clap::ArgGroup::new("job").args(["job_kwh", "job_json"]).multiple(true)))]
pub struct AdviseArgs {
    /// Prometheus that scrapes every host's agent.
    #[arg(long, default_value = "http://127.0.0.1:9090", value_name = "URL")]
    pub prometheus: String,
    /// The label that names a host.
    #[arg(long, default_value = "instance", value_name = "LABEL", value_parser = parse_label)]
    pub host_label: String,
    /// Window over which each VM's power is averaged (rate()).
    #[arg(long, default_value = "1h", value_parser = parse_span, value_name = "DURATION")]
    pub window: Duration,
    /// A move must pay back, by the forecast, within this horizon.
    #[arg(long, default_value = "24h", value_parser = parse_span, value_name = "DURATION")]
    pub horizon: Duration,
    /// Network energy per GB moved (Aslan et al. 2018: 0.06 kWh/GB for 2015; see README).
    #[arg(long, default_value = "0.06", value_name = "KWH", value_parser = parse_non_negative)]
    pub network_kwh_per_gb: f64,
    /// Memory re-sent during a live migration, as a fraction of the VM's memory.
    #[arg(long, default_value = "0.5", value_name = "FRACTION", value_parser = parse_non_negative)]
    pub dirty_factor: f64,
    /// Downtime a live migration is expected to cause (reported with each move).
    #[arg(long, default_value = "300ms", value_parser = parse_span, value_name = "DURATION")]
    pub expected_downtime: Duration,
    /// A host whose intensity is older than this is excluded.
    #[arg(long, default_value = "1h", value_parser = parse_span, value_name = "DURATION")]
    pub max_intensity_age: Duration,
    /// vCPUs allowed per host CPU when checking room.
    #[arg(long, default_value = "1.0", value_name = "RATIO", value_parser = parse_positive)]
    pub cpu_overcommit: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Carry out the recommended moves (libvirt live migration); a dry run without it.
    #[arg(long, requires = "libvirt_uri_template", conflicts_with = "job")]
    pub apply: bool,
    /// Most moves one run carries out.
    #[arg(long, default_value = "1", value_name = "N")]
    pub max_migrations: u32,
    /// libvirt URI of a host, `{host}` standing for its name, e.g. `qemu+ssh://{host}/system`.
    #[arg(long, value_name = "TEMPLATE")]
    pub libvirt_uri_template: Option<String>,
    /// A live migration still copying after this long is aborted (the VM stays where it
    /// was): a guest that dirties memory faster than the link copies it never converges.
    #[arg(long, default_value = "10m", value_parser = parse_span, value_name = "DURATION")]
    pub migration_timeout: Duration,
    /// Bandwidth cap of each live migration, MiB/s (0: libvirt's default, unlimited).
    #[arg(long, default_value = "0", value_name = "MIB_PER_S")]
    pub migration_bandwidth: u64,
    /// Time-shifting: the job's energy, kWh.
    #[arg(long, value_name = "KWH", value_parser = parse_positive)]
    pub job_kwh: Option<f64>,
    /// Time-shifting: the job's energy and duration from an `optimus measure --json` file.
    #[arg(long, value_name = "FILE")]
    pub job_json: Option<PathBuf>,
    /// Time-shifting: how long the job runs.
    #[arg(long, value_parser = parse_span, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// Time-shifting: when the job must be done, a time (2026-12-02T06:00:00Z) or a span from now (12h).
    #[arg(long, value_name = "TIME", requires = "job")]
    pub deadline: Option<String>,
    /// Time-shifting: the grid zone whose forecast to use (GB: the UK API; others: Electricity Maps).
    #[arg(long, value_name = "ZONE", conflicts_with = "host", requires = "job")]
    pub zone: Option<String>,
    /// Time-shifting: use this host's forecast, from its agent through Prometheus.
    #[arg(long, value_name = "HOST", requires = "job")]
    pub host: Option<String>,
    /// UK Carbon Intensity API base URL (for --zone GB).
    #[arg(long, value_name = "URL", default_value = crate::carbon::DEFAULT_UK_GRID_URL)]
    pub uk_grid_url: String,
    /// Electricity Maps API base URL (other zones; token from ELECTRICITYMAPS_TOKEN).
    #[arg(long, value_name = "URL", default_value = crate::carbon::DEFAULT_ELECTRICITY_MAPS_URL)]
    pub electricitymaps_url: String,
}

impl AdviseArgs {
    /// The window as given back in PromQL's syntax.
    pub fn window_text(&self) -> String {
        span_text(self.window)
    }

    pub fn horizon_text(&self) -> String {
        span_text(self.horizon)
    }
}

/// `3600 s` as `1h`, `90 s` as `90s`.
fn span_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A span for `optimus advise`: `300ms`, `30s`, `15m`, `1h`, `2d`, from 1 ms to 30 days.
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let secs = seconds_of(s, SPAN_UNITS, "1h, 30m or 2d")?;
    if !(0.001..=30.0 * 86_400.0).contains(&secs) {
        return Err(format!("`{}` is out of range; use 1ms to 30d", s.trim()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Units of `--interval`-like flags, seconds each.
const DURATION_UNITS: &[(&str, f64)] = &[("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)];
/// Units of `optimus advise`'s spans: those and days.
const SPAN_UNITS: &[(&str, f64)] = &[
    ("ms", 0.001),
    ("s", 1.0),
    ("m", 60.0),
    ("h", 3600.0),
    ("d", 86_400.0),
];

/// `<number><unit>` (a bare number is seconds) in seconds, with one of `units`; `example`
/// goes in the message for text that is no number.
fn seconds_of(s: &str, units: &[(&str, f64)], example: &str) -> Result<f64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. {example}"))?;
    let unit = if unit.is_empty() { "s" } else { unit };
    let Some((_, scale)) = units.iter().find(|(u, _)| *u == unit) else {
        let names: Vec<&str> = units.iter().map(|(u, _)| *u).collect();
        let (last, rest) = names.split_last().unwrap_or((&"s", &[]));
        return Err(format!(
            "unknown unit `{unit}` in `{s}`; use {} or {last}",
            rest.join(", ")
        ));
    };
    Ok(value * scale)
}

fn parse_label(s: &str) -> Result<String, String> {
    let ok = s
        .chars()
        .enumerate()
        .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
    if ok && !s.is_empty() {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a Prometheus label name; write e.g. instance or host"
        ))
    }
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("`{s}` is not a number of 0 or more"))
}

fn parse_positive(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("`{s}` is not a number above 0"))
}

/// An agent's root URL: `http://` or `https://`, or a bare `host:port` taken as `http://`
/// (as curl does).
pub fn parse_agent_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let (scheme, rest) = url.split_once("://").unwrap_or(("", &url));
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "`{s}` is not an http:// or https:// URL; write e.g. http://127.0.0.1:9947"
        ));
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!(
            "`{s}` names no host; write e.g. http://127.0.0.1:9947"
        ));
    }
    Ok(format!("{scheme}://{rest}"))
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

/// Parses `--log-level`: `error`, `warn` (or `warning`), `info`, `debug`, `trace`, `off`.
pub fn parse_log_level(s: &str) -> Result<String, String> {
    let level = s.trim().to_ascii_lowercase();
    match level.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" | "off" => Ok(level),
        "warning" => Ok("warn".to_owned()),
        _ => Err(format!(
            "`{s}` is not a log level; use error, warn, info, debug or trace"
        )),
    }
}

/// Parses `--listen IP:PORT`; a host name is refused with the fix (the agent binds one
/// address, and a name could resolve to several or to a public one).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let host = s.rsplit_once(':').map_or(s, |(h, _)| h);
    let example = if host.eq_ignore_ascii_case("localhost") {
        "127.0.0.1:9947 (or [::1]:9947)".to_owned()
    } else {
        "127.0.0.1:9947, 0.0.0.0:9947 or [::1]:9947".to_owned()
    };
    Err(format!(
        "`{s}` is not an IP address and port: --listen needs an IP, not a host name; \
         write e.g. {example}"
    ))
}

/// Whether listening on `addr` exposes /metrics beyond this host, and what to say about it.
pub fn exposure_warning(addr: SocketAddr) -> Option<String> {
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "listening on {addr}: /metrics is reachable from other hosts with no \
             authentication; protect it with --web.config.file (TLS and basic auth), a \
             firewall, or listen on 127.0.0.1"
        )
    })
}

/// Parses `--max-vms`: at least 1.
pub fn parse_max_vms(s: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("`{s}` is not a number of VMs of at least 1"))
}

/// Parses `--max-zone-watts`: a positive number of watts, at most 1 MW.
pub fn parse_zone_watts(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|w| w.is_finite() && *w > 0.0 && *w <= 1e6)
        .ok_or_else(|| format!("`{s}` is not a wattage above 0 and at most 1000000"))
}

/// Parses `1s`, `250ms`, `2m`, `1h` or a bare number of seconds; 10 ms to 1 h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs = seconds_of(s, DURATION_UNITS, "1s or 500ms")?;
    if !(0.01..=3600.0).contains(&secs) {
        return Err(format!("`{}` is out of range; use 10ms to 1h", s.trim()));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_durations_share_units_but_not_ranges() {
        assert_eq!(parse_span("2d").unwrap(), Duration::from_secs(2 * 86_400));
        assert_eq!(parse_span("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_span("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_span("5x").unwrap_err(),
            "unknown unit `x` in `5x`; use ms, s, m, h or d"
        );
        assert_eq!(
            parse_duration("5d").unwrap_err(),
            "unknown unit `d` in `5d`; use ms, s, m or h"
        );
        assert!(parse_span("31d").unwrap_err().contains("use 1ms to 30d"));
        assert!(parse_span("soon")
            .unwrap_err()
            .contains("write e.g. 1h, 30m or 2d"));
        assert!(parse_duration("soon")
            .unwrap_err()
            .contains("write e.g. 1s or 500ms"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        // The message says "10ms to 1h": both ends are accepted.
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
        assert!(parse_duration("2h").unwrap_err().contains("use 10ms to 1h"));
        assert!(parse_duration("9ms").is_err());
    }

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["optimus", "run"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Some(Command::Run(args)) => Ok(*args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn log_levels_are_validated() {
        assert_eq!(parse_log_level("warning").unwrap(), "warn");
        assert_eq!(parse_log_level("DEBUG").unwrap(), "debug");
        let err = parse_log_level("bogus").unwrap_err();
        assert!(err.contains("error, warn, info, debug or trace"), "{err}");
        assert!(Cli::try_parse_from(["optimus", "--log-level", "bogus", "run"]).is_err());
        let cli = Cli::try_parse_from(["optimus", "run", "--log-level", "warning"]).unwrap();
        assert_eq!(cli.log_level, "warn");
    }

    #[test]
    fn an_empty_control_socket_turns_it_off() {
        let args = run_args(&["--control-socket", ""]).unwrap();
        assert!(args.control_socket.as_os_str().is_empty());
        let args = run_args(&[]).unwrap();
        assert_eq!(
            args.control_socket,
            PathBuf::from(crate::control::DEFAULT_SOCKET)
        );
    }

    #[test]
    fn listen_needs_an_ip() {
        let err = run_args(&["--listen", "localhost:9947"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs an IP"), "{err}");
        assert!(err.contains("127.0.0.1:9947"), "{err}");
        let args = run_args(&["--listen", "0.0.0.0:9100"]).unwrap();
        let warning = exposure_warning(args.listen).unwrap();
        assert!(warning.contains("no authentication"), "{warning}");
        assert!(warning.contains("--web.config.file"), "{warning}");
        assert_eq!(exposure_warning(RunArgs::default().listen), None);
        assert!(exposure_warning("[::1]:1".parse().unwrap()).is_none());
    }

    #[test]
    fn contradicting_flags_are_refused_with_the_fix() {
        let args = run_args(&["--pue", "1.4"]).unwrap();
        let err = args.carbon.validate().unwrap_err();
        assert!(err.contains("--pue needs a carbon source"), "{err}");
        assert!(err.contains("--carbon-intensity"), "{err}");
        let args = run_args(&["--pue", "1.4", "--carbon-intensity", "300"]).unwrap();
        assert_eq!(args.carbon.validate(), Ok(()));
        assert_eq!(args.carbon.pue(), 1.4);
        assert_eq!(RunArgs::default().carbon.pue(), 1.0);

        let args = run_args(&["--no-estimate", "--estimate-watts", "1,2"]).unwrap();
        let err = args.energy.validate().unwrap_err();
        assert!(err.contains("contradict"), "{err}");
        assert!(run_args(&["--estimate-watts", "1,2"])
            .unwrap()
            .energy
            .validate()
            .is_ok());
    }

    #[test]
    fn max_vms_and_zone_watts() {
        assert_eq!(
            RunArgs::default().host.max_vms,
            crate::discovery::DEFAULT_MAX_VMS
        );
        assert_eq!(run_args(&["--max-vms", "3"]).unwrap().host.max_vms, 3);
        assert!(run_args(&["--max-vms", "0"]).is_err());
        assert_eq!(
            run_args(&["--max-zone-watts", "400"])
                .unwrap()
                .energy
                .max_zone_watts,
            Some(400.0)
        );
        assert!(run_args(&["--max-zone-watts", "-1"]).is_err());
    }

    #[test]
    fn agent_urls() {
        assert_eq!(
            parse_agent_url("127.0.0.1:9947").unwrap(),
            "http://127.0.0.1:9947"
        );
        assert_eq!(parse_agent_url("https://h:1/").unwrap(), "https://h:1");
        assert!(parse_agent_url("ftp://h")
            .unwrap_err()
            .contains("http:// or https://"));
        assert!(parse_agent_url("http://").is_err());
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
