//! The processor's differential dataflow, read top to bottom as the SPEC's steps.
//!
//! ```text
//! summaries ─┬─ allocations     ▸ allocation_intervals ▸ gpu_milliseconds ─┐
//!            └─ counter windows ▸ counter_usage                          ─┴▸ amounts
//! amounts ─┬─ window_totals   (per lease, service, item and base window → meterflow.usage)
//!          └─ billing_totals  (per lease, item and billing window       → meterflow.billing)
//! ```
//!
//! Each step is a function from collection to collection. Input order does not matter: a late
//! or re-ordered observation changes an interval or a counter delta, and differential dataflow
//! retracts the old windowed values and emits the new ones. Deduplication by (agent, sequence)
//! happens before the dataflow, in [`crate::runner`], where one agent's batches arrive on one
//! worker; there a [`crate::series::Feeder`] also reduces each series' samples to what the
//! dataflow needs, so its state grows per series and window rather than per sample.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::VecCollection;
use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::operators::probe::Handle as ProbeHandle;

use crate::model::{AllocationObs, SeriesRef, Summary};
use crate::names::{BillingIdx, UsageIdx};

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

/// Usage amounts per (owner, item, base window), carried in the multiplicities so that every
/// sum downstream is a plain addition.
pub fn amounts<'s>(summaries: Coll<'s, Summary>, window_ms: i64) -> Coll<'s, UsageIdx> {
    let allocations = summaries.clone().flat_map(|s| match s {
        Summary::Allocation(k, v) => Some((k, v)),
        Summary::CounterWindow(..) => None,
    });
    let counters = summaries.flat_map(|s| match s {
        Summary::CounterWindow(k, w) => Some((k, w)),
        Summary::Allocation(..) => None,
    });
    let gpu = gpu_milliseconds(allocation_intervals(allocations), window_ms);
    gpu.concat(counter_usage(counters))
}

/// Changes of a collection of totals, `((key, total), time, diff)`, as captured from the dataflow.
pub type Changes<K> = Rc<RefCell<Vec<((K, isize), Time, isize)>>>;

/// One worker's installed dataflow: its input, a probe to know when an epoch is done, and the
/// changes of the usage and billing totals captured for the caller.
pub struct Installed {
    pub input: InputSession<Time, Summary, isize>,
    pub probe: ProbeHandle<Time>,
    pub usage: Changes<UsageIdx>,
    pub billing: Changes<BillingIdx>,
}

/// Builds the dataflow in `worker`: base windows of `window_ms`, billing windows of
/// `billing_window_ms` (a multiple of the base window).
pub fn install(
    worker: &mut timely::worker::Worker,
    window_ms: i64,
    billing_window_ms: i64,
) -> Installed {
    let usage: Changes<UsageIdx> = Rc::default();
    let billing: Changes<BillingIdx> = Rc::default();
    let (usage_out, billing_out) = (usage.clone(), billing.clone());
    let (input, probe) = worker.dataflow::<Time, _, _>(|scope| {
        let (input, summaries) = scope.new_collection::<Summary, isize>();
        let amounts = amounts(summaries, window_ms);
        let (probe, _) = window_totals(amounts.clone())
            .inspect(move |update| usage_out.borrow_mut().push(*update))
            .probe();
        billing_totals(amounts, billing_window_ms)
            .inspect(move |update| billing_out.borrow_mut().push(*update))
            .probe_with(&probe);
        (input, probe)
    });
    Installed {
        input,
        probe,
        usage,
        billing,
    }
}

/// Allocation series → the interval its GPUs were held: from the runtime's `started_at` to its
/// `finished_at` once seen, else to the latest observation (an open interval grows as samples
/// arrive). Time before the start (pending) and between two containers (a restart is a new
/// series) is never inside an interval.
pub fn allocation_intervals<'s>(
    observations: Coll<'s, (SeriesRef, AllocationObs)>,
) -> Coll<'s, (SeriesRef, Interval)> {
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

/// Intervals → GPU-milliseconds per (owner, item, window), carried in the multiplicity so that
/// the sums downstream are plain additions.
pub fn gpu_milliseconds<'s>(
    intervals: Coll<'s, (SeriesRef, Interval)>,
    window_ms: i64,
) -> Coll<'s, UsageIdx> {
    intervals.explode(move |(s, iv)| {
        split_by_window(iv.start_ms, iv.end_ms, window_ms)
            .map(|(window_start_ms, ms)| {
                (
                    UsageIdx {
                        owner: s.owner,
                        lease: s.lease,
                        item: s.item,
                        window_start_ms,
                    },
                    (ms * iv.count) as isize,
                )
            })
            .collect::<Vec<_>>()
    })
}

/// Per-series window usage (amount in the multiplicity) → usage per (owner, item, window).
pub fn counter_usage<'s>(windows: Coll<'s, (SeriesRef, i64)>) -> Coll<'s, UsageIdx> {
    windows.map(|(s, window_start_ms)| UsageIdx {
        owner: s.owner,
        lease: s.lease,
        item: s.item,
        window_start_ms,
    })
}

/// Amounts carried in multiplicities → one `(key, total)` record per base window.
pub fn window_totals<'s>(amounts: Coll<'s, UsageIdx>) -> Coll<'s, (UsageIdx, isize)> {
    amounts.count()
}

/// Amounts → one `(key, total)` record per lease, item and billing window (services summed).
pub fn billing_totals<'s>(
    amounts: Coll<'s, UsageIdx>,
    billing_window_ms: i64,
) -> Coll<'s, (BillingIdx, isize)> {
    amounts
        .map(move |k| BillingIdx::of(&k, billing_window_ms))
        .count()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::model::{
        Aggregate, AllocationKey, BillingKey, CounterKey, CounterObs, Observation, Owner, UsageKey,
    };
    use crate::names::Names;
    use crate::series::Feeder;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 3_600_000;

    /// Runs the dataflow over epochs of observations fed through a [`Feeder`], as the
    /// processor does, and returns the final usage and billing totals, named.
    fn run_all(
        epochs: Vec<Vec<Observation>>,
    ) -> (BTreeMap<UsageKey, i64>, BTreeMap<BillingKey, i64>) {
        timely::execute_directly(move |worker| {
            let Installed {
                mut input,
                probe,
                usage,
                billing,
            } = install(worker, MIN, HOUR);
            let names = Arc::new(Names::default());
            let mut feeder = Feeder::new(MIN, names.clone(), 0);
            for (epoch, observations) in epochs.into_iter().enumerate() {
                input.advance_to(epoch as Time);
                for o in observations {
                    feeder.feed(&mut input, 0, o, i64::MIN);
                }
            }
            input.advance_to(u64::MAX - 1);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
            (
                totals(&usage, |k| names.usage_key(k)),
                totals(&billing, |k| names.billing_key(k)),
            )
        })
    }

    fn run(epochs: Vec<Vec<Observation>>) -> BTreeMap<UsageKey, i64> {
        run_all(epochs).0
    }

    /// Accumulates captured changes into the final `key → total`, checking there is one each.
    fn totals<K: Ord + Clone, N: Ord>(
        changes: &Changes<K>,
        name: impl Fn(&K) -> N,
    ) -> BTreeMap<N, i64> {
        let mut acc: BTreeMap<(K, isize), isize> = BTreeMap::new();
        for (rec, _t, d) in changes.borrow().iter() {
            *acc.entry(rec.clone()).or_default() += d;
        }
        acc.into_iter()
            .filter(|(_, d)| *d != 0)
            .map(|((k, v), d)| {
                assert_eq!(d, 1, "one total per key");
                (name(&k), v as i64)
            })
            .collect()
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
            vec![alloc("l", "c1", "g", 10_000, None, 30_000)],
            vec![alloc("l", "c1", "g", 10_000, None, 90_000)],
            vec![alloc("l", "c1", "g", 10_000, Some(100_000), 100_500)],
        ]);
        assert_eq!(
            out,
            BTreeMap::from([(gpu_key("l", 0), 50_000), (gpu_key("l", MIN), 40_000)])
        );
    }

    #[test]
    fn an_open_allocation_runs_to_its_latest_observation_and_a_restart_skips_the_gap() {
        let out = run(vec![
            vec![alloc("l", "c1", "g", 0, Some(20_000), 25_000)],
            // Restarted as a new container at 40 s; last seen at 70 s.
            vec![alloc("l", "c2", "g", 40_000, None, 70_000)],
            // Duplicate and out-of-order observations change nothing.
            vec![
                alloc("l", "c2", "g", 40_000, None, 50_000),
                alloc("l", "c1", "g", 0, None, 10_000),
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
                cpu("l", "c1", 10_000, 1_000_000),
                cpu("l", "c1", 50_000, 3_000_000),
            ],
            // Reset at 70 s (lower reading), then growth; a gap loses nothing.
            vec![
                cpu("l", "c1", 130_000, 9_000_000),
                cpu("l", "c1", 70_000, 500_000),
            ],
            // A new container counts from zero.
            vec![cpu("l", "c2", 75_000, 2_000_000)],
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
        for (k, vs) in counters {
            // Two readings at one time: the larger is the reading.
            let mut by_time: BTreeMap<i64, i64> = BTreeMap::new();
            for v in vs {
                let u = by_time.entry(v.timestamp_ms).or_insert(v.units);
                *u = (*u).max(v.units);
            }
            let vs = by_time.into_iter().map(|(timestamp_ms, units)| CounterObs {
                timestamp_ms,
                units,
            });
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
                epochs.last_mut().expect("non-empty").push(o);
            }
            let (usage, billing) = run_all(epochs);
            // Billing totals are the usage totals summed per lease, item and hour.
            let mut billed: BTreeMap<BillingKey, i64> = BTreeMap::new();
            for (k, v) in &expected {
                *billed.entry(BillingKey::of(k, HOUR)).or_default() += v;
            }
            billed.retain(|_, v| *v != 0);
            prop_assert_eq!(usage, expected);
            prop_assert_eq!(billing, billed);
        }
    }
}
