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
    let result = match cli
        .command
        .unwrap_or_else(|| Command::Run(RunArgs::default()))
    {
        Command::Run(args) => run(&args),
        Command::Check(args) => return optimus::check::run(&args.host, &args.energy),
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
    let pue = optimus::carbon::check_pue(args.carbon.pue)
        .map_err(|e| anyhow::anyhow!("{e}: pass --pue between 1.0 and 10"))?;
    let carbon_cfg = args.carbon.config();
    carbon_cfg
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}: fix the carbon intensity flags"))?;
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
    let paths = args.host.paths();
    let tracer = Tracer::load(&TracerOptions {
        track_all: args.track_all,
        block_io: !args.no_block_io,
        attach_baseline: args.bench_baseline,
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
    let discovery = Discovery::new(paths.clone(), args.host.libvirt());
    // Meters are opened before privileges are dropped (perf events, root-only files).
    let meters = EnergyMeters::open(&args.energy.config(&args.host));
    for status in meters.status() {
        log::info!("energy meter {status}");
    }
    let ncpus = aya::util::nr_cpus().unwrap_or(1);
    let energy = EnergyState::new(
        meters,
        optimus::energy::package_of_cpus(&paths.sys, ncpus),
        args.idle_policy,
    );
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
        Some(CarbonState::new(source, pue))
    };
    let sampler = Sampler::new(discovery, tracer, Some(energy), carbon, paths);
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
        let listener = optimus::exporter::http::bind(args.listen)
            .await
            .map_err(anyhow::Error::msg)?;
        if let Err(e) = optimus::privileges::drop_privileges() {
            log::warn!("could not drop capabilities ({e}); running with full privileges");
        }
        let shared = Arc::new(RwLock::new(Arc::new(Snapshot::default())));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = sampler::spawn(sampler, args.interval, shared.clone(), stop.clone())
            .context("starting the sampler thread")?;
        log::info!(
            "serving http://{}/metrics, sampling every {:?}",
            args.listen,
            args.interval
        );
        let server = tokio::spawn(optimus::exporter::http::serve(listener, shared));
        shutdown_signal().await;
        log::info!("shutting down");
        server.abort();
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        Ok(())
    })
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
