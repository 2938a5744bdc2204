//! `cargo xtask fuzz [SECONDS]`: builds the cargo-fuzz targets in `fuzz/` (nightly,
//! libFuzzer) and runs each for SECONDS, one after the other, then says per target how many
//! inputs ran, how fast, and where the reproducer of a crash or hang is.
//!
//! Inputs found while fuzzing go to `fuzz/target/corpus/<target>/`, beside the committed
//! corpus `fuzz/corpus/<target>/` (read only); `--merge` then rewrites the committed one as
//! a minimal set covering both (libFuzzer's `-set_cover_merge=1`), seeds kept. Previously fixed crashes in
//! `fuzz/regressions/<target>/` run first every time. The same inputs replay on stable in
//! `cargo test` (`optimus::fuzzing`), without libFuzzer.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::cmd::Cmd;
use crate::setup::{self, Purpose, Ready};

/// Largest input libFuzzer makes; every parser's real input is smaller (BTF seeds included).
const MAX_LEN: u32 = 4096;
/// An input that takes longer than this is reported as a hang.
const TIMEOUT_S: u32 = 5;
/// Memory ceiling of one fuzz process; more is reported as a leak or blow-up.
const RSS_LIMIT_MB: u32 = 2048;

/// What libFuzzer said about one target's run.
struct Outcome {
    target: String,
    runs: Option<u64>,
    execs_per_s: Option<u64>,
    new_inputs: usize,
    /// The reproducer libFuzzer wrote, when the run found a crash, hang or OOM.
    reproducer: Option<PathBuf>,
    failed: bool,
    log: PathBuf,
}

/// `cargo xtask fuzz`.
pub fn run(seconds: u64, only: &[String], merge: bool) -> Result<ExitCode> {
    if seconds == 0 {
        bail!("SECONDS must be at least 1 (how long to fuzz each target)");
    }
    let ready = setup::ensure(Purpose::Fuzz)?;
    let fuzz_dir = ready.ws.root.join("fuzz");
    let targets = list(&ready)?;
    let chosen: Vec<String> = if only.is_empty() {
        targets
    } else {
        for t in only {
            if !targets.contains(t) {
                bail!(
                    "no fuzz target `{t}`; the targets are: {}",
                    targets.join(", ")
                );
            }
        }
        only.to_vec()
    };

    let build =
        nightly_fuzz(&ready).args(["build", "--sanitizer", "none", "--codegen-units", "16"]);
    // cargo fuzz builds one target or all of them.
    let build = match chosen.as_slice() {
        [one] => build.arg(one),
        _ => build,
    };
    println!(
        "\n==> [build] {} fuzz targets (nightly, libFuzzer, overflow checks on)\n    $ {}",
        chosen.len(),
        build.shown()
    );
    build.run().context("building the fuzz targets")?;

    let mut outcomes = Vec::new();
    for (i, target) in chosen.iter().enumerate() {
        println!(
            "\n==> [fuzz {}/{}] {target} for {seconds} s",
            i + 1,
            chosen.len()
        );
        let outcome = fuzz_one(&ready, &fuzz_dir, target, seconds)?;
        report(&outcome);
        if merge && !outcome.failed {
            merge_into_corpus(&fuzz_dir, target)?;
        }
        outcomes.push(outcome);
    }
    summarize(&outcomes)
}

/// `cargo fuzz ...` with the nightly toolchain and the agent built without its eBPF object
/// (the parsers need none; see `optimus-user/build.rs`).
fn nightly_fuzz(ready: &Ready) -> Cmd {
    ready
        .tool("rustup")
        .args(["run", "nightly", "cargo", "fuzz"])
        // Set by the `cargo run` that started xtask: they would pin the stable toolchain.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env("AYA_BUILD_SKIP", "1")
}

/// The targets `fuzz/Cargo.toml` declares.
fn list(ready: &Ready) -> Result<Vec<String>> {
    let out = nightly_fuzz(ready)
        .arg("list")
        .read()
        .context("listing the fuzz targets")?;
    let targets: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("fuzz/Cargo.toml declares no fuzz target");
    }
    Ok(targets)
}

fn binary(fuzz_dir: &Path, target: &str) -> PathBuf {
    fuzz_dir
        .join("target/x86_64-unknown-linux-gnu/release")
        .join(target)
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

fn fuzz_one(ready: &Ready, fuzz_dir: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let work = fuzz_dir.join("target/corpus").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let logs = fuzz_dir.join("target/logs");
    for dir in [&work, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let before = files_in(&work);
    let mut cmd = ready
        .tool(binary(fuzz_dir, target))
        .arg(&work)
        .arg(fuzz_dir.join("corpus").join(target));
    let regressions = fuzz_dir.join("regressions").join(target);
    if regressions.is_dir() {
        cmd = cmd.arg(&regressions);
    }
    let mut prefix = artifacts.into_os_string();
    prefix.push("/");
    let mut prefix_arg = std::ffi::OsString::from("-artifact_prefix=");
    prefix_arg.push(&prefix);
    let cmd = cmd
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-timeout={TIMEOUT_S}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(prefix_arg)
        .arg("-print_final_stats=1");
    println!("    $ {}", cmd.shown());
    let started = Instant::now();
    let (shown, output) = cmd.output()?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    let log = logs.join(format!("{target}.log"));
    std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
    let stat = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
    };
    let reproducer = text
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map(PathBuf::from);
    let failed = !output.status.success();
    if failed && reproducer.is_none() && started.elapsed().as_secs() < seconds {
        bail!(
            "`{shown}` failed before fuzzing ({}); its output is in {}",
            output.status,
            log.display()
        );
    }
    Ok(Outcome {
        target: target.to_owned(),
        runs: stat("stat::number_of_executed_units:"),
        execs_per_s: stat("stat::average_exec_per_sec:"),
        new_inputs: files_in(&work).saturating_sub(before),
        reproducer,
        failed,
        log,
    })
}

fn report(o: &Outcome) {
    let num = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), thousands);
    if o.failed {
        println!(
            "    FAILED after {} runs: see {}",
            num(o.runs),
            o.log.display()
        );
        if let Some(r) = &o.reproducer {
            println!("    reproducer: {}", r.display());
            println!(
                "    replay: fuzz/target/x86_64-unknown-linux-gnu/release/{} {}",
                o.target,
                r.display()
            );
            println!(
                "    once fixed, keep it: cp {} fuzz/regressions/{}/",
                r.display(),
                o.target
            );
        }
    } else {
        println!(
            "    ok: {} runs, {} exec/s, {} new inputs",
            num(o.runs),
            num(o.execs_per_s),
            o.new_inputs
        );
    }
}

/// Replaces the committed corpus with a minimal set of inputs covering what it and this
/// run's inputs cover (libFuzzer's greedy set cover, `-set_cover_merge=1`), keeping the
/// hand-written `seed-*` files whatever they cover.
fn merge_into_corpus(fuzz_dir: &Path, target: &str) -> Result<()> {
    let corpus = fuzz_dir.join("corpus").join(target);
    let merged = fuzz_dir.join("target/merge").join(target);
    if merged.exists() {
        std::fs::remove_dir_all(&merged)
            .with_context(|| format!("removing {}", merged.display()))?;
    }
    std::fs::create_dir_all(&merged).with_context(|| format!("creating {}", merged.display()))?;
    let before = files_in(&corpus);
    let (shown, output) = Cmd::new(binary(fuzz_dir, target))
        .arg("-set_cover_merge=1")
        // Edges only, not hit-count buckets: a corpus ten times smaller for the same lines.
        .arg("-use_counters=0")
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(&merged)
        .arg(&corpus)
        .arg(fuzz_dir.join("target/corpus").join(target))
        .output()?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let is_seed = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"))
    };
    let mut seeds = Vec::new();
    for entry in
        std::fs::read_dir(&corpus).with_context(|| format!("listing {}", corpus.display()))?
    {
        let path = entry?.path();
        if is_seed(&path) {
            seeds
                .push(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
        } else {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for entry in
        std::fs::read_dir(&merged).with_context(|| format!("listing {}", merged.display()))?
    {
        let path = entry?.path();
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if seeds.contains(&data) {
            continue;
        }
        let Some(name) = path.file_name() else {
            continue;
        };
        std::fs::write(corpus.join(name), &data)
            .with_context(|| format!("writing into {}", corpus.display()))?;
    }
    let after = files_in(&corpus);
    let bytes: u64 = std::fs::read_dir(&corpus)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "    merged: fuzz/corpus/{target} has {after} inputs, {} bytes (was {before})",
        thousands(bytes)
    );
    Ok(())
}

fn summarize(outcomes: &[Outcome]) -> Result<ExitCode> {
    println!("\n==> summary");
    println!(
        "    {:<16} {:>12} {:>10} {:>6}  result",
        "target", "runs", "exec/s", "new"
    );
    let num = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), thousands);
    for o in outcomes {
        let result = match (&o.reproducer, o.failed) {
            (Some(r), _) => format!("FAILED: {}", r.display()),
            (None, true) => format!("FAILED: see {}", o.log.display()),
            (None, false) => "ok".to_owned(),
        };
        println!(
            "    {:<16} {:>12} {:>10} {:>6}  {result}",
            o.target,
            num(o.runs),
            num(o.execs_per_s),
            o.new_inputs
        );
    }
    Ok(if outcomes.iter().any(|o| o.failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
