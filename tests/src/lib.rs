//! Real-component harness for Optimus' integration tests and `cargo xtask demo-vm`.
//!
//! Every component it starts (QEMU, libvirtd, a libvirt domain, Prometheus, temp trees) is
//! owned by an RAII guard that stops and removes it on drop, whether the test passes or
//! panics. The kernel's own accounting (`/proc/<pid>/task/<tid>/schedstat`, `/proc/<pid>/io`,
//! `/sys/class/block/<dev>/stat`) is exposed in [`proc`] as the oracle to test against.
//!
//! Recipes behind the choices here are in the project's `ENGINEERING.md`.

pub mod env;
pub mod fakes;
pub mod guest;
pub mod http;
pub mod libvirt;
pub mod load;
pub mod proc;
pub mod prometheus;
pub mod qemu;

mod console;
mod cpio;
