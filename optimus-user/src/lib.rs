//! Optimus agent library: the kernel → tracer → attribution → exporter pipeline.
//!
//! - [`tracer`]: loads the eBPF programs and reads per-thread on-CPU time from the kernel.
//! - [`discovery`]: which QEMU processes and threads make up which VM.
//! - [`energy`]: energy meters (RAPL, NVML, estimate).
//! - [`sampler`]: on its own clock, joins the above into one [`sampler::Snapshot`].
//! - [`exporter`]: serves the latest snapshot as OpenMetrics text.
//! - [`check`]: `optimus check`, what works on this host and what does not.

pub mod attribution;
pub mod carbon;
pub mod check;
pub mod cli;
pub mod discovery;
pub mod energy;
pub mod exporter;
pub mod host;
pub mod privileges;
pub mod sampler;
pub mod tracer;
