//! What `optimus top` shows: the state (latest snapshot, sort, filter) and one pure render
//! function over it, so the screen is tested on ratatui's in-memory backend.

use std::cmp::Ordering;

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use crate::web::doc::VmDoc;
use crate::web::SnapshotDoc;

/// Column the rows are sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Power,
    Energy,
    Co2,
    Name,
}

impl SortKey {
    /// `p`ower, `e`nergy, `c`o2, `n`ame.
    pub fn from_char(c: char) -> Option<Self> {
        match c.to_ascii_lowercase() {
            'p' => Some(Self::Power),
            'e' => Some(Self::Energy),
            'c' => Some(Self::Co2),
            'n' => Some(Self::Name),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Power => "power",
            Self::Energy => "energy",
            Self::Co2 => "CO2",
            Self::Name => "name",
        }
    }
}

/// The view's state.
#[derive(Clone, Debug)]
pub struct App {
    pub url: String,
    /// The last good snapshot.
    pub doc: Option<SnapshotDoc>,
    /// Why the last read failed, while it keeps failing.
    pub error: Option<String>,
    pub sort: SortKey,
    /// Reverse of the key's natural order (largest first for numbers, A→Z for names).
    pub reversed: bool,
    /// Case-insensitive substring of the name or UUID; empty shows all.
    pub filter: String,
    /// Typing a filter after `/`.
    pub editing: bool,
    pub color: bool,
}

impl App {
    pub fn new(url: &str, color: bool) -> Self {
        Self {
            url: url.to_owned(),
            doc: None,
            error: None,
            sort: SortKey::Power,
            reversed: false,
            filter: String::new(),
            editing: false,
            color,
        }
    }

    /// Takes a poll's outcome; a failure keeps the last good snapshot on screen.
    pub fn update(&mut self, result: Result<SnapshotDoc, String>) {
        match result {
            Ok(doc) => {
                self.doc = Some(doc);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// Sorts by `key`; the same key again reverses the order.
    pub fn sort_by(&mut self, key: SortKey) {
        if self.sort == key {
            self.reversed = !self.reversed;
        } else {
            self.sort = key;
            self.reversed = false;
        }
    }

    /// The VMs shown, filtered and in order.
    pub fn rows(&self) -> Vec<&VmDoc> {
        let Some(doc) = &self.doc else {
            return Vec::new();
        };
        let needle = self.filter.to_lowercase();
        let mut rows: Vec<&VmDoc> = doc
            .vms
            .iter()
            .filter(|vm| {
                needle.is_empty()
                    || vm.name.to_lowercase().contains(&needle)
                    || vm.uuid.contains(&needle)
            })
            .collect();
        let by = |a: &&VmDoc, b: &&VmDoc| -> Ordering {
            let natural = match self.sort {
                SortKey::Power => b.power_watts.total_cmp(&a.power_watts),
                SortKey::Energy => b.energy_joules.total_cmp(&a.energy_joules),
                SortKey::Co2 => b
                    .carbon_grams
                    .unwrap_or(0.0)
                    .total_cmp(&a.carbon_grams.unwrap_or(0.0)),
                SortKey::Name => a.name.cmp(&b.name),
            };
            let natural = natural.then_with(|| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
            if self.reversed {
                natural.reverse()
            } else {
                natural
            }
        };
        rows.sort_by(by);
        rows
    }

    fn style(&self, color: Color) -> Style {
        if self.color {
            Style::new().fg(color)
        } else {
            Style::new()
        }
    }
}

/// Watts with two decimals.
pub fn watts(w: f64) -> String {
    format!("{w:.2}")
}

/// Joules as J, kJ or kWh, whichever reads best.
pub fn energy(j: f64) -> String {
    if j < 10_000.0 {
        format!("{j:.1} J")
    } else if j < 3.6e6 {
        format!("{:.2} kJ", j / 1e3)
    } else {
        format!("{:.3} kWh", j / 3.6e6)
    }
}

/// Grams with three significant-ish decimals.
pub fn grams(g: f64) -> String {
    if g < 10.0 {
        format!("{g:.3}")
    } else if g < 10_000.0 {
        format!("{g:.1}")
    } else {
        format!("{:.1}k", g / 1e3)
    }
}

/// Bytes per second, binary-free SI units.
pub fn rate(bps: f64) -> String {
    if bps < 1e3 {
        format!("{bps:.0} B/s")
    } else if bps < 1e6 {
        format!("{:.1} kB/s", bps / 1e3)
    } else if bps < 1e9 {
        format!("{:.1} MB/s", bps / 1e6)
    } else {
        format!("{:.1} GB/s", bps / 1e9)
    }
}

/// Sum of a VM's vCPU busy fractions as a percentage of one host CPU (like `top`).
pub fn vcpu_busy(vm: &VmDoc) -> Option<f64> {
    let busy: Vec<f64> = vm.vcpus.iter().filter_map(|v| v.busy).collect();
    (!busy.is_empty()).then(|| busy.iter().sum::<f64>() * 100.0)
}

fn io_rate(vm: &VmDoc) -> Option<f64> {
    Some(vm.block_io.read_bytes_per_second? + vm.block_io.write_bytes_per_second?)
}

fn header(app: &App) -> Vec<Line<'static>> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines = Vec::new();
    let title = match &app.doc {
        Some(d) => format!(
            " optimus top  {}  {} VM(s)  sample {}",
            app.url,
            d.vms.len(),
            d.agent.samples
        ),
        None => format!(" optimus top  {}", app.url),
    };
    lines.push(Line::from(Span::styled(
        title,
        Style::new().add_modifier(Modifier::REVERSED),
    )));
    let Some(doc) = &app.doc else {
        return lines;
    };
    let mut node = vec![Span::styled("node ", bold)];
    match doc.node.power_watts {
        Some(w) => node.push(Span::raw(format!("{} W", watts(w)))),
        None => node.push(Span::raw("no meter")),
    }
    if let Some(s) = doc.node.split_watts {
        node.push(Span::raw(format!(
            "  = VMs {} + host {} + idle {} W",
            watts(s.vms),
            watts(s.host),
            watts(s.idle)
        )));
    }
    lines.push(Line::from(node));
    let mut zones = vec![Span::styled("zones ", bold)];
    for (i, z) in doc.node.zones.iter().enumerate() {
        if i > 0 {
            zones.push(Span::raw("  "));
        }
        let value = z
            .watts
            .map_or_else(|| "unavailable".to_owned(), |w| format!("{} W", watts(w)));
        zones.push(Span::raw(format!("{} {} {value} ", z.zone, z.device)));
        let (kind, color) = if z.measured {
            ("measured", Color::Green)
        } else {
            ("estimated", Color::Yellow)
        };
        zones.push(Span::styled(kind.to_owned(), app.style(color)));
    }
    if doc.node.zones.is_empty() {
        zones.push(Span::raw("none"));
    }
    lines.push(Line::from(zones));
    let grid = match &doc.carbon {
        Some(c) => match c.intensity_g_per_kwh {
            Some(g) => {
                let age = c
                    .age_seconds
                    .map(|a| format!(", {a:.0} s old"))
                    .unwrap_or_default();
                let source = c.source.as_deref().unwrap_or("?");
                let zone = c
                    .zone
                    .as_deref()
                    .filter(|z| *z != source)
                    .map(|z| format!(" {z}"))
                    .unwrap_or_default();
                format!("{g:.0} g/kWh ({source}{zone}{age})")
            }
            None => "no value yet".to_owned(),
        },
        None => "not configured (no CO2)".to_owned(),
    };
    lines.push(Line::from(vec![
        Span::styled("grid ", bold),
        Span::raw(grid),
    ]));
    lines
}

fn footer(app: &App) -> Line<'static> {
    if app.editing {
        return Line::from(format!(" filter: {}_   Enter keep  Esc clear", app.filter));
    }
    let order = if app.reversed { " reversed" } else { "" };
    let filter = if app.filter.is_empty() {
        String::new()
    } else {
        format!("  filter \"{}\"", app.filter)
    };
    let text = match &app.error {
        Some(e) => format!(" agent unreachable, retrying: {e}"),
        None => format!(
            " sort {}{order}{filter}  [p]ower [e]nergy [c]o2 [n]ame  [/]filter  [q]uit",
            app.sort.label()
        ),
    };
    let style = if app.error.is_some() {
        app.style(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::new().add_modifier(Modifier::REVERSED)
    };
    Line::from(Span::styled(text, style))
}

/// Draws the whole screen; fits 80×24 (names are cut to the column's width).
pub fn render(frame: &mut Frame<'_>, app: &App) {
    let head = header(app);
    // Wrapped height of the header (many zones take several lines), plus a blank line;
    // at most half the screen, so rows always show.
    let width = usize::from(frame.area().width.max(1));
    let lines: usize = head
        .iter()
        .map(|l| l.width().div_ceil(width).max(1) + usize::from(l.width() > width))
        .sum();
    let head_height = u16::try_from(lines + 1)
        .unwrap_or(u16::MAX)
        .min(frame.area().height / 2);
    let [top, table, bottom] = Layout::vertical([
        Constraint::Length(head_height),
        Constraint::Min(2),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(head).wrap(Wrap { trim: true }), top);

    let mark = |key: SortKey, title: &'static str| -> Cell<'static> {
        if app.sort == key {
            // Numbers naturally sort largest first (▼), names A to Z (▲).
            let down = (key != SortKey::Name) != app.reversed;
            Cell::from(format!("{title}{}", if down { "▼" } else { "▲" }))
        } else {
            Cell::from(title)
        }
    };
    let titles = Row::new(vec![
        mark(SortKey::Name, "VM"),
        mark(SortKey::Power, "WATTS"),
        mark(SortKey::Energy, "ENERGY"),
        mark(SortKey::Co2, "CO2 g"),
        Cell::from("vCPU"),
        Cell::from("I/O"),
        Cell::from("PHASE"),
    ])
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let dash = || "-".to_owned();
    let rows: Vec<Row<'static>> = app
        .rows()
        .into_iter()
        .map(|vm| {
            Row::new(vec![
                Cell::from(vm.name.clone()),
                Cell::from(watts(vm.power_watts)),
                Cell::from(energy(vm.energy_joules)),
                Cell::from(vm.carbon_grams.map_or_else(dash, grams)),
                Cell::from(vcpu_busy(vm).map_or_else(dash, |p| format!("{p:.0}%"))),
                Cell::from(io_rate(vm).map_or_else(dash, rate)),
                Cell::from(vm.phase.clone().unwrap_or_else(dash)),
            ])
        })
        .collect();
    let empty = rows.is_empty();
    let widths = [
        Constraint::Min(12),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Length(10),
        Constraint::Length(10),
    ];
    let table_widget = Table::new(rows, widths).header(titles).column_spacing(1);
    frame.render_widget(table_widget, table);
    if empty {
        let why = if app.filter.is_empty() {
            "no VMs on this host"
        } else {
            "no VM matches the filter"
        };
        let [_, line] =
            Layout::vertical([Constraint::Length(1), Constraint::Length(1)]).areas(table);
        frame.render_widget(Paragraph::new(format!(" ({why})")), line);
    }
    frame.render_widget(Paragraph::new(footer(app)), bottom);
}
