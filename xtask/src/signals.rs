//! Ctrl-C without a signal-handling crate: the termination signals are blocked in every
//! thread (block them before any thread starts: threads inherit the mask) and taken
//! synchronously with `sigwaitinfo`, so cleanup runs on an ordinary code path. Children
//! spawned through `std::process` start with an empty mask again (std resets it).
use std::io;
use std::mem::MaybeUninit;

use anyhow::{Context as _, Result};
use libc::c_int;

const SIGNALS: [c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The termination signals, blocked in this thread and the threads it starts from now on.
#[derive(Clone, Copy)]
pub struct Blocked {
    set: libc::sigset_t,
}

/// A signal taken by [`Blocked::wait`].
pub struct Caught {
    pub signal: c_int,
    /// Sent by a process with kill(2), not by the terminal (whose Ctrl-C already reached the
    /// whole foreground process group).
    pub from_kill: bool,
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread.
pub fn block() -> Result<Blocked> {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset only writes the set it is given, which is valid for writes.
    if unsafe { libc::sigemptyset(set.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("sigemptyset");
    }
    // SAFETY: sigemptyset succeeded, so the set is initialised.
    let mut set = unsafe { set.assume_init() };
    for signal in SIGNALS {
        // SAFETY: `set` is an initialised sigset_t and `signal` a valid signal number.
        if unsafe { libc::sigaddset(&mut set, signal) } != 0 {
            return Err(io::Error::last_os_error()).context("sigaddset");
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc)).context("blocking SIGINT/SIGTERM/SIGHUP");
    }
    Ok(Blocked { set })
}

impl Blocked {
    /// Waits until one of the signals arrives.
    pub fn wait(&self) -> Result<Caught> {
        loop {
            let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
            // SAFETY: `self.set` is an initialised sigset_t and `info` is valid for writes.
            let signal = unsafe { libc::sigwaitinfo(&self.set, info.as_mut_ptr()) };
            if signal < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("sigwaitinfo");
            }
            // SAFETY: zero-initialised, then filled by the kernel on success.
            let info = unsafe { info.assume_init() };
            return Ok(Caught {
                signal,
                from_kill: info.si_code == libc::SI_USER,
            });
        }
    }
}

/// Sends `signal` to process `pid`.
pub fn send(pid: u32, signal: c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("kill({pid}, {signal})"));
    }
    Ok(())
}
