//! The agent's local control socket, and `optimus phase`, its client.
//!
//! In: one JSON request line per connection (`{"vm": "NAME|UUID", "phase": "train epoch=3"}`)
//! from a local root process (socket mode 0600 in a 0700 directory, peer uid checked).
//! Out: the request handed to the sampler (which reads the counters at the boundary), and
//! one JSON reply line. Requests are bounded in size and time.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cli::PhaseArgs;
use crate::phase::{format_mark, parse_line, parse_words, quote, Mark};

/// Where the agent listens unless `--control-socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/optimus/control.sock";
/// Longest request accepted, bytes.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request, and the agent to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One request on the socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The VM, by name or UUID.
    pub vm: String,
    /// A phase line (`NAME [key=value ...]` or `-`).
    pub phase: String,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// On success: the VM and the phase now in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// On failure: why, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A failure reply.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            vm_name: None,
            vm_uuid: None,
            phase: None,
            error: Some(message.into()),
        }
    }
}

/// A phase switch for the sampler, with where to send the answer.
#[derive(Debug)]
pub struct PhaseRequest {
    pub vm: String,
    pub mark: Mark,
    pub reply: mpsc::Sender<Reply>,
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent is already listening on {} (stop it, or pass --control-socket)", path.display())]
    InUse { path: PathBuf },
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes the socket file on drop, if it is still the one this agent bound (another agent
/// may have replaced it).
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket at `path`: its directory created 0700 if missing, a stale
/// socket file replaced, the socket made 0600. The guard removes the file again.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), ControlError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", dir))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io_err("remove stale", path))?;
    }
    // Created 0600 from the start: no window where another user could connect.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io_err("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod", path))?;
    let ino = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::symlink_metadata(path)
            .map_err(io_err("stat", path))?
            .ino()
    };
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            ino,
        },
    ))
}

/// Serves the socket on its own thread: each request goes to `requests` (the sampler).
pub fn serve(
    listener: UnixListener,
    requests: mpsc::Sender<PhaseRequest>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("optimus-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => handle(stream, &requests),
                    Err(e) => log::warn!("control socket: accept failed: {e}"),
                }
            }
        })
}

/// The uid of the peer, from SO_PEERCRED.
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd as _;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into the struct we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

pub(crate) fn handle(stream: UnixStream, requests: &mpsc::Sender<PhaseRequest>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let reply = match peer_uid(&stream) {
        Some(uid) if uid == 0 || uid == me => answer(&stream, requests),
        Some(uid) => Reply::error(format!("uid {uid} may not control the agent: run as root")),
        None => Reply::error("cannot tell who is asking"),
    };
    let mut stream = stream;
    let mut line = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
    line.push('\n');
    let _ = stream.write_all(line.as_bytes());
}

fn answer(stream: &UnixStream, requests: &mpsc::Sender<PhaseRequest>) -> Reply {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST + 1));
    if let Err(e) = reader.read_until(b'\n', &mut line) {
        return Reply::error(format!("reading the request: {e}"));
    }
    if line.len() as u64 > MAX_REQUEST {
        return Reply::error(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => return Reply::error(format!("malformed request {}: {e}", quote(&line))),
    };
    let mark = match parse_line(req.phase.as_bytes()) {
        Ok(Some(m)) => m,
        Ok(None) => return Reply::error("empty phase: give NAME [key=value ...] or -"),
        Err(e) => return Reply::error(format!("bad phase {}: {e}", quote(req.phase.as_bytes()))),
    };
    let (tx, rx) = mpsc::channel();
    let sent = requests.send(PhaseRequest {
        vm: req.vm,
        mark,
        reply: tx,
    });
    if sent.is_err() {
        return Reply::error("the agent is shutting down");
    }
    rx.recv_timeout(IO_TIMEOUT)
        .unwrap_or_else(|_| Reply::error("the agent did not answer in time"))
}

/// `optimus phase`: sends one request and prints the outcome in one line.
pub fn client_main(args: &PhaseArgs) -> ExitCode {
    match client(args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn client(args: &PhaseArgs) -> Result<String, String> {
    let mark = match parse_words(&args.phase) {
        Ok(Some(m)) => m,
        Ok(None) => return Err("empty phase: give NAME [key=value ...] or -".into()),
        Err(e) => return Err(format!("bad phase: {e}")),
    };
    let path = &args.control_socket;
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "no agent is running: nothing listens on {} (start `optimus run`, or pass the agent's --control-socket)",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {}: the control socket is root-only, run with sudo",
            path.display()
        ),
        _ => format!("cannot connect to {}: {e}", path.display()),
    })?;
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT * 2));
    let mut req = serde_json::to_string(&Request {
        vm: args.vm.clone(),
        phase: format_mark(&mark),
    })
    .map_err(|e| e.to_string())?;
    req.push('\n');
    stream
        .write_all(req.as_bytes())
        .map_err(|e| format!("sending to {}: {e}", path.display()))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_REQUEST))
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the agent's answer: {e}"))?;
    let reply: Reply = serde_json::from_slice(&line)
        .map_err(|_| format!("the agent answered {}", quote(&line)))?;
    if reply.ok {
        Ok(format!(
            "{} ({}): phase {}",
            reply.vm_name.unwrap_or_default(),
            reply.vm_uuid.unwrap_or_default(),
            reply.phase.unwrap_or_default()
        ))
    } else {
        Err(reply.error.unwrap_or_else(|| "the agent refused".into()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_private_and_requests_reach_the_sampler() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/optimus/control.sock");
        let (listener, guard) = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // A second agent on the same path is refused while the first listens.
        assert!(matches!(bind(&path), Err(ControlError::InUse { .. })));
        let (tx, rx) = mpsc::channel::<PhaseRequest>();
        let _server = serve(listener, tx).unwrap();
        let sampler = std::thread::spawn(move || {
            for req in rx.iter().take(2) {
                let reply = if req.vm == "vm1" {
                    Reply {
                        ok: true,
                        vm_name: Some("vm1".into()),
                        vm_uuid: Some("u1".into()),
                        phase: Some(format_mark(&req.mark)),
                        error: None,
                    }
                } else {
                    Reply::error(format!("unknown VM {:?}", req.vm))
                };
                req.reply.send(reply).unwrap();
            }
        });
        let args = |vm: &str, words: &[&str]| PhaseArgs {
            vm: vm.into(),
            control_socket: path.clone(),
            phase: words.iter().map(|w| (*w).to_owned()).collect(),
        };
        assert_eq!(
            client(&args("vm1", &["train", "epoch=3"])).unwrap(),
            "vm1 (u1): phase train epoch=3"
        );
        assert_eq!(
            client(&args("nope", &["-"])).unwrap_err(),
            "unknown VM \"nope\""
        );
        // Bad phases are refused by the client before anything is sent.
        assert!(client(&args("vm1", &["(bad)"]))
            .unwrap_err()
            .starts_with("bad phase"));
        sampler.join().unwrap();
        drop(guard);
        assert!(!path.exists(), "the socket file is removed on exit");
    }

    #[test]
    fn no_agent_is_one_clear_line() {
        let tmp = tempfile::tempdir().unwrap();
        let err = client(&PhaseArgs {
            vm: "x".into(),
            control_socket: tmp.path().join("none.sock"),
            phase: vec!["train".into()],
        })
        .unwrap_err();
        assert!(err.starts_with("no agent is running"), "{err}");
        assert!(!err.contains('\n'));
    }
}
