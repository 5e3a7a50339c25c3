//! Names interned to small integers, so the dataflow sorts and compares integers, not strings.
//!
//! Differential dataflow sorts, compares and clones its records in every arrangement; with the
//! owners' and items' strings inside them, most of its time went to `memcmp` and the allocator.
//! The [`crate::series::Feeder`] interns each series' owner, lease and item once, when the
//! series first appears, and the dataflow carries only [`OwnerId`], [`LeaseId`] and [`ItemId`];
//! the runner turns results back into named keys before they leave the process.
//!
//! Ids are given in order of first appearance and are valid within one process only; they are
//! never written to a checkpoint or a topic.

use std::collections::HashMap;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::model::{Aggregate, BillingKey, Owner, SeriesRef, UsageKey};
use crate::prices::PriceBook;

/// An interned [`Owner`] (tenant, lease, service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OwnerId(pub u32);

/// An interned (tenant, lease): what billing is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u32);

/// An interned tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TenantId(pub u32);

/// An interned node name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u32);

/// An interned [`Item`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ItemId(pub u32);

/// What is measured: the aggregate, and for GPU time the class and MIG profile.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Item {
    pub metric: Aggregate,
    pub gpu_class: String,
    pub mig_profile: String,
}

/// The key of one usage total inside the dataflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UsageIdx {
    pub owner: OwnerId,
    pub lease: LeaseId,
    pub item: ItemId,
    /// The item's aggregate, so the dataflow can tell how it is measured without a lookup.
    pub metric: Aggregate,
    pub window_start_ms: i64,
}

impl UsageIdx {
    /// The usage key a series adds to in the window starting at `window_start_ms`.
    pub fn of(series: &SeriesRef, window_start_ms: i64) -> Self {
        Self {
            owner: series.owner,
            lease: series.lease,
            item: series.item,
            metric: series.metric,
            window_start_ms,
        }
    }
}

/// The key of one billing total inside the dataflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BillingIdx {
    pub lease: LeaseId,
    pub item: ItemId,
    pub window_start_ms: i64,
}

impl BillingIdx {
    /// The billing total a usage total adds to, for billing windows of `billing_window_ms`.
    pub fn of(usage: &UsageIdx, billing_window_ms: i64) -> Self {
        Self {
            lease: usage.lease,
            item: usage.item,
            window_start_ms: usage.window_start_ms.div_euclid(billing_window_ms)
                * billing_window_ms,
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    owners: Vec<(Owner, LeaseId)>,
    owner_ids: HashMap<Owner, OwnerId>,
    leases: Vec<(String, String)>,
    /// The tenant of each lease, by lease id.
    lease_tenants: Vec<TenantId>,
    tenants: Vec<String>,
    tenant_ids: HashMap<String, TenantId>,
    lease_ids: HashMap<(String, String), LeaseId>,
    items: Vec<Item>,
    item_ids: HashMap<Item, ItemId>,
    nodes: Vec<String>,
    node_ids: HashMap<String, NodeId>,
}

/// The interner shared by the workers of one process.
#[derive(Debug, Default)]
pub struct Names {
    tables: RwLock<Tables>,
}

impl Names {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of an owner and of its (tenant, lease).
    pub fn owner(&self, owner: &Owner) -> (OwnerId, LeaseId) {
        {
            // One read guard: taking a second one while a writer waits deadlocks.
            let t = self.read();
            if let Some(id) = t.owner_ids.get(owner) {
                return (*id, t.owners[id.0 as usize].1);
            }
        }
        let mut t = self.write();
        if let Some(id) = t.owner_ids.get(owner).copied() {
            return (id, t.owners[id.0 as usize].1);
        }
        let lease_key = (owner.tenant.clone(), owner.lease.clone());
        let lease = match t.lease_ids.get(&lease_key) {
            Some(l) => *l,
            None => {
                let l = LeaseId(t.leases.len() as u32);
                let tenant = match t.tenant_ids.get(&owner.tenant) {
                    Some(id) => *id,
                    None => {
                        let id = TenantId(t.tenants.len() as u32);
                        t.tenants.push(owner.tenant.clone());
                        t.tenant_ids.insert(owner.tenant.clone(), id);
                        id
                    }
                };
                t.lease_tenants.push(tenant);
                t.leases.push(lease_key.clone());
                t.lease_ids.insert(lease_key, l);
                l
            }
        };
        let id = OwnerId(t.owners.len() as u32);
        t.owners.push((owner.clone(), lease));
        t.owner_ids.insert(owner.clone(), id);
        (id, lease)
    }

    /// The id of an item.
    pub fn item(&self, item: &Item) -> ItemId {
        if let Some(id) = self.read().item_ids.get(item) {
            return *id;
        }
        let mut t = self.write();
        if let Some(id) = t.item_ids.get(item) {
            return *id;
        }
        let id = ItemId(t.items.len() as u32);
        t.items.push(item.clone());
        t.item_ids.insert(item.clone(), id);
        id
    }

    /// The id of a node.
    pub fn node(&self, node: &str) -> NodeId {
        if let Some(id) = self.read().node_ids.get(node) {
            return *id;
        }
        let mut t = self.write();
        if let Some(id) = t.node_ids.get(node) {
            return *id;
        }
        let id = NodeId(t.nodes.len() as u32);
        t.nodes.push(node.to_string());
        t.node_ids.insert(node.to_string(), id);
        id
    }

    /// The tenant a lease belongs to.
    pub fn tenant_of(&self, lease: LeaseId) -> TenantId {
        self.read().lease_tenants[lease.0 as usize]
    }

    /// The name of a tenant.
    pub fn tenant_name(&self, id: TenantId) -> String {
        self.read().tenants[id.0 as usize].clone()
    }

    /// The owner (tenant, lease, service) an id stands for.
    pub fn owner_named(&self, id: OwnerId) -> Owner {
        self.read().owners[id.0 as usize].0.clone()
    }

    /// The cost in micros of `quantity` of an item, as [`PriceBook::cost_micros`] prices it.
    pub fn cost_micros(&self, item: ItemId, quantity: i64, prices: &PriceBook) -> i64 {
        let t = self.read();
        let item = &t.items[item.0 as usize];
        prices.cost_of(item.metric, &item.gpu_class, &item.mig_profile, quantity)
    }

    /// The name of a node.
    pub fn node_name(&self, id: NodeId) -> String {
        self.read().nodes[id.0 as usize].clone()
    }

    /// The named key of a usage total.
    pub fn usage_key(&self, k: &UsageIdx) -> UsageKey {
        let t = self.read();
        let item = &t.items[k.item.0 as usize];
        UsageKey {
            owner: t.owners[k.owner.0 as usize].0.clone(),
            metric: item.metric,
            gpu_class: item.gpu_class.clone(),
            mig_profile: item.mig_profile.clone(),
            window_start_ms: k.window_start_ms,
        }
    }

    /// The named key of a billing total.
    pub fn billing_key(&self, k: &BillingIdx) -> BillingKey {
        let t = self.read();
        let item = &t.items[k.item.0 as usize];
        let (tenant, lease) = &t.leases[k.lease.0 as usize];
        BillingKey {
            tenant: tenant.clone(),
            lease: lease.clone(),
            metric: item.metric,
            gpu_class: item.gpu_class.clone(),
            mig_profile: item.mig_profile.clone(),
            window_start_ms: k.window_start_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(lease: &str, service: &str) -> Owner {
        Owner {
            tenant: "t".into(),
            lease: lease.into(),
            service: service.into(),
        }
    }

    #[test]
    fn workers_interning_at_once_agree_and_never_block_each_other() {
        let names = std::sync::Arc::new(Names::default());
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let names = names.clone();
                std::thread::spawn(move || {
                    (0..5_000)
                        .map(|i| {
                            // Each thread walks the same owners in its own order.
                            let n = (i * 7 + w * 1_250) % 5_000;
                            (
                                n,
                                names.owner(&owner(&format!("l{}", n / 2), &format!("s{n}"))),
                            )
                        })
                        .collect::<std::collections::BTreeMap<_, _>>()
                })
            })
            .collect();
        let seen: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("no panic"))
            .collect();
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "one id per owner");
        let ids: std::collections::BTreeSet<_> = seen[0].values().map(|(o, _)| *o).collect();
        assert_eq!(ids.len(), 5_000);
    }

    #[test]
    fn names_intern_once_and_come_back() {
        let names = Names::default();
        let (a, la) = names.owner(&owner("l1", "train"));
        let (b, lb) = names.owner(&owner("l1", "infer"));
        let (c, lc) = names.owner(&owner("l2", "train"));
        assert_ne!(c, a);
        assert_ne!(a, b);
        assert_eq!(la, lb, "two services of one lease bill to one lease");
        assert_eq!(names.tenant_name(names.tenant_of(lc)), "t");
        assert_eq!(names.tenant_of(la), names.tenant_of(lc));
        assert_eq!(names.owner_named(b), owner("l1", "infer"));
        assert_ne!(la, lc);
        assert_eq!(names.owner(&owner("l1", "train")), (a, la));
        let gpu = Item {
            metric: Aggregate::GpuSeconds,
            gpu_class: "h100".into(),
            mig_profile: String::new(),
        };
        let item = names.item(&gpu);
        assert_eq!(names.item(&gpu), item);
        let n = names.node("node-7");
        assert_eq!(names.node("node-7"), n);
        assert_ne!(names.node("node-8"), n);
        assert_eq!(names.node_name(n), "node-7");
        let usage = UsageIdx {
            owner: b,
            lease: lb,
            item,
            metric: Aggregate::GpuSeconds,
            window_start_ms: 7_200_000,
        };
        let key = names.usage_key(&usage);
        assert_eq!(key.owner, owner("l1", "infer"));
        assert_eq!(key.gpu_class, "h100");
        let bill = names.billing_key(&BillingIdx::of(&usage, 3_600_000));
        assert_eq!(
            (bill.lease.as_str(), bill.window_start_ms),
            ("l1", 7_200_000)
        );
    }
}
