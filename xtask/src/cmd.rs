//! Child processes with a printable form, so every failure names the command that failed.
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{bail, Context as _, Result};

/// A command to run plus how it reads in a shell (environment overrides included), for
/// messages.
pub struct Cmd {
    inner: Command,
    shown: String,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref();
        Self {
            inner: Command::new(program),
            shown: program.to_string_lossy().into_owned(),
        }
    }

    /// Names the program differently in messages (`cargo` for the full path in `$CARGO`).
    pub fn shown_as(mut self, name: &str) -> Self {
        name.clone_into(&mut self.shown);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let arg = arg.as_ref();
        let _ = write!(self.shown, " {}", arg.to_string_lossy());
        self.inner.arg(arg);
        self
    }

    pub fn args<I, S>(self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        args.into_iter().fold(self, Self::arg)
    }

    /// Sets a variable for the child; it shows in messages unless it is `PATH`, which is
    /// long and rarely the point.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        let (key, value) = (key.as_ref(), value.as_ref());
        if key != "PATH" {
            self.shown = format!(
                "{}={} {}",
                key.to_string_lossy(),
                value.to_string_lossy(),
                self.shown
            );
        }
        self.inner.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.inner.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.inner.current_dir(dir);
        self
    }

    /// The command as a shell would read it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Runs with inherited stdio and fails unless it exits 0.
    pub fn run(self) -> Result<()> {
        let (shown, status) = self.status()?;
        check(&shown, status)
    }

    /// Runs with inherited stdio and returns how it exited.
    pub fn status(mut self) -> Result<(String, ExitStatus)> {
        let status = self
            .inner
            .status()
            .map_err(|e| spawn_error(&self.shown, e))?;
        Ok((self.shown, status))
    }

    /// Runs with stdout captured (stderr inherited); fails unless it exits 0.
    pub fn read(mut self) -> Result<String> {
        let out = self
            .inner
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| spawn_error(&self.shown, e))?;
        check(&self.shown, out.status)?;
        String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", self.shown))
    }

    /// Runs with all output captured, shown only if it fails (the last lines, in the error):
    /// for chatty tools like apt-get whose progress is noise when they succeed.
    pub fn run_quiet(mut self) -> Result<()> {
        let out = self
            .inner
            .stdin(Stdio::null())
            .output()
            .map_err(|e| spawn_error(&self.shown, e))?;
        if out.status.success() {
            return Ok(());
        }
        let text = [out.stdout, out.stderr]
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("");
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        bail!("`{}` failed ({}):\n{tail}", self.shown, out.status)
    }

    /// For checks: stdout when the command starts and exits 0, `None` otherwise (stderr
    /// swallowed: a failed probe is an answer, not an error).
    pub fn probe(mut self) -> Option<String> {
        let out = self
            .inner
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8(out.stdout).ok()
    }

    /// Like [`Cmd::probe`] but also hands back stdout of a failed run, for tools whose exit
    /// status means "some were missing" rather than "it broke" (dpkg-query).
    pub fn read_any_status(mut self) -> Result<String> {
        let out = self
            .inner
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|e| spawn_error(&self.shown, e))?;
        String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", self.shown))
    }

    /// Runs with stdin closed and stdout and stderr captured, whatever the exit status: for
    /// tools whose output the caller reads either way (libFuzzer's statistics and crash).
    pub fn output(mut self) -> Result<(String, std::process::Output)> {
        let out = self
            .inner
            .stdin(Stdio::null())
            .output()
            .map_err(|e| spawn_error(&self.shown, e))?;
        Ok((self.shown, out))
    }

    pub fn spawn(mut self) -> Result<(String, Child)> {
        let child = self
            .inner
            .spawn()
            .map_err(|e| spawn_error(&self.shown, e))?;
        Ok((self.shown, child))
    }

    /// Replaces this process with the command (so the terminal's signals reach it directly);
    /// returns only on failure.
    pub fn exec(mut self) -> anyhow::Error {
        use std::os::unix::process::CommandExt as _;
        spawn_error(&self.shown, self.inner.exec())
    }
}

/// Fails with the command and its exit status unless it succeeded.
pub fn check(shown: &str, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

fn spawn_error(shown: &str, e: io::Error) -> anyhow::Error {
    let program = shown
        .split_whitespace()
        .find(|w| !w.contains('='))
        .unwrap_or(shown);
    if e.kind() == io::ErrorKind::NotFound {
        anyhow::anyhow!("could not start `{shown}`: `{program}` is not on PATH")
    } else {
        anyhow::Error::new(e).context(format!("could not start `{shown}`"))
    }
}

/// `dirs` at the front of `current` (in that order), each once.
pub fn path_with(dirs: &[&Path], current: Option<OsString>) -> Result<OsString> {
    let current = current.unwrap_or_default();
    let rest = std::env::split_paths(&current).filter(|p| !dirs.iter().any(|d| p == d));
    let parts: Vec<_> = dirs.iter().map(|d| d.to_path_buf()).chain(rest).collect();
    std::env::join_paths(parts).context("PATH has an entry with ':' in it")
}
