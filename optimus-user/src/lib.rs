//! Optimus agent library: the kernel → tracer → attribution → exporter pipeline.
//!
//! - [`tracer`]: loads the eBPF programs and reads per-thread on-CPU time from the kernel.
//! - [`discovery`]: which QEMU processes and threads make up which VM.
//! - [`energy`]: energy meters (RAPL, NVML, estimate).
//! - [`sampler`]: on its own clock, joins the above into one [`sampler::Snapshot`].
//! - [`exporter`]: renders the latest snapshot as OpenMetrics text.
//! - [`http`]: serves it (and the API) over HTTP/1.1, with TLS and basic auth when asked.
//! - [`check`]: `optimus check`, what works on this host and what does not.
//! - [`web`]: the live page at `/` and `GET /api/v1/snapshot`, with a 15-minute history ring.
//! - [`top`]: `optimus top`, a terminal view of a running agent.
//! - [`phase`]: phases of a workload (line protocol, per-phase ledger).
//! - [`measure`]: `optimus measure`, one command's CPU, I/O, energy and CO2 by phase.
//! - [`advise`]: `optimus advise`, carbon-aware placement and timing from Prometheus.
//! - [`model`]: the power model, trained beside a meter and used where there is none.
//! - [`channel`]: the host side of the guest channel (virtio-serial, `org.optimus.agent.0`).
//! - [`guest`]: `optimus guest`, the agent inside a VM.

pub mod advise;
pub mod attribution;
pub mod carbon;
pub mod channel;
pub mod check;
pub mod cli;
pub mod control;
pub mod discovery;
pub mod energy;
pub mod exporter;
/// Fuzz entry points (`fuzz/`); tests and the `fuzzing` feature only.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest;
pub mod host;
pub mod http;
pub mod measure;
pub mod model;
pub mod phase;
pub mod privileges;
pub mod sampler;
pub mod top;
pub mod tracer;
pub mod web;
