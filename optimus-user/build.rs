//! Builds the eBPF programs of `optimus-ebpf` for `bpfel-unknown-none` and leaves the object
//! in OUT_DIR, where `tracer` embeds it. `AYA_BUILD_SKIP=1` skips this for a quick check.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "optimus-ebpf")
        .ok_or_else(|| anyhow!("optimus-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("optimus-ebpf manifest has no parent directory"))?;
    // The toolchain is chosen by xtask (OPTIMUS_EBPF_TOOLCHAIN): nightly where installed,
    // else stable with RUSTC_BOOTSTRAP=1, both with rust-src (ENGINEERING.md).
    println!("cargo:rerun-if-env-changed=OPTIMUS_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("OPTIMUS_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "optimus-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
