//! vCPU thread ids from a QEMU's QMP monitor, for a QEMU started without `debug-threads=on`
//! (all its threads are then named after the binary).
//!
//! In: the QMP socket on the command line (`-qmp unix:PATH,...`, or `-chardev
//! socket,id=ID,path=PATH,...` with `-mon chardev=ID,mode=control`). Out: `query-cpus-fast`'s
//! vCPU index → thread id. Only asked for processes that passed the trust rules, with a
//! short timeout and bounded reads; a monitor that another client holds (QMP serves one at a
//! time) simply times out, and the answer is cached per process.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one QMP exchange may take: the sampler waits for it.
pub const QMP_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest line read from the monitor (a `query-cpus-fast` answer is ~200 bytes per vCPU).
const MAX_LINE: u64 = 1 << 20;

/// The QMP control socket a command line names, if any.
pub fn socket_of(argv: &[&[u8]]) -> Option<PathBuf> {
    let text: Vec<String> = argv
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let opt = |i: usize| text.get(i).map(String::as_str);
    let mut chardevs: Vec<(String, String)> = Vec::new();
    let mut monitors: Vec<String> = Vec::new();
    for (i, arg) in text.iter().enumerate() {
        let name = arg.trim_start_matches('-');
        if !arg.starts_with('-') {
            continue;
        }
        match name {
            "qmp" | "qmp-pretty" => {
                let value = opt(i + 1)?;
                if let Some(rest) = value.strip_prefix("unix:") {
                    let path = rest.split(',').next().unwrap_or_default();
                    if !path.is_empty() {
                        return Some(PathBuf::from(path));
                    }
                }
            }
            "chardev" => {
                let Some(value) = opt(i + 1) else { continue };
                let mut parts = value.split(',');
                if parts.next() != Some("socket") {
                    continue;
                }
                let keys: Vec<(&str, &str)> = parts.filter_map(|kv| kv.split_once('=')).collect();
                let get = |k: &str| keys.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
                if let (Some(id), Some(path)) = (get("id"), get("path")) {
                    chardevs.push((id.to_owned(), path.to_owned()));
                }
            }
            "mon" => {
                let Some(value) = opt(i + 1) else { continue };
                let keys: Vec<(&str, &str)> = value
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .collect();
                let get = |k: &str| keys.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
                if get("mode") == Some("control") {
                    if let Some(id) = get("chardev") {
                        monitors.push(id.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    monitors.iter().find_map(|id| {
        chardevs
            .iter()
            .find(|(c, _)| c == id)
            .map(|(_, p)| PathBuf::from(p))
    })
}

/// Why a QMP query gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qmp {}: unexpected answer {answer:?}", path.display())]
    Answer { path: PathBuf, answer: String },
}

/// vCPU index → thread id from `query-cpus-fast` on the monitor at `path`.
pub fn vcpu_threads(path: &Path) -> Result<Vec<(u32, u32)>, QmpError> {
    let io = |op| {
        move |source| QmpError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let stream = UnixStream::connect(path).map_err(io("connect"))?;
    stream
        .set_read_timeout(Some(QMP_TIMEOUT))
        .map_err(io("set timeout"))?;
    stream
        .set_write_timeout(Some(QMP_TIMEOUT))
        .map_err(io("set timeout"))?;
    let mut writer = stream.try_clone().map_err(io("clone"))?;
    let mut reader = BufReader::new(stream);
    // The greeting, then one command at a time, skipping asynchronous events.
    let greeting = read_message(&mut reader).map_err(io("read greeting"))?;
    if greeting.get("QMP").is_none() {
        return Err(answer(path, &greeting));
    }
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(io("write"))?;
    reply(&mut reader, path)?;
    writer
        .write_all(b"{\"execute\":\"query-cpus-fast\"}\n")
        .map_err(io("write"))?;
    let cpus = reply(&mut reader, path)?;
    let list = cpus.as_array().ok_or_else(|| answer(path, &cpus))?;
    let mut out = Vec::with_capacity(list.len());
    for cpu in list {
        let index = cpu.get("cpu-index").and_then(serde_json::Value::as_u64);
        let tid = cpu.get("thread-id").and_then(serde_json::Value::as_u64);
        match (index, tid) {
            (Some(i), Some(t)) => out.push((
                u32::try_from(i).map_err(|_| answer(path, cpu))?,
                u32::try_from(t).map_err(|_| answer(path, cpu))?,
            )),
            _ => return Err(answer(path, cpu)),
        }
    }
    Ok(out)
}

fn answer(path: &Path, value: &serde_json::Value) -> QmpError {
    let mut text = value.to_string();
    text.truncate(200);
    QmpError::Answer {
        path: path.to_path_buf(),
        answer: text,
    }
}

/// The `return` of the next reply (events skipped); an `error` reply is an error.
fn reply(reader: &mut BufReader<UnixStream>, path: &Path) -> Result<serde_json::Value, QmpError> {
    for _ in 0..64 {
        let msg = read_message(reader).map_err(|source| QmpError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        })?;
        if msg.get("event").is_some() {
            continue;
        }
        return msg.get("return").cloned().ok_or_else(|| answer(path, &msg));
    }
    Err(QmpError::Answer {
        path: path.to_path_buf(),
        answer: "only events".to_owned(),
    })
}

/// One JSON message: one line of at most [`MAX_LINE`] bytes.
fn read_message(reader: &mut BufReader<UnixStream>) -> std::io::Result<serde_json::Value> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    serde_json::from_slice(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn finds_the_qmp_socket_on_a_command_line() {
        let q = b"qemu-system-x86_64".as_slice();
        assert_eq!(
            socket_of(&[q, b"-qmp", b"unix:/run/vm.qmp,server=on,wait=off"]),
            Some(PathBuf::from("/run/vm.qmp"))
        );
        assert_eq!(
            socket_of(&[
                q,
                b"-chardev",
                b"socket,id=mon0,path=/tmp/m.sock,server=on,wait=off",
                b"-mon",
                b"chardev=mon0,mode=control"
            ]),
            Some(PathBuf::from("/tmp/m.sock"))
        );
        // A human monitor (mode=readline) is not QMP; tcp is not looked at.
        assert_eq!(
            socket_of(&[
                q,
                b"-chardev",
                b"socket,id=h,path=/tmp/h.sock,server=on",
                b"-mon",
                b"chardev=h,mode=readline",
                b"-qmp",
                b"tcp:127.0.0.1:4444,server=on"
            ]),
            None
        );
        assert_eq!(socket_of(&[q, b"-qmp"]), None);
    }

    /// A scripted QMP server: greeting, capabilities, an event, then the CPUs.
    #[test]
    fn reads_vcpu_threads_skipping_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            s.write_all(b"{\"return\": {}}\r\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("query-cpus-fast"), "{line}");
            s.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\r\n")
                .unwrap();
            s.write_all(
                b"{\"return\": [{\"cpu-index\": 0, \"thread-id\": 4242, \"target\": \"x86_64\"}, {\"cpu-index\": 1, \"thread-id\": 4243}]}\r\n",
            )
            .unwrap();
        });
        assert_eq!(vcpu_threads(&path).unwrap(), vec![(0, 4242), (1, 4243)]);
        server.join().unwrap();
    }

    #[test]
    fn a_silent_monitor_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let started = std::time::Instant::now();
        assert!(vcpu_threads(&path).is_err());
        assert!(started.elapsed() < QMP_TIMEOUT * 3);
        assert!(vcpu_threads(&dir.path().join("none.sock")).is_err());
    }
}
