//! The sink's materialized views in RocksDB.
//!
//! Keys (all big-endian so that byte order is numeric order):
//! - `u` 0x00 tenant 0x00 window_start (i64, sign bit flipped) id → the [`UsageUpdate`] (Avro);
//!   an update with the same id overwrites the earlier one, so applying twice changes nothing.
//! - `o` 0x00 topic 0x00 partition (i32) → the next offset to consume from that partition.
//! - `m` 0x00 `watermark` → the latest window end seen.
//! - `l` 0x00 lease 0x00 tenant 0x00 window_start id → the same record again, for a lease's
//!   series and live values (base windows and `live.*` records of leases only). A lease id is
//!   unique only within its tenant (Akash's dseq is a block height), so the tenant is part of
//!   the key;
//! - `t` 0x00 lease 0x00 tenant → nothing: the tenants a lease id belongs to;
//! - `c` 0x00 tenant 0x00 month_start → the sum of the tenant's `cost` records (base windows)
//!   in that calendar month, in micros: kept as records arrive (a replaced record adds the
//!   difference), so the period to date is one read however long the month has run.
//! - `h` 0x00 tenant 0x00 hour_start metric 0x00 gpu_class 0x00 mig_profile 0x00 → a [`Cell`]:
//!   the tenant's usage records ([`is_usage`]) whose window starts in that hour, summed over
//!   leases and services. Kept like the month sums (a replaced record adds the difference), so
//!   a tenant's 30 days by the hour is 720 cells per metric however many leases it runs.
//! - `g` 0x00 tenant 0x00 hour_start lease 0x00 service 0x00 metric 0x00 gpu_class 0x00
//!   mig_profile 0x00 → the same per lease and service: an hour of a lease is one cell, not
//!   sixty minute records to decode.
//! - `p` 0x00 tenant 0x00 lease 0x00 cell_start service 0x00 metric 0x00 gpu_class 0x00
//!   mig_profile 0x00 → a lease's usage records whose window starts in that 5-minute cell
//!   ([`LEASE_CELL_MS`]), summed, and kept by RocksDB's merge of the differences records make
//!   (no read before a write): the lease first, so that a lease's month is one run of
//!   8,640 cells per metric instead of 43,200 one-minute records, for AEP-43's steps of 5
//!   minutes and more.
//!
//! - `b` 0x00 tenant 0x00 month_start → what `meterflow.billing` has billed the tenant for
//!   windows starting in that calendar month, in micros: the sum of the `cost_micros` of its
//!   charges and adjustments (`period.billed`; windows still open are not in it).
//! - `r` 0x00 tenant 0x00 lease 0x00 item 0x00 window_start → the latest revision of that
//!   billing key applied, so that a billing record applied again changes nothing.
//! - `m` 0x00 `currency` → the currency of the latest billing record applied (the price
//!   book's: usage records carry amounts without it).
//! - `a` 0x00 tenant 0x00 id → an [`Alert`] from `meterflow.alerts` (Avro), the first one
//!   applied of that id: the processor raises each (tenant, budget, threshold, period) once,
//!   and one it sends again after a crash (the same id) changes nothing.
//!
//! Data and the offsets that produced it are written in one `WriteBatch`: after a crash the
//! sink resumes exactly after the last update it stored.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::Path;

use meterflow_schemas::time::month_start;
use meterflow_schemas::{Alert, BillingRecord, Record, UsageUpdate};
use rocksdb::{DB, Direction, IteratorMode, MergeOperands, Options, WriteBatch};

/// A failure of the view store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("stored usage record is unreadable: {0}")]
    Decode(#[from] meterflow_schemas::DecodeError),
    #[error("usage record cannot be encoded: {0}")]
    Encode(#[from] meterflow_schemas::EncodeError),
}

/// One consumed record: where it came from and what it said (a usage update, or a billing
/// record).
#[derive(Debug, Clone)]
pub struct Consumed<R = UsageUpdate> {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub update: R,
}

/// The view store.
pub struct Store {
    db: DB,
}

fn sortable(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn usage_prefix(tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 3);
    k.extend_from_slice(b"u\0");
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

fn usage_key(u: &UsageUpdate) -> Vec<u8> {
    let mut k = usage_prefix(&u.tenant);
    k.extend_from_slice(&sortable(u.window_start_ms));
    k.extend_from_slice(u.id.as_bytes());
    k
}

fn lease_prefix(lease: &str, tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(lease.len() + tenant.len() + 4);
    k.extend_from_slice(b"l\0");
    k.extend_from_slice(lease.as_bytes());
    k.push(0);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

fn lease_key(u: &UsageUpdate) -> Vec<u8> {
    let mut k = lease_prefix(&u.lease, &u.tenant);
    k.extend_from_slice(&sortable(u.window_start_ms));
    k.extend_from_slice(u.id.as_bytes());
    k
}

fn lease_tenants_prefix(lease: &str) -> Vec<u8> {
    let mut k = b"t\0".to_vec();
    k.extend_from_slice(lease.as_bytes());
    k.push(0);
    k
}

/// Whether a record belongs in its lease's index: a base window or a live value of a lease.
fn indexed_by_lease(u: &UsageUpdate) -> bool {
    !u.lease.is_empty() && u.resolution.is_empty()
}

fn month_cost_key(tenant: &str, month_start_ms: i64) -> Vec<u8> {
    let mut k = b"c\0".to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&sortable(month_start_ms));
    k
}

/// Records per tenant and calendar month: spend as billed, and the budget it is judged by.
pub const PERIOD_METRICS: [&str; 2] = ["period_cost", "budget"];

/// Whether a record is a tenant's usage in a base window: what usage answers add up. Live
/// values (`live.*`) are not usage of a window, roll-ups (`resolution` hour, day, month)
/// repeat what base windows hold, and a month's spend and budget are the burn-rate route's.
pub fn is_usage(u: &UsageUpdate) -> bool {
    !u.tenant.is_empty()
        && u.resolution.is_empty()
        && !u.metric.starts_with("live.")
        && !PERIOD_METRICS.contains(&u.metric.as_str())
}

/// One hour of one tenant's usage of one metric on one GPU class and MIG profile, summed over
/// its leases and services (`lease` and `service` empty) or of one lease and service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    pub hour_start_ms: i64,
    pub lease: String,
    pub service: String,
    pub metric: String,
    pub gpu_class: String,
    pub mig_profile: String,
    pub amount: i64,
    pub scale: i32,
    pub coverage_ms: i64,
    pub present_ms: i64,
}

/// A cell of an hour view ([`Store::each_hourly`]) or a lease cell ([`Store::each_lease_cell`])
/// as it is read: its names borrowed from the store's key, `lease` and `service` empty in a
/// tenant's hour view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellRef<'a> {
    pub start_ms: i64,
    pub lease: &'a str,
    pub service: &'a str,
    pub metric: &'a str,
    pub gpu_class: &'a str,
    pub mig_profile: &'a str,
    pub amount: i64,
    pub scale: i32,
    pub coverage_ms: i64,
    pub present_ms: i64,
}

impl<'a> From<&'a UsageUpdate> for CellRef<'a> {
    /// A base window's record as the cell of its window alone.
    fn from(u: &'a UsageUpdate) -> Self {
        Self {
            start_ms: u.window_start_ms,
            lease: &u.lease,
            service: &u.service,
            metric: &u.metric,
            gpu_class: &u.gpu_class,
            mig_profile: &u.mig_profile,
            amount: u.amount,
            scale: u.scale,
            coverage_ms: u.coverage_ms,
            present_ms: u.present_ms,
        }
    }
}

impl CellRef<'_> {
    pub fn to_cell(&self) -> Cell {
        Cell {
            hour_start_ms: self.start_ms,
            lease: self.lease.to_string(),
            service: self.service.to_string(),
            metric: self.metric.to_string(),
            gpu_class: self.gpu_class.to_string(),
            mig_profile: self.mig_profile.to_string(),
            amount: self.amount,
            scale: self.scale,
            coverage_ms: self.coverage_ms,
            present_ms: self.present_ms,
        }
    }
}

pub const HOUR_MS: i64 = 3_600_000;

/// The length of a lease cell (the `p` view): a divisor of an hour, and of AEP-43's coarser
/// steps (5 and 15 minutes, an hour).
pub const LEASE_CELL_MS: i64 = 300_000;

fn lease_cells_prefix(tenant: &str, lease: &str) -> Vec<u8> {
    let mut k = b"p\0".to_vec();
    for part in [tenant, lease] {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

fn lease_cell_key(u: &UsageUpdate) -> Vec<u8> {
    let mut k = lease_cells_prefix(&u.tenant, &u.lease);
    k.extend_from_slice(&sortable(
        u.window_start_ms.div_euclid(LEASE_CELL_MS) * LEASE_CELL_MS,
    ));
    for part in [&u.service, &u.metric, &u.gpu_class, &u.mig_profile] {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

/// The hour cells a usage record ([`is_usage`]) adds to: its tenant's hour, and its lease's
/// and service's.
fn hour_keys(u: &UsageUpdate) -> impl Iterator<Item = Vec<u8>> + '_ {
    [Hourly::Tenant, Hourly::Lease]
        .map(|view| hour_key(view, u))
        .into_iter()
}

/// The lease cell a usage record adds to, for a lease's record.
fn lease_cell_of(u: &UsageUpdate) -> Option<Vec<u8>> {
    (!u.lease.is_empty()).then(|| lease_cell_key(u))
}

/// RocksDB's merge of lease cells: a cell written as a sum, then changed by differences
/// (amount, coverage and presence added; the latest scale kept). A lease cell is written this
/// way, without reading it first: only its own few windows ever change it, so the operands a
/// read adds up before compaction folds them are few.
fn add_cells(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut sum = existing.and_then(decode_cell).unwrap_or_default();
    for (amount, scale, coverage, present) in operands.iter().filter_map(decode_cell) {
        sum.0 += amount;
        sum.1 = scale;
        sum.2 += coverage;
        sum.3 += present;
    }
    Some(encode_cell(sum.0, sum.1, sum.2, sum.3))
}

/// What a cell key names between its start and its aggregate.
#[derive(Clone, Copy)]
enum KeyNames<'k> {
    /// Nothing: a tenant's hour (`h`).
    Neither,
    /// The lease and the service: a lease's hour (`g`).
    LeaseAndService,
    /// The service, of a lease the prefix named: a lease cell (`p`).
    ServiceOf(&'k str),
}

/// A cell's entry under its view's prefix (`rest`: its start, then its names, each ended by a
/// NUL) and its value, as a [`CellRef`].
fn read_cell<'k>(rest: &'k [u8], value: &[u8], key: KeyNames<'k>) -> Option<CellRef<'k>> {
    let start_ms = rest
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| (u64::from_be_bytes(b) ^ (1 << 63)) as i64)?;
    let (amount, scale, coverage_ms, present_ms) = decode_cell(value)?;
    // Keys are written from strings: a part that is not UTF-8 is a corrupt key, read as empty
    // rather than failing the answer.
    let mut names = rest[8..]
        .split(|b| *b == 0)
        .map(|p| std::str::from_utf8(p).unwrap_or_default());
    let mut next = || names.next().unwrap_or_default();
    let (lease, service) = match key {
        KeyNames::Neither => ("", ""),
        KeyNames::LeaseAndService => (next(), next()),
        KeyNames::ServiceOf(lease) => (lease, next()),
    };
    Some(CellRef {
        start_ms,
        lease,
        service,
        metric: next(),
        gpu_class: next(),
        mig_profile: next(),
        amount,
        scale,
        coverage_ms,
        present_ms,
    })
}

/// The two hour views: summed over leases (`h`), or per lease and service (`g`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hourly {
    Tenant,
    Lease,
}

fn hour_prefix(view: Hourly, tenant: &str) -> Vec<u8> {
    let mut k = match view {
        Hourly::Tenant => b"h\0".to_vec(),
        Hourly::Lease => b"g\0".to_vec(),
    };
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

fn hour_key(view: Hourly, u: &UsageUpdate) -> Vec<u8> {
    let mut k = hour_prefix(view, &u.tenant);
    k.extend_from_slice(&sortable(u.window_start_ms.div_euclid(HOUR_MS) * HOUR_MS));
    if view == Hourly::Lease {
        for part in [&u.lease, &u.service] {
            k.extend_from_slice(part.as_bytes());
            k.push(0);
        }
    }
    for part in [&u.metric, &u.gpu_class, &u.mig_profile] {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

/// A cell's value: amount, scale, coverage, present.
fn encode_cell(amount: i64, scale: i32, coverage_ms: i64, present_ms: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(&amount.to_be_bytes());
    v.extend_from_slice(&scale.to_be_bytes());
    v.extend_from_slice(&coverage_ms.to_be_bytes());
    v.extend_from_slice(&present_ms.to_be_bytes());
    v
}

fn decode_cell(v: &[u8]) -> Option<(i64, i32, i64, i64)> {
    let v: &[u8; 28] = v.try_into().ok()?;
    let i64_at = |at: usize| i64::from_be_bytes(v[at..at + 8].try_into().unwrap_or_default());
    Some((
        i64_at(0),
        i32::from_be_bytes(v[8..12].try_into().unwrap_or_default()),
        i64_at(12),
        i64_at(20),
    ))
}

/// Whether a record is a base window's cost (what the month sums add up).
pub fn is_window_cost(u: &UsageUpdate) -> bool {
    u.metric == "cost" && u.resolution.is_empty()
}

fn billed_key(tenant: &str, month_start_ms: i64) -> Vec<u8> {
    let mut k = b"b\0".to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&sortable(month_start_ms));
    k
}

fn revision_key(b: &BillingRecord) -> Vec<u8> {
    let mut k = b"r\0".to_vec();
    for part in [&b.tenant, &b.lease, &b.item] {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k.extend_from_slice(&sortable(b.window_start_ms));
    k
}

fn alert_prefix(tenant: &str) -> Vec<u8> {
    let mut k = b"a\0".to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

fn read_i64(v: Option<Vec<u8>>) -> Option<i64> {
    v.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
        .map(i64::from_be_bytes)
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = b"o\0".to_vec();
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

const WATERMARK_KEY: &[u8] = b"m\0watermark";
const CURRENCY_KEY: &[u8] = b"m\0currency";
/// Present once the hour views (`h`, `g`) hold every stored record: a store written before
/// they existed gets them built from its records when opened.
const HOUR_VIEWS_KEY: &[u8] = b"m\0hour-views";
/// Present once the lease cells (`p`) hold every stored record, as [`HOUR_VIEWS_KEY`].
const LEASE_CELLS_KEY: &[u8] = b"m\0lease-cells";

impl Store {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
            path: path.display().to_string(),
            source,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Views repeat names in every key and record: LZ4 (the one codec built in) shrinks
        // them several times for little CPU.
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_merge_operator_associative("meterflow-add-cells", add_cells);
        // Most reads on the write path ask for a record or cell that is not there yet (a new
        // window): bloom filters answer those without reading the levels.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        opts.set_block_based_table_factory(&table);
        let db = DB::open(&opts, path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let store = Self { db };
        if store.db.get(HOUR_VIEWS_KEY)?.is_none() || store.db.get(LEASE_CELLS_KEY)?.is_none() {
            store.build_cell_views()?;
        }
        Ok(store)
    }

    /// Builds the cell views (hours and lease cells) from the stored records (a store from
    /// before they existed; cells already there are written again with the same sums), then
    /// marks them built. Records are stored by tenant and window start, so the cells of one
    /// tenant's hour are complete when the scan leaves that hour: memory stays one hour's.
    fn build_cell_views(&self) -> Result<(), StoreError> {
        let mut cells: BTreeMap<Vec<u8>, (i64, i32, i64, i64)> = BTreeMap::new();
        let mut current: Option<(String, i64)> = None;
        let mut built = 0usize;
        for item in self
            .db
            .iterator(IteratorMode::From(b"u\0", Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(b"u\0") {
                break;
            }
            let u = UsageUpdate::decode(&v)?;
            if !is_usage(&u) {
                continue;
            }
            let hour = (u.tenant.clone(), u.window_start_ms.div_euclid(HOUR_MS));
            if current.as_ref() != Some(&hour) {
                built += self.write_cells(std::mem::take(&mut cells))?;
                current = Some(hour);
            }
            for key in hour_keys(&u).chain(lease_cell_of(&u)) {
                let cell = cells.entry(key).or_insert((0, u.scale, 0, 0));
                cell.0 += u.amount;
                cell.2 += u.coverage_ms;
                cell.3 += u.present_ms;
            }
        }
        built += self.write_cells(cells)?;
        self.db.put(HOUR_VIEWS_KEY, b"1")?;
        self.db.put(LEASE_CELLS_KEY, b"1")?;
        if built > 0 {
            tracing::info!(cells = built, "cell views built from the stored records");
        }
        Ok(())
    }

    fn write_cells(
        &self,
        cells: BTreeMap<Vec<u8>, (i64, i32, i64, i64)>,
    ) -> Result<usize, StoreError> {
        let mut batch = WriteBatch::default();
        let n = cells.len();
        for (key, (amount, scale, coverage, present)) in cells {
            batch.put(key, encode_cell(amount, scale, coverage, present));
        }
        self.db.write(batch)?;
        Ok(n)
    }

    /// Applies consumed updates, their offsets and the new watermark in one atomic write.
    pub fn apply(&self, consumed: &[Consumed]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut watermark = self.watermark_ms()?;
        // Usage records replaced in this batch (their latest amount, coverage and presence),
        // and the month sums and hour cells they changed.
        let mut latest: HashMap<Vec<u8>, (i64, i64, i64)> = HashMap::new();
        let mut month_costs: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        let mut cells: BTreeMap<Vec<u8>, (i64, i32, i64, i64)> = BTreeMap::new();
        // The differences this batch makes to lease cells, merged into them (not read first).
        let mut lease_deltas: BTreeMap<Vec<u8>, (i64, i32, i64, i64)> = BTreeMap::new();
        // The (lease, tenant) pairs indexed in this batch: a lease's every record names its
        // tenant, and one entry is enough.
        let mut indexed: std::collections::HashSet<(&str, &str)> = Default::default();
        for c in consumed {
            let u = &c.update;
            let key = usage_key(u);
            if is_usage(u) {
                let before = match latest.get(&key) {
                    Some(before) => *before,
                    None => match self.db.get(&key)? {
                        Some(v) => {
                            let b = UsageUpdate::decode(&v)?;
                            (b.amount, b.coverage_ms, b.present_ms)
                        }
                        None => (0, 0, 0),
                    },
                };
                latest.insert(key.clone(), (u.amount, u.coverage_ms, u.present_ms));
                if let Some(key) = lease_cell_of(u) {
                    let d = lease_deltas.entry(key).or_insert((0, u.scale, 0, 0));
                    d.0 += u.amount - before.0;
                    d.1 = u.scale;
                    d.2 += u.coverage_ms - before.1;
                    d.3 += u.present_ms - before.2;
                }
                for hour in hour_keys(u) {
                    let cell = match cells.get(&hour) {
                        Some(cell) => *cell,
                        None => self
                            .db
                            .get(&hour)?
                            .and_then(|v| decode_cell(&v))
                            .unwrap_or((0, u.scale, 0, 0)),
                    };
                    cells.insert(
                        hour,
                        (
                            cell.0 + u.amount - before.0,
                            u.scale,
                            cell.2 + u.coverage_ms - before.1,
                            cell.3 + u.present_ms - before.2,
                        ),
                    );
                }
                if is_window_cost(u) {
                    let month = month_cost_key(&u.tenant, month_start(u.window_start_ms));
                    let sum = match month_costs.get(&month) {
                        Some(sum) => *sum,
                        None => read_i64(self.db.get(&month)?).unwrap_or(0),
                    };
                    month_costs.insert(month, sum + u.amount - before.0);
                }
            }
            let encoded = u.encode()?;
            if indexed_by_lease(u) {
                batch.put(lease_key(u), &encoded);
                if indexed.insert((&u.lease, &u.tenant)) {
                    let mut tenant = lease_tenants_prefix(&u.lease);
                    tenant.extend_from_slice(u.tenant.as_bytes());
                    batch.put(tenant, b"");
                }
            }
            batch.put(key, encoded);
            let e = next.entry((&c.topic, c.partition)).or_insert(c.offset + 1);
            *e = (*e).max(c.offset + 1);
            // Only per-lease base windows say how far the data has come: node and fleet
            // records are hourly, a tenant's period cost and the roll-ups span longer windows,
            // and live values are not windows.
            if !u.lease.is_empty() && u.resolution.is_empty() && !u.metric.starts_with("live.") {
                watermark = Some(watermark.unwrap_or(i64::MIN).max(u.window_end_ms));
            }
        }
        for (month, sum) in month_costs {
            batch.put(month, sum.to_be_bytes());
        }
        for (hour, (amount, scale, coverage, present)) in cells {
            batch.put(hour, encode_cell(amount, scale, coverage, present));
        }
        for (key, (amount, scale, coverage, present)) in lease_deltas {
            batch.merge(key, encode_cell(amount, scale, coverage, present));
        }
        for ((topic, partition), offset) in next {
            batch.put(offset_key(topic, partition), offset.to_be_bytes());
        }
        if let Some(w) = watermark {
            batch.put(WATERMARK_KEY, w.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Applies consumed billing records and their offsets in one atomic write: each adds its
    /// cost to its tenant's billed sum for the month its window starts in. A record whose
    /// revision of its key was applied already (the same record again) changes nothing.
    pub fn apply_billing(&self, consumed: &[Consumed<BillingRecord>]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut revisions: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut billed: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        for c in consumed {
            let e = next.entry((&c.topic, c.partition)).or_insert(c.offset + 1);
            *e = (*e).max(c.offset + 1);
            let b = &c.update;
            // A kind newer than this sink's schema: not counted as billed (it stays pending).
            if b.kind == meterflow_schemas::BillingKind::Unknown {
                tracing::warn!(id = %b.id, "a billing record of a kind this sink does not know; upgrade the sink");
                continue;
            }
            let key = revision_key(b);
            let applied = match revisions.get(&key) {
                Some(r) => Some(*r),
                None => read_i64(self.db.get(&key)?),
            };
            if applied.is_some_and(|r| r >= b.revision) {
                continue;
            }
            revisions.insert(key, b.revision);
            if !b.currency.is_empty() {
                batch.put(CURRENCY_KEY, b.currency.as_bytes());
            }
            let month = billed_key(&b.tenant, month_start(b.window_start_ms));
            let sum = match billed.get(&month) {
                Some(sum) => *sum,
                None => read_i64(self.db.get(&month)?).unwrap_or(0),
            };
            billed.insert(month, sum + b.cost_micros);
        }
        for (key, revision) in revisions {
            batch.put(key, revision.to_be_bytes());
        }
        for (month, sum) in billed {
            batch.put(month, sum.to_be_bytes());
        }
        for ((topic, partition), offset) in next {
            batch.put(offset_key(topic, partition), offset.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Stores the alerts of `consumed` not stored before (by id), with the offsets after them,
    /// in one write.
    pub fn apply_alerts(&self, consumed: &[Consumed<Alert>]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut new: BTreeMap<Vec<u8>, &Alert> = BTreeMap::new();
        for c in consumed {
            let e = next.entry((&c.topic, c.partition)).or_insert(c.offset + 1);
            *e = (*e).max(c.offset + 1);
            let mut key = alert_prefix(&c.update.tenant);
            key.extend_from_slice(c.update.id.as_bytes());
            if !new.contains_key(&key) && self.db.get(&key)?.is_none() {
                new.insert(key, &c.update);
            }
        }
        for (key, alert) in new {
            batch.put(key, alert.encode()?);
        }
        for ((topic, partition), offset) in next {
            batch.put(offset_key(topic, partition), offset.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// The length of the base windows the processor writes (its `--window`), read from the
    /// first lease records stored; `None` before any.
    pub fn base_window_ms(&self) -> Result<Option<i64>, StoreError> {
        for item in self
            .db
            .iterator(IteratorMode::From(b"l\0", Direction::Forward))
            .take(1_000)
        {
            let (k, v) = item?;
            if !k.starts_with(b"l\0") {
                break;
            }
            let u = UsageUpdate::decode(&v)?;
            if !u.metric.starts_with("live.") {
                return Ok(Some(u.window_end_ms - u.window_start_ms));
            }
        }
        Ok(None)
    }

    /// The price book's currency, as the latest billing record applied says (`None` before the
    /// first: billing follows a window's close).
    pub fn currency(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .get(CURRENCY_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// A tenant's alerts, oldest first (by the time raised, then id).
    pub fn alerts(&self, tenant: &str) -> Result<Vec<Alert>, StoreError> {
        self.alerts_under(&alert_prefix(tenant))
    }

    /// Every tenant's alerts, oldest first.
    pub fn all_alerts(&self) -> Result<Vec<Alert>, StoreError> {
        self.alerts_under(b"a\0")
    }

    /// The alerts whose keys start with `prefix`, oldest first (by the time raised, then id).
    fn alerts_under(&self, prefix: &[u8]) -> Result<Vec<Alert>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(Alert::decode(&v)?);
        }
        out.sort_by(|a, b| (a.raised_at_ms, &a.id).cmp(&(b.raised_at_ms, &b.id)));
        Ok(out)
    }

    /// What `meterflow.billing` has billed `tenant` for windows in the calendar month starting
    /// at `month_start_ms`, in micros.
    pub fn billed(&self, tenant: &str, month_start_ms: i64) -> Result<i64, StoreError> {
        Ok(read_i64(self.db.get(billed_key(tenant, month_start_ms))?).unwrap_or(0))
    }

    /// A tenant's hour cells of `view` with `from_ms <= hour_start < to_ms`, in hour order.
    pub fn hourly(
        &self,
        view: Hourly,
        tenant: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Cell>, StoreError> {
        let mut out = Vec::new();
        self.each_hourly(view, tenant, from_ms, to_ms, |c| {
            out.push(c.to_cell());
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// Calls `each` with every hour cell [`Store::hourly`] would return, in the same order,
    /// its names borrowed from the stored key (a month of a hundred leases is 216,000 cells,
    /// read without allocating one of them), until it says to stop.
    pub fn each_hourly(
        &self,
        view: Hourly,
        tenant: &str,
        from_ms: i64,
        to_ms: i64,
        mut each: impl FnMut(&CellRef<'_>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let key = match view {
            Hourly::Tenant => KeyNames::Neither,
            Hourly::Lease => KeyNames::LeaseAndService,
        };
        self.scan(hour_prefix(view, tenant), from_ms, to_ms, |rest, v| {
            Ok(read_cell(rest, v, key).map_or(ControlFlow::Continue(()), |c| each(&c)))
        })
    }

    /// Calls `each` with a lease's cells with `from_ms <= start < to_ms`, in time order (then
    /// service and aggregate), names borrowed from the stored key.
    pub fn each_lease_cell(
        &self,
        tenant: &str,
        lease: &str,
        from_ms: i64,
        to_ms: i64,
        mut each: impl FnMut(&CellRef<'_>),
    ) -> Result<(), StoreError> {
        self.scan(
            lease_cells_prefix(tenant, lease),
            from_ms,
            to_ms,
            |rest, v| {
                if let Some(c) = read_cell(rest, v, KeyNames::ServiceOf(lease)) {
                    each(&c);
                }
                Ok(ControlFlow::Continue(()))
            },
        )
    }

    /// The length of the base windows of a lease's first record with `from_ms <= window_start
    /// < to_ms` (`None` when it has none there): the processor's `--window`, as the lease's
    /// records were written.
    pub fn lease_window_ms(
        &self,
        tenant: &str,
        lease: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let mut found = None;
        self.scan(lease_prefix(lease, tenant), from_ms, to_ms, |_, v| {
            let u = UsageUpdate::decode(v)?;
            Ok(if is_usage(&u) {
                found = Some(u.window_end_ms - u.window_start_ms);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        Ok(found)
    }

    /// The next offset to consume per partition of `topic`, for partitions consumed before.
    pub fn offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, StoreError> {
        let mut prefix = b"o\0".to_vec();
        prefix.extend_from_slice(topic.as_bytes());
        prefix.push(0);
        let mut out = BTreeMap::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let (Ok(p), Ok(o)) = (
                <[u8; 4]>::try_from(&k[prefix.len()..]),
                <[u8; 8]>::try_from(&v[..]),
            ) {
                out.insert(i32::from_be_bytes(p), i64::from_be_bytes(o));
            }
        }
        Ok(out)
    }

    /// The latest window end of any stored update.
    pub fn watermark_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(read_i64(self.db.get(WATERMARK_KEY)?))
    }

    /// The sum of a tenant's base-window costs in the calendar month starting at
    /// `month_start_ms`, in micros.
    pub fn month_cost(&self, tenant: &str, month_start_ms: i64) -> Result<i64, StoreError> {
        Ok(read_i64(self.db.get(month_cost_key(tenant, month_start_ms))?).unwrap_or(0))
    }

    /// The tenants with a lease of this id, in name order (empty for a lease never seen).
    pub fn lease_tenants(&self, lease: &str) -> Result<Vec<String>, StoreError> {
        let prefix = lease_tenants_prefix(lease);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    /// A tenant's lease's base-window and live records with `from_ms <= window_start < to_ms`,
    /// in window order (live values have window start 0).
    pub fn lease_usage(
        &self,
        tenant: &str,
        lease: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageUpdate>, StoreError> {
        self.range(lease_prefix(lease, tenant), from_ms, to_ms)
    }

    /// A tenant's usage updates with `from_ms <= window_start < to_ms`, in window order.
    pub fn usage(
        &self,
        tenant: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageUpdate>, StoreError> {
        self.range(usage_prefix(tenant), from_ms, to_ms)
    }

    /// The records under `prefix` whose window start is in `[from_ms, to_ms)`.
    fn range(
        &self,
        prefix: Vec<u8>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageUpdate>, StoreError> {
        let mut out = Vec::new();
        self.scan(prefix, from_ms, to_ms, |_, v| {
            out.push(UsageUpdate::decode(v)?);
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(out)
    }

    /// Calls `each` with the rest of the key (from the time on) and the value of every entry
    /// under `prefix` whose time (the 8 bytes after the prefix) is in `[from_ms, to_ms)`, until
    /// it says to stop.
    fn scan(
        &self,
        prefix: Vec<u8>,
        from_ms: i64,
        to_ms: i64,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        let mut start = prefix.clone();
        start.extend_from_slice(&sortable(from_ms));
        let mut end = prefix.clone();
        end.extend_from_slice(&sortable(to_ms));
        // A raw iterator lends each key and value instead of copying them into two boxes, and
        // the upper bound lets RocksDB stop at the range's end without reading past it.
        let mut read = rocksdb::ReadOptions::default();
        read.set_iterate_upper_bound(end);
        let mut it = self.db.raw_iterator_opt(read);
        it.seek(&start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&prefix) {
                break;
            }
            if each(&k[prefix.len()..], v)?.is_break() {
                break;
            }
            it.next();
        }
        it.status()?;
        Ok(())
    }
}

impl Store {
    /// Tenants with at least one stored usage update, in name order.
    pub fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut seek = b"u\0".to_vec();
        loop {
            let mut iter = self
                .db
                .iterator(IteratorMode::From(&seek, Direction::Forward));
            let Some(item) = iter.next() else { break };
            let (k, _) = item?;
            if !k.starts_with(b"u\0") {
                break;
            }
            let rest = &k[2..];
            let Some(end) = rest.iter().position(|b| *b == 0) else {
                break;
            };
            if end > 0 {
                // The empty tenant holds the node and fleet records.
                out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            // Jump past this tenant: its keys all continue with 0x00, so 0x01 sorts after them.
            seek = b"u\0".to_vec();
            seek.extend_from_slice(&rest[..end]);
            seek.push(1);
        }
        Ok(out)
    }
}

impl Store {
    /// Whether RocksDB is still flushing or compacting (or has compaction to do): a load
    /// test waits for this to end after filling the store, so that its queries meet the
    /// store as a sink that has held its data a while does, not one still sorting its writes.
    pub fn background_work(&self) -> Result<bool, StoreError> {
        let mut busy = false;
        for property in [
            "rocksdb.compaction-pending",
            "rocksdb.num-running-compactions",
            "rocksdb.num-running-flushes",
            "rocksdb.mem-table-flush-pending",
        ] {
            busy |= self.db.property_int_value(property)?.unwrap_or(0) > 0;
        }
        Ok(busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(tenant: &str, id: &str, window: i64, amount: i64) -> UsageUpdate {
        UsageUpdate {
            id: id.into(),
            tenant: tenant.into(),
            lease: "l".into(),
            service: "s".into(),
            metric: "gpu_seconds".into(),
            gpu_class: "h100".into(),
            mig_profile: String::new(),
            window_start_ms: window,
            window_end_ms: window + 60_000,
            resolution: String::new(),
            amount,
            scale: 3,
            coverage_ms: 60_000,
            present_ms: 60_000,
            node: String::new(),
        }
    }

    fn consumed(offset: i64, u: UsageUpdate) -> Consumed {
        Consumed {
            topic: "meterflow.usage".into(),
            partition: 0,
            offset,
            update: u,
        }
    }

    #[test]
    fn billed_sums_charges_and_adjustments_per_month_once_each() {
        use meterflow_schemas::BillingKind;
        // 2026-11-30T23:00Z and the hour after it, in December.
        const NOV_LAST_HOUR: i64 = 1_796_079_600_000;
        const DEC: i64 = 1_796_083_200_000;
        let record = |offset: i64, window: i64, revision: i64, cost_micros: i64| Consumed {
            topic: "meterflow.billing".into(),
            partition: 1,
            offset,
            update: BillingRecord {
                id: format!("r{offset}"),
                kind: if revision == 0 {
                    BillingKind::Charge
                } else {
                    BillingKind::Adjustment
                },
                tenant: "t".into(),
                lease: "l".into(),
                item: "gpu_seconds/h100".into(),
                window_start_ms: window,
                window_end_ms: window + 3_600_000,
                revision,
                quantity: 0,
                scale: 3,
                price_book_version: "v1".into(),
                cost_micros,
                currency: "USD".into(),
            },
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("opens");
        // A charge of 700 and an adjustment of -200 for November's last hour; a charge of 50
        // for December's first; the adjustment again in the same write and in a later one
        // (a duplicate on the topic) adds nothing.
        store
            .apply_billing(&[
                record(0, NOV_LAST_HOUR, 0, 700),
                record(1, DEC, 0, 50),
                record(2, NOV_LAST_HOUR, 1, -200),
                record(3, NOV_LAST_HOUR, 1, -200),
            ])
            .expect("applies");
        store
            .apply_billing(&[record(4, NOV_LAST_HOUR, 1, -200)])
            .expect("applies");
        drop(store);
        let store = Store::open(dir.path()).expect("reopens");
        // November 2026 starts at 1_793_491_200_000.
        assert_eq!(store.billed("t", 1_793_491_200_000).expect("reads"), 500);
        assert_eq!(store.billed("t", DEC).expect("reads"), 50);
        assert_eq!(store.billed("u", DEC).expect("reads"), 0);
        assert_eq!(
            store.offsets("meterflow.billing").expect("reads"),
            BTreeMap::from([(1, 5)])
        );
        assert!(store.offsets("meterflow.usage").expect("reads").is_empty());
    }

    #[test]
    fn alerts_are_kept_once_per_id_per_tenant_with_their_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let alert = |tenant: &str, id: &str, at: i64| Consumed {
            topic: "meterflow.alerts".into(),
            partition: 0,
            offset: at,
            update: Alert {
                id: id.into(),
                tenant: tenant.into(),
                kind: "budget_threshold".into(),
                period: "2026-11".into(),
                threshold_percent: 50,
                budget_micros: 300_000,
                spent_micros: 150_001,
                raised_at_ms: at,
                message: format!("{tenant} {id}"),
            },
        };
        store
            .apply_alerts(&[
                alert("acme", "x", 2),
                alert("acme", "y", 1),
                alert("globex", "x", 3),
            ])
            .expect("applied");
        // The same id again (a processor that crashed before it knew the first was sent): the
        // first stays.
        store
            .apply_alerts(&[alert("acme", "x", 9)])
            .expect("applied");
        let acme = store.alerts("acme").expect("read");
        assert_eq!(
            acme.iter()
                .map(|a| (a.id.as_str(), a.raised_at_ms))
                .collect::<Vec<_>>(),
            [("y", 1), ("x", 2)]
        );
        assert_eq!(store.alerts("globex").expect("read").len(), 1);
        assert!(
            store.alerts("acm").expect("read").is_empty(),
            "a prefix of a name is another tenant"
        );
        assert_eq!(
            store.offsets("meterflow.alerts").expect("offsets").get(&0),
            Some(&10)
        );
    }

    #[test]
    fn updates_replace_by_id_and_offsets_travel_with_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("opens");
        store
            .apply(&[
                consumed(0, update("t", "a", 0, 5)),
                consumed(1, update("t", "b", 60_000, 7)),
            ])
            .expect("applies");
        // The same id again (a re-emission or a new value): replaces, never adds.
        store
            .apply(&[consumed(2, update("t", "a", 0, 9))])
            .expect("applies");
        store
            .apply(&[consumed(2, update("t", "a", 0, 9))])
            .expect("applying twice is harmless");
        // Another tenant, and a tenant whose name is a prefix of this one.
        store
            .apply(&[
                consumed(3, update("u", "c", 0, 1)),
                consumed(4, update("tt", "d", 0, 1)),
            ])
            .expect("applies");
        drop(store);

        let store = Store::open(dir.path()).expect("reopens");
        let got: Vec<_> = store
            .usage("t", 0, 120_000)
            .expect("reads")
            .into_iter()
            .map(|u| (u.id, u.amount))
            .collect();
        assert_eq!(got, vec![("a".to_string(), 9), ("b".to_string(), 7)]);
        assert_eq!(store.usage("t", 60_000, 120_000).expect("reads").len(), 1);
        assert_eq!(store.usage("t", -120_000, 0).expect("reads").len(), 0);
        assert_eq!(
            store.offsets("meterflow.usage").expect("reads"),
            BTreeMap::from([(0, 5)])
        );
        assert_eq!(store.watermark_ms().expect("reads"), Some(120_000));
        assert_eq!(store.tenants().expect("reads"), vec!["t", "tt", "u"]);
        // A lease id is one per tenant: each tenant's records, and the tenants holding it.
        assert_eq!(
            store
                .lease_usage("t", "l", 0, 120_000)
                .expect("reads")
                .len(),
            2
        );
        assert_eq!(
            store
                .lease_usage("tt", "l", 0, 120_000)
                .expect("reads")
                .len(),
            1
        );
        assert_eq!(
            store.lease_tenants("l").expect("reads"),
            vec!["t", "tt", "u"]
        );
        assert!(store.lease_tenants("nope").expect("reads").is_empty());
    }

    #[test]
    fn month_costs_follow_replacements_within_and_across_batches() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("opens");
        let cost = |id: &str, window: i64, micros: i64| UsageUpdate {
            metric: "cost".into(),
            scale: 6,
            ..update("t", id, window, micros)
        };
        // 2026-11-30T23:59Z and 2026-12-01T00:00Z: two months.
        let (nov, dec) = (1_796_083_140_000, 1_796_083_200_000);
        store
            .apply(&[
                consumed(0, cost("a", nov, 100)),
                consumed(1, cost("a", nov, 150)),
                consumed(2, cost("b", dec, 7)),
                // Not a base window's cost: left out of the sums.
                consumed(3, update("t", "g", nov, 1_000)),
            ])
            .expect("applies");
        store
            .apply(&[consumed(4, cost("a", nov, 120))])
            .expect("applies");
        store
            .apply(&[consumed(4, cost("a", nov, 120))])
            .expect("applying twice is harmless");
        let month = |t| store.month_cost("t", month_start(t)).expect("reads");
        assert_eq!((month(nov), month(dec)), (120, 7));
        assert_eq!(store.month_cost("u", month_start(nov)).expect("reads"), 0);
    }

    #[test]
    fn sums_follow_batches_across_compaction_and_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        // 2026-12-01T00:00Z: an hour, a month.
        const DEC: i64 = 1_796_083_200_000;
        let cost = |id: &str, window: i64, micros: i64| UsageUpdate {
            metric: "cost".into(),
            scale: 6,
            ..update("t", id, window, micros)
        };
        {
            let store = Store::open(dir.path()).expect("opens");
            // A sum already stored: the batches that follow add to it.
            store
                .db
                .put(month_cost_key("t", DEC), 1_000i64.to_be_bytes())
                .expect("puts");
            for (offset, micros) in [(0, 10), (1, 30), (2, 25)] {
                store
                    .apply(&[
                        consumed(offset, cost("a", DEC, micros)),
                        consumed(offset, update("t", "g", DEC + 60_000, 5_000 * (offset + 1))),
                    ])
                    .expect("applies");
            }
            // The sums leave the memtable for the files the next reads find them in.
            store.db.compact_range(None::<&[u8]>, None::<&[u8]>);
        }
        let store = Store::open(dir.path()).expect("reopens");
        store
            .apply(&[consumed(3, cost("b", DEC + 120_000, 4))])
            .expect("applies");
        // 1,000 written whole, then a's latest 25 and b's 4.
        assert_eq!(store.month_cost("t", DEC).expect("reads"), 1_029);
        let cells = store
            .hourly(Hourly::Tenant, "t", DEC, DEC + HOUR_MS)
            .expect("reads");
        let gpu: Vec<(i64, i64, i64)> = cells
            .iter()
            .filter(|c| &*c.metric == "gpu_seconds")
            .map(|c| (c.amount, c.coverage_ms, c.present_ms))
            .collect();
        // g replaced twice: its latest 15,000, one minute covered and present.
        assert_eq!(gpu, vec![(15_000, 60_000, 60_000)]);
        // The lease's 5-minute cell, merged from differences across batches, a compaction and
        // a reopening: g's latest 15,000; a's latest cost 25 and b's 4 in the same cell.
        let mut lease = Vec::new();
        store
            .each_lease_cell("t", "l", DEC, DEC + HOUR_MS, |c| {
                lease.push((c.start_ms, c.metric.to_string(), c.amount, c.present_ms))
            })
            .expect("reads");
        assert_eq!(
            lease,
            vec![
                (DEC, "cost".to_string(), 29, 120_000),
                (DEC, "gpu_seconds".to_string(), 15_000, 60_000)
            ]
        );
    }

    #[test]
    fn hour_cells_sum_leases_and_follow_replacements() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("opens");
        let h = 1_796_083_200_000; // an hour start
        let on = |lease: &str, id: &str, window: i64, amount: i64| UsageUpdate {
            lease: lease.into(),
            coverage_ms: 30_000,
            ..update("t", id, window, amount)
        };
        store
            .apply(&[
                consumed(0, on("l1", "a", h, 100)),
                consumed(1, on("l2", "b", h + 59 * 60_000, 50)),
                consumed(2, on("l1", "c", h + 3_600_000, 7)),
                // Replaced in the same batch: counts once, with its latest value.
                consumed(3, on("l1", "a", h, 120)),
                // Not usage of a window: left out.
                consumed(
                    4,
                    UsageUpdate {
                        metric: "live.gpu_util.gauge".into(),
                        ..on("l1", "d", 0, 5)
                    },
                ),
                consumed(
                    5,
                    UsageUpdate {
                        resolution: "hour".into(),
                        ..on("l1", "e", h, 999)
                    },
                ),
            ])
            .expect("applies");
        // Replaced in a later batch, and applied twice.
        for _ in 0..2 {
            store
                .apply(&[consumed(6, on("l2", "b", h + 59 * 60_000, 40))])
                .expect("applies");
        }
        let cells = store
            .hourly(Hourly::Tenant, "t", h, h + 2 * 3_600_000)
            .expect("reads");
        let got: Vec<_> = cells
            .iter()
            .map(|c| {
                (
                    c.hour_start_ms,
                    c.metric.as_str(),
                    c.gpu_class.as_str(),
                    c.amount,
                    c.coverage_ms,
                    c.present_ms,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (h, "gpu_seconds", "h100", 160, 60_000, 120_000),
                (h + 3_600_000, "gpu_seconds", "h100", 7, 30_000, 60_000),
            ]
        );
        assert_eq!(
            store
                .hourly(Hourly::Tenant, "t", h + 1, h + 3_600_000)
                .expect("reads"),
            vec![]
        );
        assert_eq!(
            store
                .hourly(Hourly::Tenant, "tt", h, h + 2 * 3_600_000)
                .expect("reads"),
            vec![]
        );
        // Per lease: the same hours, each lease on its own.
        let by_lease: Vec<_> = store
            .hourly(Hourly::Lease, "t", h, h + 2 * 3_600_000)
            .expect("reads")
            .into_iter()
            .map(|c| {
                (
                    c.hour_start_ms,
                    c.lease,
                    c.service,
                    c.metric,
                    c.amount,
                    c.present_ms,
                )
            })
            .collect();
        let row = |hour, lease: &str, amount| {
            (
                hour,
                lease.to_string(),
                "s".to_string(),
                "gpu_seconds".to_string(),
                amount,
                60_000,
            )
        };
        assert_eq!(
            by_lease,
            vec![
                row(h, "l1", 120),
                row(h, "l2", 40),
                row(h + 3_600_000, "l1", 7)
            ]
        );
        // A lease's 5-minute cells: l2's window at 59 minutes is in the cell from 55, replaced
        // by 40 and applied twice; l1's hour has one window in the cell from 0, the next hour's
        // in the cell from 60. Nothing outside the range, nothing of another lease.
        let lease_cells = |lease: &str, from: i64, to: i64| {
            let mut got = Vec::new();
            store
                .each_lease_cell("t", lease, from, to, |c| {
                    got.push((c.start_ms, c.service.to_string(), c.amount, c.present_ms))
                })
                .expect("reads");
            got
        };
        assert_eq!(
            lease_cells("l2", h, h + 2 * 3_600_000),
            vec![(h + 55 * 60_000, "s".to_string(), 40, 60_000)]
        );
        assert_eq!(
            lease_cells("l1", h, h + 2 * 3_600_000),
            vec![
                (h, "s".to_string(), 120, 60_000),
                (h + 3_600_000, "s".to_string(), 7, 60_000)
            ]
        );
        assert_eq!(lease_cells("l1", h + 1, h + 3_600_000), vec![]);
        assert_eq!(lease_cells("l3", h, h + 2 * 3_600_000), vec![]);
        assert_eq!(
            store
                .lease_window_ms("t", "l1", h, h + 2 * 3_600_000)
                .expect("reads"),
            Some(60_000)
        );
        assert_eq!(
            store.lease_window_ms("t", "l3", h, h + 1).expect("reads"),
            None
        );
    }

    #[test]
    fn a_store_from_before_the_hour_views_gets_them_when_opened() {
        let dir = tempfile::tempdir().expect("temp dir");
        let h = 1_796_083_200_000;
        let on = |lease: &str, id: &str, window: i64, amount: i64| UsageUpdate {
            lease: lease.into(),
            ..update("t", id, window, amount)
        };
        let views = |store: &Store| {
            let hours = [Hourly::Tenant, Hourly::Lease].map(|view| {
                ["t", "u"].map(|tenant| {
                    store
                        .hourly(view, tenant, h - 3_600_000, h + 3 * 3_600_000)
                        .expect("reads")
                })
            });
            let mut cells = Vec::new();
            for (tenant, lease) in [("t", "l1"), ("t", "l2"), ("u", "l9")] {
                store
                    .each_lease_cell(tenant, lease, h - 3_600_000, h + 3 * 3_600_000, |c| {
                        cells.push((tenant, lease, c.start_ms, c.amount))
                    })
                    .expect("reads");
            }
            (hours, cells)
        };
        let expected = {
            let store = Store::open(dir.path()).expect("opens");
            store
                .apply(&[
                    consumed(0, on("l1", "a", h, 100)),
                    consumed(1, on("l2", "b", h + 60_000, 50)),
                    consumed(2, on("l1", "c", h + 3_600_000, 7)),
                    consumed(3, on("l1", "d", h - 60_000, 3)),
                    consumed(
                        4,
                        UsageUpdate {
                            tenant: "u".into(),
                            ..on("l9", "e", h, 11)
                        },
                    ),
                ])
                .expect("applies");
            let expected = views(&store);
            // As a store written before the views existed: records only.
            for prefix in [&b"h\0"[..], b"g\0", b"p\0"] {
                let keys: Vec<Box<[u8]>> = store
                    .db
                    .iterator(IteratorMode::From(prefix, Direction::Forward))
                    .map(|item| item.expect("reads").0)
                    .take_while(|k| k.starts_with(prefix))
                    .collect();
                assert!(!keys.is_empty());
                for k in keys {
                    store.db.delete(k).expect("deletes");
                }
            }
            store.db.delete(HOUR_VIEWS_KEY).expect("deletes");
            store.db.delete(LEASE_CELLS_KEY).expect("deletes");
            let (hours, cells) = views(&store);
            assert!(hours.iter().flatten().all(Vec::is_empty) && cells.is_empty());
            expected
        };
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(views(&store), expected);
        assert_eq!(expected.0[0][0].len(), 3, "{expected:?}");
        assert_eq!(expected.0[1][0].len(), 4, "{expected:?}");
        // l1: the windows at h - 1 min (cell h - 5 min), h and h + 1 h; l2: h + 1 min (cell h).
        assert_eq!(
            expected.1,
            vec![
                ("t", "l1", h - 300_000, 3),
                ("t", "l1", h, 100),
                ("t", "l1", h + 3_600_000, 7),
                ("t", "l2", h, 50),
                ("u", "l9", h, 11)
            ]
        );
    }
}
