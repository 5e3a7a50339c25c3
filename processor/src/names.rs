//! Names interned to integers, so the dataflow sorts and compares integers, not strings.
//!
//! Differential dataflow sorts, compares and clones its records in every arrangement; with the
//! owners' and items' strings inside them, most of its time went to `memcmp` and the allocator.
//! The [`crate::series::Feeder`] interns each series' owner, lease and item once, when the
//! series first appears, and the dataflow carries only [`OwnerId`], [`LeaseId`] and [`ItemId`];
//! the runner turns results back into named keys before they leave the process.
//!
//! Ids are stable 64-bit hashes of the names (SHA-256), the same in every process, so workers
//! of several processes agree on them; two names with one id are never merged (see
//! [`IdCollision`]); each process learns every name through the dataflow (see
//! [`Name`]). Ids are never written to a checkpoint or a topic.

use std::collections::HashMap;
use std::sync::RwLock;

use meterflow_schemas::id::StrongId;
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

/// How a name's fields become its id: `(domain, fields)` → 64 bits.
pub type IdHash = fn(&str, &[&str]) -> u64;

/// Ids are the first 64 bits of a SHA-256 of the domain and the fields: a tenant cannot
/// choose names that hit another's id (about 2^64 tries for one given id).
fn strong(domain: &str, fields: &[&str]) -> u64 {
    fields
        .iter()
        .fold(StrongId::new(domain), |id, f| id.str(f))
        .value()
}

/// A name whose id is already another name's: refused, never merged with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {kind} {name} has the same 64-bit id as the {kind} {existing}, seen first: its samples are refused so that the two are never added together"
)]
pub struct IdCollision {
    pub kind: &'static str,
    pub name: String,
    pub existing: String,
}

/// The names of one process. Ids are stable hashes of the names (see [`IdHash`]), the same in
/// every process and every run; a name whose id another name has is refused
/// ([`IdCollision`]), never merged with it.
#[derive(Debug)]
pub struct Names {
    tables: RwLock<Tables>,
    hash: IdHash,
}

impl Default for Names {
    fn default() -> Self {
        Self::with_hash(strong)
    }
}

/// Inserts `name` under `id` unless present; a different name under the same id is refused.
/// Returns whether it was new.
fn insert<K: std::hash::Hash + Eq + Copy, V: PartialEq + Clone + std::fmt::Debug>(
    map: &mut HashMap<K, V>,
    id: K,
    name: &V,
    kind: &'static str,
) -> Result<bool, IdCollision> {
    match map.get(&id) {
        Some(existing) if existing == name => Ok(false),
        Some(existing) => Err(IdCollision {
            kind,
            name: format!("{name:?}"),
            existing: format!("{existing:?}"),
        }),
        None => {
            map.insert(id, name.clone());
            Ok(true)
        }
    }
}

impl Names {
    /// How many names are interned (owners, leases, tenants, items, nodes), for `/metrics`.
    pub fn count(&self) -> usize {
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        t.owners.len() + t.leases.len() + t.tenants.len() + t.items.len() + t.nodes.len()
    }

    /// Names whose ids `hash` makes (tests force collisions with it).
    pub fn with_hash(hash: IdHash) -> Self {
        Self {
            tables: RwLock::default(),
            hash,
        }
    }

    fn owner_id(&self, o: &Owner) -> OwnerId {
        OwnerId((self.hash)("owner", &[&o.tenant, &o.lease, &o.service]))
    }

    fn lease_id(&self, tenant: &str, lease: &str) -> LeaseId {
        LeaseId((self.hash)("lease", &[tenant, lease]))
    }

    fn tenant_id(&self, tenant: &str) -> TenantId {
        TenantId((self.hash)("tenant", &[tenant]))
    }

    fn item_id(&self, i: &Item) -> ItemId {
        ItemId((self.hash)(
            "item",
            &[i.metric.name(), &i.gpu_class, &i.mig_profile],
        ))
    }

    fn node_id(&self, node: &str) -> NodeId {
        NodeId((self.hash)("node", &[node]))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of an owner and of its (tenant, lease); refused when the owner, its lease or
    /// its tenant has the id of another.
    pub fn owner(&self, owner: &Owner) -> Result<(OwnerId, LeaseId), IdCollision> {
        self.intern_owner(owner, true)
    }

    /// `tell`: whether a name new here goes to [`Names::take_fresh`].
    fn intern_owner(&self, owner: &Owner, tell: bool) -> Result<(OwnerId, LeaseId), IdCollision> {
        let id = self.owner_id(owner);
        let lease = self.lease_id(&owner.tenant, &owner.lease);
        if self
            .read()
            .owners
            .get(&id)
            .is_some_and(|(known, _)| known == owner)
        {
            return Ok((id, lease));
        }
        let tenant = self.tenant_id(&owner.tenant);
        let lease_name = (owner.tenant.clone(), owner.lease.clone(), tenant);
        let mut t = self.write();
        // All three are checked before any is registered: a refused owner leaves nothing.
        let taken = |known: Option<String>, kind: &'static str, name: String| match known {
            Some(existing) if existing != name => Err(IdCollision {
                kind,
                name,
                existing,
            }),
            _ => Ok(()),
        };
        taken(
            t.owners.get(&id).map(|o| format!("{:?}", o.0)),
            "owner",
            format!("{owner:?}"),
        )?;
        taken(
            t.leases
                .get(&lease)
                .map(|l| format!("{:?} of {:?}", l.1, l.0)),
            "lease",
            format!("{:?} of {:?}", owner.lease, owner.tenant),
        )?;
        taken(
            t.tenants.get(&tenant).map(|n| format!("{n:?}")),
            "tenant",
            format!("{:?}", owner.tenant),
        )?;
        if insert(&mut t.owners, id, &(owner.clone(), lease), "owner")? {
            insert(&mut t.tenants, tenant, &owner.tenant, "tenant")?;
            insert(&mut t.leases, lease, &lease_name, "lease")?;
            if tell {
                t.fresh.push(Name::Owner(owner.clone()));
            }
        }
        Ok((id, lease))
    }

    /// The id of an item; refused when another item has it.
    pub fn item(&self, item: &Item) -> Result<ItemId, IdCollision> {
        self.intern_item(item, true)
    }

    fn intern_item(&self, item: &Item, tell: bool) -> Result<ItemId, IdCollision> {
        let id = self.item_id(item);
        if self.read().items.get(&id) == Some(item) {
            return Ok(id);
        }
        let mut t = self.write();
        if insert(&mut t.items, id, item, "item")? && tell {
            t.fresh.push(Name::Item(item.clone()));
        }
        Ok(id)
    }

    /// The id of a node; refused when another node has it.
    pub fn node(&self, node: &str) -> Result<NodeId, IdCollision> {
        self.intern_node(node, true)
    }

    fn intern_node(&self, node: &str, tell: bool) -> Result<NodeId, IdCollision> {
        let id = self.node_id(node);
        if self.read().nodes.get(&id).is_some_and(|n| n == node) {
            return Ok(id);
        }
        let mut t = self.write();
        if insert(&mut t.nodes, id, &node.to_string(), "node")? && tell {
            t.fresh.push(Name::Node(node.to_string()));
        }
        Ok(id)
    }

    /// Registers a name another worker told of (registering one already known does nothing).
    /// Workers of one process share their names, so a collision is refused where the sample
    /// arrives; one between two processes can only be seen here, and is logged.
    pub fn register(&self, name: &Name) {
        let registered = match name {
            Name::Owner(o) => self.intern_owner(o, false).map(drop),
            Name::Item(i) => self.intern_item(i, false).map(drop),
            Name::Node(n) => self.intern_node(n, false).map(drop),
        };
        if let Err(collision) = registered {
            tracing::error!(%collision, "another process uses an id of a name known here");
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
                                names
                                    .owner(&owner(&format!("l{}", n / 2), &format!("s{n}")))
                                    .expect("no collision"),
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
        let (a, la) = names.owner(&owner("l1", "train")).expect("interned");
        let (b, lb) = names.owner(&owner("l1", "infer")).expect("interned");
        let (c, lc) = names.owner(&owner("l2", "train")).expect("interned");
        assert_ne!(c, a);
        assert_ne!(a, b);
        assert_eq!(la, lb, "two services of one lease bill to one lease");
        assert_eq!(names.tenant_name(names.tenant_of(lc)), "t");
        assert_eq!(names.tenant_of(la), names.tenant_of(lc));
        assert_eq!(names.owner_named(b), owner("l1", "infer"));
        assert_ne!(la, lc);
        assert_eq!(names.owner(&owner("l1", "train")), Ok((a, la)));
        let gpu = Item {
            metric: Aggregate::GpuSeconds,
            gpu_class: "h100".into(),
            mig_profile: String::new(),
        };
        let item = names.item(&gpu).expect("interned");
        assert_eq!(names.item(&gpu).expect("interned"), item);
        let n = names.node("node-7").expect("interned");
        assert_eq!(names.node("node-7").expect("interned"), n);
        assert_ne!(names.node("node-8").expect("interned"), n);
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

    #[test]
    fn a_name_with_another_names_id_is_refused_and_leaves_nothing() {
        // Every id the same: the second tenant's owner (and with it its lease and tenant)
        // collides with the first's.
        let names = Names::with_hash(|_, _| 7);
        let a = Owner {
            tenant: "acme".into(),
            lease: "1".into(),
            service: "web".into(),
        };
        let (ida, lease_a) = names.owner(&a).expect("the first is interned");
        let b = Owner {
            tenant: "globex".into(),
            ..a.clone()
        };
        let refused = names.owner(&b).expect_err("the second is refused");
        assert_eq!(refused.kind, "owner");
        assert!(refused.to_string().contains("globex"), "{refused}");
        assert_eq!(names.owner_named(ida), a, "the first keeps its id");
        assert_eq!(names.tenant_name(names.tenant_of(lease_a)), "acme");
        assert_eq!(names.owner(&a), Ok((ida, lease_a)), "and is still known");
        // Another process told of the colliding name keeps its own.
        names.register(&Name::Owner(b));
        assert_eq!(names.owner_named(ida), a);
        let fresh = names.take_fresh();
        assert_eq!(
            fresh,
            vec![Name::Owner(a.clone())],
            "the refused name is told to no one"
        );
        // Items and nodes alike.
        let item = |class: &str| Item {
            metric: Aggregate::GpuSeconds,
            gpu_class: class.into(),
            mig_profile: String::new(),
        };
        let h100 = names.item(&item("h100")).expect("interned");
        assert_eq!(names.item(&item("a100")).map_err(|e| e.kind), Err("item"));
        assert_eq!(names.item(&item("h100")), Ok(h100));
        names.node("node-1").expect("interned");
        assert_eq!(names.node("node-2").map_err(|e| e.kind), Err("node"));
        // Only the lease ids collide: another tenant's lease is refused, and its owner and
        // tenant, whose ids are free, are not registered either.
        let leases_collide = Names::with_hash(|domain, fields| {
            if domain == "lease" {
                1
            } else {
                strong(domain, fields)
            }
        });
        leases_collide.owner(&a).expect("interned");
        let other = Owner {
            tenant: "globex".into(),
            lease: "2".into(),
            ..a.clone()
        };
        assert_eq!(
            leases_collide.owner(&other).map_err(|e| e.kind),
            Err("lease")
        );
        assert_eq!(
            leases_collide.owner(&other).map_err(|e| e.kind),
            Err("lease")
        );
        assert_eq!(leases_collide.take_fresh(), vec![Name::Owner(a)]);
    }
}
