//! The processor's checkpoint: input offsets and the state they produced, in one RocksDB write.
//!
//! State is stored per input partition (a partition's agents, series and window usage), so a
//! restart with another number of workers still finds each partition's state whole. A worker
//! writes a checkpoint after its outputs up to that point are acknowledged by the broker, in one
//! `WriteBatch`: the next offset of each of its partitions, what changed in its agents, series
//! and ledger since the previous checkpoint, and the billing topic's end offsets as it saw them
//! (so a restart knows from where to read back the records written after the checkpoint).
//!
//! Keys (`P` a partition as big-endian `i32`, `W` a worker as big-endian `u32`; series and
//! billing keys as JSON, which serde writes deterministically):
//!
//! ```text
//! o P            → next input offset (i64 BE)
//! a P agent      → AgentState (JSON)
//! s P series     → AllocationObs (JSON)
//! c P series     → Readings of a counter or gauge series (JSON)
//! w P series T   → parts of the series' usage in the window starting at T: total, observed ms,
//!                  present ms (i64 LE each, trailing zeros left out; merged by element-wise
//!                  addition; T big-endian with the sign bit flipped)
//! n P T node     → (empty): the node sent a sample in the hour starting at T, while the hour
//!                  is open (deleted once it closes)
//! b key          → Billed (JSON)
//! k W P          → billing topic offset below which this worker's records are all in `b`
//! r key level    → a total retired from the dataflow (JSON of its usage key and roll-up, `null`
//!                  for a base window): total, observed ms, present ms as in `w`
//! x owner T      → a base window's cost retired from the dataflow (JSON), in micros (i64 LE)
//! q key          → a billing total retired from the dataflow (JSON of its billing key), i64 LE
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{DB, Direction, IteratorMode, MergeOperands, Options, WriteBatch, WriteOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::agents::AgentState;
use crate::billing::Billed;
use crate::dataflow::{CostIdx, LevelIdx, Measured, Resolution};
use crate::model::{AllocationKey, AllocationObs, BillingKey, Owner, ReadingKey, UsageKey};
use crate::names::{BillingIdx, Names};
use crate::series::{Dirty, Parts, Readings};

/// Why the state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the processor state in {path}: {source} (is another processor using it?)")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("cannot create the processor state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("processor state: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("processor state: unreadable entry {key:?}: {message}")]
    Corrupt { key: Vec<u8>, message: String },
    #[error("processor state: closed after a failed write and not yet reopened")]
    Closed,
    #[error(
        "processor state in {path}: the disk is full ({available} bytes free); checkpoints resume once {needed} are"
    )]
    NoRoom {
        path: PathBuf,
        available: u64,
        needed: u64,
    },
}

/// What one partition's checkpoint holds.
#[derive(Debug, Default)]
pub struct PartitionState {
    /// The next offset to read, if a checkpoint was written.
    pub offset: Option<i64>,
    pub agents: Vec<(String, AgentState)>,
    pub allocations: Vec<(AllocationKey, AllocationObs)>,
    pub readings: Vec<(ReadingKey, Readings)>,
    /// `(series, window_start_ms, parts)`.
    pub windows: Vec<(ReadingKey, i64, Parts)>,
    /// `(node, hour_start_ms)` in which the node was active.
    pub node_hours: Vec<(String, i64)>,
}

/// One worker's checkpoint.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub worker: u32,
    /// `(partition, next offset)` of every partition the worker reads.
    pub offsets: Vec<(i32, i64)>,
    /// Agents changed since the previous checkpoint, with their partition.
    pub agents: Vec<(i32, String, AgentState)>,
    pub series: Dirty,
    pub billed: Vec<(BillingKey, Billed)>,
    /// `(billing partition, end offset)` after this worker's records were acknowledged.
    pub billing_offsets: Vec<(i32, i64)>,
    /// Totals taken out of the dataflow since the previous checkpoint (see
    /// [`crate::windows`]), named.
    pub retired_totals: Vec<(RetiredTotal, Measured)>,
    pub retired_costs: Vec<(RetiredCost, i64)>,
    pub retired_billing: Vec<(BillingKey, i64)>,
}

/// A retired total's key in the store: its usage key, and its roll-up (`None`: base window).
pub type RetiredTotal = (UsageKey, Option<Resolution>);

/// A retired cost's key in the store: its owner and base window start.
pub type RetiredCost = (Owner, i64);

/// The processor's RocksDB, shared by the workers of one process.
///
/// After a failed write (a full disk) RocksDB refuses every later one until it is opened again,
/// so the store is then marked broken and the next [`Store::write`] reopens it first: what
/// reached the disk is replayed, and the failed write, which is atomic, left nothing.
pub struct Store {
    /// `None` only while being reopened, or when reopening failed.
    db: std::sync::RwLock<Option<DB>>,
    dir: PathBuf,
    broken: std::sync::atomic::AtomicBool,
}

/// Reads little-endian `i64`s; a shorter value has zeros after its end.
fn read_parts(bytes: &[u8]) -> Parts {
    let mut parts = [0; 3];
    for (part, chunk) in parts.iter_mut().zip(bytes.chunks_exact(8)) {
        *part = i64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
    }
    parts
}

/// Writes parts as little-endian `i64`s, leaving out trailing zeros (a counter's window is one
/// `i64`, as before gauges existed).
fn write_parts(parts: Parts) -> Vec<u8> {
    let len = parts.iter().rposition(|p| *p != 0).map_or(1, |i| i + 1);
    parts[..len].iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn add_parts(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut sum = existing.map_or([0; 3], read_parts);
    for op in operands {
        for (s, o) in sum.iter_mut().zip(read_parts(op)) {
            *s = s.wrapping_add(o);
        }
    }
    Some(write_parts(sum))
}

fn key(tag: u8, partition: i32, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.len());
    k.push(tag);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(rest);
    k
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state types serialize to JSON")
}

fn window_bytes(window_start_ms: i64) -> [u8; 8] {
    ((window_start_ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn parse<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_vec(),
        message: e.to_string(),
    })
}

fn be_i64(key: &[u8], bytes: &[u8]) -> Result<i64, StoreError> {
    bytes
        .try_into()
        .map(i64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            key: key.to_vec(),
            message: format!("{} bytes where an offset has 8", bytes.len()),
        })
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: std::sync::RwLock::new(Some(Self::open_db(dir)?)),
            dir: dir.to_path_buf(),
            broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn open_db(dir: &Path) -> Result<DB, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // The operator's name is stored with the data: it stays "add_i64", which it extends.
        opts.set_merge_operator_associative("add_i64", add_parts);
        DB::open(&opts, dir).map_err(|source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        })
    }

    /// Closes the database and opens it again (the way back from a failed write); refused,
    /// with the database left open for reading, while the disk has less room than
    /// [`meterflow_schemas::disk::ROOM_TO_REOPEN`].
    pub fn reopen(&self) -> Result<(), StoreError> {
        use meterflow_schemas::disk;
        if !disk::room_to_reopen(&self.dir) {
            return Err(StoreError::NoRoom {
                path: self.dir.clone(),
                available: disk::available_bytes(&self.dir).unwrap_or(0),
                needed: disk::ROOM_TO_REOPEN,
            });
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        *db = None;
        *db = Some(Self::open_db(&self.dir)?);
        self.broken
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Runs `f` on the open database.
    fn with_db<R>(&self, f: impl FnOnce(&DB) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        f(db.as_ref().ok_or(StoreError::Closed)?)
    }

    fn scan(
        &self,
        prefix: &[u8],
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.with_db(|db| {
            for item in db.iterator(IteratorMode::From(prefix, Direction::Forward)) {
                let (k, v) = item?;
                if !k.starts_with(prefix) {
                    break;
                }
                each(&k, &v)?;
            }
            Ok(())
        })
    }

    /// Everything checkpointed for input `partition`.
    pub fn load_partition(&self, partition: i32) -> Result<PartitionState, StoreError> {
        let mut state = PartitionState::default();
        let offset_key = key(b'o', partition, &[]);
        if let Some(v) = self.with_db(|db| Ok(db.get(&offset_key)?))? {
            state.offset = Some(be_i64(&offset_key, &v)?);
        }
        self.scan(&key(b'a', partition, &[]), |k, v| {
            let agent = String::from_utf8_lossy(&k[5..]).into_owned();
            state.agents.push((agent, parse(k, v)?));
            Ok(())
        })?;
        self.scan(&key(b's', partition, &[]), |k, v| {
            state.allocations.push((parse(k, &k[5..])?, parse(k, v)?));
            Ok(())
        })?;
        self.scan(&key(b'c', partition, &[]), |k, v| {
            state.readings.push((parse(k, &k[5..])?, parse(k, v)?));
            Ok(())
        })?;
        self.scan(&key(b'w', partition, &[]), |k, v| {
            let (series, window) = k[5..].split_at(k.len().saturating_sub(13));
            let window = window
                .try_into()
                .map(|w| (u64::from_be_bytes(w) ^ (1 << 63)) as i64)
                .map_err(|_| StoreError::Corrupt {
                    key: k.to_vec(),
                    message: "short window key".into(),
                })?;
            let parts = read_parts(v);
            if parts != [0; 3] {
                state.windows.push((parse(k, series)?, window, parts));
            }
            Ok(())
        })?;
        self.scan(&key(b'n', partition, &[]), |k, _| {
            let hour = k
                .get(5..13)
                .and_then(|w| w.try_into().ok())
                .map(|w| (u64::from_be_bytes(w) ^ (1 << 63)) as i64)
                .ok_or_else(|| StoreError::Corrupt {
                    key: k.to_vec(),
                    message: "short node-hour key".into(),
                })?;
            let node = String::from_utf8_lossy(&k[13..]).into_owned();
            state.node_hours.push((node, hour));
            Ok(())
        })?;
        Ok(state)
    }

    /// The JSON value stored under `k`, if any.
    fn get_json<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StoreError> {
        self.with_db(|db| Ok(db.get(k)?))?
            .map(|v| parse(k, &v))
            .transpose()
    }

    /// A retired allocation series' merged observations, as last checkpointed.
    pub fn allocation(
        &self,
        partition: i32,
        series: &AllocationKey,
    ) -> Result<Option<AllocationObs>, StoreError> {
        self.get_json(&key(b's', partition, &json(series)))
    }

    /// A retired counter or gauge series' readings, as last checkpointed.
    pub fn readings(
        &self,
        partition: i32,
        series: &ReadingKey,
    ) -> Result<Option<Readings>, StoreError> {
        self.get_json(&key(b'c', partition, &json(series)))
    }

    /// Forgets every retired total. A run restores every window from the series' state and
    /// retires the closed ones again, so it needs none of a previous run's; and one could be
    /// wrong for it: a worker's retired value can hold input that another worker of the
    /// process had not checkpointed yet, which the new run reads again.
    pub fn clear_retired(&self) -> Result<(), StoreError> {
        self.with_db(|db| {
            let mut batch = WriteBatch::default();
            for tag in [b'r', b'x', b'q'] {
                batch.delete_range([tag], [tag + 1]);
            }
            Ok(db.write(batch)?)
        })
    }

    /// A retired total's value, as checkpointed.
    pub fn retired_total(&self, key: &RetiredTotal) -> Result<Option<Measured>, StoreError> {
        let k = [&[b'r'][..], &json(key)].concat();
        Ok(self.with_db(|db| Ok(db.get(&k)?))?.map(|v| {
            let [total, observed_ms, present_ms] = read_parts(&v);
            Measured {
                total,
                observed_ms,
                present_ms,
            }
        }))
    }

    /// A retired window cost, as checkpointed.
    pub fn retired_cost(&self, key: &RetiredCost) -> Result<Option<i64>, StoreError> {
        let k = [&[b'x'][..], &json(key)].concat();
        Ok(self
            .with_db(|db| Ok(db.get(&k)?))?
            .map(|v| read_parts(&v)[0]))
    }

    /// A retired billing total, as checkpointed.
    pub fn retired_billing(&self, key: &BillingKey) -> Result<Option<i64>, StoreError> {
        let k = [&[b'q'][..], &json(key)].concat();
        Ok(self
            .with_db(|db| Ok(db.get(&k)?))?
            .map(|v| read_parts(&v)[0]))
    }

    /// What was billed for `key`, as of the checkpoints and the records read back since.
    pub fn billed(&self, key: &BillingKey) -> Result<Option<Billed>, StoreError> {
        self.get_json(&[&[b'b'][..], &json(key)].concat())
    }

    /// Stores what was billed for `key` (used when reading back the billing topic).
    pub fn put_billed(&self, key: &BillingKey, billed: Billed) -> Result<(), StoreError> {
        let k = [&[b'b'][..], &json(key)].concat();
        self.with_db(|db| Ok(db.put(k, json(&billed))?))
    }

    /// What RocksDB holds in memory, in bytes: its memtables, its block cache, and its table
    /// readers' indexes and filters (for `/metrics`; a property it cannot tell is left out).
    pub fn memory(&self) -> Vec<(&'static str, i64)> {
        let properties = [
            ("memtables", "rocksdb.cur-size-all-mem-tables"),
            ("block_cache", "rocksdb.block-cache-usage"),
            ("table_readers", "rocksdb.estimate-table-readers-mem"),
        ];
        self.with_db(|db| {
            Ok(properties
                .iter()
                .filter_map(|(kind, property)| {
                    let bytes = db.property_int_value(*property).ok().flatten()?;
                    Some((*kind, i64::try_from(bytes).unwrap_or(i64::MAX)))
                })
                .collect())
        })
        .unwrap_or_default()
    }

    /// Per billing partition, the offset from which records may be missing from `b`: the
    /// lowest that any worker stored.
    pub fn billing_offsets(&self) -> Result<BTreeMap<i32, i64>, StoreError> {
        let mut out: BTreeMap<i32, i64> = BTreeMap::new();
        self.scan(b"k", |k, v| {
            let partition = k
                .get(5..9)
                .and_then(|p| p.try_into().ok())
                .map(i32::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    key: k.to_vec(),
                    message: "short billing offset key".into(),
                })?;
            let offset = be_i64(k, v)?;
            let e = out.entry(partition).or_insert(offset);
            *e = (*e).min(offset);
            Ok(())
        })?;
        Ok(out)
    }

    /// Flushes and compacts the whole store (for measuring its size; the processor never
    /// needs to).
    pub fn compact(&self) {
        let compacted = self.with_db(|db| {
            db.flush()?;
            db.compact_range::<&[u8], &[u8]>(None, None);
            Ok(())
        });
        if let Err(e) = compacted {
            tracing::warn!(error = %e, "flushing the state store failed");
        }
    }

    /// Writes checkpoints of one worker, in order, atomically and durably: the ones a failed
    /// write left (their window parts are additions, so none may be applied twice or skipped)
    /// and then the new one. A store broken by an earlier failure is reopened first.
    pub fn write(&self, checkpoints: &[Checkpoint]) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        let mut batch = WriteBatch::default();
        for cp in checkpoints {
            Self::add(&mut batch, cp);
        }
        let mut opts = WriteOptions::default();
        // The checkpoint is what a restart trusts: it must survive the machine, not only the
        // process.
        opts.set_sync(true);
        let written = self.with_db(|db| Ok(db.write_opt(batch, &opts)?));
        if written.is_err() {
            self.broken.store(true, Ordering::SeqCst);
        }
        written
    }

    fn add(batch: &mut WriteBatch, cp: &Checkpoint) {
        for (p, offset) in &cp.offsets {
            batch.put(key(b'o', *p, &[]), offset.to_be_bytes());
        }
        for (p, agent, state) in &cp.agents {
            batch.put(key(b'a', *p, agent.as_bytes()), json(state));
        }
        for (p, k, obs) in &cp.series.allocations {
            batch.put(key(b's', *p, &json(k)), json(obs));
        }
        for (p, k, series) in &cp.series.readings {
            batch.put(key(b'c', *p, &json(k)), json(series));
        }
        for (p, k, window, change) in &cp.series.windows {
            let mut rest = json(k);
            rest.extend_from_slice(&window_bytes(*window));
            batch.merge(key(b'w', *p, &rest), write_parts(*change));
        }
        for (p, node, hour, open) in &cp.series.node_hours {
            let mut rest = window_bytes(*hour).to_vec();
            rest.extend_from_slice(node.as_bytes());
            match open {
                true => batch.put(key(b'n', *p, &rest), []),
                false => batch.delete(key(b'n', *p, &rest)),
            }
        }
        for (k, billed) in &cp.billed {
            batch.put([&[b'b'][..], &json(k)].concat(), json(billed));
        }
        for (p, offset) in &cp.billing_offsets {
            let mut k = vec![b'k'];
            k.extend_from_slice(&cp.worker.to_be_bytes());
            k.extend_from_slice(&p.to_be_bytes());
            batch.put(k, offset.to_be_bytes());
        }
        // A retired value brought back since is spent: deleted (see `windows::NOTHING`).
        for (k, m) in &cp.retired_totals {
            let key = [&[b'r'][..], &json(k)].concat();
            match *m {
                crate::windows::NOTHING => batch.delete(key),
                m => batch.put(key, write_parts([m.total, m.observed_ms, m.present_ms])),
            }
        }
        let amounts = (cp.retired_costs.iter())
            .map(|(k, a)| (b'x', json(k), *a))
            .chain(cp.retired_billing.iter().map(|(k, a)| (b'q', json(k), *a)));
        for (tag, k, amount) in amounts {
            let key = [&[tag][..], &k].concat();
            match amount {
                0 => batch.delete(key),
                a => batch.put(key, a.to_le_bytes()),
            }
        }
    }
}

/// The store, read with the names of the process's ids: where retired totals are found again.
pub struct NamedStore<'a> {
    pub store: &'a Store,
    pub names: &'a Names,
}

impl crate::windows::RetiredTotals for NamedStore<'_> {
    type Error = StoreError;
    fn total(&self, (k, level): &LevelIdx) -> Result<Option<Measured>, StoreError> {
        self.store.retired_total(&(self.names.usage_key(k), *level))
    }
    fn cost(&self, (owner, _, start): &CostIdx) -> Result<Option<i64>, StoreError> {
        self.store
            .retired_cost(&(self.names.owner_named(*owner), *start))
    }
    fn billed(&self, key: &BillingIdx) -> Result<Option<i64>, StoreError> {
        self.store.retired_billing(&self.names.billing_key(key))
    }
}

impl crate::series::Retired for Store {
    type Error = StoreError;
    fn allocation(
        &self,
        partition: i32,
        key: &AllocationKey,
    ) -> Result<Option<AllocationObs>, StoreError> {
        Store::allocation(self, partition, key)
    }
    fn readings(&self, partition: i32, key: &ReadingKey) -> Result<Option<Readings>, StoreError> {
        Store::readings(self, partition, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Aggregate, Owner};

    fn counter_key() -> ReadingKey {
        ReadingKey {
            owner: Owner {
                tenant: "t".into(),
                lease: "l".into(),
                service: "s".into(),
            },
            node: "n".into(),
            container_id: "c".into(),
            metric: Aggregate::CpuCoreSeconds,
            gpu_uuid: String::new(),
            gpu_class: String::new(),
            mig_profile: String::new(),
        }
    }

    fn gauge_key() -> ReadingKey {
        ReadingKey {
            metric: Aggregate::MemoryByteSeconds,
            ..counter_key()
        }
    }

    #[test]
    fn a_checkpoint_reads_back_per_partition_and_window_usage_adds_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let mut agent = AgentState::new();
        agent.first_time(3);
        // Node-a active in hours 0 and 1; hour 0 closes by the second checkpoint.
        let checkpoint = |windows: Vec<(i32, ReadingKey, i64, Parts)>, offset| Checkpoint {
            worker: 0,
            offsets: vec![(2, offset)],
            agents: vec![(2, "agent-a".into(), agent.clone())],
            series: Dirty {
                windows,
                node_hours: match offset {
                    10 => vec![
                        (2, "node-a".into(), 0, true),
                        (2, "node-a".into(), 3_600_000, true),
                    ],
                    _ => vec![(2, "node-a".into(), 0, false)],
                },
                ..Dirty::default()
            },
            billed: vec![],
            billing_offsets: vec![(0, offset * 10)],
            ..Checkpoint::default()
        };
        let first = || {
            checkpoint(
                vec![
                    (2, counter_key(), -60_000, [5, 0, 0]),
                    (2, counter_key(), 0, [7, 0, 0]),
                    (2, gauge_key(), 0, [100, 0, 60_000]),
                ],
                10,
            )
        };
        let second = || {
            checkpoint(
                vec![
                    (2, counter_key(), 0, [-2, 0, 0]),
                    (2, gauge_key(), 0, [30, 10_000, 0]),
                ],
                12,
            )
        };
        store.write(&[first()]).expect("first");
        store.write(&[second()]).expect("second");
        store
            .write(&[Checkpoint {
                worker: 1,
                billing_offsets: vec![(0, 50)],
                ..Checkpoint::default()
            }])
            .expect("another worker");
        drop(store);
        // What a failed write leaves is written with the next checkpoint, in one batch: the
        // same state as the two written one after the other.
        let together = tempfile::tempdir().expect("temp dir");
        let store = Store::open(together.path()).expect("open");
        store.write(&[first(), second()]).expect("both");
        let both = store.load_partition(2).expect("load");
        drop(store);

        let store = Store::open(dir.path()).expect("reopen");
        let p = store.load_partition(2).expect("load");
        assert_eq!(
            (&both.offset, &both.agents, &both.windows, &both.node_hours),
            (&p.offset, &p.agents, &p.windows, &p.node_hours)
        );
        assert_eq!(p.offset, Some(12));
        assert_eq!(p.agents, vec![("agent-a".to_string(), agent)]);
        assert_eq!(
            p.windows,
            vec![
                (counter_key(), -60_000, [5, 0, 0]),
                (counter_key(), 0, [5, 0, 0]),
                (gauge_key(), 0, [130, 10_000, 60_000]),
            ]
        );
        assert_eq!(p.node_hours, vec![("node-a".to_string(), 3_600_000)]);
        assert_eq!(store.load_partition(3).expect("load").offset, None);
        assert_eq!(
            store.billing_offsets().expect("offsets"),
            BTreeMap::from([(0, 50)]),
            "the lowest any worker stored"
        );
    }

    #[test]
    fn retired_totals_and_costs_read_back_by_their_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let usage = UsageKey {
            owner: counter_key().owner,
            metric: Aggregate::MemoryByteSeconds,
            gpu_class: String::new(),
            mig_profile: String::new(),
            window_start_ms: 60_000,
        };
        let (base, hour, day) = (
            (usage.clone(), None),
            (usage.clone(), Some(Resolution::Hour)),
            (usage.clone(), Some(Resolution::Day)),
        );
        let (cost, no_cost) = ((usage.owner.clone(), 60_000), (usage.owner.clone(), 0));
        let total = |k: &RetiredTotal| store.retired_total(k).expect("readable");
        let micros = |k: &RetiredCost| store.retired_cost(k).expect("readable");
        let gauge = Measured {
            total: 7,
            observed_ms: 0,
            present_ms: 60_000,
        };
        let hourly = Measured {
            total: -3,
            observed_ms: 5,
            present_ms: 0,
        };
        let write = |totals, costs| {
            store
                .write(&[Checkpoint {
                    retired_totals: totals,
                    retired_costs: costs,
                    ..Checkpoint::default()
                }])
                .expect("write")
        };
        write(
            vec![(base.clone(), gauge), (hour.clone(), hourly)],
            vec![(cost.clone(), -42)],
        );
        assert_eq!(total(&base), Some(gauge));
        assert_eq!(total(&hour), Some(hourly));
        assert_eq!(total(&day), None);
        assert_eq!(micros(&cost), Some(-42));
        assert_eq!(micros(&no_cost), None);
        // Brought back since (spent): deleted.
        write(
            vec![(base.clone(), crate::windows::NOTHING)],
            vec![(cost.clone(), 0)],
        );
        assert_eq!(total(&base), None);
        assert_eq!(total(&hour), Some(hourly));
        assert_eq!(micros(&cost), None);
    }

    #[test]
    fn a_counter_window_is_one_i64_as_before_gauges_existed() {
        assert_eq!(write_parts([7, 0, 0]), 7i64.to_le_bytes().to_vec());
        assert_eq!(read_parts(&7i64.to_le_bytes()), [7, 0, 0]);
        assert_eq!(write_parts([0, 0, 0]).len(), 8);
        assert_eq!(read_parts(&write_parts([1, -2, 3])), [1, -2, 3]);
    }

    #[test]
    fn billed_entries_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let k = BillingKey {
            tenant: "t".into(),
            lease: "l".into(),
            metric: Aggregate::GpuSeconds,
            gpu_class: "h100".into(),
            mig_profile: String::new(),
            window_start_ms: 0,
        };
        assert_eq!(store.billed(&k).expect("read"), None);
        let b = Billed {
            revision: 1,
            quantity: 9,
        };
        store.put_billed(&k, b).expect("put");
        assert_eq!(store.billed(&k).expect("read"), Some(b));
    }
}
