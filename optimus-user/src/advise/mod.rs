//! `optimus advise`: carbon-aware placement and timing across hosts. Prometheus (which
//! already gathers every host's agent) in; which VM to move where, when to run a job, and
//! optionally the moves themselves (libvirt live migration) out. No cluster layer of our
//! own: a host is a value of a Prometheus label.
//!
//! - [`prom`]: the Prometheus HTTP API client.
//! - [`fleet`]: hosts and VMs as the agents export them.
//! - [`plan`]: the arithmetic of a move (saving, cost, break-even).
//! - [`shift`]: the arithmetic of starting a job later.
//! - [`apply`]: carrying out moves through libvirt.

pub mod apply;
pub mod fleet;
pub mod plan;
pub mod prom;
pub mod shift;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::carbon::forecast::{self, ForecastProvider, Period};
use crate::cli::AdviseArgs;

/// Time one Prometheus or provider request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `optimus advise`; errors are one `error:` line and exit 1.
pub fn run(args: &AdviseArgs) -> ExitCode {
    let result = if args.job_kwh.is_some() || args.job_json.is_some() {
        time_shift(args)
    } else {
        placement(args)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn placement(args: &AdviseArgs) -> Result<ExitCode, String> {
    let now = forecast::unix_now();
    let prom = prom::Prom::new(&args.prometheus, REQUEST_TIMEOUT).at(now);
    let answers = fleet::gather(&prom, &args.host_label, args.window).map_err(|e| e.to_string())?;
    let fleet = fleet::assemble(&answers, &args.host_label, args.max_intensity_age);
    if fleet.hosts.is_empty() {
        return Err(format!(
            "Prometheus at {} knows no Optimus agent (no optimus_build_info series by `{}`); check that it scrapes the agents and --host-label",
            prom.url(),
            args.host_label
        ));
    }
    let params = plan::Params {
        horizon_hours: u32::try_from(args.horizon.as_secs().div_ceil(3600).max(1)).unwrap_or(48),
        network_kwh_per_gb: args.network_kwh_per_gb,
        dirty_factor: args.dirty_factor,
        downtime_seconds: args.expected_downtime.as_secs_f64(),
        cpu_overcommit: args.cpu_overcommit,
    };
    let plan = plan::plan(&fleet, &params);
    let applied = if args.apply {
        let template = args.libvirt_uri_template.as_deref().unwrap_or_default();
        apply::apply(
            &plan.recommendations,
            usize::try_from(args.max_migrations).unwrap_or(usize::MAX),
            &apply::Target {
                template,
                prometheus: &args.prometheus,
                host_label: &args.host_label,
                timeout: args.migration_timeout,
                bandwidth_mib_s: args.migration_bandwidth,
            },
        )
    } else {
        Vec::new()
    };
    if args.json {
        println!("{}", placement_json(args, now, &fleet, &plan, &applied));
    } else {
        print!("{}", placement_table(args, &fleet, &plan, &applied));
    }
    Ok(if applied.iter().any(|a| !a.ok) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// Bytes as an integer for JSON (memory figures are far below 2^53, so exact).
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "clamped to 0..=2^53 first"
)]
fn whole_bytes(b: f64) -> u64 {
    b.clamp(0.0, 9_007_199_254_740_992.0) as u64
}

fn placement_json(
    args: &AdviseArgs,
    now: i64,
    fleet: &fleet::Fleet,
    plan: &plan::Plan,
    applied: &[apply::Applied],
) -> serde_json::Value {
    let hosts: Vec<_> = fleet
        .hosts
        .iter()
        .map(|h| {
            json!({
                "host": h.name,
                "zone": h.zone,
                "intensity_grams_per_kwh": h.intensity.map(finite),
                "intensity_age_seconds": h.intensity_age.map(finite),
                "cpus_free": finite(h.cpus_free(args.cpu_overcommit)),
                "memory_free_bytes": whole_bytes(h.memory_free_bytes()),
                "cpus": h.cpus.map(finite),
                "cpus_busy": h.cpus_busy.map(finite),
                "forecast_hours": h.forecast.len(),
                "excluded": h.excluded,
            })
        })
        .collect();
    let recs: Vec<_> = plan
        .recommendations
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("break_even_hours".into(), finite(r.break_even_hours));
            }
            v
        })
        .collect();
    json!({
        "generated_at": rfc3339(now),
        "window": args.window_text(),
        "horizon_hours": args.horizon.as_secs() / 3600,
        "hosts": hosts,
        "recommendations": recs,
        "kept": plan.kept,
        "applied": applied,
        "dry_run": !args.apply,
    })
}

fn placement_table(
    args: &AdviseArgs,
    fleet: &fleet::Fleet,
    plan: &plan::Plan,
    applied: &[apply::Applied],
) -> String {
    let mut out = String::new();
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
    let _ = writeln!(
        out,
        "{:<24} {:<10} {:>9} {:>8} {:>9} {:>11}  status",
        "HOST", "ZONE", "gCO2/kWh", "AGE s", "CPUS FREE", "MEM FREE GB"
    );
    for h in &fleet.hosts {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:>9} {:>8} {:>9.1} {:>11.1}  {}",
            h.name,
            h.zone.as_deref().unwrap_or("-"),
            opt(h.intensity, 1),
            opt(h.intensity_age, 0),
            h.cpus_free(args.cpu_overcommit),
            h.memory_free_bytes() / 1e9,
            h.excluded
                .as_deref()
                .map_or("ok".to_owned(), |w| format!("excluded: {w}")),
        );
    }
    out.push('\n');
    if plan.recommendations.is_empty() {
        let _ = writeln!(out, "No move pays off within {}.", args.horizon_text());
    } else {
        let _ = writeln!(
            out,
            "{:<24} {:<20} {:<20} {:>8} {:>9} {:>8} {:>10} {:>11}  confidence",
            "VM", "FROM", "TO", "W", "g/h SAVED", "MOVE g", "BREAK-EVEN", "HORIZON g"
        );
        for r in &plan.recommendations {
            let _ = writeln!(
                out,
                "{:<24} {:<20} {:<20} {:>8.2} {:>9.3} {:>8.3} {:>9.2}h {:>11.2}  {}",
                r.vm_name,
                r.from,
                r.to,
                r.power_watts,
                r.saving_grams_per_hour,
                r.migration_grams,
                r.break_even_hours,
                r.horizon_saving_grams,
                r.confidence
            );
        }
    }
    for k in &plan.kept {
        let _ = writeln!(out, "keep {} on {}: {}", k.vm_name, k.host, k.reason);
    }
    for a in applied {
        let _ = writeln!(
            out,
            "{} {} {} -> {}: {}",
            if a.ok { "moved" } else { "FAILED" },
            a.vm_name,
            a.from,
            a.to,
            a.detail
        );
    }
    if !args.apply && !plan.recommendations.is_empty() {
        let _ = writeln!(out, "(dry run: --apply carries out the moves)");
    }
    out
}

/// The job's energy and duration: the flags, or an earlier `optimus measure --json`.
fn job_of(args: &AdviseArgs) -> Result<shift::Job, String> {
    if let Some(path) = &args.job_json {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --job-json {}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "--job-json {} is not JSON ({e}); give the file of `optimus measure --json`",
                path.display()
            )
        })?;
        let wall = v["wall_seconds"].as_f64().filter(|w| w.is_finite() && *w > 0.0).ok_or_else(|| {
            format!("--job-json {}: no positive wall_seconds; give the file of `optimus measure --json`", path.display())
        })?;
        let joules: f64 = ["package", "dram", "gpu"]
            .iter()
            .filter_map(|z| v["energy_joules"][z].as_f64())
            .filter(|j| j.is_finite() && *j >= 0.0)
            .sum();
        if joules <= 0.0 {
            return Err(format!(
                "--job-json {}: energy_joules has no package, dram or gpu energy",
                path.display()
            ));
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a job's seconds fit in i64"
        )]
        Ok(shift::Job {
            kwh: args.job_kwh.unwrap_or(joules / 3.6e6),
            duration_seconds: args.duration.map_or(wall.ceil() as i64, |d| {
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
            }),
        })
    } else {
        let kwh = args.job_kwh.unwrap_or_default();
        let d = args
            .duration
            .ok_or("--job-kwh needs --duration D (e.g. 3h)")?;
        Ok(shift::Job {
            kwh,
            duration_seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        })
    }
}

/// The forecast for time-shifting: a provider's (`--zone`) or a host's from Prometheus.
fn forecast_for(args: &AdviseArgs, now: i64) -> Result<(String, String, Vec<Period>), String> {
    if let Some(zone) = &args.zone {
        let provider = if zone.eq_ignore_ascii_case("GB") {
            ForecastProvider::UkGrid {
                base_url: args.uk_grid_url.clone(),
            }
        } else {
            ForecastProvider::ElectricityMaps {
                base_url: args.electricitymaps_url.clone(),
                zone: zone.clone(),
                token: crate::carbon::token_from_env(),
            }
        };
        let source = match provider {
            ForecastProvider::UkGrid { .. } => "ukgrid",
            ForecastProvider::ElectricityMaps { .. } => "electricitymaps",
        };
        let agent = ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).build();
        let periods = provider
            .fetch(&agent, now)
            .map_err(|e| format!("cannot get the forecast for zone {zone} from {source}: {e}"))?;
        return Ok((zone.clone(), source.to_owned(), periods));
    }
    let Some(host) = &args.host else {
        return Err("give --zone Z (GB: the UK API; else Electricity Maps) or --host H (its agent's forecast from Prometheus)".to_owned());
    };
    let prom = prom::Prom::new(&args.prometheus, REQUEST_TIMEOUT);
    let sel = format!(
        "{}=\"{}\"",
        args.host_label,
        host.replace('\\', "\\\\").replace('"', "\\\"")
    );
    let current = prom
        .query(&format!(
            "optimus_grid_carbon_intensity_grams_per_kwh{{{sel}}}"
        ))
        .map_err(|e| e.to_string())?;
    let Some(now_value) = current.first() else {
        return Err(format!(
            "Prometheus has no carbon intensity for {} = {host}; check --host and --host-label",
            args.host_label
        ));
    };
    let zone = now_value.label("zone").unwrap_or("-").to_owned();
    let source = now_value.label("source").unwrap_or("-").to_owned();
    let horizons = prom
        .query(&format!(
            "optimus_grid_carbon_intensity_forecast_grams_per_kwh{{{sel}}}"
        ))
        .map_err(|e| e.to_string())?;
    // The value `h` hours ahead stands for the hour around it; now's for the first half.
    let mut periods = vec![Period {
        start: now,
        end: now + 1800,
        g_per_kwh: now_value.value,
    }];
    for s in &horizons {
        let Some(h) = s
            .label("horizon")
            .and_then(|h| h.strip_suffix('h')?.parse::<i64>().ok())
        else {
            continue;
        };
        if s.value.is_finite() && s.value >= 0.0 {
            periods.push(Period {
                start: now + h * 3600 - 1800,
                end: now + h * 3600 + 1800,
                g_per_kwh: s.value,
            });
        }
    }
    periods.sort_by_key(|p| p.start);
    if periods
        .iter()
        .any(|p| !p.g_per_kwh.is_finite() || p.g_per_kwh < 0.0)
    {
        return Err(format!(
            "{host}'s agent serves an invalid carbon intensity; fix that exporter"
        ));
    }
    Ok((zone, source, periods))
}

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn time_shift(args: &AdviseArgs) -> Result<ExitCode, String> {
    let job = job_of(args)?;
    if !job.kwh.is_finite() || job.kwh <= 0.0 {
        return Err("--job-kwh must be a positive number of kWh".to_owned());
    }
    let now = forecast::unix_now();
    let deadline = match &args.deadline {
        Some(d) => parse_deadline(d, now)?,
        None => {
            return Err(
                "time-shifting needs --deadline T (e.g. 24h from now, or 2026-12-02T06:00Z)"
                    .to_owned(),
            )
        }
    };
    let (zone, source, periods) = forecast_for(args, now)?;
    let best = shift::best_start(&periods, now, deadline, job).map_err(|e| e.to_string())?;
    let saving = best.grams_now.map(|n| n - best.grams);
    #[expect(clippy::cast_precision_loss, reason = "seconds within days")]
    let start_in_hours = (best.start - now) as f64 / 3600.0;
    #[expect(clippy::cast_precision_loss, reason = "seconds within days")]
    let duration_hours = job.duration_seconds as f64 / 3600.0;
    if args.json {
        println!(
            "{}",
            json!({
                "generated_at": rfc3339(now),
                "zone": zone,
                "source": source,
                "job_kwh": job.kwh,
                "duration_hours": duration_hours,
                "deadline": rfc3339(deadline),
                "best_start": rfc3339(best.start),
                "start_in_hours": start_in_hours,
                "emissions_grams": best.grams,
                "emissions_now_grams": best.grams_now,
                "saving_grams": saving,
                "confidence": "forecast",
            })
        );
    } else {
        println!(
            "Start at {} ({start_in_hours:.1} h from now) in {zone} ({source}): {:.1} g CO2eq for {:.3} kWh over {duration_hours:.1} h.",
            rfc3339(best.start),
            best.grams,
            job.kwh
        );
        match (best.grams_now, saving) {
            (Some(n), Some(s)) => println!(
                "Starting now would emit {n:.1} g: waiting saves {s:.1} g ({:.0} %).",
                if n > 0.0 { s / n * 100.0 } else { 0.0 }
            ),
            _ => println!(
                "The forecast does not cover a start now, so the saving against now is unknown."
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--deadline`: an RFC 3339 time (`2026-12-02T06:00:00Z`, or the UK API's
/// `2026-12-02T06:00Z`), or a span from now (`12h`, `2d`).
pub fn parse_deadline(s: &str, now: i64) -> Result<i64, String> {
    if let Some(t) = forecast::parse_time(s) {
        return Ok(t);
    }
    crate::cli::parse_span(s.trim_start_matches('+'))
        .map(|d| now + i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2))
        .map_err(|_| format!("--deadline `{s}` is neither a time (2026-12-02T06:00:00Z) nor a span from now (12h)"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        assert_eq!(parse_deadline("12h", 100).unwrap(), 100 + 12 * 3600);
        assert_eq!(parse_deadline("+2d", 0).unwrap(), 2 * 86_400);
        assert_eq!(
            parse_deadline("2026-12-01T12:00Z", 0).unwrap(),
            1_796_126_400
        );
        assert!(parse_deadline("soon", 0).is_err());
    }
}
