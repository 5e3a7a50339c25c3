//! Per-series state between the validated samples and the dataflow.
//!
//! One node's batches always reach the same worker, so the worker that owns a series sees every
//! observation of it and can keep what they reduce to:
//! - an allocation series reduces to [`AllocationObs::merge`] of its observations (earliest
//!   start and finish, latest observation), and the dataflow is handed a replacement summary
//!   only when that changes;
//! - a counter series reduces to its readings inside the allowed lateness (plus the last one
//!   before it), from which [`CounterSeries::insert`] derives how each new reading changes the
//!   usage of its window and of its successor's window.
//!
//! The dataflow's state then grows with series and windows, not with samples; a repeated or
//! older observation costs nothing downstream. What changed since the last checkpoint is kept
//! as "dirty" so a checkpoint writes only that ([`Feeder::take_dirty`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use differential_dataflow::input::InputSession;
use serde::{Deserialize, Serialize};

use crate::dataflow::Time;
use crate::model::{
    Aggregate, AllocationKey, AllocationObs, CounterKey, CounterObs, Observation, Owner, SeriesRef,
    Summary,
};
use crate::names::{Item, Names};

/// Usage between two readings of a counter: the difference, or the whole reading after a reset
/// (a lower reading) or with no earlier reading (a new container counts from zero).
fn delta(previous: Option<i64>, units: i64) -> i64 {
    match previous {
        Some(p) if units >= p => units - p,
        _ => units,
    }
}

/// The readings of one counter series that a late reading could still fall between.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSeries {
    /// The latest reading folded away by [`CounterSeries::compact`], `(timestamp, units)`.
    pub base: Option<(i64, i64)>,
    /// Readings by timestamp.
    pub readings: BTreeMap<i64, i64>,
}

impl CounterSeries {
    fn previous(&self, timestamp_ms: i64) -> Option<i64> {
        self.readings
            .range(..timestamp_ms)
            .next_back()
            .map(|(_, u)| *u)
            .or(self.base.map(|(_, u)| u))
    }

    fn next(&self, timestamp_ms: i64) -> Option<(i64, i64)> {
        self.readings
            .range(timestamp_ms + 1..)
            .next()
            .map(|(t, u)| (*t, *u))
    }

    /// Adds a reading and returns how the usage of windows changes, `(window_start_ms, change)`:
    /// the reading's own delta lands in its window, and its successor's delta is now taken from
    /// it. Two readings at one timestamp keep the larger (so the order they arrive in does not
    /// matter); a reading at or before the folded-away base is ignored.
    pub fn insert(&mut self, timestamp_ms: i64, units: i64, window_ms: i64) -> Vec<(i64, i64)> {
        if self.base.is_some_and(|(t, _)| timestamp_ms <= t) {
            return Vec::new();
        }
        let window = |t: i64| t.div_euclid(window_ms) * window_ms;
        let mut changes = Vec::with_capacity(4);
        if let Some(&existing) = self.readings.get(&timestamp_ms) {
            if units <= existing {
                return Vec::new();
            }
            changes.extend(self.remove(timestamp_ms, window_ms));
        }
        let previous = self.previous(timestamp_ms);
        changes.push((window(timestamp_ms), delta(previous, units)));
        if let Some((t, u)) = self.next(timestamp_ms) {
            changes.push((window(t), delta(Some(units), u) - delta(previous, u)));
        }
        self.readings.insert(timestamp_ms, units);
        changes.retain(|(_, c)| *c != 0);
        changes
    }

    /// Removes the reading at `timestamp_ms` and returns the usage changes.
    fn remove(&mut self, timestamp_ms: i64, window_ms: i64) -> Vec<(i64, i64)> {
        let window = |t: i64| t.div_euclid(window_ms) * window_ms;
        let Some(units) = self.readings.remove(&timestamp_ms) else {
            return Vec::new();
        };
        let previous = self.previous(timestamp_ms);
        let mut changes = vec![(window(timestamp_ms), -delta(previous, units))];
        if let Some((t, u)) = self.next(timestamp_ms) {
            changes.push((window(t), delta(previous, u) - delta(Some(units), u)));
        }
        changes
    }

    /// Folds readings before `horizon_ms` into [`CounterSeries::base`]: no accepted reading can
    /// arrive before the horizon, so only the latest of them can still be a predecessor.
    pub fn compact(&mut self, horizon_ms: i64) {
        if self
            .readings
            .first_key_value()
            .is_none_or(|(t, _)| *t >= horizon_ms)
        {
            return;
        }
        let kept = self.readings.split_off(&horizon_ms);
        let folded = std::mem::replace(&mut self.readings, kept);
        if let Some(last) = folded.into_iter().next_back() {
            self.base = Some(last);
        }
    }
}

/// What changed since the last checkpoint, with the input partition each series came from.
#[derive(Debug, Default)]
pub struct Dirty {
    pub allocations: Vec<(i32, AllocationKey, AllocationObs)>,
    pub counters: Vec<(i32, CounterKey, CounterSeries)>,
    /// `(partition, series, window_start_ms, change)`: to be added to the stored window usage.
    pub windows: Vec<(i32, CounterKey, i64, i64)>,
}

/// One allocation series' state.
#[derive(Debug)]
struct AllocationState {
    partition: i32,
    series: SeriesRef,
    summary: AllocationObs,
}

/// One counter series' state.
#[derive(Debug)]
struct CounterState {
    partition: i32,
    series: SeriesRef,
    readings: CounterSeries,
}

/// Feeds one worker's dataflow input with per-series summaries (see the module's doc).
#[derive(Debug)]
pub struct Feeder {
    window_ms: i64,
    names: Arc<Names>,
    /// The next series number; the worker's index is in the high bits, so numbers are unique
    /// across the workers of a process.
    next_series: u64,
    allocations: HashMap<AllocationKey, AllocationState>,
    counters: HashMap<CounterKey, CounterState>,
    allocation_keys: HashMap<u64, AllocationKey>,
    counter_keys: HashMap<u64, CounterKey>,
    dirty_allocations: HashSet<u64>,
    dirty_counters: HashSet<u64>,
    dirty_windows: HashMap<(u64, i64), i64>,
}

impl Feeder {
    /// A feeder for base windows of `window_ms`, for worker `worker` of a process whose
    /// workers share `names`.
    pub fn new(window_ms: i64, names: Arc<Names>, worker: usize) -> Self {
        Self {
            window_ms,
            names,
            next_series: (worker as u64) << 40,
            allocations: HashMap::new(),
            counters: HashMap::new(),
            allocation_keys: HashMap::new(),
            counter_keys: HashMap::new(),
            dirty_allocations: HashSet::new(),
            dirty_counters: HashSet::new(),
            dirty_windows: HashMap::new(),
        }
    }

    fn series_ref(&mut self, owner: &Owner, item: Item) -> SeriesRef {
        let (owner, lease) = self.names.owner(owner);
        let item = self.names.item(&item);
        self.next_series += 1;
        SeriesRef {
            series: self.next_series,
            owner,
            lease,
            item,
        }
    }

    fn new_allocation(
        &mut self,
        partition: i32,
        key: AllocationKey,
        obs: AllocationObs,
    ) -> SeriesRef {
        let item = Item {
            metric: Aggregate::GpuSeconds,
            gpu_class: key.gpu_class.clone(),
            mig_profile: key.mig_profile.clone(),
        };
        let series = self.series_ref(&key.owner, item);
        self.allocation_keys.insert(series.series, key.clone());
        self.allocations.insert(
            key,
            AllocationState {
                partition,
                series,
                summary: obs,
            },
        );
        series
    }

    fn counter(&mut self, partition: i32, key: CounterKey) -> &mut CounterState {
        if !self.counters.contains_key(&key) {
            let item = Item {
                metric: key.metric,
                gpu_class: String::new(),
                mig_profile: String::new(),
            };
            let series = self.series_ref(&key.owner, item);
            self.counter_keys.insert(series.series, key.clone());
            self.counters.insert(
                key.clone(),
                CounterState {
                    partition,
                    series,
                    readings: CounterSeries::default(),
                },
            );
        }
        self.counters
            .get_mut(&key)
            .expect("inserted above when missing")
    }

    /// Feeds one observation from input `partition`. Counter readings before `horizon_ms`
    /// (the allowed lateness behind their agent's watermark) are folded away first.
    pub fn feed(
        &mut self,
        input: &mut InputSession<Time, Summary, isize>,
        partition: i32,
        observation: Observation,
        horizon_ms: i64,
    ) {
        match observation {
            Observation::Allocation(key, obs) => match self.allocations.get_mut(&key) {
                Some(state) => {
                    let merged = state.summary.merge(obs);
                    if merged != state.summary {
                        input.remove(Summary::Allocation(state.series, state.summary));
                        input.insert(Summary::Allocation(state.series, merged));
                        state.summary = merged;
                        self.dirty_allocations.insert(state.series.series);
                    }
                }
                None => {
                    let series = self.new_allocation(partition, key, obs);
                    input.insert(Summary::Allocation(series, obs));
                    self.dirty_allocations.insert(series.series);
                }
            },
            Observation::Counter(
                key,
                CounterObs {
                    timestamp_ms,
                    units,
                },
            ) => {
                let window_ms = self.window_ms;
                let state = match self.counters.get_mut(&key) {
                    Some(state) => state,
                    None => self.counter(partition, key),
                };
                state.readings.compact(horizon_ms);
                let series = state.series;
                for (window, change) in state.readings.insert(timestamp_ms, units, window_ms) {
                    input.update(Summary::CounterWindow(series, window), change as isize);
                    *self
                        .dirty_windows
                        .entry((series.series, window))
                        .or_insert(0) += change;
                }
                self.dirty_counters.insert(series.series);
            }
        }
    }

    /// Restores an allocation series from a checkpoint and feeds its summary.
    pub fn restore_allocation(
        &mut self,
        input: &mut InputSession<Time, Summary, isize>,
        partition: i32,
        key: AllocationKey,
        obs: AllocationObs,
    ) {
        let series = self.new_allocation(partition, key, obs);
        input.insert(Summary::Allocation(series, obs));
    }

    /// Restores a counter series' readings from a checkpoint.
    pub fn restore_counter(&mut self, partition: i32, key: CounterKey, series: CounterSeries) {
        self.counter(partition, key).readings = series;
    }

    /// Restores a counter series' usage in one window from a checkpoint and feeds it.
    pub fn restore_counter_window(
        &mut self,
        input: &mut InputSession<Time, Summary, isize>,
        partition: i32,
        key: CounterKey,
        window_start_ms: i64,
        usage: i64,
    ) {
        let series = self.counter(partition, key).series;
        input.update(
            Summary::CounterWindow(series, window_start_ms),
            usage as isize,
        );
    }

    /// Series alive in this feeder: `(allocation series, counter series)`.
    pub fn series(&self) -> (usize, usize) {
        (self.allocations.len(), self.counters.len())
    }

    /// Takes what changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        let allocations = self
            .dirty_allocations
            .drain()
            .filter_map(|id| {
                let key = self.allocation_keys.get(&id)?;
                let state = self.allocations.get(key)?;
                Some((state.partition, key.clone(), state.summary))
            })
            .collect();
        let counters = self
            .dirty_counters
            .drain()
            .filter_map(|id| {
                let key = self.counter_keys.get(&id)?;
                let state = self.counters.get(key)?;
                Some((state.partition, key.clone(), state.readings.clone()))
            })
            .collect();
        let windows = self
            .dirty_windows
            .drain()
            .filter(|(_, change)| *change != 0)
            .filter_map(|((id, w), change)| {
                let key = self.counter_keys.get(&id)?;
                let state = self.counters.get(key)?;
                Some((state.partition, key.clone(), w, change))
            })
            .collect();
        Dirty {
            allocations,
            counters,
            windows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn apply(series: &mut CounterSeries, readings: &[(i64, i64)]) -> BTreeMap<i64, i64> {
        let mut usage = BTreeMap::new();
        for (t, u) in readings {
            for (w, c) in series.insert(*t, *u, MIN) {
                *usage.entry(w).or_insert(0) += c;
            }
        }
        usage.retain(|_, v| *v != 0);
        usage
    }

    #[test]
    fn in_order_readings_give_differences_and_a_reset_counts_from_zero() {
        let mut s = CounterSeries::default();
        let usage = apply(
            &mut s,
            &[(10_000, 100), (50_000, 300), (70_000, 50), (130_000, 900)],
        );
        assert_eq!(usage, BTreeMap::from([(0, 300), (MIN, 50), (2 * MIN, 850)]));
    }

    #[test]
    fn a_late_reading_moves_usage_between_windows() {
        let mut s = CounterSeries::default();
        let mut usage = apply(&mut s, &[(10_000, 100), (130_000, 900)]);
        assert_eq!(usage, BTreeMap::from([(0, 100), (2 * MIN, 800)]));
        // A reading at 70 s arrives late: 500 of the 800 happened in minute 1.
        for (w, c) in s.insert(70_000, 600, MIN) {
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
            &mut CounterSeries::default(),
            &[(0, 10), (1_000, 20), (1_000, 30), (2_000, 40)],
        );
        let b = apply(
            &mut CounterSeries::default(),
            &[(2_000, 40), (1_000, 30), (0, 10), (1_000, 20)],
        );
        assert_eq!(a, BTreeMap::from([(0, 40)]));
        assert_eq!(a, b);
    }

    #[test]
    fn compaction_keeps_the_predecessor_and_ignores_older_readings() {
        let mut s = CounterSeries::default();
        apply(&mut s, &[(10_000, 100), (20_000, 200), (30_000, 300)]);
        s.compact(25_000);
        assert_eq!(s.base, Some((20_000, 200)));
        assert_eq!(s.readings.len(), 1);
        assert!(s.insert(15_000, 150, MIN).is_empty(), "behind the horizon");
        // A reading between the base and the kept one takes its delta from the base.
        assert_eq!(s.insert(26_000, 260, MIN), vec![(0, 60), (0, -60)]);
    }
}
