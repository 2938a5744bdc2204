//! The phase line protocol, shared by `optimus measure` (`$OPTIMUS_PHASE`), `optimus phase`
//! (the agent's control socket) and any later guest channel:
//!
//! ```text
//! NAME [key=value ...]     start phase NAME (ends the one in progress)
//! -                        end the phase in progress (time goes to `(none)`)
//! ```
//!
//! Input is untrusted: every part is bounded in size and character set, and a rejected line
//! is quoted back cut to [`QUOTE_BYTES`] with non-printable bytes escaped.

use std::collections::BTreeMap;

/// Longest line accepted, bytes (without the newline).
pub const MAX_LINE_BYTES: usize = 1024;
/// Longest phase name, bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Most labels on one line.
pub const MAX_LABELS: usize = 16;
/// Longest label key, bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Longest label value, bytes.
pub const MAX_VALUE_BYTES: usize = 128;
/// How much of a rejected line a warning quotes, bytes.
pub const QUOTE_BYTES: usize = 80;

/// A phase's labels (`epoch=3`), sorted by key. Shown in JSON and CSV, never turned into
/// Prometheus labels.
pub type Labels = BTreeMap<String, String>;

/// What one line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Start phase `name` with `labels`, ending the phase in progress.
    Start { name: String, labels: Labels },
    /// End the phase in progress.
    End,
}

/// Why a line was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line is {len} bytes, longer than {MAX_LINE_BYTES}")]
    TooLong { len: usize },
    #[error("line is not UTF-8 text")]
    NotUtf8,
    #[error("phase name must be 1 to {MAX_NAME_BYTES} bytes of letters, digits and _ - . : /")]
    BadName,
    #[error("label {token:?} is not key=value (key: letters, digits, _ . -, up to {MAX_KEY_BYTES} bytes; value: up to {MAX_VALUE_BYTES} printable bytes)")]
    BadLabel { token: String },
    #[error("label {key:?} given twice")]
    DuplicateLabel { key: String },
    #[error("more than {MAX_LABELS} labels")]
    TooManyLabels,
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'))
}

fn key_ok(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.len() <= MAX_KEY_BYTES
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn value_ok(value: &str) -> bool {
    value.len() <= MAX_VALUE_BYTES && !value.chars().any(char::is_control)
}

/// Parses one line (without its `\n`; a trailing `\r` and surrounding blanks are ignored).
/// `Ok(None)` for a blank line, which means nothing.
pub fn parse_line(line: &[u8]) -> Result<Option<Mark>, LineError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(LineError::TooLong { len: line.len() });
    }
    let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    let mut tokens = text.split_ascii_whitespace();
    let Some(name) = tokens.next() else {
        return Ok(None);
    };
    if name == "-" {
        return match tokens.next() {
            None => Ok(Some(Mark::End)),
            Some(_) => Err(LineError::BadName),
        };
    }
    if !name_ok(name) {
        return Err(LineError::BadName);
    }
    let mut labels = Labels::new();
    for token in tokens {
        let Some((key, value)) = token
            .split_once('=')
            .filter(|(k, v)| key_ok(k) && value_ok(v))
        else {
            return Err(LineError::BadLabel {
                token: token.chars().take(QUOTE_BYTES).collect(),
            });
        };
        if labels.len() == MAX_LABELS {
            return Err(LineError::TooManyLabels);
        }
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(LineError::DuplicateLabel {
                key: key.to_owned(),
            });
        }
    }
    Ok(Some(Mark::Start {
        name: name.to_owned(),
        labels,
    }))
}

/// Parses the words of a command line (`optimus phase --vm X train epoch=3`) as one line.
pub fn parse_words<S: AsRef<str>>(words: &[S]) -> Result<Option<Mark>, LineError> {
    let line: Vec<&str> = words.iter().map(AsRef::as_ref).collect();
    let line = line.join(" ");
    parse_line(line.as_bytes())
}

/// A line as the protocol writes it (the inverse of [`parse_line`]).
pub fn format_mark(mark: &Mark) -> String {
    match mark {
        Mark::End => "-".to_owned(),
        Mark::Start { name, labels } => {
            let mut out = name.clone();
            for (k, v) in labels {
                out.push(' ');
                out.push_str(k);
                out.push('=');
                out.push_str(v);
            }
            out
        }
    }
}

/// The first [`QUOTE_BYTES`] bytes of `line`, quoted, non-printable bytes escaped, `...`
/// when cut: safe to print in a log line or a terminal.
pub fn quote(line: &[u8]) -> String {
    let cut = &line[..line.len().min(QUOTE_BYTES)];
    let mut out = String::from("\"");
    out.push_str(&cut.escape_ascii().to_string());
    out.push('"');
    if line.len() > QUOTE_BYTES {
        out.push_str("...");
    }
    out
}

/// Cuts a byte stream into lines with bounded memory: a line longer than
/// [`MAX_LINE_BYTES`] is not kept whole, only its first [`QUOTE_BYTES`] bytes (for the
/// warning) and its length.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
    /// Length of the over-long line being skipped, if one is.
    skipping: Option<usize>,
    /// Longest line kept whole; `None`: [`MAX_LINE_BYTES`].
    limit: Option<usize>,
}

/// One line out of a [`LineSplitter`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// A whole line, without its newline.
    Line(Vec<u8>),
    /// A line over [`MAX_LINE_BYTES`]: its start, and its length.
    TooLong { start: Vec<u8>, len: usize },
}

impl Piece {
    /// What the line means, or why it is rejected (with the quote to show).
    pub fn parse(&self) -> Result<Option<Mark>, (String, LineError)> {
        match self {
            Piece::Line(l) => parse_line(l).map_err(|e| (quote(l), e)),
            Piece::TooLong { start, len } => {
                let mut q = quote(start);
                if !q.ends_with("...") {
                    q.push_str("...");
                }
                Err((q, LineError::TooLong { len: *len }))
            }
        }
    }
}

impl LineSplitter {
    /// A splitter that keeps lines of up to `limit` bytes whole (the guest channel's 64 KiB).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit: Some(limit),
            ..Self::default()
        }
    }

    /// Feeds `bytes`; pushes each line completed by them onto `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Piece>) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let (chunk, done) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], Some(i + 1)),
                None => (rest, None),
            };
            match &mut self.skipping {
                Some(len) => *len += chunk.len(),
                None => {
                    self.pending.extend_from_slice(chunk);
                    if self.pending.len() > self.limit.unwrap_or(MAX_LINE_BYTES) {
                        self.skipping = Some(self.pending.len());
                        self.pending.truncate(QUOTE_BYTES + 1);
                    }
                }
            }
            let Some(next) = done else {
                return;
            };
            let line = std::mem::take(&mut self.pending);
            out.push(match self.skipping.take() {
                Some(len) => Piece::TooLong { start: line, len },
                None => Piece::Line(line),
            });
            rest = &rest[next..];
        }
    }

    /// The unterminated last line, if any (at end of input).
    pub fn finish(&mut self) -> Option<Piece> {
        let line = std::mem::take(&mut self.pending);
        match self.skipping.take() {
            Some(len) => Some(Piece::TooLong { start: line, len }),
            None => (!line.is_empty()).then_some(Piece::Line(line)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn start(name: &str, labels: &[(&str, &str)]) -> Mark {
        Mark::Start {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn names_labels_and_end() {
        assert_eq!(parse_line(b"train").unwrap(), Some(start("train", &[])));
        assert_eq!(
            parse_line(b"train epoch=3 lr=0.1\r").unwrap(),
            Some(start("train", &[("epoch", "3"), ("lr", "0.1")]))
        );
        assert_eq!(
            parse_line(b"  eval  split=val ").unwrap(),
            Some(start("eval", &[("split", "val")]))
        );
        assert_eq!(parse_line(b"-").unwrap(), Some(Mark::End));
        assert_eq!(parse_line(b" - ").unwrap(), Some(Mark::End));
        assert_eq!(parse_line(b"").unwrap(), None);
        assert_eq!(parse_line(b"   \r").unwrap(), None);
        assert_eq!(
            parse_line(b"data/load:v2").unwrap(),
            Some(start("data/load:v2", &[]))
        );
        // Values may be any printable text, including '=' and non-ASCII.
        assert_eq!(
            parse_line("p note=a=b city=Zürich".as_bytes()).unwrap(),
            Some(start("p", &[("note", "a=b"), ("city", "Zürich")]))
        );
        assert_eq!(parse_line(b"p k=").unwrap(), Some(start("p", &[("k", "")])));
    }

    #[test]
    fn bad_lines() {
        assert_eq!(
            parse_line(&[b'a'; 10_240]),
            Err(LineError::TooLong { len: 10_240 })
        );
        assert_eq!(parse_line(&[0xff, 0xfe, 0x00]), Err(LineError::NotUtf8));
        assert_eq!(parse_line(b"(none)"), Err(LineError::BadName));
        assert_eq!(parse_line(b"a\x01b"), Err(LineError::BadName));
        assert_eq!(parse_line(b"- x"), Err(LineError::BadName));
        assert_eq!(parse_line(&[b'n'; 65]), Err(LineError::BadName));
        assert!(parse_line(&[b'n'; 64]).is_ok());
        assert!(matches!(
            parse_line(b"p epoch"),
            Err(LineError::BadLabel { .. })
        ));
        assert!(matches!(
            parse_line(b"p =3"),
            Err(LineError::BadLabel { .. })
        ));
        assert!(matches!(
            parse_line(b"p 1x=3"),
            Err(LineError::BadLabel { .. })
        ));
        assert!(matches!(
            parse_line(b"p k=\x7f"),
            Err(LineError::BadLabel { .. })
        ));
        assert_eq!(
            parse_line(b"p a=1 a=2"),
            Err(LineError::DuplicateLabel { key: "a".into() })
        );
        let many: String = (0..17).map(|i| format!(" k{i}=v")).collect();
        assert_eq!(
            parse_line(format!("p{many}").as_bytes()),
            Err(LineError::TooManyLabels)
        );
    }

    #[test]
    fn words_and_format_round_trip() {
        let m = parse_words(&["train", "epoch=3"]).unwrap().unwrap();
        assert_eq!(m, start("train", &[("epoch", "3")]));
        assert_eq!(format_mark(&m), "train epoch=3");
        assert_eq!(parse_line(format_mark(&m).as_bytes()).unwrap(), Some(m));
        assert_eq!(format_mark(&Mark::End), "-");
        assert_eq!(parse_words(&["-"]).unwrap(), Some(Mark::End));
    }

    #[test]
    fn splitter_bounds_long_lines_and_keeps_partial_ones() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.feed(b"train epoch=1\nev", &mut out);
        s.feed(b"al\n", &mut out);
        assert_eq!(
            out,
            vec![
                Piece::Line(b"train epoch=1".to_vec()),
                Piece::Line(b"eval".to_vec())
            ]
        );
        out.clear();
        let long = vec![b'x'; 10_240];
        for chunk in long.chunks(1000) {
            s.feed(chunk, &mut out);
        }
        assert!(out.is_empty());
        assert!(s.pending.len() <= QUOTE_BYTES + 1);
        s.feed(b"\n-\n", &mut out);
        assert_eq!(out.len(), 2);
        let Piece::TooLong { len, .. } = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(*len, 10_240);
        let (q, e) = out[0].parse().unwrap_err();
        assert_eq!(e, LineError::TooLong { len: 10_240 });
        assert_eq!(q.len(), 80 + 2 + 3);
        assert_eq!(out[1].parse(), Ok(Some(Mark::End)));
        s.feed(b"tail", &mut out);
        assert_eq!(s.finish(), Some(Piece::Line(b"tail".to_vec())));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn quotes_are_cut_and_escaped() {
        assert_eq!(quote(b"a\"b\x00"), "\"a\\\"b\\x00\"");
        let long = quote(&[b'x'; 200]);
        assert_eq!(long.len(), 80 + 2 + 3);
        assert!(long.ends_with("\"..."));
    }
}
