//! The agent's durable spool (SPEC: delivery guarantees; issue 3): every batch is written here
//! before it is sent and removed once the broker has acknowledged it, so neither a broker
//! outage nor an agent restart loses one.
//!
//! RocksDB keys:
//! - `b` 0x00 position (u64, big-endian) → the batch (Avro), in the order they were made;
//! - `s` 0x00 agent id → the next sequence number of that agent (i64): sequences keep rising
//!   across restarts, so the processor's (agent, sequence) deduplication never mistakes a
//!   restarted agent's new batches for old ones;
//! - `m` 0x00 `next` → the next position.
//!
//! A batch and its agent's new sequence are written in one `WriteBatch`. When the spool is
//! over its size limit it drops its oldest batches (counted in [`Spool::dropped`] and logged):
//! the explicit policy the SPEC asks for, keeping the newest data when the broker has been
//! away for longer than the spool can hold.
//!
//! A failed write (a full disk) leaves RocksDB refusing every later write, so the spool then
//! counts as broken until [`Spool::reopen`] opens it again: reopening replays what reached the
//! disk, and the batches removed in between (delivered while writes failed) are deleted then.
//! A removed batch whose deletion never lands is sent again after a restart, which the
//! processor's (agent, sequence) deduplication absorbs.

use std::collections::BTreeMap;
use std::path::Path;

use meterflow_schemas::{Record, SampleBatch};
use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch};
use tracing::warn;

/// A failure of the spool's storage.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "spool at {path}: {source} (is another agent using it? give each agent its own --spool-dir)"
    )]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("spool: {0} (is the disk full?)")]
    Db(#[from] rocksdb::Error),
    #[error("spool: a stored batch is unreadable: {0}")]
    Decode(#[from] meterflow_schemas::DecodeError),
    #[error("spool: a batch cannot be encoded: {0}")]
    Encode(#[from] meterflow_schemas::EncodeError),
    #[error("spool: a write failed earlier; no write is tried until the spool is reopened")]
    Closed,
    #[error(
        "spool at {path}: the disk is full ({available} bytes free); it is reopened once {needed} are"
    )]
    NoRoom {
        path: String,
        available: u64,
        needed: u64,
    },
}

/// The spool of one agent process.
pub struct Spool {
    /// `None` only when [`Spool::reopen`] failed to open it again.
    db: Option<DB>,
    /// A write failed: RocksDB refuses writes until the database is reopened (reads still work).
    broken: bool,
    path: std::path::PathBuf,
    max_bytes: u64,
    /// Positions removed from `held` whose deletion did not reach the disk.
    unremoved: Vec<u64>,
    /// The batch being sent, never dropped to make room (see [`Spool::pin`]).
    pinned: Option<u64>,
    /// Position → encoded size, of every batch held.
    held: BTreeMap<u64, u64>,
    bytes: u64,
    next: u64,
    dropped: u64,
}

const NEXT_KEY: &[u8] = b"m\0next";

fn batch_key(position: u64) -> Vec<u8> {
    let mut k = b"b\0".to_vec();
    k.extend_from_slice(&position.to_be_bytes());
    k
}

fn sequence_key(agent: &str) -> Vec<u8> {
    let mut k = b"s\0".to_vec();
    k.extend_from_slice(agent.as_bytes());
    k
}

fn read_u64(v: Option<Vec<u8>>) -> Option<u64> {
    v.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
        .map(u64::from_be_bytes)
}

impl Spool {
    /// Opens (or creates) the spool in `path`, holding at most `max_bytes` of batches.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let (db, held, next) = Self::load(path)?;
        let bytes = held.values().sum();
        Ok(Self {
            db: Some(db),
            path: path.to_path_buf(),
            broken: false,
            max_bytes,
            unremoved: Vec::new(),
            pinned: None,
            held,
            bytes,
            next,
            dropped: 0,
        })
    }

    /// Closes the database and opens it again: the way back from a failed write once the disk
    /// has room (refused, with the database left open for reading, while it has less than
    /// [`meterflow_schemas::disk::ROOM_TO_REOPEN`]). Deletes the batches delivered meanwhile;
    /// what was held is held again.
    pub fn reopen(&mut self) -> Result<(), SpoolError> {
        if !meterflow_schemas::disk::room_to_reopen(&self.path) {
            return Err(SpoolError::NoRoom {
                path: self.path.display().to_string(),
                available: meterflow_schemas::disk::available_bytes(&self.path).unwrap_or(0),
                needed: meterflow_schemas::disk::ROOM_TO_REOPEN,
            });
        }
        self.db = None;
        let (db, mut held, next) = Self::load(&self.path)?;
        let mut write = WriteBatch::default();
        for position in &self.unremoved {
            write.delete(batch_key(*position));
            held.remove(position);
        }
        db.write(write)?;
        self.unremoved.clear();
        self.bytes = held.values().sum();
        self.held = held;
        self.next = next;
        self.db = Some(db);
        self.broken = false;
        Ok(())
    }

    /// Whether a write failed and the spool waits for [`Spool::reopen`].
    pub fn is_broken(&self) -> bool {
        self.broken || self.db.is_none()
    }

    fn db(&self) -> Result<&DB, SpoolError> {
        self.db.as_ref().ok_or(SpoolError::Closed)
    }

    /// Runs a write; after a failure the spool is broken until reopened (RocksDB refuses
    /// further writes after one).
    fn write(&mut self, write: WriteBatch) -> Result<(), SpoolError> {
        if self.broken {
            return Err(SpoolError::Closed);
        }
        match self.db()?.write(write) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.broken = true;
                Err(e.into())
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn load(path: &Path) -> Result<(DB, BTreeMap<u64, u64>, u64), SpoolError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, path).map_err(|source| SpoolError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mut held = BTreeMap::new();
        for item in db.iterator(IteratorMode::From(b"b\0", Direction::Forward)) {
            let (k, v) = item?;
            let Some(position) = k
                .strip_prefix(b"b\0")
                .and_then(|p| <[u8; 8]>::try_from(p).ok())
            else {
                break;
            };
            held.insert(u64::from_be_bytes(position), v.len() as u64);
        }
        let next = read_u64(db.get(NEXT_KEY)?).unwrap_or(0);
        Ok((db, held, next))
    }

    /// Gives `batch` its agent's next sequence number (1 for an agent never seen) and stores it
    /// behind every batch held; returns the sequence. Drops the oldest batches first when the
    /// spool would grow past its limit. On an error nothing is stored and `batch` keeps no
    /// sequence.
    pub fn push(&mut self, batch: &mut SampleBatch) -> Result<i64, SpoolError> {
        let sequence_key = sequence_key(&batch.agent_id);
        let sequence = read_u64(self.db()?.get(&sequence_key)?).map_or(1, |s| s as i64);
        batch.sequence = sequence;
        let encoded = batch.encode()?;
        let size = encoded.len() as u64;
        let mut write = WriteBatch::default();
        // Make room: the oldest go first, and they are counted.
        let (mut freed, mut dropping) = (0u64, Vec::new());
        for (&oldest, &oldest_size) in &self.held {
            if self.bytes - freed + size <= self.max_bytes {
                break;
            }
            if self.pinned == Some(oldest) {
                continue;
            }
            write.delete(batch_key(oldest));
            dropping.push(oldest);
            freed += oldest_size;
        }
        let position = self.next;
        write.put(batch_key(position), &encoded);
        write.put(&sequence_key, ((sequence + 1) as u64).to_be_bytes());
        write.put(NEXT_KEY, (position + 1).to_be_bytes());
        if let Err(e) = self.write(write) {
            batch.sequence = 0;
            return Err(e);
        }
        for oldest in dropping {
            self.held.remove(&oldest);
            self.dropped += 1;
            warn!(
                position = oldest,
                dropped = self.dropped,
                max_bytes = self.max_bytes,
                "spool full: oldest batch dropped"
            );
        }
        self.bytes -= freed;
        self.next = position + 1;
        self.held.insert(position, size);
        self.bytes += size;
        Ok(sequence)
    }

    /// Marks the batch at `position` as being sent (`None`: none is): the size limit drops
    /// the oldest batches but that one, which the broker may already have.
    pub fn pin(&mut self, position: Option<u64>) {
        self.pinned = position;
    }

    /// The oldest batch held, with its position.
    pub fn front(&self) -> Result<Option<(u64, SampleBatch)>, SpoolError> {
        let Some(&position) = self.held.keys().next() else {
            return Ok(None);
        };
        match self.db()?.get(batch_key(position))? {
            Some(v) => Ok(Some((position, SampleBatch::decode(&v)?))),
            None => Ok(None),
        }
    }

    /// Forgets the batch at `position` (the broker has it). On an error it is forgotten all
    /// the same and deleted by [`Spool::reopen`].
    pub fn remove(&mut self, position: u64) -> Result<(), SpoolError> {
        if let Some(size) = self.held.remove(&position) {
            self.bytes -= size;
        }
        let mut write = WriteBatch::default();
        write.delete(batch_key(position));
        let written = self.write(write);
        if written.is_err() {
            self.unremoved.push(position);
        }
        written
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Bytes of batches held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The most bytes of batches it holds.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Batches dropped by the size limit since the spool was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(agent: &str, at: i64) -> SampleBatch {
        SampleBatch {
            node: "n".into(),
            agent_id: agent.into(),
            sequence: 0,
            collected_at_ms: at,
            agent_version: "test".into(),
            samples: Vec::new(),
        }
    }

    #[test]
    fn batches_come_back_in_order_across_a_restart_and_sequences_keep_rising() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).expect("opens");
            for (agent, at) in [("a", 1), ("b", 2), ("a", 3)] {
                spool.push(&mut batch(agent, at)).expect("stored");
            }
            let (position, first) = spool.front().expect("reads").expect("a batch");
            assert_eq!((first.agent_id.as_str(), first.sequence), ("a", 1));
            spool.remove(position).expect("removed");
        }
        // As after a crash: what was not acknowledged is still there, in order.
        let mut spool = Spool::open(dir.path(), 1 << 20).expect("reopens");
        let mut left = Vec::new();
        while let Some((position, b)) = spool.front().expect("reads") {
            left.push((b.agent_id.clone(), b.sequence, b.collected_at_ms));
            spool.remove(position).expect("removed");
        }
        assert_eq!(left, vec![("b".into(), 1, 2), ("a".into(), 2, 3)]);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        // The next batch of `a` is 3, never 1 again.
        assert_eq!(spool.push(&mut batch("a", 4)).expect("stored"), 3);
    }

    #[test]
    fn a_full_spool_drops_its_oldest_batches_and_counts_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let size = batch("a", 0).encode().expect("encodes").len() as u64;
        let mut spool = Spool::open(dir.path(), 3 * size).expect("opens");
        for at in 1..=5 {
            spool.push(&mut batch("a", at)).expect("stored");
        }
        assert_eq!((spool.len(), spool.dropped()), (3, 2));
        let (_, oldest) = spool.front().expect("reads").expect("a batch");
        assert_eq!((oldest.collected_at_ms, oldest.sequence), (3, 3));
        drop(spool);
        let spool = Spool::open(dir.path(), 3 * size).expect("reopens");
        assert_eq!((spool.len(), spool.bytes()), (3, 3 * size));
    }

    #[test]
    fn the_batch_being_sent_is_not_dropped_to_make_room() {
        let dir = tempfile::tempdir().expect("temp dir");
        let size = batch("a", 0).encode().expect("encodes").len() as u64;
        let mut spool = Spool::open(dir.path(), 3 * size).expect("opens");
        spool.push(&mut batch("a", 1)).expect("stored");
        let (sending, _) = spool.front().expect("reads").expect("a batch");
        spool.pin(Some(sending));
        for at in 2..=5 {
            spool.push(&mut batch("a", at)).expect("stored");
        }
        assert_eq!(spool.dropped(), 2, "2 and 3 made room, not 1");
        let mut left = Vec::new();
        while let Some((position, b)) = spool.front().expect("reads") {
            left.push(b.collected_at_ms);
            spool.remove(position).expect("removed");
        }
        assert_eq!(left, vec![1, 4, 5]);
    }
}
