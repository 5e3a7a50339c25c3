//! Closed windows leave the dataflow.
//!
//! Every total the dataflow holds (per base window, per hour, day and month roll-up, and the
//! cost of each base window) stays in its arrangements while it can still change. Once the
//! closing frontier (the cluster's newest agent watermark less the allowed lateness, never ahead
//! of the clock) has passed the end of a total's window, [`OpenTotals::retire`] takes it out:
//! its value, negated, is fed to its own level alone ([`Summary::Level`],
//! [`Summary::CostCarried`]), so the arrangements consolidate it away; the retraction that
//! follows is not sent (the value stays where it went: the usage topic, the sinks), and the
//! value goes to the checkpoint store. A base total's cost is carried into its window's cost as
//! the total leaves, so that cost does not move until it leaves itself.
//!
//! A change can still reach a retired total: an agent replaying its spool after an outage is
//! judged by its own watermark, not the cluster's; a gauge reading after a gap holds the level
//! across the windows behind it; an allocation first seen late started in the past. The total
//! then reappears in the dataflow holding the change alone. [`OpenTotals::sift`] sees a changed
//! total it does not hold whose window has closed, finds its retired value (not yet
//! checkpointed, or in the store) and brings it back: the value is fed to its level again and
//! its carried cost withdrawn; that epoch's value is not sent, the next epoch's (retired value
//! and change) is. Nothing is lost or counted twice: the property test in [`crate::dataflow`]
//! retires every total after every epoch and still gets the oracle's totals.
//!
//! Each worker keeps the totals its dataflow outputs (the keys its operators own), by the end of
//! their window, so a retirement takes whole buckets.

use std::collections::BTreeMap;

use differential_dataflow::input::InputSession;

use crate::dataflow::{CostIdx, Costing, LevelIdx, Measured, RollupIdx, Time};
use crate::model::{Kind, Part, Summary};
use crate::names::{ItemId, UsageIdx};
use crate::series::{FastMap, FastSet};

/// Where retired totals are found again: the checkpoint store.
pub trait RetiredTotals {
    type Error;
    /// The value `key` had when it was retired.
    fn total(&self, key: &LevelIdx) -> Result<Option<Measured>, Self::Error>;
    /// The cost a window had when it was retired.
    fn cost(&self, key: &CostIdx) -> Result<Option<i64>, Self::Error>;
}

/// Totals retired since the last checkpoint was written, for the next one.
#[derive(Debug, Default, Clone)]
pub struct Retired {
    pub totals: Vec<(LevelIdx, Measured)>,
    pub costs: Vec<(CostIdx, i64)>,
}

/// One epoch's values to send: per base window, per roll-up and per window's cost (`None`: the
/// value is gone from the window).
pub type Sifted = (
    BTreeMap<UsageIdx, Option<Measured>>,
    BTreeMap<RollupIdx, Option<Measured>>,
    BTreeMap<CostIdx, Option<isize>>,
);

/// One epoch's changes of the totals, as the dataflow output them.
pub type TotalChanges = (
    Vec<((UsageIdx, Measured), Time, isize)>,
    Vec<((RollupIdx, Measured), Time, isize)>,
    Vec<((CostIdx, isize), Time, isize)>,
);

/// The totals one worker's dataflow holds, and those it took out (see the module's doc).
pub struct OpenTotals {
    window_ms: i64,
    cost_of: Box<dyn Fn(ItemId, i64) -> i64>,
    /// Open totals and costs by the end of their window.
    totals: BTreeMap<i64, FastMap<LevelIdx, Measured>>,
    costs: BTreeMap<i64, FastMap<CostIdx, i64>>,
    /// Negated at the last retirement, with the value they had: their retraction is not sent.
    retiring: FastMap<LevelIdx, Measured>,
    retiring_costs: FastMap<CostIdx, i64>,
    /// Brought back this epoch: sent the next, and not retired before.
    reviving: FastSet<LevelIdx>,
    reviving_costs: FastSet<CostIdx>,
    /// Retired and not yet in a checkpoint; then in one being written.
    unwritten_totals: FastMap<LevelIdx, Measured>,
    unwritten_costs: FastMap<CostIdx, i64>,
    writing_totals: FastMap<LevelIdx, Measured>,
    writing_costs: FastMap<CostIdx, i64>,
    /// The frontier of the latest retirement: a total not held whose window ends by it may
    /// have been retired.
    retired_through_ms: i64,
    retired: u64,
    revived: u64,
}

/// A retired value that is spent (brought back since): written to the store as a deletion.
pub const NOTHING: Measured = Measured {
    total: 0,
    observed_ms: 0,
    present_ms: 0,
};

/// The parts a total is fed as: an exact total's amount, or a gauge's three.
fn parts((k, _): &LevelIdx, m: Measured) -> impl Iterator<Item = (Part, i64)> {
    let gauge = k.metric.kind() == Kind::Gauge;
    [
        (Part::Total, m.total),
        (Part::Observed, if gauge { m.observed_ms } else { 0 }),
        (Part::Present, if gauge { m.present_ms } else { 0 }),
    ]
    .into_iter()
    .filter(|(_, amount)| *amount != 0)
}

fn cost_key((k, _): &LevelIdx) -> CostIdx {
    (k.owner, k.lease, k.window_start_ms)
}

impl OpenTotals {
    /// Totals of base windows of `window_ms`, costs priced by `costing` (as the dataflow's).
    pub fn new(window_ms: i64, costing: &Costing) -> Self {
        Self {
            window_ms,
            cost_of: Box::new(costing.pricer()),
            totals: BTreeMap::new(),
            costs: BTreeMap::new(),
            retiring: FastMap::default(),
            retiring_costs: FastMap::default(),
            reviving: FastSet::default(),
            reviving_costs: FastSet::default(),
            unwritten_totals: FastMap::default(),
            unwritten_costs: FastMap::default(),
            writing_totals: FastMap::default(),
            writing_costs: FastMap::default(),
            retired_through_ms: i64::MIN,
            retired: 0,
            revived: 0,
        }
    }

    fn end(&self, (k, level): &LevelIdx) -> i64 {
        match level {
            None => k.window_start_ms + self.window_ms,
            Some(r) => r.end(k.window_start_ms),
        }
    }

    fn cost_end(&self, (_, _, start): &CostIdx) -> i64 {
        start + self.window_ms
    }

    /// How many totals are held, and how many the dataflow does not hold any more.
    pub fn held(&self) -> usize {
        self.totals.values().map(FastMap::len).sum::<usize>()
            + self.costs.values().map(FastMap::len).sum::<usize>()
    }

    /// Totals retired and brought back since the last look.
    pub fn take_counts(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.retired),
            std::mem::take(&mut self.revived),
        )
    }

    /// Whether every total brought back has been sent: a checkpoint written before would let a
    /// restart (which sends nothing of its restored state) lose its value.
    pub fn settled(&self) -> bool {
        self.reviving.is_empty() && self.reviving_costs.is_empty()
    }

    /// Holds the restored state's totals (the first epoch, whose values were sent before the
    /// checkpoint was written), without sending them.
    pub fn restored(&mut self, (usage, rollups, costs): TotalChanges) {
        use crate::runner::latest_values;
        for (k, m) in latest_values(usage) {
            if let Some(m) = m {
                self.hold((k, None), m);
            }
        }
        for ((k, r), m) in latest_values(rollups) {
            if let Some(m) = m {
                self.hold((k, Some(r)), m);
            }
        }
        for (k, c) in latest_values(costs) {
            if let Some(c) = c {
                self.hold_cost(k, c as i64);
            }
        }
    }

    fn hold(&mut self, key: LevelIdx, m: Measured) {
        let end = self.end(&key);
        self.totals.entry(end).or_default().insert(key, m);
    }

    fn hold_cost(&mut self, key: CostIdx, c: i64) {
        let end = self.cost_end(&key);
        self.costs.entry(end).or_default().insert(key, c);
    }

    /// One epoch's changed totals → the values to send (see the module's doc); totals brought
    /// back are fed to `input`.
    pub fn sift<R: RetiredTotals>(
        &mut self,
        (usage, rollups, costs): TotalChanges,
        input: &mut InputSession<Time, Summary, isize>,
        retired: &R,
    ) -> Result<Sifted, R::Error> {
        use crate::runner::latest_values;
        let due = std::mem::take(&mut self.reviving);
        let due_costs = std::mem::take(&mut self.reviving_costs);
        let mut sent: Sifted = Default::default();
        for (k, m) in latest_values(usage) {
            if self.sift_total((k, None), m, input, retired)? {
                sent.0.insert(k, m);
            }
        }
        for ((k, r), m) in latest_values(rollups) {
            if self.sift_total((k, Some(r)), m, input, retired)? {
                sent.1.insert((k, r), m);
            }
        }
        for (k, c) in latest_values(costs) {
            if self.sift_cost(k, c, input, retired)? {
                sent.2.insert(k, c);
            }
        }
        // Those brought back last epoch are sent now, changed again or not.
        for key in due {
            let held = self
                .totals
                .get(&self.end(&key))
                .and_then(|b| b.get(&key))
                .copied();
            match key {
                (k, None) => sent.0.entry(k).or_insert(held),
                (k, Some(r)) => sent.1.entry((k, r)).or_insert(held),
            };
        }
        for key in due_costs {
            let held = self
                .costs
                .get(&self.cost_end(&key))
                .and_then(|b| b.get(&key))
                .map(|c| *c as isize);
            sent.2.entry(key).or_insert(held);
        }
        // A total taken out shows no change only if a change as large as its value reached it
        // in the same epoch: the dataflow holds that change, to be added to the value taken out.
        for (key, was) in std::mem::take(&mut self.retiring) {
            self.revive(key, was, was, input);
        }
        for (key, was) in std::mem::take(&mut self.retiring_costs) {
            self.revive_cost(key, was, was, input);
        }
        Ok(sent)
    }

    /// Whether `key`'s change to `value` is sent.
    fn sift_total<R: RetiredTotals>(
        &mut self,
        key: LevelIdx,
        value: Option<Measured>,
        input: &mut InputSession<Time, Summary, isize>,
        retired: &R,
    ) -> Result<bool, R::Error> {
        if let Some(was) = self.retiring.remove(&key) {
            // Taken out: the value sent stands. Changed as it was taken out: brought back.
            if let Some(change) = value {
                self.revive(key, was, change, input);
            }
            return Ok(false);
        }
        let end = self.end(&key);
        if let Some(bucket) = self.totals.get_mut(&end)
            && let Some(held) = bucket.get_mut(&key)
        {
            match value {
                Some(m) => *held = m,
                None => {
                    bucket.remove(&key);
                }
            }
            return Ok(true);
        }
        if let Some(change) = value {
            if end <= self.retired_through_ms {
                let was = match self
                    .unwritten_totals
                    .get(&key)
                    .or_else(|| self.writing_totals.get(&key))
                {
                    Some(was) => Some(*was),
                    None => retired.total(&key)?,
                };
                if let Some(was) = was.filter(|was| *was != NOTHING) {
                    self.revive(key, was, change, input);
                    return Ok(false);
                }
            }
            self.hold(key, change);
        }
        Ok(true)
    }

    /// Feeds a retired total's value `was` back to its level and withdraws the cost it
    /// carried. Held at `now`, what the dataflow holds before `was` is added: the next epoch
    /// shows the total's value with it, and if it shows no change, `now` is that value (what
    /// else came cancelled `was`).
    fn revive(
        &mut self,
        key: LevelIdx,
        was: Measured,
        now: Measured,
        input: &mut InputSession<Time, Summary, isize>,
    ) {
        for (part, amount) in parts(&key, was) {
            input.update(Summary::Level(key, part), amount as isize);
        }
        if key.1.is_none() {
            let cost = (self.cost_of)(key.0.item, was.total);
            if cost != 0 {
                input.update(Summary::CostCarried(cost_key(&key)), -cost as isize);
            }
        }
        // What the store holds of it is spent: should the total leave the dataflow by going to
        // nothing (no retirement writes it then), a later change must not bring it back again.
        self.unwritten_totals.insert(key, NOTHING);
        self.hold(key, now);
        self.reviving.insert(key);
        self.revived += 1;
    }

    /// Whether a window cost's change to `value` is sent.
    fn sift_cost<R: RetiredTotals>(
        &mut self,
        key: CostIdx,
        value: Option<isize>,
        input: &mut InputSession<Time, Summary, isize>,
        retired: &R,
    ) -> Result<bool, R::Error> {
        if let Some(was) = self.retiring_costs.remove(&key) {
            if let Some(change) = value {
                self.revive_cost(key, was, change as i64, input);
            }
            return Ok(false);
        }
        let end = self.cost_end(&key);
        if let Some(bucket) = self.costs.get_mut(&end)
            && let Some(held) = bucket.get_mut(&key)
        {
            match value {
                Some(c) => *held = c as i64,
                None => {
                    bucket.remove(&key);
                }
            }
            return Ok(true);
        }
        if let Some(change) = value {
            if end <= self.retired_through_ms {
                let was = match self
                    .unwritten_costs
                    .get(&key)
                    .or_else(|| self.writing_costs.get(&key))
                {
                    Some(was) => Some(*was),
                    None => retired.cost(&key)?,
                };
                if let Some(was) = was.filter(|was| *was != 0) {
                    self.revive_cost(key, was, change as i64, input);
                    return Ok(false);
                }
            }
            self.hold_cost(key, change as i64);
        }
        Ok(true)
    }

    /// [`OpenTotals::revive`] for a window's cost.
    fn revive_cost(
        &mut self,
        key: CostIdx,
        was: i64,
        now: i64,
        input: &mut InputSession<Time, Summary, isize>,
    ) {
        input.update(Summary::CostCarried(key), was as isize);
        self.unwritten_costs.insert(key, 0);
        self.hold_cost(key, now);
        self.reviving_costs.insert(key);
        self.revived += 1;
    }

    /// Takes every held total whose window ends by `frontier_ms` out of the dataflow (fed to
    /// `input` for the next epoch), except those brought back this epoch and not yet sent.
    pub fn retire(&mut self, frontier_ms: i64, input: &mut InputSession<Time, Summary, isize>) {
        self.retired_through_ms = self.retired_through_ms.max(frontier_ms);
        let ends: Vec<i64> = self.totals.range(..=frontier_ms).map(|(e, _)| *e).collect();
        for end in ends {
            let bucket = self.totals.remove(&end).unwrap_or_default();
            let mut kept = FastMap::default();
            for (key, m) in bucket {
                if self.reviving.contains(&key) {
                    kept.insert(key, m);
                    continue;
                }
                for (part, amount) in parts(&key, m) {
                    input.update(Summary::Level(key, part), -amount as isize);
                }
                if key.1.is_none() {
                    let cost = (self.cost_of)(key.0.item, m.total);
                    if cost != 0 {
                        input.update(Summary::CostCarried(cost_key(&key)), cost as isize);
                    }
                }
                self.retiring.insert(key, m);
                self.unwritten_totals.insert(key, m);
                self.retired += 1;
            }
            if !kept.is_empty() {
                self.totals.insert(end, kept);
            }
        }
        let ends: Vec<i64> = self.costs.range(..=frontier_ms).map(|(e, _)| *e).collect();
        for end in ends {
            let bucket = self.costs.remove(&end).unwrap_or_default();
            let mut kept = FastMap::default();
            for (key, c) in bucket {
                if self.reviving_costs.contains(&key) {
                    kept.insert(key, c);
                    continue;
                }
                input.update(Summary::CostCarried(key), -c as isize);
                self.retiring_costs.insert(key, c);
                self.unwritten_costs.insert(key, c);
                self.retired += 1;
            }
            if !kept.is_empty() {
                self.costs.insert(end, kept);
            }
        }
    }

    /// The totals retired since the last call, for a checkpoint; they are still found here
    /// until [`OpenTotals::written`] says the checkpoint is in the store.
    pub fn take_unwritten(&mut self) -> Retired {
        let totals: Vec<(LevelIdx, Measured)> = self.unwritten_totals.drain().collect();
        let costs: Vec<(CostIdx, i64)> = self.unwritten_costs.drain().collect();
        self.writing_totals.extend(totals.iter().copied());
        self.writing_costs.extend(costs.iter().copied());
        Retired { totals, costs }
    }

    /// Every checkpoint taken so far is in the store.
    pub fn written(&mut self) {
        self.writing_totals.clear();
        self.writing_costs.clear();
    }
}
