//! `optimus check`'s look at the guest channels: which VMs have one, and whether the guest
//! at the other end answers a hello within [`ANSWER_WAIT`].

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::protocol::{decode, encode, GuestMessage, HostMessage, MAX_LINE_BYTES};
use crate::discovery::{escape_controls, Vm};
use crate::phase::{LineSplitter, Piece};

/// How long a guest has to answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// What probing one channel found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A valid message came back; the guest agent's description when it said hello.
    Answers(Option<String>),
    /// Lines came back, none of them the protocol.
    Garbage,
    /// Connected, nothing came back in time.
    Silent,
    /// The socket could not be connected.
    Unreachable(String),
}

/// Connects to `socket`, says hello and waits up to `wait` for a valid guest message.
pub fn probe(socket: &Path, wait: Duration) -> Probe {
    let (tx, rx) = mpsc::channel();
    let path = socket.to_path_buf();
    // In a thread: a connect to a listener whose backlog is full would block.
    let spawned = std::thread::Builder::new()
        .name("optimus-probe".into())
        .spawn(move || {
            let _ = tx.send(talk(&path, wait));
        });
    if spawned.is_err() {
        return Probe::Unreachable("cannot start a thread".into());
    }
    rx.recv_timeout(wait + Duration::from_secs(1))
        .unwrap_or(Probe::Silent)
}

fn talk(path: &PathBuf, wait: Duration) -> Probe {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => return Probe::Unreachable(e.to_string()),
    };
    let hello = encode(&HostMessage::Hello {
        agent: format!("optimus {} check", env!("CARGO_PKG_VERSION")),
    });
    if let Ok(line) = hello {
        if let Err(e) = stream.write_all(&line) {
            return Probe::Unreachable(e.to_string());
        }
    }
    let deadline = Instant::now() + wait;
    let mut lines = LineSplitter::with_limit(MAX_LINE_BYTES);
    let mut pieces = Vec::new();
    let mut buf = [0u8; 8192];
    let mut garbage = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(10))));
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        lines.feed(&buf[..n], &mut pieces);
        for p in pieces.drain(..) {
            let Piece::Line(l) = p else {
                garbage = true;
                continue;
            };
            match decode::<GuestMessage>(&l) {
                Ok(GuestMessage::Hello { agent, .. }) => return Probe::Answers(Some(agent)),
                Ok(_) => return Probe::Answers(None),
                Err(_) => garbage = true,
            }
        }
    }
    if garbage {
        Probe::Garbage
    } else {
        Probe::Silent
    }
}

/// One check line per VM with a channel, plus one for those without.
pub fn items(vms: &[Vm], proc: &Path, run: &Path) -> Vec<(bool, String)> {
    let all: Vec<&Vm> = vms.iter().collect();
    let specs: Vec<(&Vm, Option<PathBuf>)> = super::specs_of(&all, proc, run)
        .into_iter()
        .map(|(vm, spec)| (vm, spec.socket))
        .collect();
    let probes: Vec<_> = specs
        .iter()
        .filter_map(|(vm, s)| Some((*vm, s.clone()?)))
        .map(|(vm, socket)| {
            let (tx, rx) = mpsc::channel();
            let path = socket.clone();
            let _ = std::thread::Builder::new().spawn(move || {
                let _ = tx.send(probe(&path, ANSWER_WAIT));
            });
            (vm, socket, rx)
        })
        .collect();
    let mut out = Vec::new();
    for (vm, socket, rx) in probes {
        let name = escape_controls(&vm.id.name);
        let result = rx
            .recv_timeout(ANSWER_WAIT + Duration::from_secs(2))
            .unwrap_or(Probe::Silent);
        let (ok, what) = match result {
            Probe::Answers(Some(agent)) => (
                true,
                format!("guest answers ({})", escape_controls(&agent)),
            ),
            Probe::Answers(None) => (true, "guest answers".to_owned()),
            Probe::Garbage => (
                false,
                "the guest sends lines that are not the channel protocol (see optimus_guest_channel_errors_total)".to_owned(),
            ),
            Probe::Silent => (
                false,
                format!(
                    "no answer within {} s: `optimus guest` is not running in the VM, or a running `optimus run` holds the channel (then see optimus_guest_channel_connected)",
                    ANSWER_WAIT.as_secs()
                ),
            ),
            Probe::Unreachable(why) => (false, format!("cannot connect ({why})")),
        };
        out.push((ok, format!("VM \"{name}\": {}: {what}", socket.display())));
    }
    let without: Vec<String> = specs
        .iter()
        .filter(|(_, s)| s.is_none())
        .map(|(vm, _)| escape_controls(&vm.id.name).into_owned())
        .collect();
    if !without.is_empty() {
        out.push((
            true,
            format!(
                "no channel (optional; README \"Guest channel\"): {}",
                without.join(", ")
            ),
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            s.write_all(reply).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        (tmp, path)
    }

    #[test]
    fn answers_garbage_silence_and_nothing() {
        let (_t, p) = serve(b"{\"v\":1,\"type\":\"hello\",\"agent\":\"optimus 0.1.0\"}\n");
        assert_eq!(
            probe(&p, Duration::from_secs(2)),
            Probe::Answers(Some("optimus 0.1.0".into()))
        );
        let (_t, p) = serve(b"junk\n");
        assert_eq!(probe(&p, Duration::from_millis(300)), Probe::Garbage);
        let (_t, p) = serve(b"");
        assert_eq!(probe(&p, Duration::from_millis(300)), Probe::Silent);
        assert!(matches!(
            probe(Path::new("/nonexistent/sock"), Duration::from_millis(100)),
            Probe::Unreachable(_)
        ));
    }
}
