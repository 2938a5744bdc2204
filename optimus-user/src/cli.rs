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
    Check(HostArgs),
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
    fn defaults_are_safe() {
        let args = RunArgs::default();
        assert!(args.listen.ip().is_loopback());
        assert_eq!(args.listen.port(), 9947);
        assert_eq!(args.interval, Duration::from_secs(1));
        assert_eq!(args.host.libvirt().as_deref(), Some("qemu:///system"));
    }
}
