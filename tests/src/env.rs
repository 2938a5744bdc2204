//! Whether a real-component test can run here, and where the harness caches its downloads.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// True when `CI=true` (or `CI=1`): a real component that will not start must FAIL the test
/// (panic with the cause), never skip it.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Call at the start of a real-component test. `Ok(())` when it can run here (root, with
/// `/proc`, `/sys` and `/dev` mounted). Otherwise, in CI, panics with the reason; outside
/// CI, prints `SKIPPED <test>: <reason>` to stderr and returns the reason.
pub fn require_root(test: &str) -> Result<(), String> {
    match root_problem() {
        None => Ok(()),
        Some(reason) => skip(test, &reason),
    }
}

/// What a test that cannot run does with `reason`: panics in CI, otherwise prints
/// `SKIPPED <test>: <reason>` to stderr and returns `Err(reason)`.
pub fn skip(test: &str, reason: &str) -> Result<(), String> {
    if ci() {
        panic!("{test} cannot run in CI: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
    Err(reason.to_owned())
}

fn root_problem() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!(
            "needs root (running as uid {euid}); run with sudo -E"
        ));
    }
    for (path, what) in [
        ("/proc/self/stat", "/proc"),
        ("/sys/kernel", "/sys"),
        ("/dev/null", "/dev"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!("{what} is not mounted ({path} missing)"));
        }
    }
    None
}

/// Checks that each command exists (in `PATH` or the sbin directories, where root's tools
/// live), e.g. `&[("qemu-system-x86_64", "qemu-system-x86"), ("virsh", "libvirt-clients")]`.
/// The error names every missing command and the Debian package that provides it.
pub fn require_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .map(|(tool, package)| format!("{tool} (apt-get install {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; `cargo xtask setup` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Full path of command `tool`: searched in `PATH`, then `/usr/local/sbin`, `/usr/sbin`,
/// `/sbin` (daemons such as libvirtd live there and a non-login `PATH` may lack them).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let path = PathBuf::from(tool);
        return is_executable(&path).then_some(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where downloads and built guest images are kept between runs: `$OPTIMUS_CACHE_DIR`, or
/// `<workspace>/target/optimus-cache`. Created if missing (best effort: a failure shows up
/// at the first write into it, with the path).
pub fn cache_dir() -> PathBuf {
    let dir = match std::env::var_os("OPTIMUS_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target").join("optimus-cache"),
    };
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The Cargo workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

    #[test]
    fn tools() {
        assert!(find_tool("sh").is_some());
        assert!(require_tools(&[("sh", "dash")]).is_ok());
        let err = require_tools(&[("sh", "dash"), ("no-such-tool-xyz", "pkg-xyz")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-tool-xyz (apt-get install pkg-xyz)"),
            "{err}"
        );
        assert!(!err.contains("dash"), "{err}");
    }

    #[test]
    fn cache_dir_is_under_workspace_target() {
        if std::env::var_os("OPTIMUS_CACHE_DIR").is_none() {
            assert!(cache_dir().ends_with("target/optimus-cache"));
        }
        assert!(workspace_root().join("Cargo.toml").exists());
    }
}
