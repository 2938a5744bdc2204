//! The terminal view on ratatui's in-memory backend: 80×24, sorting, filtering, keys,
//! monochrome.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use ratatui::Terminal;

use super::*;
use crate::web::tests::{fixture, history};
use crate::web::SnapshotDoc;

fn app(color: bool) -> App {
    let h = history(Instant::now(), 3);
    let mut doc = SnapshotDoc::new(&fixture(103.0), &h, None);
    // A third VM that sorts differently by each key: most CO2 per joule, lowest power.
    let mut gamma = doc.vms[1].clone();
    gamma.name = "gamma".into();
    gamma.uuid = "uuid-gamma".into();
    gamma.power_watts = 0.5;
    gamma.energy_joules = 5000.0;
    gamma.carbon_grams = Some(5.0);
    gamma.phase = Some("train".into());
    doc.vms.push(gamma);
    let mut app = App::new("http://127.0.0.1:9947", color);
    app.update(Ok(doc));
    app
}

fn names(app: &App) -> Vec<&str> {
    app.rows().iter().map(|vm| vm.name.as_str()).collect()
}

fn screen(app: &App) -> (String, ratatui::buffer::Buffer) {
    let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
    term.draw(|f| view::render(f, app)).unwrap();
    let buf = term.backend().buffer().clone();
    let text = (0..24)
        .map(|y| (0..80).map(|x| buf[(x, y)].symbol()).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n");
    (text, buf)
}

fn key(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
}

#[test]
fn keys_sort_by_power_energy_co2_and_name() {
    let mut a = app(true);
    assert_eq!(names(&a), ["alpha", "beta", "gamma"]); // power, largest first
    handle_key(&mut a, key('e'));
    assert_eq!(names(&a), ["gamma", "alpha", "beta"]);
    handle_key(&mut a, key('c'));
    assert_eq!(names(&a), ["gamma", "alpha", "beta"]);
    handle_key(&mut a, key('n'));
    assert_eq!(names(&a), ["alpha", "beta", "gamma"]);
    handle_key(&mut a, key('n'));
    assert_eq!(names(&a), ["gamma", "beta", "alpha"]); // the same key again reverses
    handle_key(&mut a, key('p'));
    assert_eq!(names(&a), ["alpha", "beta", "gamma"]);
}

#[test]
fn slash_filters_and_esc_clears() {
    let mut a = app(true);
    handle_key(&mut a, key('/'));
    for c in "ET".chars() {
        assert_eq!(handle_key(&mut a, key(c)), Action::Continue);
    }
    // Typing `q` in the filter is text, not quit.
    assert_eq!(names(&a), ["beta"]);
    handle_key(&mut a, KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
    assert!(!a.editing);
    assert_eq!(names(&a), ["beta"]);
    let (text, _) = screen(&a);
    assert!(text.contains("filter \"ET\""), "{text}");
    handle_key(&mut a, KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
    assert_eq!(names(&a).len(), 3);
    handle_key(&mut a, key('/'));
    assert_eq!(handle_key(&mut a, key('q')), Action::Continue);
    assert!(names(&a).is_empty());
    handle_key(&mut a, KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
    assert_eq!(handle_key(&mut a, key('q')), Action::Quit);
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(handle_key(&mut a, ctrl_c), Action::Quit);
}

#[test]
fn fits_80x24_with_header_rows_and_footer() {
    let a = app(true);
    let (text, _) = screen(&a);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("optimus top"), "{text}");
    assert!(text.contains("node 25.00 W"), "{text}");
    assert!(
        text.contains("= VMs 11.00 + host 1.00 + idle 13.00 W"),
        "{text}"
    );
    assert!(
        text.contains("package package-0 20.00 W measured"),
        "{text}"
    );
    assert!(text.contains("grid 300 g/kWh (static)"), "{text}");
    let row = lines.iter().find(|l| l.contains("alpha")).unwrap();
    for cell in ["9.00", "927.0 J", "0.077", "100%", "1.0 MB/s"] {
        assert!(row.contains(cell), "alpha row lacks {cell}: {row:?}");
    }
    let gamma = lines.iter().find(|l| l.contains("gamma")).unwrap();
    assert!(gamma.contains("train"), "{gamma:?}");
    assert!(lines[23].contains("[q]uit"), "{text}");
    assert!(lines.iter().all(|l| l.chars().count() == 80));
}

#[test]
fn no_color_means_no_colour() {
    let (_, buf) = screen(&app(false));
    assert!(buf
        .content()
        .iter()
        .all(|c| c.fg == Color::Reset && c.bg == Color::Reset));
    let (_, buf) = screen(&app(true));
    assert!(buf.content().iter().any(|c| c.fg == Color::Green));
}

#[test]
fn unreachable_agent_is_one_line_with_the_fix() {
    // A port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let err = Client::new(&url, None)
        .unwrap()
        .fetch(None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("cannot reach the agent at {url}")),
        "{err}"
    );
    assert!(err.contains("--url") && !err.contains('\n'), "{err}");
}

#[test]
fn formats() {
    assert_eq!(view::energy(12.34), "12.3 J");
    assert_eq!(view::energy(12_345.0), "12.35 kJ");
    assert_eq!(view::energy(7.2e6), "2.000 kWh");
    assert_eq!(view::rate(0.0), "0 B/s");
    assert_eq!(view::rate(1.5e6), "1.5 MB/s");
    assert_eq!(view::grams(0.0123), "0.012");
    assert_eq!(view::grams(12_345.0), "12.3k");
}

#[test]
fn many_zones_wrap_without_hiding_the_rows() {
    let mut a = app(true);
    let doc = a.doc.as_mut().unwrap();
    let zone = doc.node.zones[0].clone();
    doc.node.zones = (0..2)
        .flat_map(|p| {
            ["package", "core", "uncore", "dram"].map(|z| {
                let mut zd = zone.clone();
                zd.zone = z.into();
                zd.device = format!("package-{p}");
                zd
            })
        })
        .collect();
    let (text, _) = screen(&a);
    assert!(text.contains("uncore package-1"), "{text}");
    assert!(text.contains("VM "), "{text}");
    assert!(text.lines().any(|l| l.contains("alpha")), "{text}");
}

#[test]
fn a_failed_poll_keeps_the_rows_and_says_so() {
    let mut a = app(true);
    a.update(Err("cannot reach the agent at x: refused".into()));
    let (text, _) = screen(&a);
    assert!(text.lines().any(|l| l.contains("alpha")), "{text}");
    assert!(
        text.contains("agent unreachable, retrying: cannot reach"),
        "{text}"
    );
}
