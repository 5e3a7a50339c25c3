//! Per-series state between the validated samples and the dataflow.
//!
//! One node's batches always reach the same worker, so the worker that owns a series sees every
//! observation of it and can keep what they reduce to:
//! - an allocation series reduces to [`AllocationObs::merge`] of its observations (earliest
//!   start and finish, latest observation), and when that changes, what the pieces of its
//!   interval per base window that changed held is added to or taken from its usage totals
//!   (see [`held_changes`]), and a GPU's pieces per hour go to the max-GPU sweep;
//! - a counter or gauge series reduces to its readings inside the allowed lateness (plus the
//!   last one before it), from which [`Readings::insert`] derives how each new reading changes
//!   the windows around it.
//!
//! Both reading kinds are sums over consecutive pairs of readings, which is what makes a late
//! reading cheap: it replaces one pair (its predecessor, its successor) with two.
//! - counter: a reading adds its difference from its predecessor (all of it after a reset, or
//!   with no predecessor) to the window of the instant just before it: the use it reports
//!   happened up to it, so a reading on a window boundary closes the window that ends there;
//! - gauge: a reading is held from its timestamp to its successor's. If they are at most
//!   `max_staleness` apart, each window they span gets the level × the overlap (`Total`) and
//!   the overlap as observed time (`Observed`); a longer gap is not observed and adds nothing
//!   to either: no interpolation, no averaging. Every gap up to `max_gap` adds its overlap as
//!   present time (`Present`), so coverage = observed / present; a longer silence is taken as
//!   the series gone and back.
//!
//! The dataflow's state then grows with series and windows, not with samples; a repeated or
//! older observation costs nothing downstream. What an epoch changes is summed per usage total
//! and part before the dataflow sees it ([`Feeder::advance`]): one update per changed total,
//! not one per series and sample. What changed since the last checkpoint is kept
//! as "dirty" so a checkpoint writes only that ([`Feeder::take_dirty`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use differential_dataflow::input::InputSession;
use serde::{Deserialize, Serialize};

use crate::dataflow::{FleetIdx, Time, split_by_window};
use crate::model::Interval;
use crate::model::{
    Aggregate, AllocationKey, AllocationObs, Identity, Kind, ObservationRef, Owner, Part,
    ReadingKey, ReadingObs, SeriesRef, Summary, held_changes,
};
use crate::names::{IdCollision, Item, Names, NodeId, OwnerId, UsageIdx};

/// The hasher of the feeder's maps, which every sample looks up several times: foldhash,
/// seeded at random per map (the keys hold names tenants choose, so a fixed seed could be aimed
/// at), several times faster than `std`'s SipHash on these short keys.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// Length of the node and fleet windows (SPEC: per node and hour).
pub const HOUR_MS: i64 = 3_600_000;

/// How readings become windowed amounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Length of a base window.
    pub window_ms: i64,
    /// The longest gap across which a gauge reading is held (SPEC: `max_staleness`).
    pub max_staleness_ms: i64,
    /// The longest gap a gauge series counts as present (unobserved) rather than gone.
    pub max_gap_ms: i64,
}

impl Rules {
    /// Base windows of `window_ms`, `max_staleness` of 30 s (twice the agent's default
    /// interval), gaps of up to an hour counted as present.
    pub fn new(window_ms: i64) -> Self {
        Self {
            window_ms,
            max_staleness_ms: 30_000,
            max_gap_ms: 3_600_000,
        }
    }

    fn window(&self, t: i64) -> i64 {
        t.div_euclid(self.window_ms) * self.window_ms
    }
}

/// A change of one part of one window: `(window_start_ms, part, change)`.
pub type WindowChange = (i64, Part, i64);

/// Usage between two readings of a counter: the difference, or the whole reading after a reset
/// (a lower reading) or with no earlier reading (a new container counts from zero).
fn delta(previous: Option<i64>, units: i64) -> i64 {
    match previous {
        Some(p) if units >= p => units - p,
        _ => units,
    }
}

/// `n / d` rounded half up, for `n >= 0`.
fn round_div(n: i128, d: i128) -> i64 {
    ((n + d / 2) / d) as i64
}

/// What the pair (`previous`, `reading`) adds to windows, times `sign`, appended to `out`.
fn pair(
    metric: Aggregate,
    rules: &Rules,
    previous: Option<(i64, i64)>,
    (t, units): (i64, i64),
    sign: i64,
    out: &mut Vec<WindowChange>,
) {
    match metric.kind() {
        // The difference covers (previous, t]: it belongs to the window holding t - 1 ms.
        Kind::Counter => out.push((
            rules.window(t - 1),
            Part::Total,
            sign * delta(previous.map(|(_, u)| u), units),
        )),
        Kind::Gauge => {
            let Some((pt, level)) = previous else {
                return;
            };
            let gap = t - pt;
            if gap > rules.max_gap_ms {
                return;
            }
            let observed = gap <= rules.max_staleness_ms;
            let divisor = metric.gauge_divisor() as i128;
            for (w, ms) in split_by_window(pt, t, rules.window_ms) {
                if observed {
                    out.push((
                        w,
                        Part::Total,
                        sign * round_div(level as i128 * ms as i128, divisor),
                    ));
                    out.push((w, Part::Observed, sign * ms));
                }
                out.push((w, Part::Present, sign * ms));
            }
        }
        Kind::Allocation => {}
    }
}

/// The readings of one counter or gauge series that a late reading could still fall between.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readings {
    /// The latest reading folded away by [`Readings::compact`], `(timestamp, units)`.
    pub base: Option<(i64, i64)>,
    /// Readings by timestamp, oldest first. Nearly every reading is the newest of its series
    /// and goes at the end, and compaction takes from the front: a sorted `Vec` does both
    /// without allocating, where a `BTreeMap` split off a new tree at every compaction. Written
    /// in checkpoints as the map it used to be.
    #[serde(with = "as_map")]
    readings: Vec<(i64, i64)>,
}

/// [`Readings::readings`] in a checkpoint: a JSON object from timestamp to units, as a
/// `BTreeMap<i64, i64>` wrote it, so state written before reads the same.
mod as_map {
    use std::collections::BTreeMap;

    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(readings: &[(i64, i64)], s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(readings.len()))?;
        for (t, u) in readings {
            map.serialize_entry(t, u)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(i64, i64)>, D::Error> {
        Ok(BTreeMap::<i64, i64>::deserialize(d)?.into_iter().collect())
    }
}

impl Readings {
    /// The latest reading, folded away or not.
    pub fn latest(&self) -> Option<(i64, i64)> {
        self.newest().or(self.base)
    }

    /// The latest reading not folded away.
    pub fn newest(&self) -> Option<(i64, i64)> {
        self.readings.last().copied()
    }

    /// Where a reading at `timestamp_ms` is or would go.
    fn position(&self, timestamp_ms: i64) -> Result<usize, usize> {
        // Newest first: nearly every reading goes at the end.
        match self.readings.last() {
            Some((t, _)) if *t < timestamp_ms => Err(self.readings.len()),
            _ => self
                .readings
                .binary_search_by_key(&timestamp_ms, |(t, _)| *t),
        }
    }

    fn previous(&self, timestamp_ms: i64) -> Option<(i64, i64)> {
        let at = self.position(timestamp_ms).unwrap_or_else(|i| i);
        match at {
            0 => self.base,
            i => Some(self.readings[i - 1]),
        }
    }

    fn next(&self, timestamp_ms: i64) -> Option<(i64, i64)> {
        let after = match self.position(timestamp_ms) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        self.readings.get(after).copied()
    }

    /// Adds a reading of `metric` and returns how windows change: the pair it closes with its
    /// predecessor is added, and the pair (predecessor, successor) it splits is replaced by
    /// (it, successor). Two readings at one timestamp keep the larger (so the order they arrive
    /// in does not matter); a reading at or before the folded-away base is ignored.
    pub fn insert(
        &mut self,
        timestamp_ms: i64,
        units: i64,
        metric: Aggregate,
        rules: &Rules,
    ) -> Vec<WindowChange> {
        let mut changes = Vec::new();
        self.insert_into(timestamp_ms, units, metric, rules, &mut changes);
        changes
    }

    /// [`Readings::insert`], the changes left in `changes` (cleared first).
    pub fn insert_into(
        &mut self,
        timestamp_ms: i64,
        units: i64,
        metric: Aggregate,
        rules: &Rules,
        changes: &mut Vec<WindowChange>,
    ) {
        changes.clear();
        if self.base.is_some_and(|(t, _)| timestamp_ms <= t) {
            return;
        }
        if let Ok(i) = self.position(timestamp_ms) {
            if units <= self.readings[i].1 {
                return;
            }
            self.remove(timestamp_ms, metric, rules, changes);
        }
        let previous = self.previous(timestamp_ms);
        let reading = (timestamp_ms, units);
        pair(metric, rules, previous, reading, 1, changes);
        if let Some(next) = self.next(timestamp_ms) {
            pair(metric, rules, Some(reading), next, 1, changes);
            pair(metric, rules, previous, next, -1, changes);
        }
        let at = self.position(timestamp_ms).unwrap_or_else(|i| i);
        self.readings.insert(at, reading);
        consolidate(changes);
    }

    /// Removes the reading at `timestamp_ms`, appending the changes to `out`.
    fn remove(
        &mut self,
        timestamp_ms: i64,
        metric: Aggregate,
        rules: &Rules,
        out: &mut Vec<WindowChange>,
    ) {
        let Ok(i) = self.position(timestamp_ms) else {
            return;
        };
        let (_, units) = self.readings.remove(i);
        let previous = self.previous(timestamp_ms);
        let reading = (timestamp_ms, units);
        pair(metric, rules, previous, reading, -1, out);
        if let Some(next) = self.next(timestamp_ms) {
            pair(metric, rules, Some(reading), next, -1, out);
            pair(metric, rules, previous, next, 1, out);
        }
    }

    /// Folds readings before `horizon_ms` into [`Readings::base`]: no accepted reading can
    /// arrive before the horizon, so only the latest of them can still be a predecessor.
    pub fn compact(&mut self, horizon_ms: i64) {
        if self.readings.first().is_none_or(|(t, _)| *t >= horizon_ms) {
            return;
        }
        let folded = self.readings.partition_point(|(t, _)| *t < horizon_ms);
        self.base = Some(self.readings[folded - 1]);
        self.readings.drain(..folded);
    }
}

/// Sums changes of the same window and part, dropping zeros, in a deterministic order.
fn consolidate(changes: &mut Vec<WindowChange>) {
    changes.sort_unstable_by_key(|(w, p, _)| (*w, *p));
    let mut kept: usize = 0;
    for i in 0..changes.len() {
        let (w, p, c) = changes[i];
        match kept.checked_sub(1).map(|last| &mut changes[last]) {
            Some((lw, lp, lc)) if *lw == w && *lp == p => *lc += c,
            _ => {
                changes[kept] = (w, p, c);
                kept += 1;
            }
        }
    }
    changes.truncate(kept);
    changes.retain(|(_, _, c)| *c != 0);
}

/// The series of one lease's service on one node that measure one metric.
pub type LiveGroup = (OwnerId, NodeId, Aggregate);

/// The live value of a group: for each metric its latest level (`gauge`), the change over the
/// last interval (`diff`) and that change per second (`rate_per_s`), summed over the group's
/// series, in the metric's reading units (see [`Aggregate::reading_units`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveValue {
    pub group: LiveGroup,
    /// The newest reading's timestamp.
    pub at_ms: i64,
    pub gauge: i64,
    pub diff: i64,
    pub rate_per_s: i64,
    /// How many series the value sums.
    pub series: usize,
}

/// `n / d` rounded half away from zero, for `d > 0`.
fn round_div_signed(n: i128, d: i128) -> i64 {
    ((n + n.signum() * d / 2) / d) as i64
}

/// The three parts of one window's amount, indexed by [`part_index`].
pub type Parts = [i64; 3];

/// Where a part is kept in [`Parts`].
pub fn part_index(part: Part) -> usize {
    match part {
        Part::Total => 0,
        Part::Observed => 1,
        Part::Present => 2,
    }
}

/// What changed since the last checkpoint, with the input partition each series came from.
#[derive(Debug, Default)]
pub struct Dirty {
    pub allocations: Vec<(i32, AllocationKey, AllocationObs)>,
    pub readings: Vec<(i32, ReadingKey, Readings)>,
    /// `(partition, series, window_start_ms, change)`: to be added to the stored window parts.
    pub windows: Vec<(i32, ReadingKey, i64, Parts)>,
    /// `(partition, node, hour_start_ms, open)`, in order: hours in which a node was first
    /// seen (`true`), and hours that closed (`false`: forgotten, their entries deleted).
    pub node_hours: Vec<(i32, String, i64, bool)>,
}

/// One allocation series' state.
#[derive(Debug)]
struct AllocationState {
    partition: i32,
    series: SeriesRef,
    /// The same series, flagged while its `finished_at` is not seen
    /// ([`Aggregate::GpuSecondsUnfinished`]); GPUs only.
    unfinished: Option<SeriesRef>,
    summary: AllocationObs,
}

/// What the observations change before the dataflow sees them (see [`Feeder::advance`]): an
/// epoch's amounts, summed per usage total and part (one update per changed total, not one per
/// sample and series), and each node's open hours (its activity and GPU pieces), kept across
/// epochs, whose changed values are sent at each advance.
#[derive(Debug, Default)]
struct Pending {
    /// This epoch's amounts, drained at each advance.
    amounts: FastMap<(UsageIdx, Part), i64>,
    /// Each node's open hours: its activity, GPU allocation pieces and the maxima sent.
    nodes: NodeHours,
}

/// One allocation piece inside an hour: `(start_ms, end_ms, GPUs)`.
type Held = (i64, i64, i64);

/// The node aggregates per hour, for the hours still open on their node: whether the node sent
/// a sample, and the GPU allocation pieces from which the most GPUs it held at once is swept.
/// A node's samples all come to one worker (the agents key their batches by node), so one
/// feeder sees all of a node's samples, and its values are whole here: each change goes
/// straight out ([`Feeder::take_fleet`]), not through the dataflow.
///
/// An hour closes once its end is `lateness_ms` behind the newest sample of its node: its
/// pieces and its node-hour leave memory (and the checkpoint) and its values stay as sent. A
/// piece that reaches a closed hour afterwards (an allocation first seen with a start long
/// past) changes no report: it is counted in [`NodeHours::too_late`]; a sample in a closed hour
/// opens it again, and its activity is sent again (the same value). Before, every piece of
/// every hour stayed in the dataflow for the life of the process (the soak's processor memory
/// grew with them), and then every node-hour did.
#[derive(Debug, Default)]
struct NodeHours {
    /// `(start, end, count)` of each piece, a multiset, per node and hour start.
    pieces: FastMap<(NodeId, i64), Vec<Held>>,
    /// Pieces held, summed over the node-hours.
    held: i64,
    /// The maximum last sent, per node-hour held.
    fed: FastMap<(NodeId, i64), i64>,
    dirty: FastSet<(NodeId, i64)>,
    /// The hours still open in which a node sent a sample, with the input partition its
    /// samples come from (where its checkpoint entry is).
    active: FastMap<(NodeId, i64), i32>,
    /// Node-hours opened and closed since the last checkpoint, in order (see
    /// [`Dirty::node_hours`]).
    hours_changed: Vec<(i32, NodeId, i64, bool)>,
    /// The node aggregates changed since [`Feeder::take_fleet`], by their latest value.
    fleet: std::collections::BTreeMap<FleetIdx, i64>,
    /// The newest sample time seen from each node.
    newest: FastMap<NodeId, i64>,
    /// `None`: hours never close.
    lateness_ms: Option<i64>,
    /// Piece changes that reached a closed hour, since [`Feeder::take_late_gpu_pieces`].
    too_late: u64,
}

impl NodeHours {
    fn closed(&self, node: NodeId, hour: i64) -> bool {
        self.lateness_ms.is_some_and(|lateness| {
            self.newest
                .get(&node)
                .is_some_and(|newest| hour + HOUR_MS <= newest.saturating_sub(lateness))
        })
    }

    /// A piece (inside one hour) added (`sign` 1) or taken back (-1).
    fn change(&mut self, node: NodeId, piece: Interval, sign: i64) {
        let hour = piece.start_ms.div_euclid(HOUR_MS) * HOUR_MS;
        if self.closed(node, hour) {
            self.too_late += 1;
            return;
        }
        let held = (piece.start_ms, piece.end_ms, piece.count);
        let pieces = self.pieces.entry((node, hour)).or_default();
        if sign > 0 {
            pieces.push(held);
            self.held += 1;
        } else if let Some(at) = pieces.iter().position(|p| *p == held) {
            pieces.swap_remove(at);
            self.held -= 1;
        }
        self.dirty.insert((node, hour));
    }

    fn seen(&mut self, node: NodeId, at_ms: i64) {
        let newest = self.newest.entry(node).or_insert(at_ms);
        *newest = (*newest).max(at_ms);
    }

    /// Notes that `node`, whose samples come from `partition`, was active in the hour starting
    /// at `hour`; `true` the first time while the hour is open (its activity is then sent).
    fn activate(&mut self, partition: i32, node: NodeId, hour: i64) -> bool {
        if self.active.insert((node, hour), partition).is_some() {
            return false;
        }
        self.fleet.insert(FleetIdx::NodeActive(node, hour), 1);
        true
    }

    /// Sends the changed maxima, then lets the closed hours go.
    fn feed(&mut self) {
        for key in self.dirty.drain() {
            let most = self.pieces.get(&key).map_or(0, |p| most_held(p));
            let fed = self.fed.get(&key).copied().unwrap_or(0);
            if most != fed {
                self.fleet.insert(FleetIdx::NodeMaxGpus(key.0, key.1), most);
            }
            if self.pieces.get(&key).is_some_and(|p| !p.is_empty()) {
                self.fed.insert(key, most);
            } else {
                self.pieces.remove(&key);
                self.fed.remove(&key);
            }
        }
        if self.lateness_ms.is_some() {
            let closed: Vec<(NodeId, i64)> = self
                .pieces
                .keys()
                .filter(|(node, hour)| self.closed(*node, *hour))
                .copied()
                .collect();
            for key in closed {
                if let Some(p) = self.pieces.remove(&key) {
                    self.held -= p.len() as i64;
                }
                self.fed.remove(&key);
            }
            let closed: Vec<((NodeId, i64), i32)> = self
                .active
                .iter()
                .filter(|((node, hour), _)| self.closed(*node, *hour))
                .map(|(key, partition)| (*key, *partition))
                .collect();
            for ((node, hour), partition) in closed {
                self.active.remove(&(node, hour));
                self.hours_changed.push((partition, node, hour, false));
            }
        }
    }
}

/// The most GPUs held at any instant by `pieces`: a sweep over their starts and ends (an end
/// sorts before a start at the same millisecond, so neither a container replaced by another
/// nor one series' consecutive pieces are counted twice).
fn most_held(pieces: &[Held]) -> i64 {
    let mut events: Vec<(i64, i64)> = Vec::with_capacity(2 * pieces.len());
    for (start, end, count) in pieces {
        events.push((*start, *count));
        events.push((*end, -*count));
    }
    events.sort_unstable();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, change) in events {
        now += change;
        most = most.max(now);
    }
    most
}

impl Pending {
    fn add(&mut self, series: &SeriesRef, window_start_ms: i64, part: Part, amount: i64) {
        if amount != 0 {
            *self
                .amounts
                .entry((UsageIdx::of(series, window_start_ms), part))
                .or_insert(0) += amount;
        }
    }

    /// What a piece of an allocation's interval (inside one base window) held: GPU-ms,
    /// millicore-ms, byte-seconds (the piece's byte-ms rounded down to the byte-second), times
    /// `sign` (1 added, -1 taken back).
    fn held(&mut self, series: &SeriesRef, piece: Interval, window_ms: i64, sign: i64) {
        let ms = (piece.end_ms - piece.start_ms) as i128;
        let amount = (ms * piece.count as i128 / series.metric.held_divisor() as i128) as i64;
        let window_start_ms = piece.start_ms.div_euclid(window_ms) * window_ms;
        self.add(series, window_start_ms, Part::Total, sign * amount);
    }
}

/// Where an allocation series' interval went from `old` to `new`: its held amounts per base
/// window into `pending`, and for GPUs its pieces per hour (for the most GPUs a node held at
/// once).
fn held(
    series: &SeriesRef,
    (old, new): (Option<Interval>, Option<Interval>),
    window_ms: i64,
    pending: &mut Pending,
) {
    let (removed, added) = held_changes(old, new, window_ms);
    for piece in removed {
        pending.held(series, piece, window_ms, -1);
    }
    for piece in added {
        pending.held(series, piece, window_ms, 1);
    }
    if series.metric == Aggregate::GpuSeconds {
        let (removed, added) = held_changes(old, new, HOUR_MS);
        for piece in removed {
            pending.nodes.change(series.node, piece, -1);
        }
        for piece in added {
            pending.nodes.change(series.node, piece, 1);
        }
    }
}

/// Folds `obs` into an allocation series' state, changing what its interval (and its
/// unfinished flag) adds where they differ; returns its node.
fn merge_allocation(
    state: &mut AllocationState,
    obs: AllocationObs,
    window_ms: i64,
    pending: &mut Pending,
    dirty: &mut FastSet<u64>,
) -> NodeId {
    let merged = state.summary.merge(obs);
    if merged != state.summary {
        let flag = state
            .unfinished
            .map(|flag| (flag, unfinished(state.summary), unfinished(merged)));
        let interval = (state.series, state.summary.interval(), merged.interval());
        for (series, old, new) in std::iter::once(interval).chain(flag) {
            held(&series, (old, new), window_ms, pending);
        }
        state.summary = merged;
        dirty.insert(state.series.series);
    }
    state.series.node
}

/// The latest instant an allocation series was observed at (or finished at).
fn allocation_seen_ms(obs: AllocationObs) -> i64 {
    obs.observed_at_ms
        .max(obs.finished_at_ms.unwrap_or(i64::MIN))
}

/// The interval of an allocation while its end has not been seen.
fn unfinished(obs: AllocationObs) -> Option<crate::model::Interval> {
    obs.finished_at_ms
        .is_none()
        .then(|| obs.interval())
        .flatten()
}

/// How many new series a tenant may open per hour (of its samples' time) on one worker. A
/// label explosion (a container id or a value in a label, a million series from one tenant)
/// is refused series by series past it, as dead letters `series_limit`, and the state and
/// the other tenants' samples stay as they were. Per hour rather than in all, because
/// containers come and go: a tenant's lifetime count of series only grows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesLimit {
    /// New series per tenant and hour on one worker.
    pub per_tenant_hour: usize,
    /// (tenant, hour start) → series opened.
    opened: HashMap<(String, i64), usize>,
}

/// A sample refused because its tenant opened too many series this hour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tenant {tenant:?} opened {limit} new series in the hour from {hour_start_ms} ms on this worker (--max-new-series-per-tenant-hour); its further new series that hour are refused"
)]
pub struct SeriesLimited {
    pub tenant: String,
    pub hour_start_ms: i64,
    pub limit: usize,
}

/// Why an observation was refused (it changed nothing; the runner dead-letters it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    SeriesLimit(#[from] SeriesLimited),
    #[error(transparent)]
    IdCollision(#[from] IdCollision),
}

impl Refused {
    /// The dead letter's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::SeriesLimit(_) => "series_limit",
            Refused::IdCollision(_) => "id_collision",
        }
    }
}

/// A series a checkpoint holds whose names now collide with others' (possible only if the
/// ids' hash changed since it was written): left out, and said so.
fn restored_collision(collision: &IdCollision) {
    tracing::error!(%collision, "a series in the checkpoint is left out: its name's id is another's");
}

impl SeriesLimit {
    pub fn new(per_tenant_hour: usize) -> Self {
        Self {
            per_tenant_hour,
            opened: HashMap::new(),
        }
    }

    /// Counts a new series of `tenant` at `at_ms` if the hour has room for it.
    fn admit(&mut self, tenant: &str, at_ms: i64) -> Result<(), SeriesLimited> {
        let hour = at_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let key = (tenant.to_string(), hour);
        let opened = self.opened.get(&key).copied().unwrap_or(0);
        if opened >= self.per_tenant_hour {
            return Err(SeriesLimited {
                tenant: tenant.to_string(),
                hour_start_ms: hour,
                limit: self.per_tenant_hour,
            });
        }
        if opened == 0 {
            // Hours two behind this one no longer take samples (the lateness is shorter).
            self.opened.retain(|(_, h), _| *h >= hour - 2 * HOUR_MS);
        }
        self.opened.insert(key, opened + 1);
        Ok(())
    }
}

impl Default for SeriesLimit {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

/// Where the state of a series retired from memory is found again: the checkpoint store
/// ([`crate::checkpoint::Store`]). A series is retired ([`Feeder::retire`]) only right after
/// a checkpoint holds it, so what comes back is what it was.
pub trait Retired {
    type Error;
    /// An allocation series' merged observations.
    fn allocation(
        &self,
        partition: i32,
        key: &AllocationKey,
    ) -> Result<Option<AllocationObs>, Self::Error>;
    /// A counter or gauge series' readings.
    fn readings(&self, partition: i32, key: &ReadingKey) -> Result<Option<Readings>, Self::Error>;
}

/// No store: nothing was retired, nothing comes back.
pub struct NothingRetired;

impl Retired for NothingRetired {
    type Error = std::convert::Infallible;
    fn allocation(&self, _: i32, _: &AllocationKey) -> Result<Option<AllocationObs>, Self::Error> {
        Ok(None)
    }
    fn readings(&self, _: i32, _: &ReadingKey) -> Result<Option<Readings>, Self::Error> {
        Ok(None)
    }
}

/// A checkpoint store in memory, for tests: the series as [`Feeder::take_dirty`] gave them.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct MemoryStore {
    allocations: HashMap<AllocationKey, AllocationObs>,
    readings: HashMap<ReadingKey, Readings>,
}

#[cfg(test)]
impl MemoryStore {
    /// Stores what a checkpoint would.
    pub(crate) fn keep(&mut self, dirty: Dirty) {
        self.allocations
            .extend(dirty.allocations.into_iter().map(|(_, k, o)| (k, o)));
        self.readings
            .extend(dirty.readings.into_iter().map(|(_, k, r)| (k, r)));
    }
}

#[cfg(test)]
impl Retired for MemoryStore {
    type Error = std::convert::Infallible;
    fn allocation(
        &self,
        _: i32,
        key: &AllocationKey,
    ) -> Result<Option<AllocationObs>, Self::Error> {
        Ok(self.allocations.get(key).copied())
    }
    fn readings(&self, _: i32, key: &ReadingKey) -> Result<Option<Readings>, Self::Error> {
        Ok(self.readings.get(key).cloned())
    }
}

/// One counter or gauge series' state.
#[derive(Debug)]
struct ReadingState {
    partition: i32,
    series: SeriesRef,
    readings: Readings,
}

/// Feeds one worker's dataflow input with per-series summaries (see the module's doc).
#[derive(Debug)]
pub struct Feeder {
    rules: Rules,
    names: Arc<Names>,
    /// The next series number; the worker's index is in the high bits, so numbers are unique
    /// across the workers of a process.
    next_series: u64,
    /// Series by identity, and each series' identity by its number: one copy of the
    /// identity, shared.
    allocations: FastMap<Identity, AllocationState>,
    readings: FastMap<Identity, ReadingState>,
    allocation_keys: FastMap<u64, Identity>,
    reading_keys: FastMap<u64, Identity>,
    /// The identity of the key being looked up, written here so that a sample of a known
    /// series allocates nothing to find it.
    scratch: Vec<u8>,
    /// Series by live group (owner, node, metric), and the groups with a new latest reading.
    live_groups: FastMap<LiveGroup, Vec<u64>>,
    live_dirty: FastSet<LiveGroup>,
    dirty_allocations: FastSet<u64>,
    dirty_readings: FastSet<u64>,
    dirty_windows: FastMap<(u64, i64), Parts>,
    limit: SeriesLimit,
    /// Series brought back from the store since [`Feeder::take_revived`].
    revived: u64,
    /// This epoch's amounts, not yet in the dataflow.
    pending: Pending,
    /// How the reading being fed changes its windows.
    changes: Vec<WindowChange>,
}

impl Feeder {
    /// A feeder following `rules`, for worker `worker` of a process whose workers share
    /// `names`.
    pub fn new(rules: Rules, names: Arc<Names>, worker: usize) -> Self {
        Self {
            rules,
            names,
            next_series: (worker as u64) << 40,
            allocations: FastMap::default(),
            readings: FastMap::default(),
            allocation_keys: FastMap::default(),
            reading_keys: FastMap::default(),
            dirty_allocations: FastSet::default(),
            dirty_readings: FastSet::default(),
            dirty_windows: FastMap::default(),
            live_groups: FastMap::default(),
            live_dirty: FastSet::default(),
            limit: SeriesLimit::default(),
            revived: 0,
            scratch: Vec::new(),
            pending: Pending::default(),
            changes: Vec::new(),
        }
    }

    /// The same feeder, letting a node's hour close (its GPU pieces and its activity leave
    /// memory, its values stay as sent) once the hour's end is `lateness_ms` behind the node's
    /// newest sample.
    pub fn closing_node_hours(mut self, lateness_ms: i64) -> Self {
        self.pending.nodes.lateness_ms = Some(lateness_ms);
        self
    }

    /// GPU allocation pieces that reached a node's closed hour since the last call (not in the
    /// node's maximum for it).
    pub fn take_late_gpu_pieces(&mut self) -> u64 {
        std::mem::take(&mut self.pending.nodes.too_late)
    }

    /// The same feeder, opening at most `per_tenant_hour` new series per tenant and hour.
    pub fn with_series_limit(mut self, per_tenant_hour: usize) -> Self {
        self.limit = SeriesLimit::new(per_tenant_hour);
        self
    }

    /// Marks `node` active in the hour of `timestamp_ms`; sends and checkpoints the node-hour
    /// the first time.
    fn active(&mut self, partition: i32, node: NodeId, timestamp_ms: i64) {
        let hour = timestamp_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let nodes = &mut self.pending.nodes;
        if nodes.activate(partition, node, hour) {
            nodes.hours_changed.push((partition, node, hour, true));
        }
        nodes.seen(node, timestamp_ms);
    }

    /// Restores an open hour in which a node was active from a checkpoint of `partition`. Its
    /// activity was sent before the checkpoint was written: it is not sent again.
    pub fn restore_node_hour(&mut self, partition: i32, node: &str, hour_start_ms: i64) {
        let node = match self.names.node(node) {
            Ok(node) => node,
            Err(collision) => return restored_collision(&collision),
        };
        let nodes = &mut self.pending.nodes;
        nodes.active.insert((node, hour_start_ms), partition);
        // The node sent a sample at or after the hour's start: its older hours may be closed.
        nodes.seen(node, hour_start_ms);
    }

    /// The node aggregates changed since the last call, by their latest value: a node's
    /// activity (1) and the most GPUs it held at once, per hour.
    pub fn take_fleet(&mut self) -> Vec<(FleetIdx, i64)> {
        std::mem::take(&mut self.pending.nodes.fleet)
            .into_iter()
            .collect()
    }

    fn series_ref(
        &mut self,
        owner: &Owner,
        item: Item,
        node: &str,
    ) -> Result<SeriesRef, IdCollision> {
        let (owner, lease) = self.names.owner(owner)?;
        let metric = item.metric;
        let item = self.names.item(&item)?;
        let node = self.names.node(node)?;
        self.next_series += 1;
        Ok(SeriesRef {
            series: self.next_series,
            metric,
            owner,
            lease,
            item,
            node,
        })
    }

    /// New numbers for an allocation series and, for GPUs, its unfinished flag.
    fn allocation_refs(
        &mut self,
        key: &AllocationKey,
    ) -> Result<(SeriesRef, Option<SeriesRef>), IdCollision> {
        let item = Item {
            metric: key.metric,
            gpu_class: key.gpu_class.clone(),
            mig_profile: key.mig_profile.clone(),
        };
        let flag = (key.metric == Aggregate::GpuSeconds).then(|| Item {
            metric: Aggregate::GpuSecondsUnfinished,
            ..item.clone()
        });
        let series = self.series_ref(&key.owner, item, &key.node)?;
        let flag = match flag {
            Some(flag) => Some(self.series_ref(&key.owner, flag, &key.node)?),
            None => None,
        };
        Ok((series, flag))
    }

    /// A new allocation series in memory; leaves its identity in `scratch`.
    fn new_allocation(
        &mut self,
        partition: i32,
        key: &AllocationKey,
        obs: AllocationObs,
    ) -> Result<SeriesRef, IdCollision> {
        let (series, unfinished) = self.allocation_refs(key)?;
        key.write_identity(&mut self.scratch);
        let id = Identity::from(&self.scratch[..]);
        self.allocation_keys.insert(series.series, id.clone());
        self.allocations.insert(
            id,
            AllocationState {
                partition,
                series,
                unfinished,
                summary: obs,
            },
        );
        Ok(series)
    }

    /// A new number for a counter or gauge series.
    fn reading_ref(&mut self, key: &ReadingKey) -> Result<SeriesRef, IdCollision> {
        let item = Item {
            metric: key.metric,
            gpu_class: key.gpu_class.clone(),
            mig_profile: key.mig_profile.clone(),
        };
        self.series_ref(&key.owner, item, &key.node)
    }

    /// The state of a counter or gauge series, new if it is not in memory; leaves its
    /// identity in `scratch`.
    fn reading(
        &mut self,
        partition: i32,
        key: &ReadingKey,
    ) -> Result<&mut ReadingState, IdCollision> {
        key.write_identity(&mut self.scratch);
        if !self.readings.contains_key(&self.scratch[..]) {
            let series = self.reading_ref(key)?;
            let id = Identity::from(&self.scratch[..]);
            self.reading_keys.insert(series.series, id.clone());
            self.live_groups
                .entry((series.owner, series.node, series.metric))
                .or_default()
                .push(series.series);
            self.readings.insert(
                id,
                ReadingState {
                    partition,
                    series,
                    readings: Readings::default(),
                },
            );
        }
        Ok(self
            .readings
            .get_mut(&self.scratch[..])
            .expect("inserted above when missing"))
    }

    /// Feeds one observation from input `partition`. Readings before `horizon_ms` (the allowed
    /// lateness behind their agent's watermark) are folded away first. An observation that
    /// would open a series past its tenant's limit, or whose names have the id of others'
    /// names, changes nothing and is refused.
    pub fn feed(
        &mut self,
        partition: i32,
        observation: ObservationRef<'_>,
        horizon_ms: i64,
    ) -> Result<(), Refused> {
        match self.feed_from(partition, observation, horizon_ms, &NothingRetired) {
            Ok(fed) => fed,
            Err(never) => match never {},
        }
    }

    /// [`Feeder::feed`], bringing a retired series back from `retired` first (its pieces and
    /// windows are still in the dataflow; only its state left memory).
    pub fn feed_from<R: Retired>(
        &mut self,
        partition: i32,
        observation: ObservationRef<'_>,
        horizon_ms: i64,
        retired: &R,
    ) -> Result<Result<(), Refused>, R::Error> {
        match observation {
            ObservationRef::Allocation(key, obs) => {
                key.write_identity(&mut self.scratch);
                let node = match self.merge_known(obs) {
                    Some(node) => node,
                    // Not in memory: retired (brought back, then merged) or new.
                    None => {
                        let key = key.to_owned();
                        match retired.allocation(partition, &key)? {
                            Some(stored) => {
                                if let Err(collision) = self.new_allocation(partition, &key, stored)
                                {
                                    return Ok(Err(collision.into()));
                                }
                                self.revived += 1;
                                self.merge_known(obs).expect("inserted just above")
                            }
                            None => {
                                if let Err(limited) =
                                    self.limit.admit(&key.owner.tenant, obs.observed_at_ms)
                                {
                                    return Ok(Err(limited.into()));
                                }
                                let series = match self.new_allocation(partition, &key, obs) {
                                    Ok(series) => series,
                                    Err(collision) => return Ok(Err(collision.into())),
                                };
                                self.hold(obs);
                                self.dirty_allocations.insert(series.series);
                                series.node
                            }
                        }
                    }
                };
                self.active(partition, node, obs.observed_at_ms);
            }
            ObservationRef::Reading(
                key,
                ReadingObs {
                    timestamp_ms,
                    units,
                },
            ) => {
                let rules = self.rules;
                let mut changes = std::mem::take(&mut self.changes);
                key.write_identity(&mut self.scratch);
                let state = match self.readings.get_mut(&self.scratch[..]) {
                    Some(state) => state,
                    // Not in memory: retired (brought back) or new.
                    None => {
                        let key = key.to_owned();
                        match retired.readings(partition, &key)? {
                            Some(stored) => {
                                self.revived += 1;
                                match self.reading(partition, &key) {
                                    Ok(state) => {
                                        state.readings = stored;
                                        state
                                    }
                                    Err(collision) => return Ok(Err(collision.into())),
                                }
                            }
                            None => {
                                if let Err(limited) =
                                    self.limit.admit(&key.owner.tenant, timestamp_ms)
                                {
                                    return Ok(Err(limited.into()));
                                }
                                match self.reading(partition, &key) {
                                    Ok(state) => state,
                                    Err(collision) => return Ok(Err(collision.into())),
                                }
                            }
                        }
                    }
                };
                state.readings.compact(horizon_ms);
                let series = state.series;
                let newest = state
                    .readings
                    .newest()
                    .is_none_or(|(t, _)| timestamp_ms >= t);
                state.readings.insert_into(
                    timestamp_ms,
                    units,
                    series.metric,
                    &rules,
                    &mut changes,
                );
                for &(window, part, change) in &changes {
                    self.pending.add(&series, window, part, change);
                    self.dirty_windows
                        .entry((series.series, window))
                        .or_insert([0; 3])[part_index(part)] += change;
                }
                self.changes = changes;
                self.dirty_readings.insert(series.series);
                if newest {
                    self.live_dirty
                        .insert((series.owner, series.node, series.metric));
                }
                self.active(partition, series.node, timestamp_ms);
            }
        }
        Ok(Ok(()))
    }

    /// Restores an allocation series from a checkpoint and feeds its summary; its state stays
    /// in memory only if it was observed at or after `retire_before_ms` (else it is brought
    /// back from the store if it is observed again).
    pub fn restore_allocation(
        &mut self,
        partition: i32,
        key: AllocationKey,
        obs: AllocationObs,
        retire_before_ms: i64,
    ) {
        if allocation_seen_ms(obs) >= retire_before_ms {
            match self.new_allocation(partition, &key, obs) {
                Ok(_) => self.hold(obs),
                Err(collision) => restored_collision(&collision),
            }
            return;
        }
        // Only its pieces, under numbers of their own: nothing downstream keys by the number.
        let (series, unfinished) = match self.allocation_refs(&key) {
            Ok(refs) => refs,
            Err(collision) => return restored_collision(&collision),
        };
        self.hold_pieces(series, unfinished, obs);
    }

    /// Retires from memory the series last observed before `before_ms` whose state the store
    /// holds (none changed since the last checkpoint: call it right after one is written).
    /// One observed again is brought back by [`Feeder::feed_from`]; its pieces and windows
    /// stay in the dataflow. Returns how many `(allocation, counter and gauge)` series left.
    pub fn retire(&mut self, before_ms: i64) -> (usize, usize) {
        let allocations: Vec<Identity> = self
            .allocations
            .iter()
            .filter(|(_, s)| {
                allocation_seen_ms(s.summary) < before_ms
                    && !self.dirty_allocations.contains(&s.series.series)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &allocations {
            if let Some(state) = self.allocations.remove(key) {
                self.allocation_keys.remove(&state.series.series);
            }
        }
        let readings: Vec<Identity> = self
            .readings
            .iter()
            .filter(|(_, s)| {
                s.readings.latest().is_none_or(|(t, _)| t < before_ms)
                    && !self.dirty_readings.contains(&s.series.series)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &readings {
            let Some(state) = self.readings.remove(key) else {
                continue;
            };
            let id = state.series.series;
            self.reading_keys.remove(&id);
            let group = (state.series.owner, state.series.node, state.series.metric);
            if let Some(members) = self.live_groups.get_mut(&group) {
                members.retain(|m| *m != id);
                if members.is_empty() {
                    self.live_groups.remove(&group);
                }
            }
        }
        if !allocations.is_empty() || !readings.is_empty() {
            if self.readings.len() * 4 < self.readings.capacity() {
                self.readings.shrink_to_fit();
                self.reading_keys.shrink_to_fit();
            }
            if self.allocations.len() * 4 < self.allocations.capacity() {
                self.allocations.shrink_to_fit();
                self.allocation_keys.shrink_to_fit();
            }
        }
        (allocations.len(), readings.len())
    }

    /// How much this feeder holds, for `/metrics`: series in memory (allocations, counters
    /// and gauges), node-hours seen, and GPU pieces in the dataflow.
    pub fn sizes(&self) -> [(&'static str, i64); 4] {
        [
            ("allocation_series", self.allocations.len() as i64),
            ("reading_series", self.readings.len() as i64),
            ("node_hours", self.pending.nodes.active.len() as i64),
            ("gpu_pieces", self.pending.nodes.held),
        ]
    }

    /// Series brought back from the store since the last call.
    pub fn take_revived(&mut self) -> u64 {
        std::mem::take(&mut self.revived)
    }

    /// Merges `obs` into the allocation series in memory whose identity is in `scratch`;
    /// returns its node, or `None` if it is not in memory.
    fn merge_known(&mut self, obs: AllocationObs) -> Option<NodeId> {
        let state = self.allocations.get_mut(&self.scratch[..])?;
        Some(merge_allocation(
            state,
            obs,
            self.rules.window_ms,
            &mut self.pending,
            &mut self.dirty_allocations,
        ))
    }

    /// Feeds every piece of the interval of the new allocation series whose identity is in
    /// `scratch` (and flags them while its end is not seen).
    fn hold(&mut self, obs: AllocationObs) {
        let state = &self.allocations[&self.scratch[..]];
        let (series, unfinished) = (state.series, state.unfinished);
        self.hold_pieces(series, unfinished, obs);
    }

    fn hold_pieces(
        &mut self,
        series: SeriesRef,
        unfinished_series: Option<SeriesRef>,
        obs: AllocationObs,
    ) {
        let flag = unfinished_series.map(|flag| (flag, unfinished(obs)));
        for (series, interval) in std::iter::once((series, obs.interval())).chain(flag) {
            held(
                &series,
                (None, interval),
                self.rules.window_ms,
                &mut self.pending,
            );
        }
    }

    /// Hands the dataflow this epoch's amounts, summed per usage total, then moves `input` to
    /// `epoch`. Call it instead of `input.advance_to`: amounts not handed over would count in
    /// a later epoch.
    pub fn advance(&mut self, input: &mut InputSession<Time, Summary, isize>, epoch: Time) {
        for ((key, part), amount) in self.pending.amounts.drain() {
            if amount != 0 {
                input.update(Summary::Amount(key, part), amount as isize);
            }
        }
        self.pending.nodes.feed();
        input.advance_to(epoch);
    }

    /// Restores a counter or gauge series' readings from a checkpoint, if its latest is at or
    /// after `retire_before_ms` (else the store keeps them until it reports again).
    pub fn restore_readings(
        &mut self,
        partition: i32,
        key: ReadingKey,
        readings: Readings,
        retire_before_ms: i64,
    ) {
        if readings
            .latest()
            .is_some_and(|(t, _)| t >= retire_before_ms)
        {
            match self.reading(partition, &key) {
                Ok(state) => state.readings = readings,
                Err(collision) => restored_collision(&collision),
            }
        }
    }

    /// Restores a reading series' parts in one window from a checkpoint and feeds them.
    pub fn restore_window(&mut self, key: ReadingKey, window_start_ms: i64, parts: Parts) {
        // A retired series' windows go in under a number of their own: nothing downstream keys
        // by the number, and no state is made for it.
        key.write_identity(&mut self.scratch);
        let series = match self.readings.get(&self.scratch[..]) {
            Some(state) => state.series,
            None => match self.reading_ref(&key) {
                Ok(series) => series,
                Err(collision) => return restored_collision(&collision),
            },
        };
        for part in [Part::Total, Part::Observed, Part::Present] {
            self.pending
                .add(&series, window_start_ms, part, parts[part_index(part)]);
        }
    }

    /// The live values of every group with a new latest reading since the last call. A series
    /// counts while its latest reading is within `max_staleness` of its group's newest, so a
    /// finished container drops out once the others report without it.
    pub fn take_live(&mut self) -> Vec<LiveValue> {
        let staleness = self.rules.max_staleness_ms;
        let mut out = Vec::with_capacity(self.live_dirty.len());
        for group in std::mem::take(&mut self.live_dirty) {
            let Some(members) = self.live_groups.get_mut(&group) else {
                continue;
            };
            let latest = |id: &u64| {
                let key = self.reading_keys.get(id)?;
                let r = &self.readings.get(key)?.readings;
                let (t, u) = r.newest()?;
                Some(((t, u), r.previous(t)))
            };
            let newest = members
                .iter()
                .filter_map(|id| latest(id).map(|((t, _), _)| t))
                .max();
            let Some(newest) = newest else { continue };
            let mut live = LiveValue {
                group,
                at_ms: newest,
                gauge: 0,
                diff: 0,
                rate_per_s: 0,
                series: 0,
            };
            let mut kept = Vec::with_capacity(members.len());
            for id in members.iter() {
                let Some(((t, units), previous)) = latest(id) else {
                    continue;
                };
                if t < newest - staleness {
                    // Gone quiet: no longer part of the live value (its windows stay).
                    continue;
                }
                kept.push(*id);
                live.series += 1;
                live.gauge += units;
                if let Some((pt, pu)) = previous {
                    let diff = match group.2.kind() {
                        Kind::Counter => delta(Some(pu), units),
                        _ => units - pu,
                    };
                    live.diff += diff;
                    if t > pt {
                        live.rate_per_s += round_div_signed(diff as i128 * 1000, (t - pt) as i128);
                    }
                }
            }
            *members = kept;
            out.push(live);
        }
        out
    }

    /// Series alive in this feeder: `(allocation series, counter and gauge series)`.
    pub fn series(&self) -> (usize, usize) {
        (self.allocations.len(), self.readings.len())
    }

    /// Takes what changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        let allocations = self
            .dirty_allocations
            .drain()
            .filter_map(|id| {
                let id = self.allocation_keys.get(&id)?;
                let state = self.allocations.get(id)?;
                let key = AllocationKey::from_identity(id).expect("an identity the feeder wrote");
                Some((state.partition, key, state.summary))
            })
            .collect();
        let readings = self
            .dirty_readings
            .drain()
            .filter_map(|id| {
                let id = self.reading_keys.get(&id)?;
                let state = self.readings.get(id)?;
                let key = ReadingKey::from_identity(id).expect("an identity the feeder wrote");
                Some((state.partition, key, state.readings.clone()))
            })
            .collect();
        let windows = self
            .dirty_windows
            .drain()
            .filter(|(_, change)| *change != [0; 3])
            .filter_map(|((id, w), change)| {
                let id = self.reading_keys.get(&id)?;
                let state = self.readings.get(id)?;
                let key = ReadingKey::from_identity(id).expect("an identity the feeder wrote");
                Some((state.partition, key, w, change))
            })
            .collect();
        let node_hours = self
            .pending
            .nodes
            .hours_changed
            .drain(..)
            .map(|(p, node, hour, open)| (p, self.names.node_name(node), hour, open))
            .collect();
        Dirty {
            allocations,
            readings,
            windows,
            node_hours,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Observation;

    const MIN: i64 = 60_000;

    /// A node's hour whose end falls the lateness behind the node's newest sample lets its
    /// GPU pieces and its activity go (their values stay as sent); a piece reaching it
    /// afterwards is counted as late and held nowhere.
    #[test]
    fn a_closed_node_hour_lets_its_gpu_pieces_and_activity_go() {
        let mut hours = NodeHours {
            lateness_ms: Some(10 * MIN),
            ..NodeHours::default()
        };
        let node = NodeId(1);
        let piece = |start_ms, end_ms| Interval {
            start_ms,
            end_ms,
            count: 1,
        };
        let sent = |hours: &mut NodeHours| -> Vec<(FleetIdx, i64)> {
            std::mem::take(&mut hours.fleet).into_iter().collect()
        };
        hours.seen(node, 30 * MIN);
        assert!(hours.activate(7, node, 0));
        assert!(!hours.activate(7, node, 0), "once per node-hour");
        hours.change(node, piece(0, 30 * MIN), 1);
        hours.change(node, piece(20 * MIN, 30 * MIN), 1);
        hours.change(node, piece(60 * MIN, 65 * MIN), 1);
        hours.feed();
        assert_eq!((hours.held, hours.pieces.len()), (3, 2));
        assert_eq!(hours.fed.get(&(node, 0)), Some(&2));
        assert_eq!(
            sent(&mut hours),
            [
                (FleetIdx::NodeActive(node, 0), 1),
                (FleetIdx::NodeMaxGpus(node, 0), 2),
                (FleetIdx::NodeMaxGpus(node, HOUR_MS), 1),
            ]
        );
        // Hour 0 ends 10 min behind the newest sample: closed at the next feed, its
        // activity's entry deleted at the next checkpoint; nothing is sent.
        hours.seen(node, 70 * MIN);
        assert!(hours.activate(7, node, HOUR_MS));
        hours.feed();
        assert_eq!(
            (hours.held, hours.pieces.len()),
            (1, 1),
            "hour 0's pieces left"
        );
        assert_eq!(hours.fed.get(&(node, 0)), None);
        assert_eq!(hours.active.len(), 1, "hour 0's activity left");
        assert_eq!(hours.hours_changed, [(7, node, 0, false)]);
        assert_eq!(sent(&mut hours), [(FleetIdx::NodeActive(node, HOUR_MS), 1)]);
        hours.change(node, piece(5 * MIN, 10 * MIN), 1);
        hours.change(node, piece(0, 30 * MIN), -1);
        hours.feed();
        assert_eq!((hours.too_late, hours.held), (2, 1));
        assert!(sent(&mut hours).is_empty(), "a closed hour's maximum stays");
        // Hour 1 is still open: its pieces change as they come, down to none.
        hours.change(node, piece(60 * MIN, 65 * MIN), -1);
        hours.feed();
        assert_eq!((hours.held, hours.pieces.len()), (0, 0));
        assert_eq!(
            sent(&mut hours),
            [(FleetIdx::NodeMaxGpus(node, HOUR_MS), 0)]
        );
    }

    fn rules() -> Rules {
        Rules {
            window_ms: MIN,
            max_staleness_ms: 30_000,
            max_gap_ms: 600_000,
        }
    }

    /// Inserts readings of `metric` and returns the resulting `(window, part) → amount`.
    fn apply_parts(
        series: &mut Readings,
        metric: Aggregate,
        readings: &[(i64, i64)],
    ) -> BTreeMap<(i64, Part), i64> {
        let mut usage = BTreeMap::new();
        for (t, u) in readings {
            for (w, p, c) in series.insert(*t, *u, metric, &rules()) {
                *usage.entry((w, p)).or_insert(0) += c;
            }
        }
        usage.retain(|_, v| *v != 0);
        usage
    }

    fn apply(series: &mut Readings, readings: &[(i64, i64)]) -> BTreeMap<i64, i64> {
        apply_parts(series, Aggregate::CpuCoreSeconds, readings)
            .into_iter()
            .map(|((w, p), v)| {
                assert_eq!(p, Part::Total, "a counter has totals only");
                (w, v)
            })
            .collect()
    }

    #[test]
    fn in_order_readings_give_differences_and_a_reset_counts_from_zero() {
        let mut s = Readings::default();
        let usage = apply(
            &mut s,
            &[(10_000, 100), (50_000, 300), (70_000, 50), (130_000, 900)],
        );
        assert_eq!(usage, BTreeMap::from([(0, 300), (MIN, 50), (2 * MIN, 850)]));
    }

    #[test]
    fn a_reading_on_a_window_boundary_closes_the_window_that_ends_there() {
        // Readings every 15 s from 0: the one at 60 s reports use from 45 s to 60 s, all of it
        // in minute 0; the one at 120 s closes minute 1.
        let mut s = Readings::default();
        let usage = apply(
            &mut s,
            &[
                (0, 0),
                (15_000, 15),
                (45_000, 45),
                (60_000, 60),
                (120_000, 120),
            ],
        );
        assert_eq!(usage, BTreeMap::from([(0, 60), (MIN, 60)]));
    }

    #[test]
    fn a_late_reading_moves_usage_between_windows() {
        let mut s = Readings::default();
        let mut usage = apply(&mut s, &[(10_000, 100), (130_000, 900)]);
        assert_eq!(usage, BTreeMap::from([(0, 100), (2 * MIN, 800)]));
        // A reading at 70 s arrives late: 500 of the 800 happened in minute 1.
        for (w, _, c) in s.insert(70_000, 600, Aggregate::CpuCoreSeconds, &rules()) {
            *usage.entry(w).or_insert(0) += c;
        }
        usage.retain(|_, v| *v != 0);
        assert_eq!(
            usage,
            BTreeMap::from([(0, 100), (MIN, 500), (2 * MIN, 300)])
        );
    }

    #[test]
    fn the_larger_of_two_readings_at_one_time_wins_in_either_order() {
        let a = apply(
            &mut Readings::default(),
            &[(1_000, 10), (2_000, 20), (2_000, 30), (3_000, 40)],
        );
        let b = apply(
            &mut Readings::default(),
            &[(3_000, 40), (2_000, 30), (1_000, 10), (2_000, 20)],
        );
        assert_eq!(a, BTreeMap::from([(0, 40)]));
        assert_eq!(a, b);
    }

    #[test]
    fn compaction_keeps_the_predecessor_and_ignores_older_readings() {
        let mut s = Readings::default();
        apply(&mut s, &[(10_000, 100), (20_000, 200), (90_000, 300)]);
        s.compact(25_000);
        assert_eq!(s.base, Some((20_000, 200)));
        assert_eq!(s.readings.len(), 1);
        let cpu = Aggregate::CpuCoreSeconds;
        assert!(
            s.insert(15_000, 150, cpu, &rules()).is_empty(),
            "behind the horizon"
        );
        // A reading between the base and the kept one takes its delta from the base, and moves
        // the kept one's delta from window 1 to window 0.
        assert_eq!(
            s.insert(26_000, 260, cpu, &rules()),
            vec![(0, Part::Total, 60), (MIN, Part::Total, -60)]
        );
    }

    #[test]
    fn a_gauge_is_held_until_the_next_reading_within_max_staleness_and_never_across_a_gap() {
        let mut s = Readings::default();
        // 1,000 bytes from 0 s, 3,000 bytes from 20 s, next reading at 50 s (30 s later:
        // still held), then a 70 s gap (over max_staleness: not observed), then 2 more.
        let usage = apply_parts(
            &mut s,
            Aggregate::MemoryByteSeconds,
            &[
                (0, 1_000),
                (20_000, 3_000),
                (50_000, 5_000),
                (120_000, 7_000),
                (135_000, 9_000),
            ],
        );
        assert_eq!(
            usage,
            BTreeMap::from([
                // 1,000 B × 20 s + 3,000 B × 30 s = 110,000 byte-seconds in minute 0.
                ((0, Part::Total), 110_000),
                ((0, Part::Observed), 50_000),
                ((0, Part::Present), 60_000),
                ((MIN, Part::Present), 60_000),
                // 7,000 B × 15 s in minute 2.
                ((2 * MIN, Part::Total), 105_000),
                ((2 * MIN, Part::Observed), 15_000),
                ((2 * MIN, Part::Present), 15_000),
            ])
        );
        // The same readings in another order give the same windows.
        let mut shuffled = Readings::default();
        let again = apply_parts(
            &mut shuffled,
            Aggregate::MemoryByteSeconds,
            &[
                (135_000, 9_000),
                (20_000, 3_000),
                (120_000, 7_000),
                (0, 1_000),
                (50_000, 5_000),
            ],
        );
        assert_eq!(usage, again);
    }

    /// A million new series from one tenant in one hour: the first `limit` are opened, every
    /// other one is refused with its tenant and hour, and the other tenant, the next hour and
    /// the series already open are unaffected.
    #[test]
    fn a_million_series_from_one_tenant_stop_at_its_hourly_limit() {
        let names = Arc::new(Names::default());
        let mut feeder = Feeder::new(rules(), names, 0).with_series_limit(1_000);
        let reading = |tenant: &str, container: String, t: i64| {
            Observation::Reading(
                ReadingKey {
                    owner: Owner {
                        tenant: tenant.into(),
                        lease: "l".into(),
                        service: "s".into(),
                    },
                    node: "n".into(),
                    container_id: container,
                    metric: Aggregate::MemoryByteSeconds,
                    gpu_uuid: String::new(),
                    gpu_class: String::new(),
                    mig_profile: String::new(),
                },
                ReadingObs {
                    timestamp_ms: t,
                    units: 1,
                },
            )
        };
        let (mut opened, mut refused) = (0, 0);
        for i in 0..1_000_000 {
            match feeder.feed(0, reading("noisy", format!("c{i}"), 1_000).as_ref(), 0) {
                Ok(()) => opened += 1,
                Err(Refused::SeriesLimit(e)) => {
                    assert_eq!(
                        (e.tenant.as_str(), e.hour_start_ms, e.limit),
                        ("noisy", 0, 1_000)
                    );
                    refused += 1;
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!((opened, refused), (1_000, 999_000));
        assert_eq!(
            feeder.series(),
            (0, 1_000),
            "only the admitted series hold state"
        );
        // An open series takes readings; another tenant and the next hour have room.
        feeder
            .feed(0, reading("noisy", "c7".into(), 2_000).as_ref(), 0)
            .expect("an open series");
        feeder
            .feed(0, reading("quiet", "q".into(), 2_000).as_ref(), 0)
            .expect("another tenant");
        feeder
            .feed(0, reading("noisy", "next".into(), HOUR_MS).as_ref(), 0)
            .expect("the next hour");
    }

    #[test]
    fn live_values_sum_the_latest_readings_and_drop_a_container_gone_quiet() {
        let names = Arc::new(Names::default());
        let mut feeder = Feeder::new(rules(), names, 0);
        let key = |container: &str, metric| ReadingKey {
            owner: Owner {
                tenant: "t".into(),
                lease: "l".into(),
                service: "s".into(),
            },
            node: "n".into(),
            container_id: container.into(),
            metric,
            gpu_uuid: String::new(),
            gpu_class: String::new(),
            mig_profile: String::new(),
        };
        let feed = |feeder: &mut Feeder, container: &str, t: i64, units: i64| {
            feeder
                .feed(
                    0,
                    Observation::Reading(
                        key(container, Aggregate::CpuCoreSeconds),
                        ReadingObs {
                            timestamp_ms: t,
                            units,
                        },
                    )
                    .as_ref(),
                    i64::MIN,
                )
                .expect("no series limit");
        };
        // Two containers' CPU counters (microseconds), 15 s apart.
        feed(&mut feeder, "a", 0, 1_000_000);
        feed(&mut feeder, "b", 0, 0);
        feed(&mut feeder, "a", 15_000, 16_000_000);
        feed(&mut feeder, "b", 15_000, 7_500_000);
        let live = feeder.take_live();
        assert_eq!(live.len(), 1, "{live:?}");
        // 1 + 0.5 cores busy.
        assert_eq!(
            (
                live[0].gauge,
                live[0].diff,
                live[0].rate_per_s,
                live[0].series
            ),
            (23_500_000, 22_500_000, 1_500_000, 2)
        );
        assert!(feeder.take_live().is_empty(), "nothing new");
        // Container a finished; b goes on for a minute: a drops out.
        feed(&mut feeder, "b", 75_000, 37_500_000);
        let live = feeder.take_live();
        assert_eq!(
            (
                live[0].gauge,
                live[0].diff,
                live[0].rate_per_s,
                live[0].series
            ),
            (37_500_000, 30_000_000, 500_000, 1)
        );
        // An older reading arriving late changes no live value.
        feed(&mut feeder, "b", 30_000, 15_000_000);
        assert!(feeder.take_live().is_empty());
    }

    #[test]
    fn a_long_silence_is_neither_observed_nor_present_and_utilization_keeps_its_fraction() {
        let usage = apply_parts(
            &mut Readings::default(),
            Aggregate::GpuUtilizationSeconds,
            // 0.5 (in millionths) for 10 s, then silence for 20 minutes.
            &[(0, 500_000), (10_000, 250_000), (1_210_000, 0)],
        );
        assert_eq!(
            usage,
            BTreeMap::from([
                ((0, Part::Total), 5_000),
                ((0, Part::Observed), 10_000),
                ((0, Part::Present), 10_000),
            ])
        );
    }

    #[test]
    fn a_retired_series_reporting_again_goes_on_from_its_stored_state() {
        let mut feeder = Feeder::new(rules(), Arc::new(Names::default()), 0);
        let key = ReadingKey {
            owner: Owner {
                tenant: "t".into(),
                lease: "l".into(),
                service: "s".into(),
            },
            node: "n".into(),
            container_id: "c".into(),
            metric: Aggregate::CpuCoreSeconds,
            gpu_uuid: String::new(),
            gpu_class: String::new(),
            mig_profile: String::new(),
        };
        let reading = |t, units| {
            Observation::Reading(
                key.clone(),
                ReadingObs {
                    timestamp_ms: t,
                    units,
                },
            )
        };
        let mut store = MemoryStore::default();
        for (t, units) in [(0, 1_000), (15_000, 2_000)] {
            feeder
                .feed(0, reading(t, units).as_ref(), i64::MIN)
                .expect("no limit");
        }
        // Not yet checkpointed: it stays.
        assert_eq!(feeder.retire(i64::MAX), (0, 0));
        store.keep(feeder.take_dirty());
        assert_eq!(
            feeder.retire(15_000),
            (0, 0),
            "not idle before its last reading"
        );
        assert_eq!(feeder.retire(15_001), (0, 1));
        assert_eq!(feeder.series(), (0, 0));
        // Two hours on, the same container's counter: the difference from its last reading,
        // as if it had never left memory (counted from zero it would be 5,000).
        let fed = feeder.feed_from(0, reading(2 * HOUR_MS, 5_000).as_ref(), i64::MIN, &store);
        assert_eq!(fed, Ok(Ok(())));
        assert_eq!(feeder.take_revived(), 1);
        let windows: Vec<(i64, Parts)> = feeder
            .take_dirty()
            .windows
            .into_iter()
            .map(|(_, _, w, parts)| (w, parts))
            .collect();
        assert_eq!(windows, vec![(2 * HOUR_MS - MIN, [3_000, 0, 0])]);
    }
}
