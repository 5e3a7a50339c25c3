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

use differential_dataflow::input::InputSession;
use serde::{Deserialize, Serialize};

use crate::dataflow::Time;
use crate::model::{AllocationKey, AllocationObs, CounterKey, CounterObs, Observation, Summary};

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

/// Feeds one worker's dataflow input with per-series summaries (see the module's doc).
#[derive(Debug)]
pub struct Feeder {
    window_ms: i64,
    allocations: HashMap<AllocationKey, (i32, AllocationObs)>,
    counters: HashMap<CounterKey, (i32, CounterSeries)>,
    dirty_allocations: HashSet<AllocationKey>,
    dirty_counters: HashSet<CounterKey>,
    dirty_windows: HashMap<(CounterKey, i64), (i32, i64)>,
}

impl Feeder {
    /// A feeder for base windows of `window_ms`.
    pub fn new(window_ms: i64) -> Self {
        Self {
            window_ms,
            allocations: HashMap::new(),
            counters: HashMap::new(),
            dirty_allocations: HashSet::new(),
            dirty_counters: HashSet::new(),
            dirty_windows: HashMap::new(),
        }
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
                Some((_, summary)) => {
                    let merged = summary.merge(obs);
                    if merged != *summary {
                        input.remove(Summary::Allocation(key.clone(), *summary));
                        input.insert(Summary::Allocation(key.clone(), merged));
                        *summary = merged;
                        self.dirty_allocations.insert(key);
                    }
                }
                None => {
                    input.insert(Summary::Allocation(key.clone(), obs));
                    self.allocations.insert(key.clone(), (partition, obs));
                    self.dirty_allocations.insert(key);
                }
            },
            Observation::Counter(
                key,
                CounterObs {
                    timestamp_ms,
                    units,
                },
            ) => {
                let (_, series) = self
                    .counters
                    .entry(key.clone())
                    .or_insert_with(|| (partition, CounterSeries::default()));
                series.compact(horizon_ms);
                let changes = series.insert(timestamp_ms, units, self.window_ms);
                for (window, change) in changes {
                    input.update(Summary::CounterWindow(key.clone(), window), change as isize);
                    self.dirty_windows
                        .entry((key.clone(), window))
                        .or_insert((partition, 0))
                        .1 += change;
                }
                self.dirty_counters.insert(key);
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
        input.insert(Summary::Allocation(key.clone(), obs));
        self.allocations.insert(key, (partition, obs));
    }

    /// Restores a counter series' readings from a checkpoint; its window usage is restored
    /// separately, straight into the input.
    pub fn restore_counter(&mut self, partition: i32, key: CounterKey, series: CounterSeries) {
        self.counters.insert(key, (partition, series));
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
            .filter_map(|k| {
                let (p, obs) = *self.allocations.get(&k)?;
                Some((p, k, obs))
            })
            .collect();
        let counters = self
            .dirty_counters
            .drain()
            .filter_map(|k| {
                let (p, series) = self.counters.get(&k)?.clone();
                Some((p, k, series))
            })
            .collect();
        let windows = self
            .dirty_windows
            .drain()
            .filter(|(_, (_, change))| *change != 0)
            .map(|((k, w), (p, change))| (p, k, w, change))
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
