//! Ctrl-C without a signal-handling crate: a handler for SIGINT, SIGTERM and SIGHUP writes
//! each signal into a pipe (the self-pipe trick), and cleanup code reads it on an ordinary
//! code path. Handlers, unlike a blocked signal mask, are reset to the default at exec, so
//! the processes xtask starts (the agent, libvirtd through the harness) react to signals
//! as usual: std's `Command` does not reset an inherited mask.
use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::FromRawFd as _;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use libc::c_int;

const SIGNALS: [c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Write end of the pipe, for the handler; -1 until [`catch`] ran.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// Signals caught since [`catch`], to be taken one by one with [`Catcher::wait`].
#[derive(Clone)]
pub struct Catcher {
    read: Arc<File>,
}

/// A signal taken by [`Catcher::wait`].
pub struct Caught {
    pub signal: c_int,
    /// Sent by a process with kill(2), not by the terminal (whose Ctrl-C already reached the
    /// whole foreground process group, children included).
    pub from_kill: bool,
}

extern "C" fn on_signal(signal: c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler (checked for null).
    let from_kill = !info.is_null() && unsafe { (*info).si_code } == libc::SI_USER;
    let message = [u8::try_from(signal).unwrap_or(0), u8::from(from_kill)];
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: errno is thread-local; saving and restoring it keeps the interrupted code's
        // view intact. write(2) is async-signal-safe and `message` outlives the call.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, message.as_ptr().cast(), message.len());
            *libc::__errno_location() = errno;
        }
    }
}

/// Installs the handlers; from now on SIGINT, SIGTERM and SIGHUP no longer end xtask but
/// wait in the returned [`Catcher`]. Call once.
pub fn catch() -> Result<Catcher> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("creating the signal pipe");
    }
    // SAFETY: pipe2 just returned this descriptor and nothing else owns it.
    let read = unsafe { File::from_raw_fd(fds[0]) };
    if PIPE_WRITE
        .compare_exchange(-1, fds[1], Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        bail!("signal handlers are already installed");
    }
    for signal in SIGNALS {
        // SAFETY: an all-zero sigaction is a valid starting value (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = (on_signal as *const ()).addr();
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `action` is initialised and `on_signal` only does async-signal-safe work;
        // a null old-action pointer is allowed.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("installing a handler for signal {signal}"));
        }
    }
    Ok(Catcher {
        read: Arc::new(read),
    })
}

impl Catcher {
    /// Waits until a signal arrives (returns at once for one caught earlier).
    pub fn wait(&self) -> Result<Caught> {
        let mut message = [0u8; 2];
        (&*self.read)
            .read_exact(&mut message)
            .context("reading the signal pipe")?;
        Ok(Caught {
            signal: c_int::from(message[0]),
            from_kill: message[1] != 0,
        })
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
