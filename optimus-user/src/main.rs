//! `optimus`: the agent binary. Parses flags and wires the library together; every error
//! ends as one line on stderr with the cause and the fix, and a non-zero exit.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use clap::Parser as _;
use optimus::cli::{Cli, Command, RunArgs};
use optimus::discovery::Discovery;
use optimus::energy::EnergyMeters;
use optimus::sampler::carbon::CarbonState;
use optimus::sampler::energy::EnergyState;
use optimus::sampler::{self, Sampler, Snapshot};
use optimus::tracer::{BlockIoStatus, Tracer, TracerOptions};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_secs()
        .init();
    let result = match cli.command.unwrap_or_else(|| Command::Run(Box::default())) {
        Command::Run(args) => run(&args),
        Command::Check(args) => match args.energy.validate() {
            Ok(()) => return optimus::check::run(&args.host, &args.energy),
            Err(e) => Err(anyhow::anyhow!(e)),
        },
        Command::Man { dir } => write_man_pages(&dir),
        Command::Top(args) => optimus::top::run(&args.url, args.ca_file.as_deref(), args.refresh)
            .map_err(anyhow::Error::from),
        Command::Measure(args) => return optimus::measure::main(&args),
        Command::Phase(args) => return optimus::control::client_main(&args),
        Command::Guest(args) => return optimus::guest::main(&args),
        Command::Advise(args) => return optimus::advise::run(&args),
        Command::Model {
            command: optimus::cli::ModelCommand::Show { file },
        } => return optimus::model::predict::show_main(&file),
        Command::Model {
            command: optimus::cli::ModelCommand::Fit { samples, output },
        } => {
            return optimus::model::offline::fit_main(
                &samples,
                &output,
                std::time::Duration::from_secs(1),
            )
        }
        Command::Model {
            command: optimus::cli::ModelCommand::Score { model, samples },
        } => return optimus::model::offline::score_main(&model, &samples),
        Command::Predict(args) => {
            return optimus::model::predict::predict_main(
                &args.model,
                &optimus::model::predict::Load {
                    busy_cpus: args.busy_cpus,
                    gpu_util: args.gpu_util.clone(),
                    io_mb_per_second: args.io_mb_per_second,
                },
            )
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    // Settings first: a typo costs nothing to report, before anything is loaded.
    args.energy.validate().map_err(anyhow::Error::msg)?;
    args.carbon.validate().map_err(anyhow::Error::msg)?;
    let pue = optimus::carbon::check_pue(args.carbon.pue())
        .map_err(|e| anyhow::anyhow!("{e}: pass --pue between 1.0 and 10"))?;
    let carbon_cfg = args.carbon.config();
    carbon_cfg
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}: fix the carbon intensity flags"))?;
    if args.libvirt_only && args.host.libvirt().is_none() {
        anyhow::bail!(
            "--libvirt-only exports only libvirt's VMs, but --libvirt-uri is empty: give a libvirt URI or drop --libvirt-only"
        );
    }
    // A bad web config stops the agent here, before anything is loaded or served.
    let security = match &args.web_config_file {
        Some(path) => optimus::http::Security::from_file(path).map_err(anyhow::Error::msg)?,
        None => optimus::http::Security::none(),
    };
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| optimus::privileges::effective_caps(&s))
        .unwrap_or(0);
    if euid != 0 && !optimus::privileges::can_trace(caps) {
        anyhow::bail!(
            "optimus run needs root (or CAP_BPF + CAP_PERFMON) to load its eBPF programs: run it with sudo; `optimus check` lists what else is missing"
        );
    }
    if let Some(warning) = optimus::cli::exposure_warning(args.listen) {
        if args.web_config_file.is_none() {
            log::warn!("{warning}");
        }
    }
    optimus::host::raise_fd_limit();
    let paths = args.host.paths();
    let tracer = Tracer::load(&TracerOptions {
        track_all: args.track_all,
        block_io: !args.no_block_io,
        attach_baseline: args.bench_baseline,
        baseline_only: args.bench_baseline_only,
        btf_path: paths.sys.join("kernel/btf/vmlinux"),
    })
    .context("starting the eBPF tracer (see `optimus check`)")?;
    match tracer.block_io_status() {
        BlockIoStatus::Attached {
            tracepoint,
            page_owner,
        } => {
            log::info!("block I/O traced at block:{tracepoint} and the bio merges");
            if let Err(why) = page_owner {
                log::warn!("kernel writeback is not traced to VMs (stays unattributed): {why}");
            }
        }
        BlockIoStatus::Unavailable(why) => log::warn!("block I/O not traced: {why}"),
        BlockIoStatus::Disabled => {}
    }
    let mut discovery = Discovery::with_config(
        paths.clone(),
        args.host.libvirt(),
        args.host.discovery_config(),
    );
    // While the agent may still read every process's `exe`: the QEMU processes running now
    // are judged by their binary itself (see discovery::trust).
    let _ = discovery.scan();
    // Meters are opened before privileges are dropped (perf events, root-only files).
    let meters = EnergyMeters::open(&args.energy.config(&args.host));
    for status in meters.status() {
        log::info!("energy meter {status}");
    }
    let ncpus = aya::util::nr_cpus().unwrap_or(1);
    let cpu_package = optimus::energy::package_of_cpus(&paths.sys, ncpus);
    // Train the power model wherever a real meter measures a modelled zone.
    let metered = meters.status().iter().any(|m| {
        m.state == optimus::energy::MeterState::Active
            && !matches!(
                m.source,
                optimus::energy::MeterSource::Estimated | optimus::energy::MeterSource::Model
            )
    });
    let mut energy = EnergyState::new(meters, cpu_package.clone(), args.idle_policy);
    if metered {
        let path = args.state_dir.join(optimus::model::file::FILE_NAME);
        log::info!(
            "power model: training beside the meter, saved to {} every 5 minutes and on exit",
            path.display()
        );
        energy = energy.with_trainer(
            optimus::model::trainer::Trainer::new(
                optimus::model::HostIdentity::detect(&paths.proc),
                args.interval,
                Some(path),
            ),
            optimus::model::FeatureReader::new(&paths.proc, &paths.sys, &cpu_package),
        );
    }
    // The control socket lives in a root-owned directory: bound while still privileged.
    let control = (!args.control_socket.as_os_str().is_empty())
        .then(|| optimus::control::bind(&args.control_socket))
        .and_then(|bound| match bound {
            Ok(b) => Some(b),
            Err(e) => {
                log::warn!("{e}: `optimus phase` cannot reach this agent");
                None
            }
        });
    // Everything that needs a capability is open now. Capabilities are per thread, so this
    // comes before the carbon thread, the sampler and the async runtime start.
    drop_privileges();
    let forecast = optimus::carbon::forecast::ForecastProvider::of(&carbon_cfg);
    let carbon = if carbon_cfg == optimus::carbon::CarbonConfig::None {
        log::info!("no carbon intensity configured (--carbon-intensity, --electricitymaps-zone or --uk-grid): no carbon metrics");
        None
    } else {
        let source = optimus::carbon::CarbonSource::start(
            carbon_cfg,
            args.carbon.carbon_refresh,
            optimus::carbon::DEFAULT_TIMEOUT,
        )
        .context("configuring the carbon intensity source")?;
        let state = CarbonState::new(source, pue);
        Some(match forecast {
            Some(provider) => state.with_forecast(
                optimus::carbon::forecast::ForecastSource::start(
                    provider,
                    args.carbon.carbon_refresh,
                    optimus::carbon::DEFAULT_TIMEOUT,
                )
                .context("starting the carbon forecast thread")?,
            ),
            None => state,
        })
    };
    let sampler = Sampler::new(discovery, tracer, Some(energy), carbon, paths)
        .with_vm_filter(args.vm_filter.clone())
        .with_libvirt_only(args.libvirt_only);
    // Phase switches come from the control socket and from the guests' channels.
    let (phase_tx, phase_rx) = std::sync::mpsc::channel();
    let sampler = sampler.with_phase_requests(phase_rx);
    let sampler = if args.no_guest_channel {
        sampler
    } else {
        sampler.with_guest_channels(
            optimus::channel::Channels::new(
                optimus::channel::ChannelConfig {
                    max_gpu_watts: args.guest_gpu_max_watts,
                    proc: args.host.proc_root.clone(),
                    run: args.host.run_root.clone(),
                },
                Some(phase_tx.clone()),
            ),
            args.interval,
        )
    };
    let _control_guard = match control {
        Some((listener, guard)) => {
            optimus::control::serve(listener, phase_tx)
                .context("starting the control socket thread")?;
            log::info!(
                "control socket {} (optimus phase)",
                args.control_socket.display()
            );
            Some(guard)
        }
        None => None,
    };
    // Loading parsed the kernel's BTF (megabytes) twice, ours and aya's; hand the freed
    // heap back to the kernel instead of keeping it resident for the agent's lifetime.
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    unsafe { libc::malloc_trim(0) };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = optimus::http::bind(args.listen)
            .await
            .map_err(anyhow::Error::msg)?;
        let shared = Arc::new(RwLock::new(Arc::new(Snapshot::default())));
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(optimus::web::History::new());
        let recorder = history.clone();
        let handle = sampler::spawn(
            sampler,
            args.interval,
            shared.clone(),
            stop.clone(),
            move |s: &Snapshot| recorder.push(s),
        )
        .context("starting the sampler thread")?;
        let requested = usize::try_from(args.web_max_connections).unwrap_or(usize::MAX);
        let max_connections = optimus::http::connection_budget(requested);
        if max_connections < requested {
            log::info!(
                "at most {max_connections} HTTP connections (a quarter of the open-file limit; --web.max-connections asked for {requested})"
            );
        }
        log::info!(
            "serving {}://{}/metrics{}, sampling every {:?}",
            if security.is_tls() { "https" } else { "http" },
            args.listen,
            if security.has_auth() { " (basic auth)" } else { "" },
            args.interval
        );
        let app = optimus::http::routes::AppState {
            snapshot: shared.clone(),
            history,
        };
        let server = tokio::spawn(optimus::http::serve(
            listener,
            app,
            security,
            optimus::http::ServeOptions { max_connections },
        ));
        shutdown_signal().await;
        log::info!("shutting down");
        server.abort();
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        Ok(())
    })
}

/// `optimus man DIR`: the pages clap_mangen renders from the same `Cli` that parses flags.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}

/// Keeps only what sampling needs (see `optimus::privileges`), or says precisely what is
/// still held and why.
fn drop_privileges() {
    use optimus::privileges;
    match privileges::drop_after_load() {
        Ok(dropped) => log::info!("{dropped}"),
        Err(e) => {
            let e = anyhow::Error::new(e);
            let held = privileges::CapSets::current().map_or_else(
                |_| "unknown".to_owned(),
                |c| privileges::cap_names(c.permitted),
            );
            log::warn!("could not drop capabilities: {e:#}; still holding: {held}");
        }
    }
    for (tid, extra) in
        privileges::threads_holding_more(privileges::CapSets::current().map_or(0, |c| c.permitted))
    {
        log::warn!(
            "thread {tid} was started before capabilities were dropped and still holds {extra}"
        );
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
