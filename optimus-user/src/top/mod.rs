//! `optimus top`: a live terminal view of a running agent. Its `GET /api/v1/snapshot`
//! flows in (polled on a thread of its own, so keys never wait on the network); a ratatui
//! screen flows out, with one row per VM that keys sort and `/` filters.

pub mod client;
pub mod view;

use std::sync::mpsc;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

pub use client::Client;
pub use view::{App, SortKey};

/// Why `optimus top` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("cannot use the terminal: {0}")]
    Terminal(#[source] std::io::Error),
}

/// What a key asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Quit,
}

/// How long one wait for a key lasts: the longest `q` can take to be seen.
const KEY_POLL: Duration = Duration::from_millis(100);

/// Whether colours are allowed: not when `NO_COLOR` is set to anything but "" (no-color.org).
pub fn color_allowed() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Runs the view until `q`. The first read happens before the terminal is touched, so an
/// unreachable agent is one line on stderr, not a flash of a blank screen.
pub fn run(
    url: &str,
    ca_file: Option<&std::path::Path>,
    refresh: Duration,
) -> Result<(), TopError> {
    let client = Client::new(url, ca_file)?;
    let first = client.fetch(None)?;
    let mut app = App::new(client.shown(), color_allowed());
    app.update(Ok(first));

    let (tx, rx) = mpsc::channel();
    let poller = client.clone();
    let mut since = app.doc.as_ref().and_then(|d| d.time);
    std::thread::Builder::new()
        .name("optimus-top-poll".into())
        .spawn(move || loop {
            std::thread::sleep(refresh);
            let result = poller.fetch(since);
            if let Ok(doc) = &result {
                since = doc.time.or(since);
            }
            if tx.send(result.map_err(|e| e.to_string())).is_err() {
                break;
            }
        })
        .map_err(TopError::Terminal)?;

    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let result = (|| -> std::io::Result<()> {
        loop {
            while let Ok(update) = rx.try_recv() {
                app.update(update);
            }
            terminal.draw(|frame| view::render(frame, &app))?;
            if event::poll(KEY_POLL)? {
                if let Event::Key(key) = event::read()? {
                    if handle_key(&mut app, key) == Action::Quit {
                        return Ok(());
                    }
                }
            }
        }
    })();
    let restored = ratatui::try_restore();
    result.and(restored).map_err(TopError::Terminal)
}

/// Applies one key press: `p`/`e`/`c`/`n` sort (the same key again reverses), `/` starts a
/// filter (Enter keeps it, Esc clears it), `q`, Esc or Ctrl-C quit.
pub fn handle_key(app: &mut App, key: KeyEvent) -> Action {
    if key.kind == KeyEventKind::Release {
        return Action::Continue;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        return Action::Quit;
    }
    if app.editing {
        match key.code {
            KeyCode::Enter => app.editing = false,
            KeyCode::Esc => {
                app.editing = false;
                app.filter.clear();
            }
            KeyCode::Backspace => {
                app.filter.pop();
            }
            // Bounded: a filter longer than any VM name matches nothing anyway.
            KeyCode::Char(c) if !c.is_control() && app.filter.chars().count() < 64 => {
                app.filter.push(c);
            }
            _ => {}
        }
        return Action::Continue;
    }
    match key.code {
        KeyCode::Char('q' | 'Q') => return Action::Quit,
        KeyCode::Esc if app.filter.is_empty() => return Action::Quit,
        KeyCode::Esc => app.filter.clear(),
        KeyCode::Char('/') => {
            app.editing = true;
            app.filter.clear();
        }
        KeyCode::Char(c) => {
            if let Some(key) = SortKey::from_char(c) {
                app.sort_by(key);
            }
        }
        _ => {}
    }
    Action::Continue
}

#[cfg(test)]
mod tests;
