//! Names interned to integers, so the dataflow sorts and compares integers, not strings.
//!
//! Differential dataflow sorts, compares and clones its records in every arrangement; with the
//! owners' and items' strings inside them, most of its time went to `memcmp` and the allocator.
//! The [`crate::series::Feeder`] interns each series' owner, lease and item once, when the
//! series first appears, and the dataflow carries only [`OwnerId`], [`LeaseId`] and [`ItemId`];
//! the runner turns results back into named keys before they leave the process.
//!
//! Ids are stable 64-bit hashes of the names, the same in every process, so workers of several
//! processes agree on them; each process learns every name through the dataflow (see
//! [`Name`]). Ids are never written to a checkpoint or a topic.

use std::collections::HashMap;
use std::sync::RwLock;

use meterflow_schemas::id::StableId;
use serde::{Deserialize, Serialize};

use crate::model::{Aggregate, BillingKey, Owner, SeriesRef, UsageKey};
use crate::prices::{PriceBook, Rate};

/// An interned [`Owner`] (tenant, lease, service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OwnerId(pub u64);

/// An interned (tenant, lease): what billing is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

/// An interned tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TenantId(pub u64);

/// An interned node name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// An interned [`Item`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ItemId(pub u64);

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

/// A name as the workers tell each other about it: every process learns every name, so that
/// any worker can name the totals the dataflow routes to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Name {
    Owner(Owner),
    Item(Item),
    Node(String),
}

#[derive(Debug, Default)]
struct Tables {
    owners: HashMap<OwnerId, (Owner, LeaseId)>,
    /// (tenant, lease) and the tenant's id, by lease id.
    leases: HashMap<LeaseId, (String, String, TenantId)>,
    tenants: HashMap<TenantId, String>,
    items: HashMap<ItemId, Item>,
    nodes: HashMap<NodeId, String>,
    /// Names registered here first, not yet handed to [`Names::take_fresh`].
    fresh: Vec<Name>,
}

/// The names of one process. Ids are stable hashes of the names (64-bit FNV-1a, domain
/// separated), the same in every process and every run; two names with one id are reported as
/// an error when the second is registered.
#[derive(Debug, Default)]
pub struct Names {
    tables: RwLock<Tables>,
}

fn owner_id(o: &Owner) -> OwnerId {
    OwnerId(
        StableId::new("owner")
            .str(&o.tenant)
            .str(&o.lease)
            .str(&o.service)
            .value(),
    )
}

fn lease_id(tenant: &str, lease: &str) -> LeaseId {
    LeaseId(StableId::new("lease").str(tenant).str(lease).value())
}

fn tenant_id(tenant: &str) -> TenantId {
    TenantId(StableId::new("tenant").str(tenant).value())
}

fn item_id(i: &Item) -> ItemId {
    ItemId(
        StableId::new("item")
            .str(i.metric.name())
            .str(&i.gpu_class)
            .str(&i.mig_profile)
            .value(),
    )
}

fn node_id(node: &str) -> NodeId {
    NodeId(StableId::new("node").str(node).value())
}

/// Inserts `name` under `id` unless present; reports a different name under the same id.
fn insert<K: std::hash::Hash + Eq + Copy + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    map: &mut HashMap<K, V>,
    id: K,
    name: V,
) -> bool {
    match map.get(&id) {
        Some(existing) if *existing == name => false,
        Some(existing) => {
            tracing::error!(
                ?id,
                ?existing,
                ?name,
                "two names hash to one id; the second is ignored"
            );
            false
        }
        None => {
            map.insert(id, name);
            true
        }
    }
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
        self.intern_owner(owner, true)
    }

    /// `tell`: whether a name new here goes to [`Names::take_fresh`].
    fn intern_owner(&self, owner: &Owner, tell: bool) -> (OwnerId, LeaseId) {
        let id = owner_id(owner);
        let lease = lease_id(&owner.tenant, &owner.lease);
        if self.read().owners.contains_key(&id) {
            return (id, lease);
        }
        let mut t = self.write();
        if insert(&mut t.owners, id, (owner.clone(), lease)) {
            let tenant = tenant_id(&owner.tenant);
            insert(&mut t.tenants, tenant, owner.tenant.clone());
            insert(
                &mut t.leases,
                lease,
                (owner.tenant.clone(), owner.lease.clone(), tenant),
            );
            if tell {
                t.fresh.push(Name::Owner(owner.clone()));
            }
        }
        (id, lease)
    }

    /// The id of an item.
    pub fn item(&self, item: &Item) -> ItemId {
        self.intern_item(item, true)
    }

    fn intern_item(&self, item: &Item, tell: bool) -> ItemId {
        let id = item_id(item);
        if self.read().items.contains_key(&id) {
            return id;
        }
        let mut t = self.write();
        if insert(&mut t.items, id, item.clone()) && tell {
            t.fresh.push(Name::Item(item.clone()));
        }
        id
    }

    /// The id of a node.
    pub fn node(&self, node: &str) -> NodeId {
        self.intern_node(node, true)
    }

    fn intern_node(&self, node: &str, tell: bool) -> NodeId {
        let id = node_id(node);
        if self.read().nodes.contains_key(&id) {
            return id;
        }
        let mut t = self.write();
        if insert(&mut t.nodes, id, node.to_string()) && tell {
            t.fresh.push(Name::Node(node.to_string()));
        }
        id
    }

    /// Registers a name another worker told of (registering one already known does nothing).
    pub fn register(&self, name: &Name) {
        match name {
            Name::Owner(o) => {
                self.intern_owner(o, false);
            }
            Name::Item(i) => {
                self.intern_item(i, false);
            }
            Name::Node(n) => {
                self.intern_node(n, false);
            }
        }
    }

    /// The names registered in this process first since the last call, to tell the others.
    pub fn take_fresh(&self) -> Vec<Name> {
        if self.read().fresh.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut self.write().fresh)
    }

    /// The tenant a lease belongs to.
    pub fn tenant_of(&self, lease: LeaseId) -> TenantId {
        self.read()
            .leases
            .get(&lease)
            .map(|l| l.2)
            .expect("every lease id is registered before the dataflow sees it")
    }

    /// The name of a tenant.
    pub fn tenant_name(&self, id: TenantId) -> String {
        self.read()
            .tenants
            .get(&id)
            .cloned()
            .expect("every tenant id is registered before the dataflow sees it")
    }

    /// The owner (tenant, lease, service) an id stands for.
    pub fn owner_named(&self, id: OwnerId) -> Owner {
        self.read()
            .owners
            .get(&id)
            .map(|o| o.0.clone())
            .expect("every owner id is registered before the dataflow sees it")
    }

    fn item_named(t: &Tables, id: ItemId) -> &Item {
        t.items
            .get(&id)
            .expect("every item id is registered before the dataflow sees it")
    }

    /// The price of an item, as [`PriceBook::rate`] gives it.
    pub fn rate(&self, item: ItemId, prices: &PriceBook) -> Rate {
        let t = self.read();
        let item = Self::item_named(&t, item);
        prices.rate(item.metric, &item.gpu_class, &item.mig_profile)
    }

    /// The name of a node.
    pub fn node_name(&self, id: NodeId) -> String {
        self.read()
            .nodes
            .get(&id)
            .cloned()
            .expect("every node id is registered before the dataflow sees it")
    }

    /// The named key of a usage total.
    pub fn usage_key(&self, k: &UsageIdx) -> UsageKey {
        let t = self.read();
        let item = Self::item_named(&t, k.item);
        UsageKey {
            owner: t
                .owners
                .get(&k.owner)
                .map(|o| o.0.clone())
                .expect("every owner id is registered before the dataflow sees it"),
            metric: item.metric,
            gpu_class: item.gpu_class.clone(),
            mig_profile: item.mig_profile.clone(),
            window_start_ms: k.window_start_ms,
        }
    }

    /// The named key of a billing total.
    pub fn billing_key(&self, k: &BillingIdx) -> BillingKey {
        let t = self.read();
        let item = Self::item_named(&t, k.item);
        let (tenant, lease, _) = t
            .leases
            .get(&k.lease)
            .expect("every lease id is registered before the dataflow sees it");
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
        // Another process learns the names it is told of, under the same ids.
        let other = Names::default();
        for name in names.take_fresh() {
            other.register(&name);
        }
        assert!(names.take_fresh().is_empty(), "each name is told once");
        assert_eq!(other.owner_named(b), owner("l1", "infer"));
        assert_eq!(other.node_name(n), "node-7");
        assert_eq!(
            other
                .usage_key(&UsageIdx {
                    owner: a,
                    lease: la,
                    item,
                    metric: Aggregate::GpuSeconds,
                    window_start_ms: 0
                })
                .owner,
            owner("l1", "train")
        );
        assert!(
            other.take_fresh().is_empty(),
            "told names are not told again"
        );
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
