//! One VM's channel connection: its socket in, judged messages out (into the VM's
//! [`Shared`] state), its figures written back. Two threads per VM, so that a silent,
//! slow or hostile guest only ever stalls itself: a reader that (re)connects and judges
//! each line, and a writer fed by a bounded queue the sampler never waits on.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::{
    decode, ErrorKind, GuestMessage, MAX_GPUS, MAX_LINE_BYTES, MAX_MESSAGES_PER_SECOND,
};
use super::trust::{GpuClaims, OwnedGpu};
use crate::control::PhaseRequest;
use crate::phase::{parse_line, LineSplitter, Piece};

/// How often a thread looks at its stop flag while blocked.
const POLL: Duration = Duration::from_millis(200);
/// Wait between connection attempts.
const RECONNECT: Duration = Duration::from_secs(1);
/// Longest a write to the guest may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most phase marks per second per VM: each one makes the sampler take a sample.
pub const MAX_PHASES_PER_SECOND: u32 = 10;
/// Most phase marks per second from all guests together, so that many VMs cannot make the
/// sampler do nothing but boundaries; the VM whose mark is dropped counts a `flood`.
pub const MAX_PHASES_PER_SECOND_ALL: u32 = 50;

/// A token bucket: `rate` tokens a second, at most `rate` saved up.
#[derive(Clone, Debug)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    at_s: f64,
}

impl RateLimit {
    pub fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at_s: 0.0,
        }
    }

    /// Whether one more event at `now_s` (monotonic seconds) is within the rate.
    pub fn allow(&mut self, now_s: f64) -> bool {
        let dt = (now_s - self.at_s).max(0.0);
        self.at_s = now_s;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the sampler reads of one VM's channel.
#[derive(Debug, Default)]
pub struct Shared {
    pub errors: std::collections::BTreeMap<ErrorKind, u64>,
    /// Accepted messages by type (`hello`, `gpu`, `phase`).
    pub messages: std::collections::BTreeMap<&'static str, u64>,
    pub claims: GpuClaims,
    pub connected: bool,
    /// When the guest last sent a message that was accepted.
    pub last_message: Option<Instant>,
    /// The guest agent's own description from its hello (cut to 64 printable bytes).
    pub agent: Option<String>,
    /// The guest's session id, from its hello.
    session: Option<u64>,
}

impl Shared {
    fn count(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// Locks `m`, taking over a poisoned lock (the state stays consistent: plain counters).
pub fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a connection needs to judge a VM's lines.
#[derive(Clone, Debug)]
pub struct VmContext {
    pub uuid: String,
    pub gpus: Vec<OwnedGpu>,
    pub max_gpu_watts: f64,
    /// Where phase marks go (the sampler's request queue).
    pub phases: Option<Sender<PhaseRequest>>,
    /// The agent's start, for monotonic seconds.
    pub epoch: Instant,
    /// The bucket of phase marks all guests share ([`MAX_PHASES_PER_SECOND_ALL`]).
    pub all_phases: Arc<Mutex<RateLimit>>,
}

/// The state of one connection's input.
pub struct Judge {
    ctx: VmContext,
    rate: RateLimit,
    phase_rate: RateLimit,
}

impl Judge {
    pub fn new(ctx: VmContext) -> Self {
        Self {
            ctx,
            rate: RateLimit::new(MAX_MESSAGES_PER_SECOND),
            phase_rate: RateLimit::new(MAX_PHASES_PER_SECOND),
        }
    }

    /// Judges one line (or an over-long one) received at `now`, updating `shared`.
    pub fn line(&mut self, piece: &Piece, now: Instant, shared: &Mutex<Shared>) {
        let now_s = now.duration_since(self.ctx.epoch).as_secs_f64();
        // Every line costs a token, so a flood of junk is bounded too.
        if !self.rate.allow(now_s) {
            lock(shared).count(ErrorKind::Flood);
            return;
        }
        let result = match piece {
            Piece::TooLong { .. } => Err(ErrorKind::Oversized),
            Piece::Line(l) if l.is_empty() => return,
            Piece::Line(l) => {
                decode::<GuestMessage>(l).and_then(|m| self.message(m, now, now_s, shared))
            }
        };
        if let Err(kind) = result {
            lock(shared).count(kind);
        }
    }

    fn message(
        &mut self,
        m: GuestMessage,
        now: Instant,
        now_s: f64,
        shared: &Mutex<Shared>,
    ) -> Result<(), ErrorKind> {
        let claimed = match &m {
            GuestMessage::Hello { vm_uuid, .. }
            | GuestMessage::Gpu { vm_uuid, .. }
            | GuestMessage::Phase { vm_uuid, .. } => vm_uuid.as_deref(),
        };
        if claimed.is_some_and(|u| !u.trim().eq_ignore_ascii_case(&self.ctx.uuid)) {
            return Err(ErrorKind::WrongVm);
        }
        let kind = match m {
            GuestMessage::Hello { agent, .. } => {
                let mut s = lock(shared);
                let session = agent_session(&agent);
                if s.session != Some(session) {
                    s.claims.reset();
                    s.session = Some(session);
                }
                s.agent = Some(
                    agent
                        .chars()
                        .filter(|c| c.is_ascii_graphic() || *c == ' ')
                        .take(64)
                        .collect(),
                );
                "hello"
            }
            GuestMessage::Gpu { gpus, .. } => {
                if gpus.len() > MAX_GPUS {
                    return Err(ErrorKind::InvalidValue);
                }
                let mut s = lock(shared);
                for g in &gpus {
                    if let Err(kind) =
                        s.claims
                            .claim(&self.ctx.gpus, g, self.ctx.max_gpu_watts, now_s)
                    {
                        s.count(kind);
                    }
                }
                "gpu"
            }
            GuestMessage::Phase { line, .. } => {
                let mark = match parse_line(line.as_bytes()) {
                    Ok(Some(mark)) => mark,
                    Ok(None) | Err(_) => return Err(ErrorKind::BadPhase),
                };
                let shared_ok = || {
                    self.ctx
                        .all_phases
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .allow(now_s)
                };
                if !self.phase_rate.allow(now_s) || !shared_ok() {
                    return Err(ErrorKind::Flood);
                }
                if let Some(tx) = &self.ctx.phases {
                    // Nobody reads the reply: the guest is not told, the host records it.
                    let (reply, _) = std::sync::mpsc::channel();
                    let _ = tx.send(PhaseRequest {
                        vm: self.ctx.uuid.clone(),
                        mark,
                        reply,
                    });
                }
                "phase"
            }
        };
        let mut s = lock(shared);
        *s.messages.entry(kind).or_default() += 1;
        s.last_message = Some(now);
        Ok(())
    }
}

/// The session id a hello carries after `session=` in its agent text (`optimus 0.1.0
/// session=123`); 0 when it carries none.
fn agent_session(agent: &str) -> u64 {
    agent
        .split_whitespace()
        .find_map(|w| w.strip_prefix("session="))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Runs a VM's reader until `stop`: connects to `socket`, sends `hello`, judges lines.
pub fn reader(
    socket: PathBuf,
    ctx: VmContext,
    shared: Arc<Mutex<Shared>>,
    current: Arc<Mutex<Option<UnixStream>>>,
    hello: Vec<u8>,
    stop: Arc<AtomicBool>,
) {
    let mut judge = Judge::new(ctx);
    let mut buf = vec![0u8; 16 * 1024];
    let mut told = false;
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match UnixStream::connect(&socket) {
            Ok(s) => s,
            Err(e) => {
                // Once per VM: a socket the agent may not open (the packaged user has no
                // access to libvirt's channel directory) is a setup problem to say.
                if !told && e.kind() == std::io::ErrorKind::PermissionDenied {
                    log::warn!(
                        "cannot connect to guest channel {}: {e}; give the agent write access to it (run as root, or add its user to the socket's group)",
                        socket.display()
                    );
                    told = true;
                }
                sleep_unless(&stop, RECONNECT);
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(POLL));
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if stream.write_all(&hello).is_err() {
            sleep_unless(&stop, RECONNECT);
            continue;
        }
        if let Ok(w) = stream.try_clone() {
            *current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(w);
        }
        lock(&shared).connected = true;
        log::info!("guest channel {} connected", socket.display());
        let mut lines = LineSplitter::with_limit(MAX_LINE_BYTES);
        let mut pieces = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    lines.feed(&buf[..n], &mut pieces);
                    let now = Instant::now();
                    for p in pieces.drain(..) {
                        judge.line(&p, now, &shared);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        *current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        lock(&shared).connected = false;
        log::info!("guest channel {} disconnected", socket.display());
        sleep_unless(&stop, RECONNECT);
    }
}

/// Runs a VM's writer until `stop`: each queued line goes to the connected stream, or is
/// dropped when there is none (figures are only worth their interval).
pub fn writer(
    rx: Receiver<Vec<u8>>,
    current: Arc<Mutex<Option<UnixStream>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let line = match rx.recv_timeout(POLL) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let stream = current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .and_then(|s| s.try_clone().ok());
        if let Some(mut s) = stream {
            if s.write_all(&line).is_err() {
                // A guest that does not read stalls only this write; the reader notices a
                // dead connection itself.
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn judge() -> (Judge, Arc<Mutex<Shared>>, Instant) {
        let epoch = Instant::now();
        let ctx = VmContext {
            uuid: "aaaaaaaa-0000-0000-0000-000000000001".into(),
            gpus: vec![OwnedGpu {
                guest_pci: "0000:00:05.0".into(),
                host_pci: "0000:65:00.0".into(),
                uuid: None,
            }],
            max_gpu_watts: 1000.0,
            phases: None,
            epoch,
            all_phases: Arc::new(Mutex::new(RateLimit::new(MAX_PHASES_PER_SECOND_ALL))),
        };
        (
            Judge::new(ctx),
            Arc::new(Mutex::new(Shared::default())),
            epoch,
        )
    }

    fn line(s: &str) -> Piece {
        Piece::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn rate_limit() {
        let mut r = RateLimit::new(100);
        let allowed = (0..1000).filter(|_| r.allow(0.5)).count();
        assert_eq!(allowed, 100);
        assert!(!r.allow(0.5));
        assert!(r.allow(0.52), "tokens come back at the rate");
    }

    #[test]
    fn hostile_lines_only_count() {
        let (mut j, shared, epoch) = judge();
        let t = |ms| epoch + Duration::from_millis(ms);
        let gpu = |mj: i64| {
            line(&format!(
                r#"{{"v":1,"type":"gpu","gpus":[{{"pci_bus_id":"00000000:00:05.0","energy_mj":{mj}}}]}}"#
            ))
        };
        j.line(&gpu(1000), t(0), &shared);
        j.line(&gpu(6000), t(1000), &shared);
        j.line(&line("junk \u{1}"), t(1100), &shared);
        j.line(
            &Piece::TooLong {
                start: vec![b'x'],
                len: 1 << 20,
            },
            t(1200),
            &shared,
        );
        j.line(&gpu(-5), t(1300), &shared);
        j.line(&gpu(10), t(1400), &shared);
        j.line(&gpu(99_999_999), t(1500), &shared);
        j.line(
            &line(
                r#"{"v":1,"type":"gpu","gpus":[{"pci_bus_id":"0000:00:06.0","energy_mj":9000}]}"#,
            ),
            t(1600),
            &shared,
        );
        j.line(
            &line(r#"{"v":1,"type":"gpu","vm_uuid":"bbbbbbbb-0000-0000-0000-000000000002","gpus":[{"pci_bus_id":"0000:00:05.0","energy_mj":9000}]}"#),
            t(1700),
            &shared,
        );
        j.line(&line(r#"{"v":9,"type":"hello"}"#), t(1800), &shared);
        j.line(
            &line(r#"{"v":1,"type":"phase","line":"bad(name)"}"#),
            t(1900),
            &shared,
        );
        for _ in 0..150 {
            j.line(&line("{}"), t(2000), &shared);
        }
        let mut s = lock(&shared);
        assert_eq!(
            s.claims.take(),
            [("pci-0000:65:00.0".to_owned(), 5_000_000)].into()
        );
        let n = |k| s.errors.get(&k).copied().unwrap_or(0);
        assert_eq!(n(ErrorKind::Oversized), 1);
        assert_eq!(n(ErrorKind::InvalidValue), 1);
        assert_eq!(n(ErrorKind::NonMonotonic), 1);
        assert_eq!(n(ErrorKind::OverMaxWatts), 1);
        assert_eq!(n(ErrorKind::NotOwned), 1);
        assert_eq!(n(ErrorKind::WrongVm), 1);
        assert_eq!(n(ErrorKind::Version), 1);
        assert_eq!(n(ErrorKind::BadPhase), 1);
        // The bucket is full again at 2 s (0.1 s refills 10 tokens): 100 of the 150 pass.
        assert_eq!(n(ErrorKind::Malformed), 1 + 100);
        assert_eq!(n(ErrorKind::Flood), 50);
        assert_eq!(s.messages.get("gpu"), Some(&6));
    }

    #[test]
    fn phase_marks_are_bounded_per_vm_and_overall() {
        let (a, _, epoch) = judge();
        let (tx, rx) = std::sync::mpsc::channel();
        let mark = line(r#"{"v":1,"type":"phase","line":"train epoch=1"}"#);
        // Six VMs sharing one agent: each may mark 10 a second, all together 50.
        let mut floods = Vec::new();
        for n in 0..6 {
            let mut j = Judge::new(VmContext {
                uuid: format!("vm-{n}"),
                phases: Some(tx.clone()),
                ..a.ctx.clone()
            });
            let shared = Arc::new(Mutex::new(Shared::default()));
            for _ in 0..15 {
                j.line(&mark, epoch, &shared);
            }
            floods.push(
                lock(&shared)
                    .errors
                    .get(&ErrorKind::Flood)
                    .copied()
                    .unwrap_or(0),
            );
        }
        assert_eq!(floods, [5, 5, 5, 5, 5, 15]);
        let sent: Vec<String> = rx.try_iter().map(|r| r.vm).collect();
        assert_eq!(sent.len(), 50);
        assert!(!sent.contains(&"vm-5".to_owned()));
    }

    #[test]
    fn sessions_reset_baselines() {
        let (mut j, shared, epoch) = judge();
        let gpu = |mj: u64| {
            line(&format!(
                r#"{{"v":1,"type":"gpu","gpus":[{{"pci_bus_id":"0000:00:05.0","energy_mj":{mj}}}]}}"#
            ))
        };
        let hello = |s: u32| {
            line(&format!(
                r#"{{"v":1,"type":"hello","agent":"optimus 0.1.0 session={s}"}}"#
            ))
        };
        j.line(&hello(1), epoch, &shared);
        j.line(&gpu(100), epoch, &shared);
        j.line(&gpu(200), epoch + Duration::from_secs(1), &shared);
        j.line(&hello(1), epoch + Duration::from_secs(1), &shared);
        j.line(&gpu(300), epoch + Duration::from_secs(2), &shared);
        j.line(&hello(2), epoch + Duration::from_secs(2), &shared);
        j.line(&gpu(5), epoch + Duration::from_secs(3), &shared);
        j.line(&gpu(10), epoch + Duration::from_secs(4), &shared);
        let mut s = lock(&shared);
        assert_eq!(
            s.claims.take(),
            [("pci-0000:65:00.0".to_owned(), 205_000)].into()
        );
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.agent.as_deref(), Some("optimus 0.1.0 session=2"));
    }
}
