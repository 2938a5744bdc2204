//! The kernel's own accounting, used as the oracle in tests, plus process helpers.
//!
//! - on-CPU time: `/proc/<pid>/task/<tid>/schedstat`, first field, nanoseconds
//!   (<https://docs.kernel.org/scheduler/sched-stats.html>)
//! - storage I/O: `/proc/<pid>/io` `read_bytes`/`write_bytes`
//!   (<https://docs.kernel.org/filesystems/proc.html>)
//! - block device: `/sys/class/block/<dev>/stat` sectors read (field 3) and written (field 7)
//!   (<https://docs.kernel.org/block/stat.html>)

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// vCPU index to thread id of a QEMU process, from the thread names `CPU N/TCG` or
/// `CPU N/KVM` in `/proc/<pid>/task/*/comm`.
///
/// QEMU names its threads only with `-name ...,debug-threads=on` (libvirt passes it); without
/// that every thread is `qemu-system-x86`, and this returns an error saying so.
pub fn vcpu_tids(pid: u32) -> anyhow::Result<BTreeMap<u32, u32>> {
    let task_dir = PathBuf::from(format!("/proc/{pid}/task"));
    let entries =
        std::fs::read_dir(&task_dir).with_context(|| format!("read {}", task_dir.display()))?;
    let mut tids = BTreeMap::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("read {}", task_dir.display()))?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread can exit between readdir and read: skip it.
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if let Some(index) = parse_vcpu_comm(comm.trim_end()) {
            tids.insert(index, tid);
        }
    }
    if tids.is_empty() {
        bail!(
            "process {pid} has no thread named \"CPU N/TCG\" or \"CPU N/KVM\" \
             (is it QEMU, started with -name ...,debug-threads=on?)"
        );
    }
    Ok(tids)
}

/// `CPU 3/TCG` -> 3; anything else -> None.
fn parse_vcpu_comm(comm: &str) -> Option<u32> {
    let rest = comm.strip_prefix("CPU ")?;
    let (index, accel) = rest.split_once('/')?;
    matches!(accel, "TCG" | "KVM").then_some(())?;
    index.parse().ok()
}

/// Nanoseconds thread `tid` of process `pid` has spent on a CPU: the first field of
/// `/proc/<pid>/task/<tid>/schedstat`. Includes the slice it is running now.
pub fn schedstat_ns(pid: u32, tid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/task/{tid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let first = text
        .split_whitespace()
        .next()
        .with_context(|| format!("{path} is empty"))?;
    first
        .parse()
        .with_context(|| format!("{path}: first field {first:?} is not a number"))
}

/// Bytes process `pid` (all its threads, living and dead) caused to be read from and
/// written to storage: `read_bytes` and `write_bytes` of `/proc/<pid>/io`.
pub fn proc_io(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/io");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_proc_io(&text).with_context(|| format!("parse {path}"))
}

fn parse_proc_io(text: &str) -> anyhow::Result<(u64, u64)> {
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("no {name} line"))?;
        line.trim()
            .parse()
            .with_context(|| format!("{name}: {line:?} is not a number"))
    };
    Ok((field("read_bytes")?, field("write_bytes")?))
}

/// Sectors (512 bytes each, whatever the device's sector size) read and written on block
/// device `dev` (`"vda"`, `"/dev/vda"` or a partition such as `"sda1"`): fields 3 and 7 of
/// `/sys/class/block/<dev>/stat`.
pub fn block_stat_sectors(dev: &str) -> anyhow::Result<(u64, u64)> {
    let name = dev.strip_prefix("/dev/").unwrap_or(dev);
    let path = format!("/sys/class/block/{name}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_block_stat(&text).with_context(|| format!("parse {path}"))
}

fn parse_block_stat(text: &str) -> anyhow::Result<(u64, u64)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        let s = fields
            .get(n - 1)
            .with_context(|| format!("only {} fields, want field {n}", fields.len()))?;
        s.parse()
            .with_context(|| format!("field {n}: {s:?} is not a number"))
    };
    Ok((field(3)?, field(7)?))
}

/// Name of the block device (`"vda"`, `"sda2"`, `"dm-0"`) holding the file system that
/// `path` lives on, for [`block_stat_sectors`]. Errors for file systems without one
/// (tmpfs, overlayfs over several devices...).
pub fn block_dev_of(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = format!("/sys/dev/block/{major}:{minor}");
    let target = std::fs::read_link(&link).with_context(|| {
        format!(
            "{} is on device {major}:{minor}, which is not a block device ({link} missing)",
            path.display()
        )
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{link} -> {} has no name", target.display()))
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Spawns `cmd` as it is configured (stdio included).
    ///
    /// A binary the test has just written can be "busy" (`ETXTBSY`) for a moment: another
    /// test thread that forked while its write fd was open holds a copy until its exec
    /// closes it. That is retried for up to a second.
    pub fn spawn(mut cmd: Command) -> anyhow::Result<ChildGuard> {
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other,
            }
        }
        .with_context(|| format!("spawn {}", describe(&cmd)))?;
        Ok(ChildGuard(child))
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.0
            .try_wait()
            .with_context(|| format!("wait for process {}", self.0.id()))
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILLs; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        signal(self.0.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Already-exited races make kill() fail harmlessly; wait() says what happened.
        let _ = self.0.kill();
        self.0
            .wait()
            .with_context(|| format!("wait for process {}", self.0.id()))
    }

    /// The underlying [`Child`], e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.0
    }

    /// Gives up ownership: the process keeps running after this guard is gone (and is
    /// not reaped by us). Returns its pid.
    pub fn detach(self) -> u32 {
        let guard = std::mem::ManuallyDrop::new(self);
        guard.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            eprintln!("optimus-tests: stopping process {}: {e:#}", self.0.id());
        }
    }
}

/// Sends `sig` to process `pid`; returns whether the kernel accepted it.
pub fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised comm (which may hold spaces and parens).
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `timeout` for process `pid` (not our child) to disappear.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose command line (NUL-separated arguments) contains `args` as consecutive
/// arguments, e.g. `["-uuid", "..."]`.
pub fn find_pids_by_args(args: &[&str]) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let entry = entry.context("read /proc")?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let found = argv
            .windows(args.len())
            .any(|w| w.iter().zip(args).all(|(a, b)| *a == b.as_bytes()));
        if found && alive(pid) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close).
///
/// Panics only when nothing at all can bind on 127.0.0.1, where no test could run.
pub fn free_port() -> u16 {
    match try_free_port() {
        Ok(port) => port,
        Err(e) => panic!("no free TCP port on 127.0.0.1: {e:#}"),
    }
}

/// [`free_port`] that returns the error instead of panicking.
pub fn try_free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local_addr")?.port())
}

/// Runs `cmd` to completion with `stdin` fed to it, killing it after `timeout`.
/// Returns its output whatever its exit status.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            // A writer thread, so a child that fills its stdout pipe cannot deadlock us.
            Some(thread::spawn(move || pipe.write_all(&data)))
        }
        _ => None,
    };
    let out_reader = child.stdout.take().map(spawn_reader);
    let err_reader = child.stderr.take().map(spawn_reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("wait {what}"))? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = writer {
        // A child that exits without reading all stdin gives EPIPE: its status tells more.
        let _ = w.join();
    }
    let join =
        |r: Option<thread::JoinHandle<Vec<u8>>>| r.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output {
        status,
        stdout: join(out_reader),
        stderr: join(err_reader),
    })
}

fn spawn_reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// [`run`] without stdin that fails unless the command exits 0; returns its stdout.
/// The error carries the command line, the status and stderr.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let what = describe(cmd);
    let out = run(cmd, None, timeout)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{what}: stdout is not UTF-8"))
}

/// `program arg1 arg2...` for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Last `lines` lines of a text file, for error messages ("" if unreadable).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    text_tail(&String::from_utf8_lossy(&bytes), lines)
}

/// Last `lines` lines of `text`.
pub fn text_tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_comm() {
        assert_eq!(parse_vcpu_comm("CPU 0/TCG"), Some(0));
        assert_eq!(parse_vcpu_comm("CPU 12/KVM"), Some(12));
        assert_eq!(parse_vcpu_comm("qemu-system-x86"), None);
        assert_eq!(parse_vcpu_comm("CPU 1/XYZ"), None);
        assert_eq!(parse_vcpu_comm("CPU x/TCG"), None);
    }

    #[test]
    fn io_and_block_stat() {
        let io = "rchar: 1\nwchar: 2\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_proc_io(io).unwrap(), (4096, 8192));
        assert!(parse_proc_io("rchar: 1\n").is_err());
        let stat = "  1234 0 5678 100 4321 0 8765 200 0 300 400 0 0 0 0 0 0\n";
        assert_eq!(parse_block_stat(stat).unwrap(), (5678, 8765));
        assert!(parse_block_stat("1 2").is_err());
    }

    #[test]
    fn self_accounting() {
        let pid = std::process::id();
        assert!(schedstat_ns(pid, pid).unwrap() > 0);
        proc_io(pid).unwrap();
        assert!(alive(pid));
        assert!(vcpu_tids(pid).is_err());
    }

    #[test]
    fn run_with_stdin_and_timeout() {
        let out = run(
            &mut Command::new("cat"),
            Some(b"hello"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(out.stdout, b"hello");
        let err = run(
            Command::new("sleep").arg("5"),
            None,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(run_ok(&mut Command::new("false"), Duration::from_secs(5)).is_err());
    }

    #[test]
    fn child_guard_stops() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let guard = ChildGuard::spawn(cmd).unwrap();
        let pid = guard.pid();
        assert!(alive(pid));
        drop(guard);
        assert!(!alive(pid));
    }

    #[test]
    fn port() {
        assert_ne!(free_port(), 0);
    }
}
