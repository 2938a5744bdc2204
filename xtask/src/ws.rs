//! Where the workspace and its build outputs are, asked of cargo itself.
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::cmd::Cmd;

pub struct Workspace {
    /// The cargo binary that runs xtask (`$CARGO`), so children use the same toolchain.
    pub cargo: OsString,
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // `cargo run` sets CARGO_MANIFEST_DIR to xtask's directory, inside the workspace.
        let start = match std::env::var_os("CARGO_MANIFEST_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => std::env::current_dir().context("reading the current directory")?,
        };
        let json = Cmd::new(&cargo)
            .current_dir(&start)
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .read()
            .context("asking cargo where the workspace is")?;
        let meta: serde_json::Value =
            serde_json::from_str(&json).context("parsing `cargo metadata` output")?;
        let field = |name: &str| -> Result<PathBuf> {
            meta.get(name)
                .and_then(serde_json::Value::as_str)
                .map(PathBuf::from)
                .with_context(|| format!("`cargo metadata` output has no {name}"))
        };
        Ok(Self {
            cargo,
            root: field("workspace_root")?,
            target_dir: field("target_directory")?,
        })
    }

    /// A binary of the agent's package in `profile` ("debug" or "release").
    pub fn bin(&self, profile: &str, name: &str) -> PathBuf {
        self.target_dir.join(profile).join(name)
    }
}
