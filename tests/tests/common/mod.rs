//! What the agent integration tests share: starting the real `optimus` binary and reading
//! its /metrics in step with its sampler.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use optimus_tests::http;
use optimus_tests::proc::{free_port, ChildGuard};

/// The running agent, stopped on drop.
pub struct Agent {
    pub child: ChildGuard,
    pub addr: String,
    /// Its own `--state-dir` and control socket directory (unless the test named them), so
    /// agents never write the host's /var/lib/optimus or fight over /run/optimus.
    _private: Option<tempfile::TempDir>,
}

/// The `optimus` binary: `$OPTIMUS_BIN` (set by `cargo xtask test`) or the debug build.
pub fn binary() -> PathBuf {
    std::env::var_os("OPTIMUS_BIN").map_or_else(
        || optimus_tests::env::workspace_root().join("target/debug/optimus"),
        PathBuf::from,
    )
}

impl Agent {
    /// Starts `optimus run` on a free loopback port with `extra` flags and waits for its
    /// first sample.
    pub fn start(extra: &[&str]) -> Agent {
        Agent::start_wrapped(&[], extra)
    }

    /// [`Agent::start`] through a wrapper command line (`["sh", "-c", "ulimit -n 256; exec \"$@\"", "sh"]`)
    /// that ends by exec'ing its arguments.
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Agent {
        let bin = binary();
        assert!(
            bin.exists(),
            "{} missing: build it first (cargo xtask test does)",
            bin.display()
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(["run", "--listen", &addr])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        Agent::spawn(cmd, addr)
    }

    /// Spawns a prepared `optimus run` command line that listens on `addr`, and waits for
    /// its first sample. Adds a private `--state-dir` and `--control-socket` unless the
    /// command line has its own.
    pub fn spawn(mut cmd: Command, addr: String) -> Agent {
        let has = |flag: &str| cmd.get_args().any(|a| a == flag);
        let (needs_state, needs_control) = (!has("--state-dir"), !has("--control-socket"));
        let private = (needs_state || needs_control).then(|| tempfile::tempdir().unwrap());
        if let Some(dir) = &private {
            if needs_state {
                cmd.arg("--state-dir").arg(dir.path());
            }
            if needs_control {
                cmd.arg("--control-socket")
                    .arg(dir.path().join("control.sock"));
            }
        }
        Agent::spawn_private(cmd, addr, private)
    }

    /// [`Agent::spawn`] exactly as given (a test of the shipped defaults: the package's own
    /// state directory and control socket).
    pub fn spawn_exact(cmd: Command, addr: String) -> Agent {
        Agent::spawn_private(cmd, addr, None)
    }

    fn spawn_private(cmd: Command, addr: String, private: Option<tempfile::TempDir>) -> Agent {
        let child = ChildGuard::spawn(cmd).unwrap();
        let agent = Agent {
            child,
            addr,
            _private: private,
        };
        agent.wait_for(Duration::from_secs(30), "the first sample", |m| {
            http::sample(m, "optimus_samples_total", &[]).is_some_and(|v| v >= 1.0)
        });
        agent
    }

    /// One scrape (classic text format, what curl gets).
    pub fn scrape(&self) -> String {
        let (status, body) = http::get(&self.addr, "/metrics").unwrap();
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }

    /// Scrapes until `done` holds, failing after `timeout` with the last scrape.
    pub fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = http::get(&self.addr, "/metrics") {
                if done(&body) {
                    return body;
                }
                if Instant::now() > deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last scrape:\n{body}");
                }
            } else if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}: agent not answering");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the sampler's next sample and returns that scrape at once, so that kernel
    /// counters read right after it describe the same instant (within milliseconds).
    pub fn next_sample(&self) -> String {
        let samples = |m: &str| http::sample(m, "optimus_samples_total", &[]).unwrap_or(0.0);
        let now = samples(&self.scrape());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let body = self.scrape();
            if samples(&body) > now {
                return body;
            }
            assert!(Instant::now() < deadline, "the agent stopped sampling");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `|a - b| <= tol * b`, with a message worth reading on failure.
pub fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
    assert!(
        err <= tol,
        "{what}: exported {got:.6}, kernel says {want:.6} ({:.2} % off, allowed {:.2} %)",
        err * 100.0,
        tol * 100.0
    );
    eprintln!(
        "{what}: exported {got:.6}, kernel {want:.6} ({:.3} % off)",
        err * 100.0
    );
}

/// Runs `cmd` to completion: whether it exited 0, and its stdout then stderr as text.
pub fn run_text(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `optimus advise ARGS`: its exit code, stdout and stderr.
pub fn advise(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("advise")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
