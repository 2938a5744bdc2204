//! The phase ledger: cumulative counters in (read at boundaries and ticks), per-phase usage
//! out. Pure arithmetic: no I/O, no clock (times are CLOCK_MONOTONIC nanoseconds given by
//! the caller).
//!
//! Every delta between two observations goes to exactly one phase, the one in progress, and
//! consecutive occurrences share their boundary instant, so the phases sum exactly (integer
//! nanoseconds, bytes and microjoules) to the total. History is bounded; totals per name
//! are kept for every name, at most [`MAX_NAMES`] of them, the rest counted as [`OTHER`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::line::{Labels, Mark};
use crate::energy::Zone;

/// The phase of time outside any phase.
pub const NONE: &str = "(none)";
/// Where phases past the [`MAX_NAMES`]th distinct name are counted.
pub const OTHER: &str = "other";
/// Most distinct phase names one ledger keeps apart (besides [`NONE`] and [`OTHER`]).
pub const MAX_NAMES: usize = 64;

/// An energy series a phase is charged in: zone and meter (`source` label value).
pub type EnergyKey = (Zone, &'static str);

/// Resources used, as cumulative counters (what the caller observes) or as the part of
/// them that fell in one phase.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// On-CPU nanoseconds.
    pub cpu_ns: u64,
    /// Bytes read from and written to block devices.
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Attributed energy, microjoules, per zone and meter. A zone no meter covers is absent.
    pub energy_uj: BTreeMap<EnergyKey, u64>,
    /// Grams CO2eq, in nanograms.
    pub carbon_ng: u64,
}

impl Usage {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Usage) {
        self.cpu_ns += other.cpu_ns;
        self.read_bytes += other.read_bytes;
        self.write_bytes += other.write_bytes;
        self.carbon_ng += other.carbon_ng;
        for (k, v) in &other.energy_uj {
            *self.energy_uj.entry(*k).or_default() += v;
        }
    }

    /// `self - prev`, per counter; a counter lower than before counts 0 (counters are
    /// monotonic; a lower read is the caller's clock skew, absorbed by [`Usage::raise`]).
    pub fn since(&self, prev: &Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_sub(prev.cpu_ns),
            read_bytes: self.read_bytes.saturating_sub(prev.read_bytes),
            write_bytes: self.write_bytes.saturating_sub(prev.write_bytes),
            carbon_ng: self.carbon_ng.saturating_sub(prev.carbon_ng),
            energy_uj: self
                .energy_uj
                .iter()
                .map(|(k, v)| {
                    (
                        *k,
                        v.saturating_sub(prev.energy_uj.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        }
    }

    /// Raises each counter of `self` to at least `other`'s.
    fn raise(&mut self, other: &Usage) {
        self.cpu_ns = self.cpu_ns.max(other.cpu_ns);
        self.read_bytes = self.read_bytes.max(other.read_bytes);
        self.write_bytes = self.write_bytes.max(other.write_bytes);
        self.carbon_ng = self.carbon_ng.max(other.carbon_ng);
        for (k, v) in &other.energy_uj {
            let e = self.energy_uj.entry(*k).or_default();
            *e = (*e).max(*v);
        }
    }

    /// Joules per zone, summed over meters.
    pub fn zone_joules(&self) -> BTreeMap<Zone, f64> {
        let mut out = BTreeMap::new();
        for ((zone, _), uj) in &self.energy_uj {
            *out.entry(*zone).or_default() += uj_to_j(*uj);
        }
        out
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "microjoules to joules for display; exact below 2^53 µJ (285 years at 1 kW)"
)]
pub(crate) fn uj_to_j(uj: u64) -> f64 {
    uj as f64 / 1e6
}

#[expect(
    clippy::cast_precision_loss,
    reason = "nanoseconds to seconds for display; exact below 104 days"
)]
pub(crate) fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One run of one phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occurrence {
    /// Phase name ([`NONE`] outside any phase, [`OTHER`] past the name limit).
    pub name: String,
    pub labels: Labels,
    /// When it started and (for the phase in progress: so far) ended, CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    pub end_ns: u64,
    /// What it used.
    pub usage: Usage,
}

impl Occurrence {
    /// Length, nanoseconds.
    pub fn wall_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    fn new(name: String, labels: Labels, at_ns: u64) -> Self {
        Self {
            name,
            labels,
            start_ns: at_ns,
            end_ns: at_ns,
            usage: Usage::default(),
        }
    }
}

/// All occurrences of one phase name together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseTotals {
    /// How many times the phase started.
    pub occurrences: u64,
    pub wall_ns: u64,
    pub usage: Usage,
}

impl PhaseTotals {
    fn add(&mut self, o: &Occurrence) {
        self.occurrences += 1;
        self.wall_ns += o.wall_ns();
        self.usage.add(&o.usage);
    }
}

/// What [`PhaseLedger::switch`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switched {
    /// The phase in progress changed as asked.
    Done,
    /// The name was new past [`MAX_NAMES`]: counted as [`OTHER`]. Returned once per ledger,
    /// for the caller to log once.
    Overflow,
    /// `-` outside any phase: nothing to end.
    Nothing,
}

/// Phases of one workload (a command, a VM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseLedger {
    origin_ns: u64,
    /// Highest cumulative counters observed.
    last: Usage,
    current: Occurrence,
    /// Closed occurrences, oldest first, at most `cap`; shared with snapshots (cloned on
    /// write only when a snapshot still holds it).
    history: Arc<VecDeque<Occurrence>>,
    cap: usize,
    dropped: u64,
    closed: BTreeMap<String, PhaseTotals>,
    names: BTreeSet<String>,
    overflowed: bool,
}

impl PhaseLedger {
    /// A ledger starting at `at_ns` in [`NONE`], with `start` as the counters' values then
    /// (their growth from there on is what gets charged), keeping the last `cap` closed
    /// occurrences.
    pub fn new(at_ns: u64, start: Usage, cap: usize) -> Self {
        Self {
            origin_ns: at_ns,
            last: start,
            current: Occurrence::new(NONE.to_owned(), Labels::new(), at_ns),
            history: Arc::new(VecDeque::new()),
            cap,
            dropped: 0,
            closed: BTreeMap::new(),
            names: BTreeSet::new(),
            overflowed: false,
        }
    }

    /// Folds counters read at `at_ns` into the phase in progress.
    pub fn observe(&mut self, at_ns: u64, cumulative: &Usage) {
        let delta = cumulative.since(&self.last);
        self.current.usage.add(&delta);
        self.last.raise(cumulative);
        self.current.end_ns = self.current.end_ns.max(at_ns);
    }

    /// Ends the phase in progress at `at_ns` and starts what `mark` says. Observe the
    /// counters at `at_ns` first, so the ending phase gets its usage up to the boundary.
    pub fn switch(&mut self, at_ns: u64, mark: Mark) -> Switched {
        let (name, labels) = match mark {
            Mark::End if self.current.name == NONE => return Switched::Nothing,
            Mark::End => (NONE.to_owned(), Labels::new()),
            Mark::Start { name, labels } => (name, labels),
        };
        let mut outcome = Switched::Done;
        let name = if name == NONE || self.names.contains(&name) {
            name
        } else if self.names.len() < MAX_NAMES {
            self.names.insert(name.clone());
            name
        } else {
            if !self.overflowed {
                self.overflowed = true;
                outcome = Switched::Overflow;
            }
            OTHER.to_owned()
        };
        let at_ns = at_ns.max(self.current.end_ns);
        self.current.end_ns = at_ns;
        let next = Occurrence::new(name, labels, at_ns);
        let done = std::mem::replace(&mut self.current, next);
        self.closed.entry(done.name.clone()).or_default().add(&done);
        let history = Arc::make_mut(&mut self.history);
        if self.cap == 0 {
            self.dropped += 1;
        } else {
            if history.len() == self.cap {
                history.pop_front();
                self.dropped += 1;
            }
            history.push_back(done);
        }
        outcome
    }

    /// The phase in progress.
    pub fn current(&self) -> &Occurrence {
        &self.current
    }

    /// When the ledger started, CLOCK_MONOTONIC ns.
    pub fn origin_ns(&self) -> u64 {
        self.origin_ns
    }

    /// Closed occurrences still kept, oldest first (the phase in progress is
    /// [`PhaseLedger::current`]).
    pub fn history(&self) -> &Arc<VecDeque<Occurrence>> {
        &self.history
    }

    /// Closed occurrences no longer kept in the history (their usage stays in the totals).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Per phase name, every occurrence so far, the one in progress included.
    pub fn totals(&self) -> BTreeMap<String, PhaseTotals> {
        let mut out = self.closed.clone();
        out.entry(self.current.name.clone())
            .or_default()
            .add(&self.current);
        out
    }

    /// Everything since the ledger started: the sum of [`PhaseLedger::totals`].
    pub fn total(&self) -> PhaseTotals {
        let mut out = PhaseTotals::default();
        for t in self.totals().values() {
            out.occurrences += t.occurrences;
            out.wall_ns += t.wall_ns;
            out.usage.add(&t.usage);
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn usage(cpu: u64, pkg_uj: u64) -> Usage {
        Usage {
            cpu_ns: cpu,
            read_bytes: cpu / 2,
            write_bytes: cpu / 3,
            energy_uj: BTreeMap::from([((Zone::Package, "rapl-powercap"), pkg_uj)]),
            carbon_ng: pkg_uj / 7,
        }
    }

    fn start(name: &str) -> Mark {
        Mark::Start {
            name: name.into(),
            labels: Labels::new(),
        }
    }

    #[test]
    fn deltas_go_to_the_phase_in_progress_and_sum_to_the_total() {
        let mut l = PhaseLedger::new(1_000, usage(50, 500), 10);
        l.observe(1_500, &usage(70, 700));
        l.switch(1_500, start("load"));
        l.observe(2_000, &usage(100, 900));
        l.observe(3_000, &usage(170, 1_300));
        l.switch(3_000, start("train"));
        l.observe(3_100, &usage(200, 1_400));
        l.switch(3_100, Mark::End);
        l.observe(4_000, &usage(201, 1_450));
        let t = l.totals();
        assert_eq!(t["(none)"].wall_ns, 500 + 900);
        assert_eq!(t["(none)"].usage.cpu_ns, 20 + 1);
        assert_eq!(t["(none)"].occurrences, 2);
        assert_eq!(t["load"].usage.cpu_ns, 100);
        assert_eq!(
            t["load"].usage.energy_uj[&(Zone::Package, "rapl-powercap")],
            600
        );
        assert_eq!(t["train"].wall_ns, 100);
        let total = l.total();
        assert_eq!(total.wall_ns, 3_000);
        assert_eq!(
            total.usage.since(&Usage::default()),
            usage(201, 1_450).since(&usage(50, 500))
        );
        assert_eq!(l.history().len(), 3);
        assert_eq!(l.current().name, NONE);
        assert_eq!(l.current().wall_ns(), 900);
    }

    #[test]
    fn a_lower_read_never_takes_back() {
        let mut l = PhaseLedger::new(0, Usage::default(), 4);
        l.observe(10, &usage(100, 10));
        l.observe(20, &usage(90, 5));
        l.observe(30, &usage(120, 30));
        assert_eq!(l.total().usage.cpu_ns, 120);
        assert_eq!(
            l.total().usage.energy_uj[&(Zone::Package, "rapl-powercap")],
            30
        );
    }

    #[test]
    fn history_is_bounded_and_totals_stay_exact() {
        let mut l = PhaseLedger::new(0, Usage::default(), 100);
        for i in 1..=20_000u64 {
            l.observe(i * 10, &usage(i * 3, i));
            l.switch(i * 10, start(if i % 2 == 0 { "a" } else { "b" }));
        }
        assert_eq!(l.history().len(), 100);
        assert_eq!(l.dropped(), 19_900);
        assert_eq!(l.total().usage.cpu_ns, 60_000);
        assert_eq!(l.total().wall_ns, 200_000);
        let t = l.totals();
        assert_eq!(
            t["a"].occurrences + t["b"].occurrences + t["(none)"].occurrences,
            20_001
        );
    }

    #[test]
    fn names_past_the_limit_count_as_other_and_say_so_once() {
        let mut l = PhaseLedger::new(0, Usage::default(), 1_000);
        for i in 0..MAX_NAMES {
            assert_eq!(l.switch(0, start(&format!("p{i}"))), Switched::Done);
        }
        assert_eq!(l.switch(1, start("extra1")), Switched::Overflow);
        assert_eq!(l.current().name, OTHER);
        assert_eq!(l.switch(2, start("extra2")), Switched::Done);
        assert_eq!(l.current().name, OTHER);
        // Known names still work.
        l.switch(3, start("p3"));
        assert_eq!(l.current().name, "p3");
        assert_eq!(l.totals().len(), MAX_NAMES + 2);
    }

    #[test]
    fn end_outside_a_phase_does_nothing() {
        let mut l = PhaseLedger::new(0, Usage::default(), 10);
        assert_eq!(l.switch(5, Mark::End), Switched::Nothing);
        assert!(l.history().is_empty());
        assert_eq!(l.switch(6, start("x")), Switched::Done);
        assert_eq!(l.switch(7, Mark::End), Switched::Done);
        assert_eq!(l.current().name, NONE);
    }

    #[test]
    fn a_boundary_before_the_last_read_is_moved_to_it() {
        let mut l = PhaseLedger::new(100, Usage::default(), 10);
        l.observe(200, &usage(10, 0));
        l.switch(150, start("x"));
        assert_eq!(l.current().start_ns, 200);
        assert_eq!(l.total().wall_ns, 100);
    }

    #[test]
    fn zone_joules_sums_meters() {
        let u = Usage {
            energy_uj: BTreeMap::from([
                ((Zone::Package, "rapl-powercap"), 1_500_000),
                ((Zone::Package, "estimated"), 500_000),
                ((Zone::Dram, "rapl-powercap"), 250_000),
            ]),
            ..Usage::default()
        };
        let z = u.zone_joules();
        assert_eq!(z[&Zone::Package], 2.0);
        assert_eq!(z[&Zone::Dram], 0.25);
    }
}
