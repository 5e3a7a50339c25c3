//! Closed windows leave the dataflow.
//!
//! Every total the dataflow holds (per base window, per hour, day and month roll-up, the cost
//! of each base window, and per lease, item and billing window) stays in its arrangements while
//! it can still change. Once the closing frontier (the cluster's newest agent watermark less
//! the allowed lateness, never ahead of the clock) has passed the end of a total's window,
//! [`OpenTotals::retire`] takes it out: its value, negated, is fed to its own level alone
//! ([`Summary::Level`], [`Summary::CostCarried`], [`Summary::Billed`]), so the arrangements
//! consolidate it away; the retraction that follows is not sent (the value stays where it went:
//! the usage topic and the sinks, the ledger), and the value goes to the checkpoint store. What
//! a total adds to a total downstream is carried into it as the total leaves (a base total's
//! cost into its window's cost, a billing total's cost into its tenant's month), so that one
//! does not move.
//!
//! A change can still reach a retired total: an agent replaying its spool after an outage is
//! judged by its own watermark, not the cluster's; a gauge reading after a gap holds the level
//! across the windows behind it; an allocation first seen late started in the past. The total
//! then reappears in the dataflow holding the change alone. [`OpenTotals::sift`] sees a changed
//! total it does not hold whose window has closed, finds its retired value (not yet
//! checkpointed, or in the store) and brings it back: the value is fed to its level again and
//! what it carried withdrawn, and the sum of the retired value and the change is sent at once
//! (a window's cost, which depends on the base totals brought back with it, the next epoch).
//! Nothing is lost or counted twice: the property test in [`crate::dataflow`] retires every
//! total after every epoch and still gets the oracle's totals. Retired values serve the run
//! that retired them: a new run restores every window and retires the closed ones again.
//!
//! Each worker keeps the totals its dataflow outputs (the keys its operators own), by the end of
//! their window, so a retirement takes whole buckets.

use std::collections::BTreeMap;
use std::hash::Hash;

use differential_dataflow::input::InputSession;

use crate::budgets::month_start_ms;
use crate::dataflow::{CostIdx, Costing, LevelIdx, Measured, RollupIdx, Time};
use crate::model::{Kind, Part, Summary};
use crate::names::{BillingIdx, ItemId, Names, UsageIdx};
use crate::series::FastMap;

/// Where retired totals are found again: the checkpoint store.
pub trait RetiredTotals {
    type Error;
    /// The value `key` had when it was retired.
    fn total(&self, key: &LevelIdx) -> Result<Option<Measured>, Self::Error>;
    /// The cost a window had when it was retired.
    fn cost(&self, key: &CostIdx) -> Result<Option<i64>, Self::Error>;
    /// The billing total a key had when it was retired.
    fn billed(&self, key: &BillingIdx) -> Result<Option<i64>, Self::Error>;
}

/// Totals retired since the last checkpoint was written, for the next one.
#[derive(Debug, Default, Clone)]
pub struct Retired {
    pub totals: Vec<(LevelIdx, Measured)>,
    pub costs: Vec<(CostIdx, i64)>,
    pub billing: Vec<(BillingIdx, i64)>,
}

/// One epoch's values to send: per base window, per roll-up, per window's cost and per billing
/// key (`None`: the value is gone from the window).
pub type Sifted = (
    BTreeMap<UsageIdx, Option<Measured>>,
    BTreeMap<RollupIdx, Option<Measured>>,
    BTreeMap<CostIdx, Option<isize>>,
    BTreeMap<BillingIdx, Option<isize>>,
);

/// One epoch's changes of the totals, as the dataflow output them.
pub type TotalChanges = (
    Vec<((UsageIdx, Measured), Time, isize)>,
    Vec<((RollupIdx, Measured), Time, isize)>,
    Vec<((CostIdx, isize), Time, isize)>,
    Vec<((BillingIdx, isize), Time, isize)>,
);

/// A retired value that is spent (brought back since): written to the store as a deletion.
pub const NOTHING: Measured = Measured {
    total: 0,
    observed_ms: 0,
    present_ms: 0,
};

/// A total's value, with the one that stands for a spent retired value.
trait Value: Copy + PartialEq {
    const SPENT: Self;
}

impl Value for Measured {
    const SPENT: Self = NOTHING;
}

impl Value for i64 {
    const SPENT: Self = 0;
}

/// What becomes of one changed total.
enum Sift<V> {
    /// Its value is sent.
    Send,
    /// Its retraction was its retirement: nothing is sent.
    Retired,
    /// A change reached it once retired: `was` goes back in, and the dataflow now holds `now`.
    Revive { was: V, now: V },
}

/// The totals of one kind a worker holds, and those it took out.
struct Kept<K, V> {
    /// Held totals by the end of their window.
    held: BTreeMap<i64, FastMap<K, V>>,
    /// Negated at the last retirement, with the value they had: their retraction is not sent.
    retiring: FastMap<K, V>,
    /// Brought back this epoch, with what the dataflow held before the retired value went back
    /// in: not retired before the next epoch, which shows their value.
    reviving: FastMap<K, V>,
    /// Retired and not yet in a checkpoint; then in one being written.
    unwritten: FastMap<K, V>,
    writing: FastMap<K, V>,
}

impl<K: Copy + Eq + Hash, V: Value> Kept<K, V> {
    /// How many totals are held.
    fn count(&self) -> usize {
        self.held.values().map(|bucket| bucket.len()).sum()
    }

    fn new() -> Self {
        Self {
            held: BTreeMap::new(),
            retiring: FastMap::default(),
            reviving: FastMap::default(),
            unwritten: FastMap::default(),
            writing: FastMap::default(),
        }
    }

    fn len(&self) -> usize {
        self.held.values().map(FastMap::len).sum()
    }

    fn hold(&mut self, end: i64, key: K, value: V) {
        self.held.entry(end).or_default().insert(key, value);
    }

    /// What becomes of `key` (its window ending at `end`) changed to `value`; `stored` finds
    /// a value retired before the last checkpoint.
    fn sift<E>(
        &mut self,
        key: K,
        end: i64,
        value: Option<V>,
        retired_through_ms: i64,
        stored: impl FnOnce(&K) -> Result<Option<V>, E>,
    ) -> Result<Sift<V>, E> {
        if let Some(was) = self.retiring.remove(&key) {
            // Taken out: the value sent stands. Changed as it was taken out: brought back.
            return Ok(match value {
                None => Sift::Retired,
                Some(now) => Sift::Revive { was, now },
            });
        }
        if let Some(bucket) = self.held.get_mut(&end)
            && let Some(held) = bucket.get_mut(&key)
        {
            match value {
                Some(v) => *held = v,
                None => {
                    bucket.remove(&key);
                }
            }
            return Ok(Sift::Send);
        }
        if let Some(now) = value {
            if end <= retired_through_ms {
                let was = match self.unwritten.get(&key).or_else(|| self.writing.get(&key)) {
                    Some(was) => Some(*was),
                    None => stored(&key)?,
                };
                if let Some(was) = was.filter(|was| *was != V::SPENT) {
                    return Ok(Sift::Revive { was, now });
                }
            }
            self.hold(end, key, now);
        }
        Ok(Sift::Send)
    }

    /// `key` is brought back, held at `value` (the sum, sent now, or for a cost what the
    /// dataflow holds, `now`, sent the next epoch).
    fn revived(&mut self, end: i64, key: K, value: V, now: V) {
        // What the store holds of it is spent: should the total leave the dataflow by going to
        // nothing (no retirement writes it then), a later change must not bring it back again.
        self.unwritten.insert(key, V::SPENT);
        self.hold(end, key, value);
        self.reviving.insert(key, now);
    }

    /// Those brought back last epoch: the next epoch shows their value with the retired one
    /// added, and if it shows no change, what else came cancelled the retired value and the
    /// dataflow holds what it held then. Returns those, held at that value.
    fn due(&mut self, end: impl Fn(&K) -> i64, changed: impl Fn(&K) -> bool) -> Vec<(K, V)> {
        let mut due = Vec::new();
        for (key, now) in std::mem::take(&mut self.reviving) {
            if !changed(&key) {
                self.hold(end(&key), key, now);
                due.push((key, now));
            }
        }
        due
    }

    /// Those taken out at the last retirement whose value showed no change: a change as large
    /// as the value reached each in the same epoch, and the dataflow holds it.
    fn unchanged(&mut self) -> Vec<(K, V)> {
        self.retiring.drain().collect()
    }

    /// Takes the held totals whose window ends by `frontier_ms`, except those brought back this
    /// epoch (the dataflow does not hold their value yet), as retiring and to be written.
    fn take_closed(&mut self, frontier_ms: i64) -> Vec<(K, V)> {
        let ends: Vec<i64> = self.held.range(..=frontier_ms).map(|(e, _)| *e).collect();
        let mut closed = Vec::new();
        for end in ends {
            let mut bucket = self.held.remove(&end).unwrap_or_default();
            if !self.reviving.is_empty() {
                let kept: FastMap<K, V> = bucket
                    .extract_if(|k, _| self.reviving.contains_key(k))
                    .collect();
                if !kept.is_empty() {
                    self.held.insert(end, kept);
                }
            }
            for (key, value) in bucket {
                self.retiring.insert(key, value);
                self.unwritten.insert(key, value);
                closed.push((key, value));
            }
        }
        closed
    }

    fn take_unwritten(&mut self) -> Vec<(K, V)> {
        let taken: Vec<(K, V)> = self.unwritten.drain().collect();
        self.writing.extend(taken.iter().copied());
        taken
    }
}

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

/// The end of a total's window, for base windows of `window_ms`.
fn level_end(window_ms: i64, (k, level): &LevelIdx) -> i64 {
    match level {
        None => k.window_start_ms + window_ms,
        Some(r) => r.end(k.window_start_ms),
    }
}

/// Puts a base or roll-up total's value among those to send.
fn send_total(sent: &mut Sifted, key: LevelIdx, value: Option<Measured>) {
    match key {
        (k, None) => sent.0.insert(k, value),
        (k, Some(r)) => sent.1.insert((k, r), value),
    };
}

fn cost_key((k, _): &LevelIdx) -> CostIdx {
    (k.owner, k.lease, k.window_start_ms)
}

/// The totals one worker's dataflow holds, and those it took out (see the module's doc).
pub struct OpenTotals {
    window_ms: i64,
    billing_window_ms: i64,
    names: std::sync::Arc<Names>,
    cost_of: Box<dyn Fn(ItemId, i64) -> i64>,
    totals: Kept<LevelIdx, Measured>,
    costs: Kept<CostIdx, i64>,
    billing: Kept<BillingIdx, i64>,
    /// The frontier of the latest retirement: a total not held whose window ends by it may
    /// have been retired.
    retired_through_ms: i64,
    retired: u64,
    revived: u64,
}

impl OpenTotals {
    /// How many totals of open windows are held (usage totals and roll-ups, costs, billing
    /// totals), for `/metrics`.
    pub fn count(&self) -> [(&'static str, i64); 3] {
        [
            ("open_totals", self.totals.count() as i64),
            ("open_costs", self.costs.count() as i64),
            ("open_billing_totals", self.billing.count() as i64),
        ]
    }

    /// Totals of base windows of `window_ms` and billing windows of `billing_window_ms`, costs
    /// priced by `costing` (as the dataflow's).
    pub fn new(window_ms: i64, billing_window_ms: i64, costing: &Costing) -> Self {
        Self {
            window_ms,
            billing_window_ms,
            names: costing.names.clone(),
            cost_of: Box::new(costing.pricer()),
            totals: Kept::new(),
            costs: Kept::new(),
            billing: Kept::new(),
            retired_through_ms: i64::MIN,
            retired: 0,
            revived: 0,
        }
    }

    fn end(&self, key: &LevelIdx) -> i64 {
        level_end(self.window_ms, key)
    }

    fn cost_end(&self, (_, _, start): &CostIdx) -> i64 {
        start + self.window_ms
    }

    fn billing_end(&self, key: &BillingIdx) -> i64 {
        key.window_start_ms + self.billing_window_ms
    }

    /// How many totals are held.
    pub fn held(&self) -> usize {
        self.totals.len() + self.costs.len() + self.billing.len()
    }

    /// Totals retired and brought back since the last look.
    pub fn take_counts(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.retired),
            std::mem::take(&mut self.revived),
        )
    }

    /// Whether every total brought back has shown its value in the dataflow: a worker that
    /// stops waits for it. Checkpoints do not (late input arriving epoch after epoch would hold
    /// them back for as long): a process killed in that one epoch leaves the sinks a window's
    /// cost brought back as it was before the change, or a total whose next change cancelled
    /// the value brought back at the sum sent, until the window changes again; its restored
    /// state holds the right value, and billing and the other totals are sent as they come
    /// back.
    pub fn settled(&self) -> bool {
        self.totals.reviving.is_empty()
            && self.costs.reviving.is_empty()
            && self.billing.reviving.is_empty()
    }

    /// Holds the restored state's totals (the first epoch, whose values were sent before the
    /// checkpoint was written), without sending them; returns the billing totals, for the
    /// ledger.
    pub fn restored(&mut self, changes: TotalChanges) -> BTreeMap<BillingIdx, Option<isize>> {
        use crate::runner::latest_values;
        let (usage, rollups, costs, billing) = changes;
        for (k, m) in latest_values(usage) {
            if let Some(m) = m {
                self.totals.hold(self.end(&(k, None)), (k, None), m);
            }
        }
        for ((k, r), m) in latest_values(rollups) {
            if let Some(m) = m {
                self.totals.hold(self.end(&(k, Some(r))), (k, Some(r)), m);
            }
        }
        for (k, c) in latest_values(costs) {
            if let Some(c) = c {
                self.costs.hold(self.cost_end(&k), k, c as i64);
            }
        }
        let billing = latest_values(billing);
        for (k, q) in &billing {
            if let Some(q) = q {
                self.billing.hold(self.billing_end(k), *k, *q as i64);
            }
        }
        billing
    }

    /// One epoch's changed totals → the values to send (see the module's doc); totals brought
    /// back are fed to `input`.
    pub fn sift<R: RetiredTotals>(
        &mut self,
        (usage, rollups, costs, billing): TotalChanges,
        input: &mut InputSession<Time, Summary, isize>,
        retired: &R,
    ) -> Result<Sifted, R::Error> {
        use crate::runner::latest_values;
        let (through, window_ms, billing_window_ms) = (
            self.retired_through_ms,
            self.window_ms,
            self.billing_window_ms,
        );
        let (usage, rollups, costs, billing) = (
            latest_values(usage),
            latest_values(rollups),
            latest_values(costs),
            latest_values(billing),
        );
        let due = (
            self.totals.due(
                |k| level_end(window_ms, k),
                |k| match k {
                    (k, None) => usage.contains_key(k),
                    (k, Some(r)) => rollups.contains_key(&(*k, *r)),
                },
            ),
            self.costs
                .due(|(_, _, start)| start + window_ms, |k| costs.contains_key(k)),
            self.billing.due(
                |k| k.window_start_ms + billing_window_ms,
                |k| billing.contains_key(k),
            ),
        );
        let mut sent: Sifted = Default::default();
        let totals = (usage.into_iter().map(|(k, m)| ((k, None), m)))
            .chain(rollups.into_iter().map(|((k, r), m)| ((k, Some(r)), m)));
        for (key, m) in totals {
            let end = self.end(&key);
            let value = match self
                .totals
                .sift(key, end, m, through, |k| retired.total(k))?
            {
                Sift::Send => m,
                Sift::Retired => continue,
                Sift::Revive { was, now } => Some(self.revive_total(key, was, now, input)),
            };
            send_total(&mut sent, key, value);
        }
        for (key, c) in costs {
            let end = self.cost_end(&key);
            let value = c.map(|c| c as i64);
            match self
                .costs
                .sift(key, end, value, through, |k| retired.cost(k))?
            {
                Sift::Send => {
                    sent.2.insert(key, c);
                }
                Sift::Retired => {}
                Sift::Revive { was, now } => self.revive_cost(key, was, now, input),
            }
        }
        for (key, q) in billing {
            let end = self.billing_end(&key);
            let value = q.map(|q| q as i64);
            let value = match self
                .billing
                .sift(key, end, value, through, |k| retired.billed(k))?
            {
                Sift::Send => q,
                Sift::Retired => continue,
                Sift::Revive { was, now } => {
                    Some(self.revive_billing(key, was, now, input) as isize)
                }
            };
            sent.3.insert(key, value);
        }
        // Brought back last epoch and not changed since: what else came cancelled the retired
        // value (or, for a cost, its value is known only now).
        for (key, m) in due.0 {
            send_total(&mut sent, key, Some(m));
        }
        for (key, c) in due.1 {
            sent.2.insert(key, Some(c as isize));
        }
        for (key, q) in due.2 {
            sent.3.insert(key, Some(q as isize));
        }
        for (key, was) in self.totals.unchanged() {
            let sum = self.revive_total(key, was, was, input);
            send_total(&mut sent, key, Some(sum));
        }
        for (key, was) in self.costs.unchanged() {
            self.revive_cost(key, was, was, input);
        }
        for (key, was) in self.billing.unchanged() {
            let sum = self.revive_billing(key, was, was, input);
            sent.3.insert(key, Some(sum as isize));
        }
        Ok(sent)
    }

    /// Feeds `value` (times `sign`) to the total's level alone, and what its cost carries the
    /// other way.
    fn feed_total(
        &self,
        key: LevelIdx,
        value: Measured,
        sign: isize,
        input: &mut InputSession<Time, Summary, isize>,
    ) {
        for (part, amount) in parts(&key, value) {
            input.update(Summary::Level(key, part), sign * amount as isize);
        }
        if key.1.is_none() {
            let cost = (self.cost_of)(key.0.item, value.total);
            if cost != 0 {
                input.update(Summary::CostCarried(cost_key(&key)), -sign * cost as isize);
            }
        }
    }

    /// [`OpenTotals::feed_total`] for a billing total, whose cost is carried into its tenant's
    /// month.
    fn feed_billing(
        &self,
        key: BillingIdx,
        quantity: i64,
        sign: isize,
        input: &mut InputSession<Time, Summary, isize>,
    ) {
        input.update(Summary::Billed(key), sign * quantity as isize);
        let cost = (self.cost_of)(key.item, quantity);
        if cost != 0 {
            let month = (
                self.names.tenant_of(key.lease),
                month_start_ms(key.window_start_ms),
            );
            input.update(Summary::PeriodCarried(month), -sign * cost as isize);
        }
    }

    /// Brings a retired total back: its value `was` fed to its level again; returns its value
    /// now, `was` and what the dataflow holds (`now`) added, to send.
    fn revive_total(
        &mut self,
        key: LevelIdx,
        was: Measured,
        now: Measured,
        input: &mut InputSession<Time, Summary, isize>,
    ) -> Measured {
        self.feed_total(key, was, 1, input);
        let sum = if key.0.metric.kind() == Kind::Gauge {
            Measured {
                total: was.total + now.total,
                observed_ms: was.observed_ms + now.observed_ms,
                present_ms: was.present_ms + now.present_ms,
            }
        } else {
            // An exact total covers its whole window either way.
            Measured {
                total: was.total + now.total,
                ..was
            }
        };
        self.totals.revived(self.end(&key), key, sum, now);
        self.revived += 1;
        sum
    }

    /// Brings a window's cost back. Its value depends on the base totals brought back with
    /// it, whose carried costs go back in with them: it is sent the next epoch.
    fn revive_cost(
        &mut self,
        key: CostIdx,
        was: i64,
        now: i64,
        input: &mut InputSession<Time, Summary, isize>,
    ) {
        input.update(Summary::CostCarried(key), was as isize);
        self.costs.revived(self.cost_end(&key), key, now, now);
        self.revived += 1;
    }

    /// [`OpenTotals::revive_total`] for a billing total.
    fn revive_billing(
        &mut self,
        key: BillingIdx,
        was: i64,
        now: i64,
        input: &mut InputSession<Time, Summary, isize>,
    ) -> i64 {
        self.feed_billing(key, was, 1, input);
        self.billing
            .revived(self.billing_end(&key), key, was + now, now);
        self.revived += 1;
        was + now
    }

    /// Takes every held total whose window ends by `frontier_ms` out of the dataflow (fed to
    /// `input` for the next epoch), except those brought back this epoch, whose value the
    /// dataflow does not hold yet.
    pub fn retire(&mut self, frontier_ms: i64, input: &mut InputSession<Time, Summary, isize>) {
        self.retired_through_ms = self.retired_through_ms.max(frontier_ms);
        for (key, value) in self.totals.take_closed(frontier_ms) {
            self.feed_total(key, value, -1, input);
            self.retired += 1;
        }
        for (key, value) in self.costs.take_closed(frontier_ms) {
            input.update(Summary::CostCarried(key), -value as isize);
            self.retired += 1;
        }
        for (key, value) in self.billing.take_closed(frontier_ms) {
            self.feed_billing(key, value, -1, input);
            self.retired += 1;
        }
    }

    /// The totals retired since the last call, for a checkpoint; they are still found here
    /// until [`OpenTotals::written`] says the checkpoint is in the store.
    pub fn take_unwritten(&mut self) -> Retired {
        Retired {
            totals: self.totals.take_unwritten(),
            costs: self.costs.take_unwritten(),
            billing: self.billing.take_unwritten(),
        }
    }

    /// Every checkpoint taken so far is in the store.
    pub fn written(&mut self) {
        self.totals.writing.clear();
        self.costs.writing.clear();
        self.billing.writing.clear();
    }
}
