//! `cargo xtask deb`: the Debian package `optimus_<version>_amd64.deb`, made by cargo-deb
//! from `[package.metadata.deb]` in optimus-user/Cargo.toml. This stages what cargo-deb
//! cannot make itself under `target/<profile>/deb/`: the man pages (rendered by the built
//! agent's `optimus man`, so they match its flags), the README, and the Grafana dashboard
//! when `deploy/grafana/optimus.json` exists.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::cmd::Cmd;
use crate::setup::{self, Purpose, Ready};
use crate::tasks;

/// Where the Grafana dashboard lives in the repository, and in the package.
const DASHBOARD: &str = "deploy/grafana/optimus.json";
const DASHBOARD_IN_DEB: &str = "usr/share/optimus/grafana/optimus.json";

/// `cargo xtask deb [--debug] [--output DIR]`.
pub fn deb(debug: bool, output: Option<PathBuf>) -> Result<()> {
    let ready = setup::ensure(Purpose::Package)?;
    let bin = tasks::build_agent(&ready, !debug)?;
    let out = output.unwrap_or_else(|| ready.ws.target_dir.join("debian"));
    let deb = package(&ready, &bin, debug, &out)?;
    println!("built {}", deb.display());
    Ok(())
}

/// Packages the already built agent `bin` (the debug build when `debug`) into `out_dir`;
/// returns the .deb's path.
pub fn package(ready: &Ready, bin: &Path, debug: bool, out_dir: &Path) -> Result<PathBuf> {
    let profile_dir = bin
        .parent()
        .with_context(|| format!("{} has no parent directory", bin.display()))?;
    let stage = profile_dir.join("deb");
    stage_files(ready, bin, &stage)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut cmd = ready
        .cargo(["deb", "--package", "optimus-user", "--no-build"])
        .arg("--output")
        .arg(out_dir);
    if debug {
        // cargo-deb warns that the dev profile is for tests only: that is what it is for.
        cmd = cmd.args(["--profile", "dev", "--quiet", "--fast"]);
    }
    println!(
        "\n==> [deb] the Debian package ({})\n    $ {}",
        if debug {
            "debug build, for tests"
        } else {
            "release"
        },
        cmd.shown()
    );
    let printed = cmd.read().context("cargo-deb failed")?;
    let deb = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo-deb printed no .deb path:\n{printed}"))?;
    let version = env!("CARGO_PKG_VERSION");
    let want = format!("optimus_{version}_amd64.deb");
    if deb.file_name().and_then(|n| n.to_str()) != Some(want.as_str()) {
        bail!("cargo-deb made {}, expected {want}", deb.display());
    }
    Ok(deb)
}

/// Fills `stage/usr/share/` (emptied first) with the man pages, the README and, where the
/// repository has it, the Grafana dashboard.
fn stage_files(ready: &Ready, bin: &Path, stage: &Path) -> Result<()> {
    if stage.exists() {
        std::fs::remove_dir_all(stage).with_context(|| format!("emptying {}", stage.display()))?;
    }
    let share = stage.join("usr/share");
    let man1 = share.join("man/man1");
    let doc = share.join("doc/optimus");
    for dir in [&man1, &doc] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    ready
        .tool(bin)
        .arg("man")
        .arg(&man1)
        .run()
        .context("rendering the man pages")?;
    let pages: Vec<PathBuf> = std::fs::read_dir(&man1)
        .with_context(|| format!("listing {}", man1.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    if pages.is_empty() {
        bail!("`optimus man` wrote no page into {}", man1.display());
    }
    // Debian wants man pages gzipped; -n keeps the archive free of timestamps.
    Cmd::new("gzip")
        .args(["-9nf"])
        .args(&pages)
        .run()
        .context("compressing the man pages")?;
    let root = &ready.ws.root;
    std::fs::copy(root.join("README.md"), doc.join("README.md")).context("copying README.md")?;
    let dashboard = root.join(DASHBOARD);
    if dashboard.is_file() {
        let to = stage.join(DASHBOARD_IN_DEB);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::copy(&dashboard, &to).with_context(|| format!("copying {DASHBOARD}"))?;
        println!("deb: with the Grafana dashboard (/{DASHBOARD_IN_DEB})");
    } else {
        println!("deb: no {DASHBOARD} in this tree, so no Grafana dashboard in the package");
    }
    Ok(())
}
