//! The billing ledger: what has been billed per key, and what is due.
//!
//! A billing window is charged once the event-time frontier (the latest agent watermark less
//! the allowed lateness) has passed its end; a later change of its total (a late sample) is
//! billed as an adjustment carrying the difference. Every record has a revision, 0 for the
//! charge and 1, 2, … for adjustments, and an id derived from (key, window, revision), so the
//! quantities of a key's records always add up to its latest total and a consumer can drop
//! a record it has seen. The costs add up the same way: each record's cost is the cost of the
//! new total less the cost of the total billed before it, so rounding never accumulates.
//!
//! The ledger is pure; [`crate::checkpoint`] stores its entries and [`crate::runner`] rebuilds
//! the entries written after the last checkpoint from the billing topic itself, which is what
//! makes a restarted processor re-emit only what is missing.

use std::collections::{BTreeMap, HashMap, HashSet};

use meterflow_schemas::id::{StableId, StrongId};
use meterflow_schemas::{BillingKind, BillingRecord};
use serde::{Deserialize, Serialize};

use crate::model::{Aggregate, BillingKey};
use crate::prices::PriceBook;

/// What has been billed for one key: the latest revision and the quantity billed in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billed {
    pub revision: i64,
    pub quantity: i64,
}

impl Billed {
    /// Folds a record of the billing topic into what was billed before it; a record whose
    /// revision is not newer is one already counted, and changes nothing.
    pub fn apply(previous: Option<Self>, record: &BillingRecord) -> Option<Self> {
        match previous {
            Some(b) if b.revision >= record.revision => None,
            _ => Some(Self {
                revision: record.revision,
                quantity: previous.map_or(0, |b| b.quantity) + record.quantity,
            }),
        }
    }
}

/// One record due: the key, its revision, the new total and the quantity billed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub key: BillingKey,
    pub revision: i64,
    pub total: i64,
    pub billed_before: i64,
}

impl Due {
    /// The record on the wire.
    pub fn record(&self, billing_window_ms: i64, prices: &PriceBook) -> BillingRecord {
        let cost = |q| prices.cost_micros(&self.key, q);
        BillingRecord {
            id: record_id(&self.key, self.revision),
            kind: if self.revision == 0 {
                BillingKind::Charge
            } else {
                BillingKind::Adjustment
            },
            tenant: self.key.tenant.clone(),
            lease: self.key.lease.clone(),
            item: self.key.item(),
            window_start_ms: self.key.window_start_ms,
            window_end_ms: self.key.window_start_ms + billing_window_ms,
            revision: self.revision,
            quantity: self.total - self.billed_before,
            scale: self.key.metric.scale(),
            price_book_version: prices.version.clone(),
            cost_micros: cost(self.total) - cost(self.billed_before),
            currency: prices.currency.clone(),
        }
    }
}

/// The Kafka key of every record of one billing key: they land on one partition, in order.
pub fn partition_key(key: &BillingKey) -> String {
    StableId::new("billing-key")
        .str(&key.tenant)
        .str(&key.lease)
        .str(&key.item())
        .int(key.window_start_ms)
        .hex()
}

/// The id of one record: (key, window, revision), 128 bits of SHA-256. Billing systems
/// deduplicate by it across all tenants, so no tenant's choice of names may make one of its
/// records collide with another's (a 64-bit FNV-1a id could be aimed at).
pub fn record_id(key: &BillingKey, revision: i64) -> String {
    StrongId::new("billing")
        .str(&key.tenant)
        .str(&key.lease)
        .str(&key.item())
        .int(key.window_start_ms)
        .int(revision)
        .hex()
}

/// The least billing key: with a window end, the first entry of `Ledger::unbilled` at or
/// after that end.
fn first_key() -> BillingKey {
    BillingKey {
        tenant: String::new(),
        lease: String::new(),
        metric: Aggregate::GpuSeconds,
        gpu_class: String::new(),
        mig_profile: String::new(),
        window_start_ms: i64::MIN,
    }
}

/// One worker's ledger over the billing keys the dataflow routes to it.
#[derive(Debug)]
pub struct Ledger {
    billing_window_ms: i64,
    /// What has been billed, for the keys looked at so far.
    billed: HashMap<BillingKey, Option<Billed>>,
    /// Totals that differ from what was billed, by window end.
    unbilled: BTreeMap<(i64, BillingKey), i64>,
    dirty: HashSet<BillingKey>,
    /// Totals of windows in closed billing periods already set aside (see
    /// [`Ledger::set_aside`]), so that each change is reported once.
    set_aside: HashMap<BillingKey, i64>,
}

impl Ledger {
    pub fn new(billing_window_ms: i64) -> Self {
        Self {
            billing_window_ms,
            billed: HashMap::new(),
            unbilled: BTreeMap::new(),
            dirty: HashSet::new(),
            set_aside: HashMap::new(),
        }
    }

    /// Records the dataflow's latest total for `key`; `load` says what was billed for it
    /// before this ledger looked (from the checkpoint).
    pub fn set_total(
        &mut self,
        key: BillingKey,
        total: i64,
        load: impl FnOnce(&BillingKey) -> Option<Billed>,
    ) {
        let billed = *self
            .billed
            .entry(key.clone())
            .or_insert_with_key(|k| load(k));
        let end = key.window_start_ms + self.billing_window_ms;
        if total == billed.map_or(0, |b| b.quantity) {
            self.unbilled.remove(&(end, key));
        } else {
            self.unbilled.insert((end, key), total);
        }
    }

    /// Whether the ledger has looked at `key` before (and so needs no `load` for it).
    pub fn knows(&self, key: &BillingKey) -> bool {
        self.billed.contains_key(key)
    }

    /// Takes the records due once the frontier is at `frontier_ms`: every window that ended
    /// by then and whose total differs from what was billed.
    pub fn due(&mut self, frontier_ms: i64) -> Vec<Due> {
        let later = self
            .unbilled
            .split_off(&(frontier_ms.saturating_add(1), first_key()));
        let due = std::mem::replace(&mut self.unbilled, later);
        due.into_iter()
            .map(|((_, key), total)| {
                let before = self.billed.get(&key).copied().flatten();
                let revision = before.map_or(0, |b| b.revision + 1);
                let billed_before = before.map_or(0, |b| b.quantity);
                self.billed.insert(
                    key.clone(),
                    Some(Billed {
                        revision,
                        quantity: total,
                    }),
                );
                self.dirty.insert(key.clone());
                Due {
                    key,
                    revision,
                    total,
                    billed_before,
                }
            })
            .collect()
    }

    /// Takes the changes of windows starting before `closed_before_ms` (billing periods that
    /// are closed) out of what is due, unbilled: each as the record it would have been, for
    /// an operator to judge. What was billed stays as it was (revisions keep no gaps); a total
    /// already set aside is not set aside again.
    pub fn set_aside(&mut self, closed_before_ms: i64) -> Vec<Due> {
        let closed: Vec<(i64, BillingKey)> = self
            .unbilled
            .range(
                ..(
                    closed_before_ms.saturating_add(self.billing_window_ms),
                    first_key(),
                ),
            )
            .map(|(k, _)| k)
            .filter(|(_, key)| key.window_start_ms < closed_before_ms)
            .cloned()
            .collect();
        let mut out = Vec::new();
        for entry in closed {
            let total = self.unbilled.remove(&entry).expect("listed just above");
            let key = entry.1;
            if self.set_aside.insert(key.clone(), total) == Some(total) {
                continue;
            }
            let before = self.billed.get(&key).copied().flatten();
            out.push(Due {
                revision: before.map_or(0, |b| b.revision + 1),
                billed_before: before.map_or(0, |b| b.quantity),
                key,
                total,
            });
        }
        out
    }

    /// Entries changed since the last call, for the checkpoint.
    pub fn take_dirty(&mut self) -> Vec<(BillingKey, Billed)> {
        self.dirty
            .drain()
            .filter_map(|k| {
                let b = self.billed.get(&k).copied().flatten()?;
                Some((k, b))
            })
            .collect()
    }

    /// Keys whose billed amount is in memory.
    pub fn known(&self) -> usize {
        self.billed.len()
    }

    /// Keys whose total is not billed yet.
    pub fn pending(&self) -> usize {
        self.unbilled.len()
    }

    /// Forgets what was billed for windows that ended before `before_ms`, where the
    /// checkpoint holds it (not changed since the last [`Ledger::take_dirty`]) and nothing is
    /// pending: a later change to one loads it again through [`Ledger::set_total`]'s `load`.
    /// Only for a ledger whose `load` reads the store. Returns how many were forgotten.
    pub fn retire(&mut self, before_ms: i64) -> usize {
        let window_ms = self.billing_window_ms;
        let pending: HashSet<&BillingKey> = self.unbilled.keys().map(|(_, k)| k).collect();
        let old: Vec<BillingKey> = self
            .billed
            .keys()
            .filter(|k| {
                k.window_start_ms.saturating_add(window_ms) < before_ms
                    && !self.dirty.contains(*k)
                    && !pending.contains(k)
            })
            .cloned()
            .collect();
        for k in &old {
            self.billed.remove(k);
        }
        if self.billed.len() * 4 < self.billed.capacity() {
            self.billed.shrink_to_fit();
        }
        old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn key(window: i64) -> BillingKey {
        BillingKey {
            tenant: "t".into(),
            lease: "l".into(),
            metric: Aggregate::GpuSeconds,
            gpu_class: "h100".into(),
            mig_profile: String::new(),
            window_start_ms: window,
        }
    }

    #[test]
    fn changes_to_closed_periods_are_set_aside_once_and_never_billed() {
        let mut ledger = Ledger::new(HOUR);
        // Hour 0 was billed 100 (revision 0); it now totals 130. Hours 0 and 1 are in a closed
        // period (closed before hour 2), hour 2 is open and new.
        ledger.set_total(key(0), 130, |_| {
            Some(Billed {
                revision: 0,
                quantity: 100,
            })
        });
        ledger.set_total(key(HOUR), 50, |_| None);
        ledger.set_total(key(2 * HOUR), 70, |_| None);
        let aside = ledger.set_aside(2 * HOUR);
        assert_eq!(
            aside,
            vec![
                Due {
                    key: key(0),
                    revision: 1,
                    total: 130,
                    billed_before: 100
                },
                Due {
                    key: key(HOUR),
                    revision: 0,
                    total: 50,
                    billed_before: 0
                },
            ]
        );
        // Only the open hour is billed; what was billed of hour 0 is unchanged.
        let due = ledger.due(10 * HOUR);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].key.window_start_ms, due[0].revision), (2 * HOUR, 0));
        let dirty: Vec<_> = ledger.take_dirty();
        assert_eq!(dirty.len(), 1, "{dirty:?}");
        // The same total again is not set aside again; another is, still not billed.
        ledger.set_total(key(HOUR), 50, |_| None);
        assert!(ledger.set_aside(2 * HOUR).is_empty());
        ledger.set_total(key(HOUR), 60, |_| None);
        let again = ledger.set_aside(2 * HOUR);
        assert_eq!((again.len(), again[0].revision, again[0].total), (1, 0, 60));
        assert!(ledger.due(10 * HOUR).is_empty());
    }

    #[test]
    fn a_window_is_charged_once_closed_and_a_late_change_is_an_adjustment() {
        let mut l = Ledger::new(HOUR);
        l.set_total(key(0), 1_000, |_| None);
        l.set_total(key(HOUR), 50, |_| None);
        assert!(l.due(HOUR - 1).is_empty(), "the first hour is still open");
        l.set_total(key(0), 1_500, |_| None);
        let charged = l.due(HOUR);
        assert_eq!(
            charged,
            vec![Due {
                key: key(0),
                revision: 0,
                total: 1_500,
                billed_before: 0
            }]
        );
        assert!(l.due(HOUR).is_empty(), "nothing twice");
        l.set_total(key(0), 1_200, |_| None);
        let adjusted = l.due(HOUR);
        assert_eq!(adjusted[0].revision, 1);
        let prices = PriceBook::default();
        assert_eq!(adjusted[0].record(HOUR, &prices).quantity, -300);
        assert_eq!(
            adjusted[0].record(HOUR, &prices).kind,
            BillingKind::Adjustment
        );
        assert_eq!(l.pending(), 1, "the second hour waits");
        assert_eq!(l.take_dirty().len(), 1);
    }

    #[test]
    fn what_the_checkpoint_says_was_billed_is_not_billed_again() {
        let mut l = Ledger::new(HOUR);
        let stored = Billed {
            revision: 2,
            quantity: 700,
        };
        l.set_total(key(0), 700, |_| Some(stored));
        assert!(l.due(i64::MAX).is_empty());
        l.set_total(key(0), 900, |_| unreachable!("loaded once"));
        let due = l.due(i64::MAX);
        assert_eq!((due[0].revision, due[0].billed_before), (3, 700));
    }

    #[test]
    fn records_replayed_from_the_topic_are_counted_once() {
        let prices = PriceBook::default();
        let r0 = Due {
            key: key(0),
            revision: 0,
            total: 100,
            billed_before: 0,
        }
        .record(HOUR, &prices);
        let r1 = Due {
            key: key(0),
            revision: 1,
            total: 160,
            billed_before: 100,
        }
        .record(HOUR, &prices);
        let b0 = Billed::apply(None, &r0).expect("new");
        let b1 = Billed::apply(Some(b0), &r1).expect("newer");
        assert_eq!(
            b1,
            Billed {
                revision: 1,
                quantity: 160
            }
        );
        assert_eq!(Billed::apply(Some(b1), &r0), None);
        assert_eq!(Billed::apply(Some(b1), &r1), None);
        assert_ne!(r0.id, r1.id);
        assert_eq!(partition_key(&key(0)), partition_key(&key(0)));
    }

    #[test]
    fn a_forgotten_window_is_loaded_again_and_adjusted_from_what_was_billed() {
        let mut l = Ledger::new(HOUR);
        l.set_total(key(0), 1_000, |_| None);
        assert_eq!(l.due(HOUR).len(), 1);
        assert_eq!(l.retire(i64::MAX), 0, "not checkpointed yet");
        let stored: HashMap<BillingKey, Billed> = l.take_dirty().into_iter().collect();
        assert_eq!(l.retire(HOUR), 0, "the window has not ended before that");
        assert_eq!(l.retire(HOUR + 1), 1);
        assert!(!l.knows(&key(0)));
        // A late change: loaded from the store, billed as revision 1 of the difference.
        l.set_total(key(0), 1_200, |k| stored.get(k).copied());
        let adjusted = l.due(2 * HOUR);
        assert_eq!(
            adjusted
                .iter()
                .map(|d| (d.revision, d.total, d.billed_before))
                .collect::<Vec<_>>(),
            vec![(1, 1_200, 1_000)]
        );
    }
}
