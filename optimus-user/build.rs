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
    )?;
    // aya-build skipped the eBPF build: leave an empty object so the crate still compiles
    // (`cargo check`, the fuzz crate); the tracer refuses to load it and says why.
    let skipped =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let object =
        std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?).join("optimus");
    if skipped && !object.exists() {
        std::fs::write(&object, b"").with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}
