//! The processor's differential dataflow, read top to bottom as the SPEC's steps.
//!
//! ```text
//! summaries ─┬─ amounts (allocation pieces and reading pairs, summed per epoch by the feeder)
//!            └─ levels, costs carried (closed totals taken out or brought back: crate::windows)
//! amounts ─┬─ window_totals ▸ measured (per lease, service, item and base window → meterflow.usage)
//!          ├─ roll_up                  (per hour, day and month, each from the amounts → meterflow.usage)
//!          └─ billing_totals           (per lease, item and billing window       → meterflow.billing)
//! measured    ▸ window_costs  (per lease and service and base window, for burn rates → meterflow.usage)
//! billing     ▸ period_costs  (per tenant and month, for budgets → meterflow.usage, meterflow.alerts)
//! ```
//!
//! Each step is a function from collection to collection. Input order does not matter: a late
//! or re-ordered observation changes an interval or a reading pair, and differential dataflow
//! retracts the old windowed values and emits the new ones. Deduplication by (agent, sequence)
//! happens before the dataflow, in [`crate::runner`], where one agent's batches arrive on one
//! worker; there a [`crate::series::Feeder`] also reduces each series' samples to what the
//! dataflow needs, so its state grows per series and window rather than per sample.
//!
//! The node aggregates (active, most GPUs held at once, per node and hour) are not in the
//! dataflow: a node's samples all reach one worker, whose feeder has them whole and sends them
//! itself, and forgets a node's hour once it closes ([`FleetIdx`]). The fleet's per hour are
//! their sums, which the sink adds up when asked.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use differential_dataflow::VecCollection;
use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Inspect, Probe};

use crate::budgets::month_start_ms;
pub use crate::model::Interval;
use crate::model::{Kind, Part, Summary};
use crate::names::{BillingIdx, ItemId, LeaseId, Name, Names, NodeId, OwnerId, TenantId, UsageIdx};
use crate::prices::{PriceBook, Rate};
use crate::series::HOUR_MS;

/// The key of a window's cost: (owner, its lease, base window start).
pub type CostIdx = (OwnerId, LeaseId, i64);

/// What costs are computed with inside the dataflow: the names of items, and their prices.
#[derive(Clone)]
pub struct Costing {
    pub names: std::sync::Arc<Names>,
    pub prices: std::sync::Arc<PriceBook>,
}

impl Costing {
    /// A pricer for one worker's operators, remembering each item's rate.
    pub fn pricer(&self) -> impl Fn(ItemId, i64) -> i64 + 'static {
        let (names, prices) = (self.names.clone(), self.prices.clone());
        let rates: RefCell<HashMap<ItemId, Rate>> = RefCell::default();
        move |item, quantity| {
            let rate = *rates
                .borrow_mut()
                .entry(item)
                .or_insert_with(|| names.rate(item, &prices));
            rate.cost(quantity)
        }
    }
}

/// Timely time of the processor: one epoch per batch of Kafka messages.
pub type Time = u64;

/// A collection at processor time with `isize` multiplicities (or quantities, for sums).
pub type Coll<'s, D> = VecCollection<'s, Time, D>;

/// One windowed aggregate's value: its total, and how much of the window it was observed.
/// For exact aggregates (allocations, counters) both times are the window's length; for a gauge
/// they are summed over its series, and `observed_ms / present_ms` is its coverage.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Measured {
    pub total: i64,
    pub observed_ms: i64,
    pub present_ms: i64,
}

/// The key of one node aggregate per hour (SPEC: per node and hour), kept and sent by the
/// feeder of the worker the node's samples reach ([`crate::series::Feeder::take_fleet`]). The
/// fleet's per hour (active nodes, the sum of the nodes' maxima) are summed from these by the
/// sink.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum FleetIdx {
    /// The node sent at least one sample in the hour (value 1).
    NodeActive(NodeId, i64),
    /// The most GPUs (or MIG instances) allocated on the node at any instant of the hour.
    NodeMaxGpus(NodeId, i64),
}

/// A usage total at one level: its key, with `None` for its base window or the resolution of
/// its roll-up.
pub type LevelIdx = (UsageIdx, Option<Resolution>);

/// The dataflow's input by what each kind of it feeds. Amounts (in the multiplicities, so that
/// every sum downstream is a plain addition) feed every level of usage and billing; a level's
/// own amounts and the costs carried only the one total they name.
struct Inputs<'s> {
    /// Per (owner, item, base window) and part.
    amounts: Coll<'s, (UsageIdx, Part)>,
    levels: Coll<'s, (LevelIdx, Part)>,
    carried: Coll<'s, CostIdx>,
    billed: Coll<'s, BillingIdx>,
    periods_carried: Coll<'s, (TenantId, i64)>,
}

fn split<'s>(summaries: Coll<'s, Summary>) -> Inputs<'s> {
    let amounts = summaries.clone().flat_map(|s| match s {
        Summary::Amount(k, part) => Some((k, part)),
        _ => None,
    });
    let levels = summaries.clone().flat_map(|s| match s {
        Summary::Level(k, part) => Some((k, part)),
        _ => None,
    });
    let carried = summaries.clone().flat_map(|s| match s {
        Summary::CostCarried(k) => Some(k),
        _ => None,
    });
    let billed = summaries.clone().flat_map(|s| match s {
        Summary::Billed(k) => Some(k),
        _ => None,
    });
    let periods_carried = summaries.flat_map(|s| match s {
        Summary::PeriodCarried(k) => Some(k),
        _ => None,
    });
    Inputs {
        amounts,
        levels,
        carried,
        billed,
        periods_carried,
    }
}

/// A level's own amounts: `None` for base windows, else the roll-up's resolution.
fn level_amounts<'s>(
    levels: Coll<'s, (LevelIdx, Part)>,
    level: Option<Resolution>,
) -> Coll<'s, (UsageIdx, Part)> {
    levels.flat_map(move |((k, l), part)| (l == level).then_some((k, part)))
}

/// Changes of a collection of `(key, value)`, with their time and diff, as captured from the
/// dataflow.
pub type Changes<K, V> = Rc<RefCell<Vec<((K, V), Time, isize)>>>;

/// One worker's progress, which every worker learns of (see [`Installed::progress`]).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Progress {
    /// The latest watermark of the worker's agents, in ms.
    pub watermark_ms: i64,
    /// Whether the worker has read what its partitions held when it started.
    pub caught_up: bool,
    /// The epoch through which the broker has acknowledged every record the worker sent
    /// ([`Time::MAX`] once it sends no more).
    pub acked: Time,
}

/// The progress of every worker of every process, as of the last completed epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterProgress {
    /// The latest watermark of any worker.
    pub watermark_ms: i64,
    /// How many workers have caught up.
    pub caught_up: usize,
    /// The epoch through which every worker's records are acknowledged: a checkpoint covering
    /// input up to it cannot hold a total whose record may still be lost.
    pub acked: Time,
}

/// One worker's installed dataflow: its inputs, a probe to know when an epoch is done, and the
/// changes of the usage and billing aggregates captured for the caller.
pub struct Installed {
    pub input: InputSession<Time, Summary, isize>,
    /// Names first seen in this process, for every worker of every process to learn.
    pub names: timely::dataflow::operators::vec::input::Handle<Time, Name>,
    /// `(worker index, its progress)`: a worker replaces its own record when it changes.
    pub progress_in: InputSession<Time, (usize, Progress), isize>,
    /// The cluster's progress, updated as epochs complete.
    pub progress: Rc<RefCell<ClusterProgress>>,
    pub probe: ProbeHandle<Time>,
    pub usage: Changes<UsageIdx, Measured>,
    pub billing: Changes<BillingIdx, isize>,
    /// Roll-ups of the usage totals to hours, days and months.
    pub rollups: Changes<RollupIdx, Measured>,
    /// Cost in micros per (owner, lease, base window).
    pub costs: Changes<CostIdx, isize>,
    /// Cost in micros per (tenant, month start), from the billed quantities.
    pub periods: Changes<(TenantId, i64), isize>,
}

/// Builds the dataflow in `worker`: base windows of `window_ms`, billing windows of
/// `billing_window_ms` (a multiple of the base window), costs from `costing`, roll-ups to
/// `rollups` (each counted from the amounts, so that each level's totals can leave the
/// dataflow on their own: see [`crate::windows`]).
pub fn install(
    worker: &mut timely::worker::Worker,
    window_ms: i64,
    billing_window_ms: i64,
    costing: Costing,
    rollups: &[Resolution],
) -> Installed {
    let levels = rollups.to_vec();
    let usage: Changes<UsageIdx, Measured> = Rc::default();
    let billing: Changes<BillingIdx, isize> = Rc::default();
    let (usage_out, billing_out) = (usage.clone(), billing.clone());
    let costs: Changes<CostIdx, isize> = Rc::default();
    let rollups: Changes<RollupIdx, Measured> = Rc::default();
    let periods: Changes<(TenantId, i64), isize> = Rc::default();
    let (costs_out, periods_out) = (costs.clone(), periods.clone());
    let progress: Rc<RefCell<ClusterProgress>> = Rc::default();
    let progress_out = progress.clone();
    let (input, names_in, progress_in, probe) = worker.dataflow::<Time, _, _>(|scope| {
        // Names first: operators built earlier run earlier in a step, so a name another
        // process sent is registered before the totals that need it are named or priced here.
        let (names_in, names) = timely::dataflow::operators::vec::Input::new_input::<Name>(&scope);
        let probe = ProbeHandle::new();
        let registry = costing.names.clone();
        names
            .broadcast()
            .inspect(move |name| registry.register(name))
            .probe_with(&probe);
        let (input, summaries) = scope.new_collection::<Summary, isize>();
        let (progress_in, progress) = scope.new_collection::<(usize, Progress), isize>();
        let inputs = split(summaries);
        let amounts = inputs.amounts;
        let totals = window_totals(
            amounts
                .clone()
                .concat(level_amounts(inputs.levels.clone(), None)),
        );
        let measured = measured(totals, window_ms);
        measured
            .clone()
            .inspect(move |update| usage_out.borrow_mut().push(*update))
            .probe_with(&probe);
        let rollups_out = rollups.clone();
        for to in levels {
            let coarser = roll_up(
                amounts.clone(),
                level_amounts(inputs.levels.clone(), Some(to)),
                to,
            );
            let out = rollups_out.clone();
            measured_by(coarser, move |start| to.end(start) - start)
                .map(move |(k, m)| ((k, to), m))
                .inspect(move |update| out.borrow_mut().push(*update))
                .probe_with(&probe);
        }
        window_costs(measured, inputs.carried, costing.clone())
            .inspect(move |update| costs_out.borrow_mut().push(*update))
            .probe_with(&probe);
        let billed = billing_totals(amounts, inputs.billed, billing_window_ms);
        billed
            .clone()
            .inspect(move |update| billing_out.borrow_mut().push(*update))
            .probe_with(&probe);
        period_costs(billed, inputs.periods_carried, costing)
            .inspect(move |update| periods_out.borrow_mut().push(*update))
            .probe_with(&probe);
        cluster_progress(progress)
            .inner
            .broadcast()
            .inspect(
                move |((_, (watermark_ms, caught_up, acked)), _time, diff)| {
                    if *diff > 0 {
                        *progress_out.borrow_mut() = ClusterProgress {
                            watermark_ms: *watermark_ms,
                            caught_up: *caught_up as usize,
                            acked: *acked,
                        };
                    }
                },
            )
            .probe_with(&probe);
        (input, names_in, progress_in, probe)
    });
    Installed {
        input,
        names: names_in,
        progress_in,
        progress,
        probe,
        usage,
        billing,
        rollups,
        costs,
        periods,
    }
}

/// The key of a roll-up: the usage key (its window starting the roll-up's) and the resolution.
pub type RollupIdx = (UsageIdx, Resolution);

/// A coarser window base windows roll up into (SPEC: hour, day and billing period).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Resolution {
    Hour,
    Day,
    /// The calendar month (UTC): the billing period.
    Month,
}

impl Resolution {
    /// Every roll-up, finest first.
    pub const ALL: [Resolution; 3] = [Resolution::Hour, Resolution::Day, Resolution::Month];

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Resolution::Hour => "hour",
            Resolution::Day => "day",
            Resolution::Month => "month",
        }
    }

    /// The start of the window holding `t_ms`.
    pub fn start(self, t_ms: i64) -> i64 {
        match self {
            Resolution::Hour => t_ms.div_euclid(HOUR_MS) * HOUR_MS,
            Resolution::Day => t_ms.div_euclid(24 * HOUR_MS) * 24 * HOUR_MS,
            Resolution::Month => month_start_ms(t_ms),
        }
    }

    /// The end of the window starting at `start_ms`.
    pub fn end(self, start_ms: i64) -> i64 {
        match self {
            Resolution::Hour => start_ms + HOUR_MS,
            Resolution::Day => start_ms + 24 * HOUR_MS,
            Resolution::Month => crate::budgets::next_month_start_ms(start_ms),
        }
    }
}

/// Amounts in base windows, and the level's own → totals by part in the windows of `to`.
pub fn roll_up<'s>(
    amounts: Coll<'s, (UsageIdx, Part)>,
    own: Coll<'s, (UsageIdx, Part)>,
    to: Resolution,
) -> Coll<'s, ((UsageIdx, Part), isize)> {
    amounts
        .map(move |(k, part)| {
            (
                UsageIdx {
                    window_start_ms: to.start(k.window_start_ms),
                    ..k
                },
                part,
            )
        })
        .concat(own)
        .count()
}

/// Every worker's progress → the latest watermark of any, how many have caught up, and the
/// epoch through which all have their records acknowledged.
pub fn cluster_progress<'s>(
    progress: Coll<'s, (usize, Progress)>,
) -> Coll<'s, ((), (i64, i64, Time))> {
    progress
        .map(|(_, p)| ((), p))
        .reduce_named("ClusterProgress", |_key, input, output| {
            let watermark_ms = input
                .iter()
                .map(|(p, _)| p.watermark_ms)
                .max()
                .unwrap_or(i64::MIN);
            let caught_up: isize = input
                .iter()
                .filter(|(p, _)| p.caught_up)
                .map(|(_, diff)| *diff)
                .sum();
            let acked = input.iter().map(|(p, _)| p.acked).min().unwrap_or(0);
            output.push(((watermark_ms, caught_up as i64, acked), 1));
        })
}

/// Windowed totals, and the costs carried for totals no longer in the dataflow → cost in
/// micros per (owner, lease, base window): what burn rates are made of. Each total is priced
/// on its own, rounded to the micro.
pub fn window_costs<'s>(
    measured: Coll<'s, (UsageIdx, Measured)>,
    carried: Coll<'s, CostIdx>,
    costing: Costing,
) -> Coll<'s, (CostIdx, isize)> {
    let cost_of = costing.pricer();
    measured
        .explode(move |(k, m)| {
            let cost = cost_of(k.item, m.total);
            (cost != 0).then_some(((k.owner, k.lease, k.window_start_ms), cost as isize))
        })
        .concat(carried)
        .count()
}

/// Billing totals, and the costs carried for totals no longer in the dataflow → what each
/// tenant has spent per calendar month, in micros: the sum of the costs its billing records
/// carry once every window is billed.
pub fn period_costs<'s>(
    billed: Coll<'s, (BillingIdx, isize)>,
    carried: Coll<'s, (TenantId, i64)>,
    costing: Costing,
) -> Coll<'s, ((TenantId, i64), isize)> {
    let cost_of = costing.pricer();
    billed
        .explode(move |(b, quantity)| {
            let cost = cost_of(b.item, quantity as i64);
            let tenant = costing.names.tenant_of(b.lease);
            (cost != 0).then_some(((tenant, month_start_ms(b.window_start_ms)), cost as isize))
        })
        .concat(carried)
        .count()
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

/// Amounts carried in multiplicities → one `((key, part), total)` record per base window.
pub fn window_totals<'s>(
    amounts: Coll<'s, (UsageIdx, Part)>,
) -> Coll<'s, ((UsageIdx, Part), isize)> {
    amounts.count()
}

/// Totals by part → one [`Measured`] per key. Exact aggregates pass straight through; a
/// gauge's three parts are gathered by key.
pub fn measured<'s>(
    totals: Coll<'s, ((UsageIdx, Part), isize)>,
    window_ms: i64,
) -> Coll<'s, (UsageIdx, Measured)> {
    measured_by(totals, move |_| window_ms)
}

/// [`measured`] for windows whose length depends on their start (months).
pub fn measured_by<'s>(
    totals: Coll<'s, ((UsageIdx, Part), isize)>,
    length_ms: impl Fn(i64) -> i64 + 'static,
) -> Coll<'s, (UsageIdx, Measured)> {
    let exact = totals
        .clone()
        .filter(|((k, _), _)| k.metric.kind() != Kind::Gauge)
        .map(move |((k, _), total)| {
            let len = length_ms(k.window_start_ms);
            (
                k,
                Measured {
                    total: total as i64,
                    observed_ms: len,
                    present_ms: len,
                },
            )
        });
    let gauges = totals
        .filter(|((k, _), _)| k.metric.kind() == Kind::Gauge)
        .map(|((k, part), amount)| (k, (part, amount)))
        .reduce_named("GaugeParts", |_key, input, output| {
            let mut m = Measured {
                total: 0,
                observed_ms: 0,
                present_ms: 0,
            };
            for ((part, amount), diff) in input {
                let amount = (*amount * *diff) as i64;
                match part {
                    Part::Total => m.total += amount,
                    Part::Observed => m.observed_ms += amount,
                    Part::Present => m.present_ms += amount,
                }
            }
            output.push((m, 1));
        });
    exact.concat(gauges)
}

/// Amounts, and the billing level's own → one `(key, total)` record per lease, item and
/// billing window (services summed), for the aggregates that are billed.
pub fn billing_totals<'s>(
    amounts: Coll<'s, (UsageIdx, Part)>,
    own: Coll<'s, BillingIdx>,
    billing_window_ms: i64,
) -> Coll<'s, (BillingIdx, isize)> {
    amounts
        .filter(|(k, part)| *part == Part::Total && k.metric.billed())
        .map(move |(k, _)| BillingIdx::of(&k, billing_window_ms))
        .concat(own)
        .count()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::model::{
        Aggregate, AllocationKey, AllocationObs, BillingKey, Observation, Owner, ReadingKey,
        ReadingObs, UsageKey,
    };
    use crate::names::Names;
    use crate::prices::PriceBook;
    use crate::series::{Feeder, Rules};

    const MIN: i64 = 60_000;
    const HOUR: i64 = 3_600_000;

    /// A node aggregate, named: `(metric, node, hour)`.
    type FleetKey = (&'static str, String, i64);

    /// Runs the dataflow over epochs of observations fed through a [`Feeder`], as the
    /// processor does, and returns the final usage, billing and fleet totals, named.
    fn run_all(epochs: Vec<Vec<Observation>>) -> Outcome {
        run_retiring(epochs, false)
    }

    /// The final usage, billing, fleet, cost, period and roll-up totals of a run.
    type Outcome = (
        BTreeMap<UsageKey, Measured>,
        BTreeMap<BillingKey, i64>,
        BTreeMap<FleetKey, i64>,
        BTreeMap<(Owner, i64), i64>,
        BTreeMap<(String, i64), i64>,
        BTreeMap<(UsageKey, Resolution), Measured>,
    );

    /// [`run_all`]; with `retire`, after every epoch the changed series are "checkpointed"
    /// and every series is retired from memory, so each observation after the first epoch
    /// brings its series back from the store.
    fn run_retiring(epochs: Vec<Vec<Observation>>, retire: bool) -> Outcome {
        let (outcome, refused, _) = run_named(epochs, (retire, false, None), Names::default);
        assert_eq!(refused, Vec::new(), "nothing refused");
        outcome
    }

    /// [`run_all`], with every total of every window taken out of the dataflow after every
    /// epoch (as if the closing frontier had passed them all, see [`crate::windows`]): each
    /// later change brings its totals back. Usage, roll-ups and costs are the values sent
    /// (the last sent per key, as a sink keeps them); also returns how many totals were
    /// retired and brought back.
    fn run_retiring_windows(epochs: Vec<Vec<Observation>>) -> (Outcome, (u64, u64)) {
        let (outcome, refused, counts) = run_named(epochs, (false, true, None), Names::default);
        assert_eq!(refused, Vec::new(), "nothing refused");
        (outcome, counts)
    }

    /// Where two outcomes differ, key by key.
    fn differences(a: &Outcome, b: &Outcome) -> String {
        fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
            what: &str,
            a: &BTreeMap<K, V>,
            b: &BTreeMap<K, V>,
            out: &mut String,
        ) {
            for (k, v) in a {
                if b.get(k) != Some(v) {
                    out.push_str(&format!("{what} {k:?}: {v:?} against {:?}\n", b.get(k)));
                }
            }
            for (k, v) in b {
                if !a.contains_key(k) {
                    out.push_str(&format!("{what} {k:?}: none against {v:?}\n"));
                }
            }
        }
        let mut out = String::new();
        diff("usage", &a.0, &b.0, &mut out);
        diff("billing", &a.1, &b.1, &mut out);
        diff("fleet", &a.2, &b.2, &mut out);
        diff("cost", &a.3, &b.3, &mut out);
        diff("period", &a.4, &b.4, &mut out);
        diff("roll-up", &a.5, &b.5, &mut out);
        out
    }

    /// Retired totals kept in memory, for tests: what checkpoints would write.
    #[derive(Default)]
    struct MemoryTotals {
        totals: HashMap<LevelIdx, Measured>,
        costs: HashMap<CostIdx, i64>,
        billing: HashMap<BillingIdx, i64>,
    }

    impl crate::windows::RetiredTotals for MemoryTotals {
        type Error = std::convert::Infallible;
        fn total(&self, key: &LevelIdx) -> Result<Option<Measured>, Self::Error> {
            Ok(self.totals.get(key).copied())
        }
        fn cost(&self, key: &CostIdx) -> Result<Option<i64>, Self::Error> {
            Ok(self.costs.get(key).copied())
        }
        fn billed(&self, key: &BillingIdx) -> Result<Option<i64>, Self::Error> {
            Ok(self.billing.get(key).copied())
        }
    }

    /// The values sent of usage, roll-ups and costs, the last per key (as a sink keeps them),
    /// and the billing totals the ledger was given.
    #[derive(Default)]
    struct Sent {
        usage: BTreeMap<UsageIdx, Measured>,
        rollups: BTreeMap<RollupIdx, Measured>,
        costs: BTreeMap<CostIdx, isize>,
        billing: BTreeMap<BillingIdx, isize>,
    }

    impl Sent {
        fn keep(&mut self, (usage, rollups, costs, billing): crate::windows::Sifted) {
            fn apply<K: Ord, V>(to: &mut BTreeMap<K, V>, from: BTreeMap<K, Option<V>>) {
                for (k, v) in from {
                    match v {
                        Some(v) => to.insert(k, v),
                        None => to.remove(&k),
                    };
                }
            }
            apply(&mut self.usage, usage);
            apply(&mut self.rollups, rollups);
            apply(&mut self.costs, costs);
            apply(&mut self.billing, billing);
        }
    }

    /// [`run_retiring`] with the names `names` makes, retiring `(series, windows)` and closing
    /// node-hours after the lateness given; also returns the refused observations, and how
    /// many totals were retired and brought back.
    fn run_named(
        epochs: Vec<Vec<Observation>>,
        (retire, retire_windows, closing): (bool, bool, Option<i64>),
        names: fn() -> Names,
    ) -> (Outcome, Vec<crate::series::Refused>, (u64, u64)) {
        timely::execute_directly(move |worker| {
            let names = Arc::new(names());
            let Installed {
                mut input,
                probe,
                usage,
                billing,
                rollups,
                costs,
                periods,
                // The names and progress inputs are closed: one process needs neither.
                ..
            } = install(worker, MIN, HOUR, costing(&names), &Resolution::ALL);
            let mut feeder = Feeder::new(rules(), names.clone(), 0);
            if let Some(lateness_ms) = closing {
                feeder = feeder.closing_node_hours(lateness_ms);
            }
            let mut stored = crate::series::MemoryStore::default();
            let mut open = crate::windows::OpenTotals::new(MIN, HOUR, &costing(&names));
            let (mut retired, mut sent) = (MemoryTotals::default(), Sent::default());
            // The node aggregates' latest values, as the feeder sends them.
            let mut fleet: BTreeMap<FleetIdx, i64> = BTreeMap::new();
            let mut refused = Vec::new();
            let mut epoch: Time = 0;
            // One epoch through the dataflow, its totals sifted (as a worker does).
            let mut step = |epoch: Time,
                            input: &mut InputSession<Time, Summary, isize>,
                            feeder: &mut Feeder,
                            open: &mut crate::windows::OpenTotals,
                            retired: &MemoryTotals| {
                feeder.advance(input, epoch);
                fleet.extend(feeder.take_fleet());
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
                let changes = (
                    usage.borrow_mut().drain(..).collect(),
                    rollups.borrow_mut().drain(..).collect(),
                    costs.borrow_mut().drain(..).collect(),
                    billing.borrow_mut().drain(..).collect(),
                );
                match open.sift(changes, input, retired) {
                    Ok(sifted) => sent.keep(sifted),
                    Err(never) => match never {},
                }
            };
            for observations in epochs {
                feeder.advance(&mut input, epoch);
                for o in observations {
                    let fed = match feeder.feed_from(0, o.as_ref(), i64::MIN, &stored) {
                        Ok(fed) => fed,
                        Err(never) => match never {},
                    };
                    refused.extend(fed.err());
                }
                if retire {
                    stored.keep(feeder.take_dirty());
                    feeder.retire(i64::MAX);
                    assert_eq!(feeder.series(), (0, 0), "every series retired");
                }
                epoch += 1;
                step(epoch, &mut input, &mut feeder, &mut open, &retired);
                if retire_windows {
                    open.retire(i64::MAX, &mut input);
                    let written = open.take_unwritten();
                    retired.totals.extend(written.totals);
                    retired.costs.extend(written.costs);
                    retired.billing.extend(written.billing);
                    open.written();
                }
            }
            // The last retirement goes through, and what it brought back is sent.
            epoch += 1;
            step(epoch, &mut input, &mut feeder, &mut open, &retired);
            while !open.settled() {
                epoch += 1;
                step(epoch, &mut input, &mut feeder, &mut open, &retired);
            }
            feeder.advance(&mut input, u64::MAX - 1);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
            let costs_sent: BTreeMap<(Owner, i64), i64> = sent
                .costs
                .iter()
                .map(|((o, _, w), c)| ((names.owner_named(*o), *w), *c as i64))
                .collect();
            let outcome = (
                sent.usage
                    .iter()
                    .map(|(k, m)| (names.usage_key(k), *m))
                    .collect(),
                sent.billing
                    .iter()
                    .map(|(k, q)| (names.billing_key(k), *q as i64))
                    .collect(),
                fleet
                    .iter()
                    .filter(|(_, v)| **v != 0)
                    .map(|(k, v)| match *k {
                        FleetIdx::NodeActive(n, h) => (("node_active", names.node_name(n), h), *v),
                        FleetIdx::NodeMaxGpus(n, h) => (("max_gpus", names.node_name(n), h), *v),
                    })
                    .collect(),
                costs_sent,
                totals(
                    &periods,
                    |(t, month)| (names.tenant_name(*t), *month),
                    |v| v as i64,
                ),
                sent.rollups
                    .iter()
                    .map(|((k, r), m)| ((names.usage_key(k), *r), *m))
                    .collect(),
            );
            (outcome, refused, open.take_counts())
        })
    }

    #[test]
    fn two_tenants_whose_names_share_an_id_are_never_added_together() {
        // acme and globex each hold an H100 through minute 0 under the same lease and service
        // names; the seam gives their owners one id.
        let held_by = |tenant: &str| {
            let Observation::Allocation(mut key, obs) =
                alloc("1", tenant, "GPU-1", 0, Some(MIN), MIN)
            else {
                unreachable!("alloc makes allocations")
            };
            key.owner.tenant = tenant.into();
            Observation::Allocation(key, obs)
        };
        let epochs = || vec![vec![held_by("acme"), held_by("globex")]];
        let gpu_seconds = |outcome: &Outcome| -> BTreeMap<String, i64> {
            outcome
                .0
                .iter()
                .filter(|(k, _)| k.metric == Aggregate::GpuSeconds)
                .map(|(k, m)| (k.owner.tenant.clone(), m.total))
                .collect()
        };
        // Apart, as they are with the real ids: a minute each.
        let (apart, refused, _) = run_named(epochs(), (false, false, None), Names::default);
        assert!(refused.is_empty());
        assert_eq!(
            gpu_seconds(&apart),
            BTreeMap::from([("acme".into(), MIN), ("globex".into(), MIN)])
        );
        // Forced to collide: globex's sample is refused, acme keeps exactly its own minute
        // (merged, acme would show two), and globex is billed nothing under acme's name.
        let (forced, refused, _) = run_named(epochs(), (false, false, None), || {
            Names::with_hash(|domain, fields| {
                if domain == "owner" {
                    7
                } else {
                    fields
                        .iter()
                        .fold(meterflow_schemas::id::StableId::new(domain), |id, f| {
                            id.str(f)
                        })
                        .value()
                }
            })
        });
        assert_eq!(gpu_seconds(&forced), BTreeMap::from([("acme".into(), MIN)]));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].reason(), "id_collision");
        assert!(refused[0].to_string().contains("globex"), "{}", refused[0]);
        let billed: Vec<(String, i64)> = forced
            .1
            .iter()
            .filter(|(k, _)| k.metric == Aggregate::GpuSeconds)
            .map(|(k, v)| (k.tenant.clone(), *v))
            .collect();
        assert_eq!(billed, vec![("acme".to_string(), MIN)]);
    }

    fn costing(names: &Arc<Names>) -> Costing {
        Costing {
            names: names.clone(),
            prices: Arc::new(PriceBook::default()),
        }
    }

    fn rules() -> Rules {
        Rules {
            window_ms: MIN,
            max_staleness_ms: 30_000,
            max_gap_ms: 600_000,
        }
    }

    /// The totals of the exact aggregates (their coverage is always the whole window).
    fn run(epochs: Vec<Vec<Observation>>) -> BTreeMap<UsageKey, i64> {
        run_all(epochs)
            .0
            .into_iter()
            .map(|(k, m)| {
                assert_eq!((m.observed_ms, m.present_ms), (MIN, MIN), "{k:?}");
                (k, m.total)
            })
            .collect()
    }

    /// Accumulates captured changes into the final `key → value`, checking there is one each.
    fn totals<K: Ord + Clone, V: Ord + Clone, N: Ord, W>(
        changes: &Changes<K, V>,
        name: impl Fn(&K) -> N,
        value: impl Fn(V) -> W,
    ) -> BTreeMap<N, W> {
        let mut acc: BTreeMap<(K, V), isize> = BTreeMap::new();
        for (rec, _t, d) in changes.borrow().iter() {
            *acc.entry(rec.clone()).or_default() += d;
        }
        acc.into_iter()
            .filter(|(_, d)| *d != 0)
            .map(|((k, v), d)| {
                assert_eq!(d, 1, "one total per key");
                (name(&k), value(v))
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
                metric: Aggregate::GpuSeconds,
                gpu_class: "h100".into(),
                mig_profile: String::new(),
                node: "n".into(),
                container_id: container.into(),
                gpu_uuid: gpu.into(),
            },
            held(1, start, finish, seen),
        )
    }

    fn held(count: i64, start: i64, finish: Option<i64>, seen: i64) -> AllocationObs {
        AllocationObs {
            started_at_ms: start,
            finished_at_ms: finish,
            observed_at_ms: seen,
            count,
        }
    }

    fn reading(
        metric: Aggregate,
        lease: &str,
        container: &str,
        ts: i64,
        units: i64,
    ) -> Observation {
        Observation::Reading(
            ReadingKey {
                owner: owner(lease),
                node: "n".into(),
                container_id: container.into(),
                metric,
                gpu_uuid: String::new(),
                gpu_class: String::new(),
                mig_profile: String::new(),
            },
            ReadingObs {
                timestamp_ms: ts,
                units,
            },
        )
    }

    fn cpu(lease: &str, container: &str, ts: i64, units: i64) -> Observation {
        reading(Aggregate::CpuCoreSeconds, lease, container, ts, units)
    }

    fn memory(lease: &str, container: &str, ts: i64, bytes: i64) -> Observation {
        reading(Aggregate::MemoryByteSeconds, lease, container, ts, bytes)
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
    fn a_change_reaching_a_retired_window_brings_its_totals_back_and_the_sum_is_sent() {
        // Lease l's minute 0: c1 held an H100 all of it. Every total is then taken out of the
        // dataflow; c2 is first seen after, having held another H100 from 30 s to the end.
        let (out, (retired, revived)) = run_retiring_windows(vec![
            vec![alloc("l", "c1", "g1", 0, Some(MIN), MIN)],
            vec![alloc("l", "c2", "g2", 30_000, Some(MIN), MIN)],
        ]);
        // Taken out after the first epoch: the minute, its hour, day and month, its cost and the
        // lease's billing total of the hour; all six brought back by c2 (and not taken out
        // again: nothing came after).
        assert_eq!((retired, revived), (6, 6));
        // What is sent last is the sum, 60 s + 30 s of GPU time at every level, and its cost:
        // $2.49 an H100-hour for 90 s is 62,250 micros.
        let whole = |len| Measured {
            total: 90_000,
            observed_ms: len,
            present_ms: len,
        };
        let gpu: BTreeMap<UsageKey, Measured> = out
            .0
            .into_iter()
            .filter(|(k, _)| k.metric == Aggregate::GpuSeconds)
            .collect();
        assert_eq!(gpu, BTreeMap::from([(gpu_key("l", 0), whole(MIN))]));
        let rollups: Vec<(Resolution, Measured)> = out
            .5
            .into_iter()
            .filter(|((k, _), _)| k.metric == Aggregate::GpuSeconds)
            .map(|((_, r), m)| (r, m))
            .collect();
        assert_eq!(
            rollups,
            vec![
                (Resolution::Hour, whole(HOUR)),
                (Resolution::Day, whole(24 * HOUR)),
                // January 1970: 31 days.
                (Resolution::Month, whole(31 * 24 * HOUR)),
            ]
        );
        assert_eq!(out.3, BTreeMap::from([((owner("l"), 0), 62_250)]));
        // The ledger is given the hour's 90 s, and the tenant's January costs the same.
        let billed: Vec<i64> = out
            .1
            .iter()
            .filter(|(k, _)| k.metric == Aggregate::GpuSeconds)
            .map(|(_, q)| *q)
            .collect();
        assert_eq!(billed, vec![90_000]);
        assert_eq!(out.4, BTreeMap::from([(("t".to_string(), 0), 62_250)]));
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
        let unfinished = |w| UsageKey {
            metric: Aggregate::GpuSecondsUnfinished,
            ..gpu_key("l", w)
        };
        assert_eq!(
            out,
            BTreeMap::from([
                (gpu_key("l", 0), 40_000),
                (gpu_key("l", MIN), 10_000),
                // c2's end is not seen: its 30 s are flagged.
                (unfinished(0), 20_000),
                (unfinished(MIN), 10_000),
            ])
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

    fn measured_total(total: i64) -> Measured {
        Measured {
            total,
            observed_ms: MIN,
            present_ms: MIN,
        }
    }

    /// `amount` (millicores, bytes) of `metric` requested by container `c1` on node `n`.
    fn reserve(
        metric: Aggregate,
        amount: i64,
        start: i64,
        finish: Option<i64>,
        seen: i64,
    ) -> Observation {
        Observation::Allocation(
            AllocationKey {
                owner: owner("l"),
                metric,
                gpu_class: String::new(),
                mig_profile: String::new(),
                node: "n".into(),
                container_id: "c1".into(),
                gpu_uuid: String::new(),
            },
            held(amount, start, finish, seen),
        )
    }

    #[test]
    fn requested_cores_and_memory_are_held_like_gpus_but_never_flagged_or_counted_as_gpus() {
        let six_gib = 6 << 30;
        let epochs = vec![
            vec![
                // 1.5 cores from 10 s to 100 s; 6 GiB from 30 s, last seen at 90 s.
                reserve(Aggregate::CpuRequestSeconds, 1_500, 10_000, None, 30_000),
                reserve(
                    Aggregate::MemoryRequestByteSeconds,
                    six_gib,
                    30_000,
                    None,
                    60_000,
                ),
                alloc("l", "c1", "g", 10_000, None, 30_000),
            ],
            vec![
                reserve(
                    Aggregate::CpuRequestSeconds,
                    1_500,
                    10_000,
                    Some(100_000),
                    100_500,
                ),
                reserve(
                    Aggregate::MemoryRequestByteSeconds,
                    six_gib,
                    30_000,
                    None,
                    90_000,
                ),
                alloc("l", "c1", "g", 10_000, Some(100_000), 100_500),
            ],
        ];
        let key = |metric, window| UsageKey {
            metric,
            gpu_class: String::new(),
            ..gpu_key("l", window)
        };
        let out = run(epochs.clone());
        assert_eq!(
            out,
            BTreeMap::from([
                (gpu_key("l", 0), 50_000),
                (gpu_key("l", MIN), 40_000),
                // Millicore-ms: 1,500 × 50 s and 1,500 × 40 s (75 and 60 core-seconds).
                (key(Aggregate::CpuRequestSeconds, 0), 75_000_000),
                (key(Aggregate::CpuRequestSeconds, MIN), 60_000_000),
                // Byte-seconds: 6 GiB × 30 s in each minute.
                (key(Aggregate::MemoryRequestByteSeconds, 0), six_gib * 30),
                (key(Aggregate::MemoryRequestByteSeconds, MIN), six_gib * 30),
            ])
        );
        // One GPU at most: the node's reservations are not GPUs.
        let (_, _, fleet, _, _, _) = run_all(epochs);
        assert_eq!(fleet.get(&("max_gpus", "n".to_string(), 0)), Some(&1));
    }

    #[test]
    fn nodes_report_their_most_gpus_held_at_once() {
        let on = |node: &str, o: Observation| match o {
            Observation::Allocation(mut k, v) => {
                k.node = node.into();
                Observation::Allocation(k, v)
            }
            other => other,
        };
        let (_, _, fleet, _, _, _) = run_all(vec![vec![
            // n1: c1 ends at 100 s exactly when c2 starts on the same GPU (1 at a time), and
            // c3 overlaps both on another GPU: at most 2.
            on("n1", alloc("l", "c1", "g1", 0, Some(100_000), 100_000)),
            on(
                "n1",
                alloc("l", "c2", "g1", 100_000, Some(200_000), 200_000),
            ),
            on("n1", alloc("l", "c3", "g2", 50_000, None, 150_000)),
            // n2: one GPU across the hour boundary, first sampled in the second hour: held in
            // the first hour (from its start), but the node is active only in the second.
            on(
                "n2",
                alloc("m", "c4", "g1", HOUR - 1_000, None, HOUR + 1_000),
            ),
        ]]);
        let n = |s: &str| s.to_string();
        assert_eq!(
            fleet,
            BTreeMap::from([
                (("max_gpus", n("n1"), 0), 2),
                (("max_gpus", n("n2"), 0), 1),
                (("max_gpus", n("n2"), HOUR), 1),
                (("node_active", n("n1"), 0), 1),
                (("node_active", n("n2"), HOUR), 1),
            ])
        );
    }

    /// A node's hour closes once its end is the lateness behind the node's newest sample: its
    /// maximum stays as it was, and an allocation first seen afterwards with a start inside it
    /// does not change it (it is billed all the same); the open hour after it counts it.
    #[test]
    fn a_nodes_closed_hour_keeps_its_most_gpus_and_a_late_piece_does_not_change_it() {
        let epochs = || {
            vec![
                // c1 from 0, seen at 30 min: one GPU in hour 0.
                vec![alloc("l", "c1", "g1", 0, None, 30 * MIN)],
                // c1 seen at 80 min: hour 0 ends 20 min behind the node's newest sample.
                vec![alloc("l", "c1", "g1", 0, None, 80 * MIN)],
                // c2, first seen at 85 min, started at 10 min: both held in hours 0 and 1.
                vec![alloc("l", "c2", "g2", 10 * MIN, None, 85 * MIN)],
            ]
        };
        let max = |fleet: &BTreeMap<FleetKey, i64>, hour| {
            fleet.get(&("max_gpus", "n".to_string(), hour)).copied()
        };
        let (open, _, _) = run_named(epochs(), (false, false, None), Names::default);
        assert_eq!((max(&open.2, 0), max(&open.2, HOUR)), (Some(2), Some(2)));
        let (closing, refused, _) =
            run_named(epochs(), (false, false, Some(10 * MIN)), Names::default);
        assert!(refused.is_empty());
        assert_eq!(
            (max(&closing.2, 0), max(&closing.2, HOUR)),
            (Some(1), Some(2)),
            "hour 0 closed with one GPU; hour 1 counts both"
        );
        // GPU time is billed as it happened either way.
        assert_eq!(closing.1, open.1);
        assert_eq!(closing.0, open.0);
    }

    /// The obviously-correct oracle: per series, sort and fold the plain list.
    fn oracle(obs: &[Observation]) -> BTreeMap<UsageKey, Measured> {
        let mut intervals: BTreeMap<AllocationKey, Vec<AllocationObs>> = BTreeMap::new();
        let mut series: BTreeMap<ReadingKey, Vec<ReadingObs>> = BTreeMap::new();
        for o in obs {
            match o {
                Observation::Allocation(k, v) => intervals.entry(k.clone()).or_default().push(*v),
                Observation::Reading(k, v) => series.entry(k.clone()).or_default().push(*v),
            }
        }
        let mut exact: BTreeMap<UsageKey, i64> = BTreeMap::new();
        let mut gauges: BTreeMap<UsageKey, Measured> = BTreeMap::new();
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
            // An end never seen: the same time again, flagged as unfinished.
            let mut metrics = vec![Aggregate::GpuSeconds];
            if vs.iter().all(|v| v.finished_at_ms.is_none()) {
                metrics.push(Aggregate::GpuSecondsUnfinished);
            }
            // Millisecond by millisecond would be the most obvious; window arithmetic on
            // integers is the same thing without the loop.
            let mut t = start;
            while t < end {
                let w = t.div_euclid(MIN) * MIN;
                let next = (w + MIN).min(end);
                for metric in &metrics {
                    *exact
                        .entry(UsageKey {
                            owner: k.owner.clone(),
                            metric: *metric,
                            gpu_class: k.gpu_class.clone(),
                            mig_profile: k.mig_profile.clone(),
                            window_start_ms: w,
                        })
                        .or_default() += next - t;
                }
                t = next;
            }
        }
        let rules = rules();
        for (k, vs) in series {
            // Two readings at one time: the larger is the reading.
            let mut by_time: BTreeMap<i64, i64> = BTreeMap::new();
            for v in vs {
                let u = by_time.entry(v.timestamp_ms).or_insert(v.units);
                *u = (*u).max(v.units);
            }
            let key = |w: i64| UsageKey {
                owner: k.owner.clone(),
                metric: k.metric,
                gpu_class: k.gpu_class.clone(),
                mig_profile: k.mig_profile.clone(),
                window_start_ms: w,
            };
            let readings: Vec<(i64, i64)> = by_time.into_iter().collect();
            if k.metric.kind() == Kind::Counter {
                // docs/metering-rules.md: the difference of readings at t0 and t is what was
                // used in (t0, t]; it goes to the window that holds its last millisecond,
                // [t - 1, t): a reading on a window's first instant closes the window before.
                let mut prev = 0;
                for (t, units) in readings {
                    let d = if units >= prev { units - prev } else { units };
                    prev = units;
                    let last_ms = t - 1;
                    *exact
                        .entry(key(last_ms - last_ms.rem_euclid(MIN)))
                        .or_default() += d;
                }
                continue;
            }
            // A gauge: walk each gap a window at a time.
            for pair in readings.windows(2) {
                let ((t0, level), (t1, _)) = (pair[0], pair[1]);
                let gap = t1 - t0;
                if gap > rules.max_gap_ms {
                    continue;
                }
                let mut t = t0;
                while t < t1 {
                    let w = t.div_euclid(MIN) * MIN;
                    let next = (w + MIN).min(t1);
                    let ms = next - t;
                    let m = gauges.entry(key(w)).or_insert(Measured {
                        total: 0,
                        observed_ms: 0,
                        present_ms: 0,
                    });
                    m.present_ms += ms;
                    if gap <= rules.max_staleness_ms {
                        m.observed_ms += ms;
                        let divisor = k.metric.gauge_divisor() as i128;
                        m.total += ((level as i128 * ms as i128 + divisor / 2) / divisor) as i64;
                    }
                    t = next;
                }
            }
        }
        exact.retain(|_, v| *v != 0);
        let mut out: BTreeMap<UsageKey, Measured> = exact
            .into_iter()
            .map(|(k, v)| (k, measured_total(v)))
            .collect();
        out.extend(gauges);
        out
    }

    /// The oracle's calendar (UTC, Gregorian), walked a year and a month at a time from 1970:
    /// `[start, end)` of the hour, day or month holding `t`. Nothing shared with `time.rs`.
    fn oracle_period(r: Resolution, t: i64) -> (i64, i64) {
        const DAY: i64 = 86_400_000;
        match r {
            Resolution::Hour => (t - t.rem_euclid(HOUR), t - t.rem_euclid(HOUR) + HOUR),
            Resolution::Day => (t - t.rem_euclid(DAY), t - t.rem_euclid(DAY) + DAY),
            Resolution::Month => {
                let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
                let year_ms = |y: i64| if leap(y) { 366 * DAY } else { 365 * DAY };
                let (mut year, mut start) = (1970, 0);
                while t < start {
                    year -= 1;
                    start -= year_ms(year);
                }
                while t >= start + year_ms(year) {
                    start += year_ms(year);
                    year += 1;
                }
                let february = if leap(year) { 29 } else { 28 };
                for days in [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] {
                    if t < start + days * DAY {
                        return (start, start + days * DAY);
                    }
                    start += days * DAY;
                }
                unreachable!("a year has twelve months")
            }
        }
    }

    /// The demo price book written out (prices.rs's defaults, in the units the aggregates are
    /// kept in), and the cost in micros of `total`, rounded half away from zero.
    fn oracle_cost(metric: Aggregate, gpu_class: &str, mig_profile: &str, total: i64) -> i64 {
        assert_eq!(mig_profile, "", "the generated GPUs are whole");
        // (micros per hour of the item, units of the aggregate in that hour)
        let (micros, units): (i128, i128) = match (metric, gpu_class) {
            // $2.49 per H100-hour; GPU-milliseconds.
            (Aggregate::GpuSeconds, "h100") => (2_490_000, 3_600_000),
            // $0.04 per core-hour; core-microseconds.
            (Aggregate::CpuCoreSeconds, _) => (40_000, 3_600_000_000),
            // $0.005 per GiB-hour; byte-seconds.
            (Aggregate::MemoryByteSeconds, _) => (5_000, 3_600 * 1_073_741_824),
            _ => return 0,
        };
        let n = i128::from(total) * micros;
        let (q, r) = (n / units, n % units);
        let away = if 2 * r.abs() >= units { n.signum() } else { 0 };
        (q + away) as i64
    }

    /// Every time in `o` moved by `base`.
    fn shifted(o: Observation, base: i64) -> Observation {
        match o {
            Observation::Allocation(k, mut v) => {
                v.started_at_ms += base;
                v.finished_at_ms = v.finished_at_ms.map(|f| f + base);
                v.observed_at_ms += base;
                Observation::Allocation(k, v)
            }
            Observation::Reading(k, mut v) => {
                v.timestamp_ms += base;
                Observation::Reading(k, v)
            }
        }
    }

    /// The node oracle: a node is active in every hour it has an observation in; its
    /// GPUs held at an instant are the allocations whose interval contains it, tried at every
    /// interval start (where the count can rise).
    fn fleet_oracle(obs: &[Observation]) -> BTreeMap<FleetKey, i64> {
        let mut out: BTreeMap<FleetKey, i64> = BTreeMap::new();
        let mut intervals: BTreeMap<AllocationKey, (i64, Option<i64>, i64, i64)> = BTreeMap::new();
        for o in obs {
            let (node, at) = match o {
                Observation::Allocation(k, v) => {
                    let e = intervals.entry(k.clone()).or_insert((
                        v.started_at_ms,
                        v.finished_at_ms,
                        v.observed_at_ms,
                        v.count,
                    ));
                    e.0 = e.0.min(v.started_at_ms);
                    e.1 = match (e.1, v.finished_at_ms) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    e.2 = e.2.max(v.observed_at_ms);
                    e.3 = e.3.max(v.count);
                    (k.node.clone(), v.observed_at_ms)
                }
                Observation::Reading(k, v) => (k.node.clone(), v.timestamp_ms),
            };
            out.insert(("node_active", node, at.div_euclid(HOUR) * HOUR), 1);
        }
        let held: Vec<(String, i64, i64, i64)> = intervals
            .into_iter()
            .map(|(k, (start, finish, seen, count))| (k.node, start, finish.unwrap_or(seen), count))
            .filter(|(_, s, e, c)| e > s && *c > 0)
            .collect();
        let mut node_max: BTreeMap<(String, i64), i64> = BTreeMap::new();
        for (node, start, end, _) in &held {
            // Every hour the interval touches, at the interval's own start within it.
            let mut hour = start.div_euclid(HOUR) * HOUR;
            while hour < *end {
                let t = (*start).max(hour);
                let at_t: i64 = held
                    .iter()
                    .filter(|(n, s, e, _)| n == node && *s <= t && t < *e)
                    .map(|(_, _, _, c)| c)
                    .sum();
                let m = node_max.entry((node.clone(), hour)).or_insert(0);
                *m = (*m).max(at_t);
                hour += HOUR;
            }
        }
        for ((node, h), m) in node_max {
            out.insert(("max_gpus", node, h), m);
        }
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
                    let mut o = alloc(
                        &lease,
                        &container,
                        "g",
                        start,
                        finished.then_some(start + len),
                        start + seen,
                    );
                    if let Observation::Allocation(k, _) = &mut o {
                        // Two nodes; allocations up to ~3 hours apart.
                        k.node = format!("n{}", l % 2);
                    }
                    o
                }),
            // Long allocations across hour boundaries.
            (0..3usize, 0..3usize, 0..4 * HOUR, 0..2 * HOUR, 0..2 * HOUR).prop_map(
                |(l, c, start, len, seen)| {
                    let mut o = alloc(
                        &format!("l{l}"),
                        &format!("c{c}"),
                        "g",
                        start,
                        Some(start + len),
                        start + seen,
                    );
                    if let Observation::Allocation(k, _) = &mut o {
                        k.node = format!("n{}", c % 2);
                    }
                    o
                }
            ),
            (0..3usize, 0..3usize, 0..400_000i64, 0..50_000_000i64)
                .prop_map(|(l, c, ts, units)| cpu(&format!("l{l}"), &format!("c{c}"), ts, units)),
            // Counter readings on a window boundary and a millisecond either side of one.
            (0..3usize, 0..3usize, 1..7i64, -1..=1i64, 0..50_000_000i64).prop_map(
                |(l, c, minute, off, units)| {
                    cpu(
                        &format!("l{l}"),
                        &format!("c{c}"),
                        minute * MIN + off,
                        units,
                    )
                }
            ),
            // Gauge readings close enough together that some gaps are held and some are not.
            (0..3usize, 0..2usize, 0..40i64, 0..8_000_000_000i64).prop_map(
                |(l, c, tick, bytes)| {
                    memory(&format!("l{l}"), &format!("c{c}"), tick * 7_919, bytes)
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the arrival order, batch boundaries and duplicates, the dataflow agrees with
        /// the oracle over the distinct observations.
        #[test]
        fn agrees_with_the_oracle(
            obs in proptest::collection::vec(arb_observation(), 1..40),
            // 1970, or hours before a leap day's end, a year's end and a century's February
            // that has no 29th (the roll-ups cross a day, a month and a year).
            base in proptest::sample::select(vec![0i64, 1_709_244_000_000, 1_798_754_400_000, 4_107_538_800_000]),
            cuts in proptest::collection::vec(0..40usize, 0..6),
            dups in proptest::collection::vec(0..40usize, 0..10),
            seed in any::<u64>(),
        ) {
            // A single allocation series has one start: the runtime reports it once.
            let mut starts: BTreeMap<AllocationKey, (i64, Option<i64>)> = BTreeMap::new();
            let obs: Vec<Observation> = obs.into_iter().map(|o| match shifted(o, base) {
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
            let outcome = run_all(epochs.clone());
            // Every series retired after every epoch and brought back from the store when it
            // reports again: the same totals.
            prop_assert_eq!(&run_retiring(epochs.clone(), true), &outcome);
            // Every total of every window taken out of the dataflow after every epoch, and
            // brought back when a change reaches it: the same totals sent.
            let (retiring, _) = run_retiring_windows(epochs);
            prop_assert!(retiring == outcome, "{}", differences(&retiring, &outcome));
            let (usage, billing, fleet, costs, periods, rollups) = outcome;
            // Roll-ups: the base windows summed into hours, days and months.
            let mut expected_rollups: BTreeMap<(UsageKey, Resolution), Measured> = BTreeMap::new();
            for (k, m) in &expected {
                for r in Resolution::ALL {
                    let (start, end) = oracle_period(r, k.window_start_ms);
                    let len = end - start;
                    let key = (UsageKey { window_start_ms: start, ..k.clone() }, r);
                    let e = expected_rollups.entry(key).or_insert(Measured {
                        total: 0,
                        observed_ms: 0,
                        present_ms: 0,
                    });
                    e.total += m.total;
                    if k.metric.kind() == Kind::Gauge {
                        e.observed_ms += m.observed_ms;
                        e.present_ms += m.present_ms;
                    } else {
                        e.observed_ms = len;
                        e.present_ms = len;
                    }
                }
            }
            expected_rollups.retain(|(k, _), m| k.metric.kind() == Kind::Gauge || m.total != 0);
            prop_assert_eq!(rollups, expected_rollups);
            prop_assert_eq!(fleet, fleet_oracle(&distinct));
            // Costs: each window total priced on its own; each tenant's month, the billed
            // totals priced on their own.
            let mut expected_costs: BTreeMap<(Owner, i64), i64> = BTreeMap::new();
            for (k, v) in &expected {
                let c = oracle_cost(k.metric, &k.gpu_class, &k.mig_profile, v.total);
                *expected_costs.entry((k.owner.clone(), k.window_start_ms)).or_default() += c;
            }
            expected_costs.retain(|_, c| *c != 0);
            prop_assert_eq!(costs, expected_costs);

            // Billing totals are the priced usage totals summed per lease, item and hour.
            let mut billed: BTreeMap<BillingKey, i64> = BTreeMap::new();
            let priced = |m: Aggregate| {
                matches!(
                    m,
                    Aggregate::GpuSeconds
                        | Aggregate::CpuCoreSeconds
                        | Aggregate::MemoryByteSeconds
                        | Aggregate::EnergyJoules
                        | Aggregate::HostEnergyJoules
                )
            };
            for (k, v) in expected.iter().filter(|(k, _)| priced(k.metric)) {
                let key = BillingKey {
                    tenant: k.owner.tenant.clone(),
                    lease: k.owner.lease.clone(),
                    metric: k.metric,
                    gpu_class: k.gpu_class.clone(),
                    mig_profile: k.mig_profile.clone(),
                    window_start_ms: oracle_period(Resolution::Hour, k.window_start_ms).0,
                };
                *billed.entry(key).or_default() += v.total;
            }
            billed.retain(|_, v| *v != 0);
            let mut expected_periods: BTreeMap<(String, i64), i64> = BTreeMap::new();
            for (k, v) in &billed {
                let month = oracle_period(Resolution::Month, k.window_start_ms).0;
                *expected_periods.entry((k.tenant.clone(), month)).or_default() +=
                    oracle_cost(k.metric, &k.gpu_class, &k.mig_profile, *v);
            }
            expected_periods.retain(|_, c| *c != 0);
            prop_assert_eq!(periods, expected_periods);
            prop_assert_eq!(usage, expected);
            prop_assert_eq!(billing, billed);
        }
    }
}
