//! The processor's differential dataflow, read top to bottom as the SPEC's steps.
//!
//! ```text
//! observations ─┬─ allocations ▸ allocation_intervals ▸ gpu_milliseconds ─┐
//!               └─ counters    ▸ counter_deltas       ▸ counter_usage    ─┴▸ window_totals
//! ```
//!
//! Each step is a function from collection to collection. Input order does not matter: a late
//! or re-ordered observation changes an interval or a delta, and differential dataflow retracts
//! the old windowed values and emits the new ones. Deduplication by (agent, sequence) happens
//! before the dataflow, in [`crate::runner`], where one agent's batches arrive on one worker;
//! there a [`Feeder`] also folds each allocation series' observations into one summary, so the
//! dataflow keeps state per series rather than per sample.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use differential_dataflow::VecCollection;
use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::operators::probe::Handle as ProbeHandle;

use crate::model::{
    Aggregate, AllocationKey, AllocationObs, CounterKey, CounterObs, Observation, UsageKey,
};

/// Timely time of the processor: one epoch per batch of Kafka messages.
pub type Time = u64;

/// A collection at processor time with `isize` multiplicities (or quantities, for sums).
pub type Coll<'s, D> = VecCollection<'s, Time, D>;

/// The interval during which an allocation series held its GPUs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Interval {
    pub start_ms: i64,
    pub end_ms: i64,
    pub count: i64,
}

/// All usage aggregates per window: `(key, amount)` with the amount at the key's scale.
pub fn usage<'s>(
    observations: Coll<'s, Observation>,
    window_ms: i64,
) -> Coll<'s, (UsageKey, isize)> {
    let allocations = observations.clone().flat_map(|o| match o {
        Observation::Allocation(k, v) => Some((k, v)),
        Observation::Counter(..) => None,
    });
    let counters = observations.flat_map(|o| match o {
        Observation::Counter(k, v) => Some((k, v)),
        Observation::Allocation(..) => None,
    });
    let gpu = gpu_milliseconds(allocation_intervals(allocations), window_ms);
    let cpu = counter_usage(counter_deltas(counters, window_ms));
    window_totals(gpu.concat(cpu))
}

/// Changes of the usage collection, `((key, amount), time, diff)`, as captured from the dataflow.
pub type Changes = Rc<RefCell<Vec<((UsageKey, isize), Time, isize)>>>;

/// One worker's installed dataflow: its input, a probe to know when an epoch is done, and the
/// changes of the usage collection (`((key, amount), time, diff)`) captured for the caller.
pub struct Installed {
    pub input: InputSession<Time, Observation, isize>,
    pub probe: ProbeHandle<Time>,
    pub changes: Changes,
}

/// Builds [`usage`] in `worker` with an input and a capture of its changes.
pub fn install(worker: &mut timely::worker::Worker, window_ms: i64) -> Installed {
    let changes: Changes = Rc::default();
    let captured = changes.clone();
    let (input, probe) = worker.dataflow::<Time, _, _>(|scope| {
        let (input, observations) = scope.new_collection::<Observation, isize>();
        let probe = usage(observations, window_ms)
            .inspect(move |update| captured.borrow_mut().push(update.clone()))
            .probe()
            .0;
        (input, probe)
    });
    Installed {
        input,
        probe,
        changes,
    }
}

/// Feeds observations to a worker's input, keeping one summary per allocation series.
///
/// An allocation interval depends only on [`AllocationObs::merge`] of its observations, and
/// the worker that owns a series sees all of them (one node's batches always reach the same
/// worker), so it hands the dataflow a replacement summary only when the summary changes. The
/// dataflow's state then grows with series, not with samples, and a repeated or older
/// observation costs nothing downstream. Counter readings pass through unchanged.
#[derive(Debug, Default)]
pub struct Feeder {
    allocations: HashMap<AllocationKey, AllocationObs>,
}

impl Feeder {
    /// Feeds one observation.
    pub fn feed(
        &mut self,
        input: &mut InputSession<Time, Observation, isize>,
        observation: Observation,
    ) {
        match observation {
            Observation::Allocation(key, obs) => match self.allocations.get_mut(&key) {
                Some(summary) => {
                    let merged = summary.merge(obs);
                    if merged != *summary {
                        input.remove(Observation::Allocation(key.clone(), *summary));
                        input.insert(Observation::Allocation(key, merged));
                        *summary = merged;
                    }
                }
                None => {
                    self.allocations.insert(key.clone(), obs);
                    input.insert(Observation::Allocation(key, obs));
                }
            },
            counter @ Observation::Counter(..) => input.insert(counter),
        }
    }
}

/// Allocation series → the interval its GPUs were held: from the runtime's `started_at` to its
/// `finished_at` once seen, else to the latest observation (an open interval grows as samples
/// arrive). Time before the start (pending) and between two containers (a restart is a new
/// series) is never inside an interval.
pub fn allocation_intervals<'s>(
    observations: Coll<'s, (AllocationKey, AllocationObs)>,
) -> Coll<'s, (AllocationKey, Interval)> {
    observations.reduce_named("AllocationIntervals", |_key, input, output| {
        let start_ms = input.iter().map(|(o, _)| o.started_at_ms).min();
        let finish_ms = input.iter().filter_map(|(o, _)| o.finished_at_ms).min();
        let last_seen_ms = input.iter().map(|(o, _)| o.observed_at_ms).max();
        let count = input.iter().map(|(o, _)| o.count).max().unwrap_or(0);
        if let (Some(start_ms), Some(last_seen_ms)) = (start_ms, last_seen_ms) {
            let end_ms = finish_ms.unwrap_or(last_seen_ms);
            if end_ms > start_ms && count > 0 {
                output.push((
                    Interval {
                        start_ms,
                        end_ms,
                        count,
                    },
                    1,
                ));
            }
        }
    })
}

/// Splits `[start_ms, end_ms)` at window boundaries: `(window_start_ms, overlap_ms)` pairs.
pub fn split_by_window(
    start_ms: i64,
    end_ms: i64,
    window_ms: i64,
) -> impl Iterator<Item = (i64, i64)> {
    let first = start_ms.div_euclid(window_ms) * window_ms;
    (0..)
        .map(move |i| first + i * window_ms)
        .take_while(move |w| *w < end_ms)
        .map(move |w| (w, end_ms.min(w + window_ms) - start_ms.max(w)))
        .filter(|(_, overlap_ms)| *overlap_ms > 0)
}

/// Intervals → GPU-milliseconds per (owner, GPU class, MIG profile, window), carried in the
/// multiplicity so that the sums downstream are plain additions.
pub fn gpu_milliseconds<'s>(
    intervals: Coll<'s, (AllocationKey, Interval)>,
    window_ms: i64,
) -> Coll<'s, UsageKey> {
    intervals.explode(move |(key, iv)| {
        split_by_window(iv.start_ms, iv.end_ms, window_ms)
            .map(|(window_start_ms, ms)| {
                (
                    UsageKey {
                        owner: key.owner.clone(),
                        metric: Aggregate::GpuSeconds,
                        gpu_class: key.gpu_class.clone(),
                        mig_profile: key.mig_profile.clone(),
                        window_start_ms,
                    },
                    (ms * iv.count) as isize,
                )
            })
            .collect::<Vec<_>>()
    })
}

/// Counter readings → usage per window. Readings are taken in time order; each adds its
/// difference from the previous one, and a lower reading is a reset that counts from zero
/// (so does the first reading of a series: a new container starts at zero). A gap between
/// readings loses nothing: the next reading carries all of it, into the window it was read in.
pub fn counter_deltas<'s>(
    readings: Coll<'s, (CounterKey, CounterObs)>,
    window_ms: i64,
) -> Coll<'s, (CounterKey, (i64, i64))> {
    readings.reduce_named("CounterDeltas", move |_key, input, output| {
        let mut previous = 0;
        let mut per_window: BTreeMap<i64, i64> = BTreeMap::new();
        for (reading, _) in input {
            let delta = if reading.units >= previous {
                reading.units - previous
            } else {
                reading.units
            };
            previous = reading.units;
            *per_window
                .entry(reading.timestamp_ms.div_euclid(window_ms) * window_ms)
                .or_default() += delta;
        }
        output.extend(
            per_window
                .into_iter()
                .filter(|(_, delta)| *delta != 0)
                .map(|wd| (wd, 1)),
        );
    })
}

/// Per-series window deltas → amounts per (owner, metric, window) in the multiplicity.
pub fn counter_usage<'s>(deltas: Coll<'s, (CounterKey, (i64, i64))>) -> Coll<'s, UsageKey> {
    deltas.explode(|(key, (window_start_ms, delta))| {
        Some((
            UsageKey {
                owner: key.owner,
                metric: key.metric,
                gpu_class: String::new(),
                mig_profile: String::new(),
                window_start_ms,
            },
            delta as isize,
        ))
    })
}

/// Amounts carried in multiplicities → one `(key, total)` record per window.
pub fn window_totals<'s>(amounts: Coll<'s, UsageKey>) -> Coll<'s, (UsageKey, isize)> {
    amounts.count()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::Owner;

    const MIN: i64 = 60_000;

    /// Runs `usage` over epochs of updates and returns the final `key → amount`.
    fn run(epochs: Vec<Vec<(Observation, isize)>>) -> BTreeMap<UsageKey, i64> {
        run_with(epochs, false)
    }

    /// As `run`; with `feeder`, insertions go through a [`Feeder`] as in the processor.
    fn run_with(epochs: Vec<Vec<(Observation, isize)>>, feeder: bool) -> BTreeMap<UsageKey, i64> {
        timely::execute_directly(move |worker| {
            let Installed {
                mut input,
                probe,
                changes,
            } = install(worker, MIN);
            let mut feed = Feeder::default();
            for (epoch, updates) in epochs.into_iter().enumerate() {
                input.advance_to(epoch as Time);
                for (o, d) in updates {
                    if feeder && d == 1 {
                        feed.feed(&mut input, o);
                    } else {
                        input.update(o, d);
                    }
                }
            }
            input.advance_to(u64::MAX - 1);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
            let mut acc: BTreeMap<(UsageKey, isize), isize> = BTreeMap::new();
            for (rec, _t, d) in changes.borrow().iter() {
                *acc.entry(rec.clone()).or_default() += d;
            }
            acc.into_iter()
                .filter(|(_, d)| *d != 0)
                .map(|((k, v), d)| {
                    assert_eq!(d, 1, "one total per key");
                    (k, v as i64)
                })
                .collect()
        })
    }

    fn owner(lease: &str) -> Owner {
        Owner {
            tenant: "t".into(),
            lease: lease.into(),
            service: "s".into(),
        }
    }

    fn alloc(
        lease: &str,
        container: &str,
        gpu: &str,
        start: i64,
        finish: Option<i64>,
        seen: i64,
    ) -> Observation {
        Observation::Allocation(
            AllocationKey {
                owner: owner(lease),
                gpu_class: "h100".into(),
                mig_profile: String::new(),
                node: "n".into(),
                container_id: container.into(),
                gpu_uuid: gpu.into(),
            },
            AllocationObs {
                started_at_ms: start,
                finished_at_ms: finish,
                observed_at_ms: seen,
                count: 1,
            },
        )
    }

    fn cpu(lease: &str, container: &str, ts: i64, units: i64) -> Observation {
        Observation::Counter(
            CounterKey {
                owner: owner(lease),
                node: "n".into(),
                container_id: container.into(),
                metric: Aggregate::CpuCoreSeconds,
            },
            CounterObs {
                timestamp_ms: ts,
                units,
            },
        )
    }

    fn gpu_key(lease: &str, window: i64) -> UsageKey {
        UsageKey {
            owner: owner(lease),
            metric: Aggregate::GpuSeconds,
            gpu_class: "h100".into(),
            mig_profile: String::new(),
            window_start_ms: window,
        }
    }

    fn cpu_key(lease: &str, window: i64) -> UsageKey {
        UsageKey {
            metric: Aggregate::CpuCoreSeconds,
            gpu_class: String::new(),
            ..gpu_key(lease, window)
        }
    }

    #[test]
    fn split_by_window_covers_the_interval_exactly() {
        let parts: Vec<_> = split_by_window(59_000, 181_500, MIN).collect();
        assert_eq!(
            parts,
            vec![
                (0, 1_000),
                (60_000, 60_000),
                (120_000, 60_000),
                (180_000, 1_500)
            ]
        );
        assert_eq!(split_by_window(5, 5, MIN).count(), 0);
        assert_eq!(
            split_by_window(-1_000, 500, MIN).collect::<Vec<_>>(),
            vec![(-60_000, 1_000), (0, 500)]
        );
    }

    #[test]
    fn an_allocation_is_billed_from_start_to_finish_whatever_the_sampling() {
        // Started 10 s into minute 0, sampled at 30 s and 90 s, finished at 100 s.
        let out = run(vec![
            vec![(alloc("l", "c1", "g", 10_000, None, 30_000), 1)],
            vec![(alloc("l", "c1", "g", 10_000, None, 90_000), 1)],
            vec![(alloc("l", "c1", "g", 10_000, Some(100_000), 100_500), 1)],
        ]);
        assert_eq!(
            out,
            BTreeMap::from([(gpu_key("l", 0), 50_000), (gpu_key("l", MIN), 40_000)])
        );
    }

    #[test]
    fn an_open_allocation_runs_to_its_latest_observation_and_a_restart_skips_the_gap() {
        let out = run(vec![
            vec![(alloc("l", "c1", "g", 0, Some(20_000), 25_000), 1)],
            // Restarted as a new container at 40 s; last seen at 70 s.
            vec![(alloc("l", "c2", "g", 40_000, None, 70_000), 1)],
            // Duplicate and out-of-order observations change nothing.
            vec![
                (alloc("l", "c2", "g", 40_000, None, 50_000), 1),
                (alloc("l", "c1", "g", 0, None, 10_000), 1),
            ],
        ]);
        assert_eq!(
            out,
            BTreeMap::from([(gpu_key("l", 0), 40_000), (gpu_key("l", MIN), 10_000)])
        );
    }

    #[test]
    fn counters_take_differences_and_count_resets_from_zero() {
        let out = run(vec![
            vec![
                (cpu("l", "c1", 10_000, 1_000_000), 1),
                (cpu("l", "c1", 50_000, 3_000_000), 1),
            ],
            // Reset at 70 s (lower reading), then growth; a gap loses nothing.
            vec![
                (cpu("l", "c1", 130_000, 9_000_000), 1),
                (cpu("l", "c1", 70_000, 500_000), 1),
            ],
            // A new container counts from zero.
            vec![(cpu("l", "c2", 75_000, 2_000_000), 1)],
        ]);
        assert_eq!(
            out,
            BTreeMap::from([
                (cpu_key("l", 0), 3_000_000),
                (cpu_key("l", MIN), 500_000 + 2_000_000),
                (cpu_key("l", 2 * MIN), 8_500_000),
            ])
        );
    }

    #[test]
    fn a_retracted_observation_retracts_its_usage() {
        let a = alloc("l", "c1", "g", 0, None, 30_000);
        let out = run(vec![vec![(a.clone(), 1)], vec![(a, -1)]]);
        assert!(out.is_empty());
    }

    /// The obviously-correct oracle: per series, sort and fold the plain list.
    fn oracle(obs: &[Observation]) -> BTreeMap<UsageKey, i64> {
        let mut intervals: BTreeMap<AllocationKey, Vec<AllocationObs>> = BTreeMap::new();
        let mut counters: BTreeMap<CounterKey, Vec<CounterObs>> = BTreeMap::new();
        for o in obs {
            match o {
                Observation::Allocation(k, v) => intervals.entry(k.clone()).or_default().push(*v),
                Observation::Counter(k, v) => counters.entry(k.clone()).or_default().push(*v),
            }
        }
        let mut out: BTreeMap<UsageKey, i64> = BTreeMap::new();
        for (k, vs) in intervals {
            let start = vs.iter().map(|v| v.started_at_ms).min().expect("non-empty");
            let end = vs
                .iter()
                .filter_map(|v| v.finished_at_ms)
                .min()
                .unwrap_or_else(|| {
                    vs.iter()
                        .map(|v| v.observed_at_ms)
                        .max()
                        .expect("non-empty")
                });
            // Millisecond by millisecond would be the most obvious; window arithmetic on
            // integers is the same thing without the loop.
            let mut t = start;
            while t < end {
                let w = t.div_euclid(MIN) * MIN;
                let next = (w + MIN).min(end);
                *out.entry(UsageKey {
                    owner: k.owner.clone(),
                    metric: Aggregate::GpuSeconds,
                    gpu_class: k.gpu_class.clone(),
                    mig_profile: k.mig_profile.clone(),
                    window_start_ms: w,
                })
                .or_default() += next - t;
                t = next;
            }
        }
        for (k, mut vs) in counters {
            vs.sort();
            vs.dedup();
            let mut prev = 0;
            for v in vs {
                let d = if v.units >= prev {
                    v.units - prev
                } else {
                    v.units
                };
                prev = v.units;
                *out.entry(UsageKey {
                    owner: k.owner.clone(),
                    metric: k.metric,
                    gpu_class: String::new(),
                    mig_profile: String::new(),
                    window_start_ms: v.timestamp_ms.div_euclid(MIN) * MIN,
                })
                .or_default() += d;
            }
        }
        out.retain(|_, v| *v != 0);
        out
    }

    fn arb_observation() -> impl Strategy<Value = Observation> {
        prop_oneof![
            (
                0..3usize,
                0..3usize,
                0..400_000i64,
                0..200_000i64,
                any::<bool>(),
                0..300_000i64
            )
                .prop_map(|(l, c, start, len, finished, seen)| {
                    let lease = format!("l{l}");
                    let container = format!("c{c}");
                    alloc(
                        &lease,
                        &container,
                        "g",
                        start,
                        finished.then_some(start + len),
                        start + seen,
                    )
                }),
            (0..3usize, 0..3usize, 0..400_000i64, 0..50_000_000i64)
                .prop_map(|(l, c, ts, units)| cpu(&format!("l{l}"), &format!("c{c}"), ts, units)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the arrival order, batch boundaries and duplicates, the dataflow agrees with
        /// the oracle over the distinct observations.
        #[test]
        fn agrees_with_the_oracle(
            obs in proptest::collection::vec(arb_observation(), 1..40),
            cuts in proptest::collection::vec(0..40usize, 0..6),
            dups in proptest::collection::vec(0..40usize, 0..10),
            seed in any::<u64>(),
        ) {
            // A single allocation series has one start: the runtime reports it once.
            let mut starts: BTreeMap<AllocationKey, (i64, Option<i64>)> = BTreeMap::new();
            let obs: Vec<Observation> = obs.into_iter().map(|o| match o {
                Observation::Allocation(k, mut v) => {
                    let (s, f) = *starts.entry(k.clone()).or_insert((v.started_at_ms, v.finished_at_ms));
                    v.started_at_ms = s;
                    v.finished_at_ms = v.finished_at_ms.and(f).or(v.finished_at_ms.map(|_| s + 1));
                    v.observed_at_ms = v.observed_at_ms.max(s);
                    Observation::Allocation(k, v)
                }
                c => c,
            }).collect();
            let mut distinct = obs.clone();
            distinct.sort();
            distinct.dedup();
            let expected = oracle(&distinct);

            // Shuffle deterministically, add duplicates, cut into epochs.
            let mut arrival: Vec<Observation> = obs.clone();
            for d in dups { arrival.push(obs[d % obs.len()].clone()); }
            let mut s = seed;
            for i in (1..arrival.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                arrival.swap(i, (s >> 33) as usize % (i + 1));
            }
            // Duplicates are removed before the dataflow (by agent and sequence); model that.
            let mut seen = std::collections::BTreeSet::new();
            arrival.retain(|o| seen.insert(o.clone()));
            let mut epochs = vec![Vec::new()];
            for (i, o) in arrival.into_iter().enumerate() {
                if cuts.contains(&i) { epochs.push(Vec::new()); }
                epochs.last_mut().expect("non-empty").push((o, 1));
            }
            prop_assert_eq!(run(epochs.clone()), expected.clone());
            prop_assert_eq!(run_with(epochs, true), expected);
        }
    }
}
