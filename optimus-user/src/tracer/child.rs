//! Loader child: runs one loading step in a short-lived forked process and passes back the
//! file descriptors it opened, so that the step's memory never counts against the agent.
//!
//! The BTF tracepoint is the reason: aya finds its attach point by name in the kernel's BTF
//! and parses all of it to do so (~20 MB on a distribution kernel), which set the agent's
//! peak memory for its whole life. A forked child makes the same aya calls on a copy of the
//! loaded object (its maps are the same kernel objects, shared by fd), attaches, and sends
//! the program's and link's fds back over a socket pair (`SCM_RIGHTS`); the parent keeps
//! them, which keeps the program attached, and closing them detaches it.

use std::collections::BTreeSet;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors one step may pass back: the tracer's maps, programs and links are
/// about 40 (the kernel takes up to 253 in one message).
const MAX_FDS: usize = 128;
/// Longest report or error message passed back.
const MAX_MESSAGE: usize = 16 * 1024;

/// Runs `step` in a forked child and returns its report (the bytes it returned) and the
/// descriptors it opened and left open (those it created that are still open when it
/// returns), or its error. Fails without
/// running it where the fork or the socket pair fails; the caller then runs it in-process.
///
/// Call while the process has one thread, as `Tracer::load` is (before the runtime
/// starts): a child of a multi-threaded process inherits locks held by threads that do
/// not exist in it.
pub(super) fn run(
    step: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), ChildError> {
    let (parent_end, child_end) = UnixStream::pair().map_err(ChildError::Spawn)?;
    // SAFETY: fork has no preconditions; the child only runs `step` and reports, then
    // _exits without running the parent's destructors or atexit handlers.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ChildError::Spawn(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(parent_end);
        let code = child(&child_end, step);
        // SAFETY: _exit has no preconditions and does not return.
        unsafe { libc::_exit(code) };
    }
    drop(child_end);
    let received = receive(&parent_end);
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` is a valid out-pointer.
    while unsafe { libc::waitpid(pid, &raw mut status, 0) } < 0 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    received.map_err(|e| match e {
        ChildError::Died(_) => ChildError::Died(status),
        e => e,
    })
}

/// The child's side: the step, then one message (a tag, then the report or the error) with
/// the new descriptors attached. Its exit code says only whether the message went out.
fn child(sock: &UnixStream, step: impl FnOnce() -> Result<Vec<u8>, String>) -> i32 {
    let before = open_fds();
    let outcome = step();
    let after = open_fds();
    let new: Vec<i32> = after
        .difference(&before)
        .copied()
        .filter(|&fd| fd != raw(sock))
        .collect();
    if new.len() > MAX_FDS {
        // More than one message carries: none rather than some.
        return 4;
    }
    // SAFETY: each of these is open in this process (just listed) and stays open until
    // the process exits, after the send.
    let fds: Vec<BorrowedFd<'_>> = new
        .iter()
        .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
        .collect();
    let message: Vec<u8> = match &outcome {
        Ok(report) if report.len() <= MAX_MESSAGE => report.clone(),
        Ok(_) => return 3,
        Err(e) => e.as_bytes().iter().take(MAX_MESSAGE).copied().collect(),
    };
    let fds: &[BorrowedFd<'_>] = if outcome.is_ok() { &fds } else { &[] };
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return 2;
    }
    // A one-byte tag first, so that success with an empty report is not an empty message.
    let tag = [u8::from(outcome.is_ok())];
    let iov = [IoSlice::new(&tag), IoSlice::new(&message)];
    match rustix::net::sendmsg(sock.as_fd(), &iov, &mut control, SendFlags::empty()) {
        Ok(_) => 0,
        Err(_) => 1,
    }
}

fn receive(sock: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), ChildError> {
    let mut buf = vec![0u8; 1 + MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let got = loop {
        match rustix::net::recvmsg(
            sock.as_fd(),
            &mut iov,
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => {}
            other => break other,
        }
    }
    .map_err(|e| ChildError::Spawn(e.into()))?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    match buf.get(..got.bytes) {
        None | Some([]) => Err(ChildError::Died(0)),
        Some([1, report @ ..]) => Ok((report.to_vec(), fds)),
        Some([_, message @ ..]) => Err(ChildError::Step(
            String::from_utf8_lossy(message).into_owned(),
        )),
    }
}

fn raw(sock: &UnixStream) -> i32 {
    use std::os::fd::AsRawFd as _;
    sock.as_raw_fd()
}

/// This process's open descriptors.
fn open_fds() -> BTreeSet<i32> {
    let mut fds: BTreeSet<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // Not the listing's own directory fd, closed again by now (and free for the next open).
    // SAFETY: F_GETFD only asks whether `fd` is open.
    fds.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    fds
}

/// Why a step in the child did not hand back its descriptors.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// No child could be started (or talked to): run the step in-process instead.
    #[error("cannot run the loader child: {0}")]
    Spawn(#[source] std::io::Error),
    /// The child ended without a report, with this wait status.
    #[error("the loader child ended without a report (wait status {0:#x})")]
    Died(i32),
    /// The step itself failed, with its error.
    #[error("{0}")]
    Step(String),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read as _, Seek as _, Write as _};

    #[test]
    fn passes_back_what_the_step_opened_and_left_open() {
        let fds = run(|| {
            let mut f = tempfile::tempfile().map_err(|e| e.to_string())?;
            f.write_all(b"from the child").map_err(|e| e.to_string())?;
            // Left open on purpose: the parent receives it.
            std::mem::forget(f);
            // Opened and closed: not passed back.
            drop(std::fs::File::open("/proc/self/status").map_err(|e| e.to_string())?);
            Ok(b"report".to_vec())
        })
        .unwrap();
        let (report, fds) = fds;
        assert_eq!(report, b"report");
        assert_eq!(fds.len(), 1);
        let mut f = std::fs::File::from(fds.into_iter().next().unwrap());
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "from the child");
    }

    #[test]
    fn the_step_error_comes_back_and_nothing_else() {
        match run(|| Err("the BTF tracepoint failed: ENOENT".to_owned())) {
            Err(ChildError::Step(e)) => assert_eq!(e, "the BTF tracepoint failed: ENOENT"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_child_that_dies_is_reported() {
        // SAFETY: _exit has no preconditions.
        let r = run(|| unsafe { libc::_exit(3) });
        assert!(matches!(r, Err(ChildError::Died(0x300))), "{r:?}");
    }
}
