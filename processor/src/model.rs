//! Records inside the dataflow, and the validation that turns a [`Sample`] into one.
//!
//! Quantities are integers at a fixed scale (GPU time in milliseconds, CPU time in
//! microseconds), so sums are exact and independent of the order they are added in.

use meterflow_schemas::{Sample, SampleKind};
use serde::{Deserialize, Serialize};

use crate::names::{ItemId, LeaseId, NodeId, OwnerId, UsageIdx};

/// Whose usage an aggregate is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub tenant: String,
    pub lease: String,
    pub service: String,
}

/// One allocation series: one GPU (or MIG instance) held by one container, or the cores or
/// memory one container run requested.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocationKey {
    pub owner: Owner,
    /// What is held: [`Aggregate::GpuSeconds`], [`Aggregate::CpuRequestSeconds`] or
    /// [`Aggregate::MemoryRequestByteSeconds`]. Left out of the JSON for GPUs, so checkpoint
    /// keys written before requests were billed still name the same series.
    #[serde(
        default = "Aggregate::gpu_seconds",
        skip_serializing_if = "Aggregate::is_gpu_seconds"
    )]
    pub metric: Aggregate,
    pub gpu_class: String,
    pub mig_profile: String,
    pub node: String,
    pub container_id: String,
    pub gpu_uuid: String,
}

/// A series' identity as bytes: its aggregate, then every string of its key, each after its
/// length (LEB128), so two keys are equal exactly when their identities are. The feeder keeps
/// one of these per series, shared by its maps, instead of a key of seven `String`s in each.
pub type Identity = std::rc::Rc<[u8]>;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut len = s.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Writes an [`Identity`] into `out` (cleared first): the aggregate's byte, then each field.
fn write_identity(metric: Aggregate, fields: [&str; 8], out: &mut Vec<u8>) {
    out.clear();
    out.push(metric as u8);
    for s in fields {
        put_str(out, s);
    }
}

fn take_str(bytes: &mut &[u8]) -> Option<String> {
    let (mut len, mut shift) = (0usize, 0u32);
    loop {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        len |= ((b & 0x7f) as usize).checked_shl(shift)?;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if len > bytes.len() {
        return None;
    }
    let (s, rest) = bytes.split_at(len);
    *bytes = rest;
    String::from_utf8(s.to_vec()).ok()
}

fn take_metric(bytes: &mut &[u8]) -> Option<Aggregate> {
    let (&b, rest) = bytes.split_first()?;
    *bytes = rest;
    Aggregate::ALL.get(b as usize).copied()
}

/// An [`AllocationKey`] borrowing a sample's strings: a sample of a known series is looked up
/// by it, and only a new series' key is copied out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationKeyRef<'a> {
    pub tenant: &'a str,
    pub lease: &'a str,
    pub service: &'a str,
    pub metric: Aggregate,
    pub gpu_class: &'a str,
    pub mig_profile: &'a str,
    pub node: &'a str,
    pub container_id: &'a str,
    pub gpu_uuid: &'a str,
}

impl AllocationKeyRef<'_> {
    /// Writes the series' [`Identity`] into `out` (cleared first).
    pub fn write_identity(&self, out: &mut Vec<u8>) {
        let fields = [
            self.tenant,
            self.lease,
            self.service,
            self.gpu_class,
            self.mig_profile,
            self.node,
            self.container_id,
            self.gpu_uuid,
        ];
        write_identity(self.metric, fields, out);
    }

    pub fn to_owned(self) -> AllocationKey {
        AllocationKey {
            owner: Owner {
                tenant: self.tenant.into(),
                lease: self.lease.into(),
                service: self.service.into(),
            },
            metric: self.metric,
            gpu_class: self.gpu_class.into(),
            mig_profile: self.mig_profile.into(),
            node: self.node.into(),
            container_id: self.container_id.into(),
            gpu_uuid: self.gpu_uuid.into(),
        }
    }
}

impl AllocationKey {
    pub fn as_ref(&self) -> AllocationKeyRef<'_> {
        AllocationKeyRef {
            tenant: &self.owner.tenant,
            lease: &self.owner.lease,
            service: &self.owner.service,
            metric: self.metric,
            gpu_class: &self.gpu_class,
            mig_profile: &self.mig_profile,
            node: &self.node,
            container_id: &self.container_id,
            gpu_uuid: &self.gpu_uuid,
        }
    }

    /// Writes the series' [`Identity`] into `out` (cleared first).
    pub fn write_identity(&self, out: &mut Vec<u8>) {
        self.as_ref().write_identity(out);
    }

    /// The key whose identity [`AllocationKey::write_identity`] wrote.
    pub fn from_identity(mut bytes: &[u8]) -> Option<Self> {
        let b = &mut bytes;
        let metric = take_metric(b)?;
        let key = Self {
            owner: Owner {
                tenant: take_str(b)?,
                lease: take_str(b)?,
                service: take_str(b)?,
            },
            metric,
            gpu_class: take_str(b)?,
            mig_profile: take_str(b)?,
            node: take_str(b)?,
            container_id: take_str(b)?,
            gpu_uuid: take_str(b)?,
        };
        b.is_empty().then_some(key)
    }
}

/// One observation of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocationObs {
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub observed_at_ms: i64,
    /// How much is held: GPUs (1 for one GPU or one MIG instance), millicores, or bytes.
    pub count: i64,
}

impl AllocationObs {
    /// Two observations of one series folded into one: the interval depends only on the
    /// earliest start, the earliest finish, the latest observation and the largest count.
    pub fn merge(self, other: Self) -> Self {
        Self {
            started_at_ms: self.started_at_ms.min(other.started_at_ms),
            finished_at_ms: match (self.finished_at_ms, other.finished_at_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            observed_at_ms: self.observed_at_ms.max(other.observed_at_ms),
            count: self.count.max(other.count),
        }
    }

    /// The interval the series held its GPUs: from the runtime's `started_at` to its
    /// `finished_at` once seen, else to the latest observation (an open interval grows as
    /// samples arrive); `None` while it is empty. Time before the start (pending) and between
    /// two containers (a restart is a new series) is never inside an interval.
    pub fn interval(&self) -> Option<Interval> {
        let end_ms = self.finished_at_ms.unwrap_or(self.observed_at_ms);
        (end_ms > self.started_at_ms && self.count > 0).then_some(Interval {
            start_ms: self.started_at_ms,
            end_ms,
            count: self.count,
        })
    }
}

/// `count` GPUs (millicores, bytes) held from `start_ms` to `end_ms`; what the dataflow is fed
/// is such an interval cut at base-window boundaries, one piece per window (see
/// [`held_changes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Interval {
    pub start_ms: i64,
    pub end_ms: i64,
    pub count: i64,
}

impl Interval {
    /// The pieces of the interval in each window of `window_ms`, from the window starting at
    /// `from_ms` (a window boundary) on.
    pub fn pieces(self, window_ms: i64, from_ms: i64) -> impl Iterator<Item = Interval> {
        let start_ms = self.start_ms.max(from_ms);
        crate::dataflow::split_by_window(start_ms, self.end_ms, window_ms).map(move |(w, ms)| {
            let start_ms = start_ms.max(w);
            Interval {
                start_ms,
                end_ms: start_ms + ms,
                count: self.count,
            }
        })
    }
}

/// The window pieces to remove and to add when an allocation series' merged observations go
/// from `old` to `new`. Usually only the end moves, and only the pieces from the window of the
/// earlier end on change: an allocation held for a month costs one piece per new observation,
/// not one per window it has run.
pub fn held_changes(
    old: Option<Interval>,
    new: Option<Interval>,
    window_ms: i64,
) -> (Vec<Interval>, Vec<Interval>) {
    let from_ms = match (old, new) {
        (Some(o), Some(n)) if o.start_ms == n.start_ms && o.count == n.count => {
            (o.end_ms.min(n.end_ms) - 1).div_euclid(window_ms) * window_ms
        }
        _ => i64::MIN,
    };
    let pieces = |iv: Option<Interval>| -> Vec<Interval> {
        iv.map(|iv| iv.pieces(window_ms, from_ms).collect())
            .unwrap_or_default()
    };
    let (mut removed, mut added) = (pieces(old), pieces(new));
    // Pieces in both stay as they are.
    let same: std::collections::HashSet<Interval> = removed.iter().copied().collect();
    let same: std::collections::HashSet<Interval> =
        added.iter().copied().filter(|p| same.contains(p)).collect();
    removed.retain(|p| !same.contains(p));
    added.retain(|p| !same.contains(p));
    (removed, added)
}

/// One series of readings: a counter or a gauge of one container (and, for GPU metrics, one
/// GPU or MIG instance).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReadingKey {
    pub owner: Owner,
    pub node: String,
    pub container_id: String,
    pub metric: Aggregate,
    // Empty for container-level metrics, and then left out of the JSON, so checkpoint keys
    // written before GPU metrics existed still name the same series.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gpu_uuid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gpu_class: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mig_profile: String,
}

/// A [`ReadingKey`] borrowing a sample's strings (see [`AllocationKeyRef`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadingKeyRef<'a> {
    pub tenant: &'a str,
    pub lease: &'a str,
    pub service: &'a str,
    pub node: &'a str,
    pub container_id: &'a str,
    pub metric: Aggregate,
    pub gpu_uuid: &'a str,
    pub gpu_class: &'a str,
    pub mig_profile: &'a str,
}

impl ReadingKeyRef<'_> {
    /// Writes the series' [`Identity`] into `out` (cleared first).
    pub fn write_identity(&self, out: &mut Vec<u8>) {
        let fields = [
            self.tenant,
            self.lease,
            self.service,
            self.node,
            self.container_id,
            self.gpu_uuid,
            self.gpu_class,
            self.mig_profile,
        ];
        write_identity(self.metric, fields, out);
    }

    pub fn to_owned(self) -> ReadingKey {
        ReadingKey {
            owner: Owner {
                tenant: self.tenant.into(),
                lease: self.lease.into(),
                service: self.service.into(),
            },
            node: self.node.into(),
            container_id: self.container_id.into(),
            metric: self.metric,
            gpu_uuid: self.gpu_uuid.into(),
            gpu_class: self.gpu_class.into(),
            mig_profile: self.mig_profile.into(),
        }
    }
}

impl ReadingKey {
    pub fn as_ref(&self) -> ReadingKeyRef<'_> {
        ReadingKeyRef {
            tenant: &self.owner.tenant,
            lease: &self.owner.lease,
            service: &self.owner.service,
            node: &self.node,
            container_id: &self.container_id,
            metric: self.metric,
            gpu_uuid: &self.gpu_uuid,
            gpu_class: &self.gpu_class,
            mig_profile: &self.mig_profile,
        }
    }

    /// Writes the series' [`Identity`] into `out` (cleared first).
    pub fn write_identity(&self, out: &mut Vec<u8>) {
        self.as_ref().write_identity(out);
    }

    /// The key whose identity [`ReadingKey::write_identity`] wrote.
    pub fn from_identity(mut bytes: &[u8]) -> Option<Self> {
        let b = &mut bytes;
        let metric = take_metric(b)?;
        let key = Self {
            owner: Owner {
                tenant: take_str(b)?,
                lease: take_str(b)?,
                service: take_str(b)?,
            },
            node: take_str(b)?,
            container_id: take_str(b)?,
            metric,
            gpu_uuid: take_str(b)?,
            gpu_class: take_str(b)?,
            mig_profile: take_str(b)?,
        };
        b.is_empty().then_some(key)
    }
}

/// One reading, as an integer: a counter at its aggregate's scale, a gauge in
/// [`Aggregate::reading_units`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReadingObs {
    pub timestamp_ms: i64,
    pub units: i64,
}

/// What the dataflow is fed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Observation {
    Allocation(AllocationKey, AllocationObs),
    Reading(ReadingKey, ReadingObs),
}

/// An [`Observation`] borrowing its sample's strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObservationRef<'a> {
    Allocation(AllocationKeyRef<'a>, AllocationObs),
    Reading(ReadingKeyRef<'a>, ReadingObs),
}

impl Observation {
    pub fn as_ref(&self) -> ObservationRef<'_> {
        match self {
            Observation::Allocation(k, o) => ObservationRef::Allocation(k.as_ref(), *o),
            Observation::Reading(k, o) => ObservationRef::Reading(k.as_ref(), *o),
        }
    }
}

impl ObservationRef<'_> {
    pub fn to_owned(self) -> Observation {
        match self {
            ObservationRef::Allocation(k, o) => Observation::Allocation(k.to_owned(), o),
            ObservationRef::Reading(k, o) => Observation::Reading(k.to_owned(), o),
        }
    }
}

/// How an aggregate is measured (SPEC: the three kinds of sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Overlap of allocation intervals with a window: exact.
    Allocation,
    /// Differences of cumulative readings: exact, a gap loses nothing.
    Counter,
    /// Each reading held until the next within `max_staleness`: reported with coverage.
    Gauge,
}

/// The aggregates the processor keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Aggregate {
    /// GPU time from allocation intervals, in milliseconds.
    GpuSeconds,
    /// The part of [`Aggregate::GpuSeconds`] whose allocation's `finished_at` has not been
    /// seen: still running, or gone without an end (closed at its last observation). Not
    /// billed again: a flag, which a `finished_at` arriving later retracts.
    GpuSecondsUnfinished,
    /// CPU time from the `cpu_usage_seconds_total` counter, in microseconds.
    CpuCoreSeconds,
    /// Energy from `energy_joules_total`, in millijoules.
    EnergyJoules,
    /// Network and storage bytes, from their counters.
    NetworkReceiveBytes,
    NetworkTransmitBytes,
    StorageReadBytes,
    StorageWriteBytes,
    /// Memory working set held over time, in byte-seconds.
    MemoryByteSeconds,
    /// GPU memory held over time, in byte-seconds.
    VramByteSeconds,
    /// GPU engine-active ratio integrated over time, in milliseconds of full activity; the mean
    /// utilization is this over the observed time.
    GpuUtilizationSeconds,
    /// A container's CPU-package, DRAM and other host energy as Kepler estimates it (its GPU
    /// energy left out: GPU energy is [`Aggregate::EnergyJoules`], measured by the board), from
    /// `host_energy_joules_total`, in millijoules. Last, so that checkpoints written before it
    /// read the same.
    HostEnergyJoules,
    /// CPU cores reserved: a container run's requested cores from its start to its finish, in
    /// millicore-milliseconds (core-seconds at scale 6), from `cpu_request_cores` allocations.
    CpuRequestSeconds,
    /// Memory reserved: a container run's requested bytes from its start to its finish, in
    /// byte-seconds, from `memory_request_bytes` allocations.
    MemoryRequestByteSeconds,
    /// CPU limit: a container run's limit in cores from its start to its finish, in
    /// millicore-milliseconds (core-seconds at scale 6), from `cpu_limit_cores` allocations.
    /// This and the five after it come after the others, so that checkpoints written before
    /// them read the same.
    CpuLimitSeconds,
    /// Memory limit: a container run's limit in bytes from its start to its finish, in
    /// byte-seconds, from `memory_limit_bytes` allocations.
    MemoryLimitByteSeconds,
    /// CPU time the quota held the container back, from `cpu_throttled_seconds_total`, in
    /// microseconds.
    CpuThrottledSeconds,
    /// Anonymous memory (RSS) held over time, in byte-seconds.
    MemoryRssByteSeconds,
    /// Processes killed by the OOM killer, from `memory_oom_kills_total`.
    OomKills,
    /// Network errors, from their counters.
    NetworkReceiveErrors,
    NetworkTransmitErrors,
    /// Persistent volumes' bytes used, capacity and inodes used, held over time, from their
    /// gauges. The bytes are read to the kilobyte and kept in kilobyte-seconds (scale -3: the
    /// amount × 1000 is byte-seconds), so that a lease's month stays exact to 3.5 PB held all
    /// month, not 3.5 TB; inodes in inode-seconds.
    FilesystemUsageByteSeconds,
    FilesystemCapacityByteSeconds,
    FilesystemInodeSeconds,
    /// A GPU's (or MIG instance's) memory, used or not, held over time, to the kilobyte
    /// (kilobyte-seconds, scale -3, as the volumes').
    VramTotalByteSeconds,
    /// The copy engine's busy ratio integrated over time, in milliseconds of full activity,
    /// as [`Aggregate::GpuUtilizationSeconds`].
    GpuCopyUtilizationSeconds,
    /// A GPU's temperature held over time (°C·s) and its SM clock (MHz·s): their mean is
    /// this over the observed time.
    GpuTemperatureSeconds,
    GpuSmClockSeconds,
}

impl Aggregate {
    /// Every aggregate, in order.
    pub const ALL: [Aggregate; 28] = [
        Aggregate::GpuSeconds,
        Aggregate::GpuSecondsUnfinished,
        Aggregate::CpuCoreSeconds,
        Aggregate::EnergyJoules,
        Aggregate::NetworkReceiveBytes,
        Aggregate::NetworkTransmitBytes,
        Aggregate::StorageReadBytes,
        Aggregate::StorageWriteBytes,
        Aggregate::MemoryByteSeconds,
        Aggregate::VramByteSeconds,
        Aggregate::GpuUtilizationSeconds,
        Aggregate::HostEnergyJoules,
        Aggregate::CpuRequestSeconds,
        Aggregate::MemoryRequestByteSeconds,
        Aggregate::CpuLimitSeconds,
        Aggregate::MemoryLimitByteSeconds,
        Aggregate::CpuThrottledSeconds,
        Aggregate::MemoryRssByteSeconds,
        Aggregate::OomKills,
        Aggregate::NetworkReceiveErrors,
        Aggregate::NetworkTransmitErrors,
        Aggregate::FilesystemUsageByteSeconds,
        Aggregate::FilesystemCapacityByteSeconds,
        Aggregate::FilesystemInodeSeconds,
        Aggregate::VramTotalByteSeconds,
        Aggregate::GpuCopyUtilizationSeconds,
        Aggregate::GpuTemperatureSeconds,
        Aggregate::GpuSmClockSeconds,
    ];

    fn gpu_seconds() -> Self {
        Aggregate::GpuSeconds
    }

    fn is_gpu_seconds(&self) -> bool {
        *self == Aggregate::GpuSeconds
    }

    /// The name on the wire and in the API.
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::GpuSeconds => "gpu_seconds",
            Aggregate::GpuSecondsUnfinished => "gpu_seconds_unfinished",
            Aggregate::CpuCoreSeconds => "cpu_core_seconds",
            Aggregate::EnergyJoules => "energy_joules",
            Aggregate::NetworkReceiveBytes => "network_receive_bytes",
            Aggregate::NetworkTransmitBytes => "network_transmit_bytes",
            Aggregate::StorageReadBytes => "storage_read_bytes",
            Aggregate::StorageWriteBytes => "storage_write_bytes",
            Aggregate::MemoryByteSeconds => "memory_byte_seconds",
            Aggregate::VramByteSeconds => "vram_byte_seconds",
            Aggregate::GpuUtilizationSeconds => "gpu_utilization_seconds",
            Aggregate::HostEnergyJoules => "host_energy_joules",
            Aggregate::CpuRequestSeconds => "cpu_request_core_seconds",
            Aggregate::MemoryRequestByteSeconds => "memory_request_byte_seconds",
            Aggregate::CpuLimitSeconds => "cpu_limit_core_seconds",
            Aggregate::MemoryLimitByteSeconds => "memory_limit_byte_seconds",
            Aggregate::CpuThrottledSeconds => "cpu_throttled_seconds",
            Aggregate::MemoryRssByteSeconds => "memory_rss_byte_seconds",
            Aggregate::OomKills => "oom_kills",
            Aggregate::NetworkReceiveErrors => "network_receive_errors",
            Aggregate::NetworkTransmitErrors => "network_transmit_errors",
            Aggregate::FilesystemUsageByteSeconds => "filesystem_usage_byte_seconds",
            Aggregate::FilesystemCapacityByteSeconds => "filesystem_capacity_byte_seconds",
            Aggregate::FilesystemInodeSeconds => "filesystem_inode_seconds",
            Aggregate::VramTotalByteSeconds => "vram_total_byte_seconds",
            Aggregate::GpuCopyUtilizationSeconds => "gpu_copy_utilization_seconds",
            Aggregate::GpuTemperatureSeconds => "gpu_temperature_celsius_seconds",
            Aggregate::GpuSmClockSeconds => "gpu_sm_clock_mhz_seconds",
        }
    }

    /// The aggregate of a sample's metric name and kind; `None` for what is not aggregated.
    pub fn of_metric(kind: SampleKind, metric: &str) -> Option<Self> {
        use meterflow_schemas::metrics as m;
        Some(match (kind, metric) {
            (SampleKind::Allocation, m::GPU) => Aggregate::GpuSeconds,
            (SampleKind::Allocation, m::CPU_REQUEST) => Aggregate::CpuRequestSeconds,
            (SampleKind::Allocation, m::MEMORY_REQUEST) => Aggregate::MemoryRequestByteSeconds,
            (SampleKind::Allocation, m::CPU_LIMIT) => Aggregate::CpuLimitSeconds,
            (SampleKind::Allocation, m::MEMORY_LIMIT) => Aggregate::MemoryLimitByteSeconds,
            (SampleKind::Counter, m::CPU_THROTTLED_SECONDS) => Aggregate::CpuThrottledSeconds,
            (SampleKind::Counter, m::OOM_KILLS) => Aggregate::OomKills,
            (SampleKind::Counter, m::NETWORK_RECEIVE_ERRORS) => Aggregate::NetworkReceiveErrors,
            (SampleKind::Counter, m::NETWORK_TRANSMIT_ERRORS) => Aggregate::NetworkTransmitErrors,
            (SampleKind::Gauge, m::MEMORY_RSS) => Aggregate::MemoryRssByteSeconds,
            (SampleKind::Gauge, m::FILESYSTEM_USAGE) => Aggregate::FilesystemUsageByteSeconds,
            (SampleKind::Gauge, m::FILESYSTEM_CAPACITY) => Aggregate::FilesystemCapacityByteSeconds,
            (SampleKind::Gauge, m::FILESYSTEM_INODES_USED) => Aggregate::FilesystemInodeSeconds,
            (SampleKind::Gauge, m::VRAM_TOTAL) => Aggregate::VramTotalByteSeconds,
            (SampleKind::Gauge, m::GPU_COPY_UTILIZATION) => Aggregate::GpuCopyUtilizationSeconds,
            (SampleKind::Gauge, m::GPU_TEMPERATURE) => Aggregate::GpuTemperatureSeconds,
            (SampleKind::Gauge, m::GPU_SM_CLOCK) => Aggregate::GpuSmClockSeconds,
            (SampleKind::Counter, m::CPU_SECONDS) => Aggregate::CpuCoreSeconds,
            (SampleKind::Counter, m::ENERGY_JOULES) => Aggregate::EnergyJoules,
            (SampleKind::Counter, m::HOST_ENERGY_JOULES) => Aggregate::HostEnergyJoules,
            (SampleKind::Counter, m::NETWORK_RECEIVE_BYTES) => Aggregate::NetworkReceiveBytes,
            (SampleKind::Counter, m::NETWORK_TRANSMIT_BYTES) => Aggregate::NetworkTransmitBytes,
            (SampleKind::Counter, m::STORAGE_READ_BYTES) => Aggregate::StorageReadBytes,
            (SampleKind::Counter, m::STORAGE_WRITE_BYTES) => Aggregate::StorageWriteBytes,
            (SampleKind::Gauge, m::MEMORY_BYTES) => Aggregate::MemoryByteSeconds,
            (SampleKind::Gauge, m::VRAM_BYTES) => Aggregate::VramByteSeconds,
            (SampleKind::Gauge, m::GPU_UTILIZATION) => Aggregate::GpuUtilizationSeconds,
            _ => return None,
        })
    }

    /// How the aggregate is measured.
    pub fn kind(self) -> Kind {
        match self {
            Aggregate::GpuSeconds
            | Aggregate::GpuSecondsUnfinished
            | Aggregate::CpuRequestSeconds
            | Aggregate::MemoryRequestByteSeconds
            | Aggregate::CpuLimitSeconds
            | Aggregate::MemoryLimitByteSeconds => Kind::Allocation,
            Aggregate::MemoryByteSeconds
            | Aggregate::MemoryRssByteSeconds
            | Aggregate::FilesystemUsageByteSeconds
            | Aggregate::FilesystemCapacityByteSeconds
            | Aggregate::FilesystemInodeSeconds
            | Aggregate::VramTotalByteSeconds
            | Aggregate::GpuCopyUtilizationSeconds
            | Aggregate::GpuTemperatureSeconds
            | Aggregate::GpuSmClockSeconds
            | Aggregate::VramByteSeconds
            | Aggregate::GpuUtilizationSeconds => Kind::Gauge,
            _ => Kind::Counter,
        }
    }

    /// Decimal places of the integer amount (negative: the amount counts thousands).
    pub fn scale(self) -> i32 {
        match self {
            Aggregate::GpuSeconds
            | Aggregate::GpuSecondsUnfinished
            | Aggregate::EnergyJoules
            | Aggregate::HostEnergyJoules => 3,
            Aggregate::CpuCoreSeconds
            | Aggregate::CpuRequestSeconds
            | Aggregate::CpuLimitSeconds
            | Aggregate::CpuThrottledSeconds => 6,
            Aggregate::GpuUtilizationSeconds | Aggregate::GpuCopyUtilizationSeconds => 3,
            Aggregate::FilesystemUsageByteSeconds
            | Aggregate::FilesystemCapacityByteSeconds
            | Aggregate::VramTotalByteSeconds => -3,
            _ => 0,
        }
    }

    /// Integer units per unit of a sample's value: a counter's reading at the aggregate's
    /// scale; a gauge's level in bytes (kilobytes for a volume's), or in millionths for a
    /// ratio; an allocation's amount held in GPUs, millicores or bytes.
    pub fn reading_units(self) -> f64 {
        match self {
            Aggregate::GpuSeconds | Aggregate::GpuSecondsUnfinished => 1.0,
            Aggregate::CpuRequestSeconds | Aggregate::CpuLimitSeconds => 1e3,
            Aggregate::MemoryRequestByteSeconds | Aggregate::MemoryLimitByteSeconds => 1.0,
            Aggregate::GpuUtilizationSeconds | Aggregate::GpuCopyUtilizationSeconds => 1e6,
            Aggregate::FilesystemUsageByteSeconds
            | Aggregate::FilesystemCapacityByteSeconds
            | Aggregate::VramTotalByteSeconds => 1e-3,
            a if a.kind() == Kind::Counter => 10f64.powi(a.scale()),
            _ => 1.0,
        }
    }

    /// For a gauge, what a level held for one millisecond is divided by to give the amount:
    /// bytes × ms / 1000 = byte-seconds; millionths × ms / 1e6 = milliseconds of activity.
    pub fn gauge_divisor(self) -> i64 {
        match self {
            Aggregate::GpuUtilizationSeconds | Aggregate::GpuCopyUtilizationSeconds => 1_000_000,
            _ => 1_000,
        }
    }

    /// For an allocation, what an amount held for one millisecond is divided by to give the
    /// aggregate: GPU-ms and millicore-ms are the aggregate itself (seconds at scale 3 and 6),
    /// byte-ms / 1000 = byte-seconds.
    pub fn held_divisor(self) -> i64 {
        match self {
            Aggregate::MemoryRequestByteSeconds | Aggregate::MemoryLimitByteSeconds => 1_000,
            _ => 1,
        }
    }

    /// The sample metric the aggregate is made from (see [`meterflow_schemas::metrics`]).
    pub fn sample_metric(self) -> &'static str {
        use meterflow_schemas::metrics as m;
        match self {
            Aggregate::GpuSeconds | Aggregate::GpuSecondsUnfinished => m::GPU,
            Aggregate::CpuRequestSeconds => m::CPU_REQUEST,
            Aggregate::MemoryRequestByteSeconds => m::MEMORY_REQUEST,
            Aggregate::CpuCoreSeconds => m::CPU_SECONDS,
            Aggregate::EnergyJoules => m::ENERGY_JOULES,
            Aggregate::HostEnergyJoules => m::HOST_ENERGY_JOULES,
            Aggregate::NetworkReceiveBytes => m::NETWORK_RECEIVE_BYTES,
            Aggregate::NetworkTransmitBytes => m::NETWORK_TRANSMIT_BYTES,
            Aggregate::StorageReadBytes => m::STORAGE_READ_BYTES,
            Aggregate::StorageWriteBytes => m::STORAGE_WRITE_BYTES,
            Aggregate::MemoryByteSeconds => m::MEMORY_BYTES,
            Aggregate::VramByteSeconds => m::VRAM_BYTES,
            Aggregate::GpuUtilizationSeconds => m::GPU_UTILIZATION,
            Aggregate::CpuLimitSeconds => m::CPU_LIMIT,
            Aggregate::MemoryLimitByteSeconds => m::MEMORY_LIMIT,
            Aggregate::CpuThrottledSeconds => m::CPU_THROTTLED_SECONDS,
            Aggregate::MemoryRssByteSeconds => m::MEMORY_RSS,
            Aggregate::OomKills => m::OOM_KILLS,
            Aggregate::NetworkReceiveErrors => m::NETWORK_RECEIVE_ERRORS,
            Aggregate::NetworkTransmitErrors => m::NETWORK_TRANSMIT_ERRORS,
            Aggregate::FilesystemUsageByteSeconds => m::FILESYSTEM_USAGE,
            Aggregate::FilesystemCapacityByteSeconds => m::FILESYSTEM_CAPACITY,
            Aggregate::FilesystemInodeSeconds => m::FILESYSTEM_INODES_USED,
            Aggregate::VramTotalByteSeconds => m::VRAM_TOTAL,
            Aggregate::GpuCopyUtilizationSeconds => m::GPU_COPY_UTILIZATION,
            Aggregate::GpuTemperatureSeconds => m::GPU_TEMPERATURE,
            Aggregate::GpuSmClockSeconds => m::GPU_SM_CLOCK,
        }
    }

    /// Decimal places of a reading in [`Aggregate::reading_units`].
    pub fn reading_scale(self) -> i32 {
        self.reading_units().log10().round() as i32
    }

    /// Whether the aggregate goes on the billing stream (the price book prices it).
    pub fn billed(self) -> bool {
        matches!(
            self,
            Aggregate::GpuSeconds
                | Aggregate::CpuCoreSeconds
                | Aggregate::MemoryByteSeconds
                | Aggregate::EnergyJoules
                | Aggregate::HostEnergyJoules
                | Aggregate::CpuRequestSeconds
                | Aggregate::MemoryRequestByteSeconds
        )
    }

    /// Whether the item is per GPU (so its usage is by GPU class and MIG profile).
    pub fn per_gpu(self) -> bool {
        matches!(
            self,
            Aggregate::GpuSeconds
                | Aggregate::GpuSecondsUnfinished
                | Aggregate::VramByteSeconds
                | Aggregate::GpuUtilizationSeconds
                | Aggregate::VramTotalByteSeconds
                | Aggregate::GpuCopyUtilizationSeconds
                | Aggregate::GpuTemperatureSeconds
                | Aggregate::GpuSmClockSeconds
        )
    }
}

/// Which part of a windowed aggregate an amount adds to. Exact aggregates have only a
/// [`Part::Total`]; a gauge's total comes with the milliseconds it was observed and present
/// (from each series' first to last reading), whose ratio is its coverage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Part {
    Total,
    Observed,
    Present,
}

/// One series as the dataflow knows it: a number unique within the process, and the interned
/// owner, lease and item it adds to (see [`crate::names`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesRef {
    pub series: u64,
    pub metric: Aggregate,
    pub owner: OwnerId,
    pub lease: LeaseId,
    pub item: ItemId,
    pub node: NodeId,
}

/// What the dataflow is fed, by a [`crate::series::Feeder`], which keeps the per-series state
/// that the raw samples reduce to and sums each epoch's changes per usage total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Summary {
    /// An amount added to one part of one usage total in one base window (the amount travels
    /// in the update's multiplicity): what an epoch's allocation pieces and reading pairs
    /// changed, summed over the total's series.
    Amount(UsageIdx, Part),
    /// An amount given to one total at one level alone (a base window, or one roll-up): a
    /// closed total taken out of the dataflow (its value negated) or brought back (its value
    /// again), see [`crate::windows`].
    Level(crate::dataflow::LevelIdx, Part),
    /// Cost in micros given to one window's cost alone: what a retired base total's cost
    /// carries into it, so that taking the total out leaves the cost as it was.
    CostCarried(crate::dataflow::CostIdx),
    /// An amount given to one billing total alone: a closed one taken out or brought back.
    Billed(crate::names::BillingIdx),
    /// Cost in micros given to one tenant's month alone: what a retired billing total's cost
    /// carries into it.
    PeriodCarried((crate::names::TenantId, i64)),
}

/// The key of one windowed aggregate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UsageKey {
    pub owner: Owner,
    pub metric: Aggregate,
    pub gpu_class: String,
    pub mig_profile: String,
    pub window_start_ms: i64,
}

/// The key of one billed quantity: what a lease used of one item in one billing window.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BillingKey {
    pub tenant: String,
    pub lease: String,
    pub metric: Aggregate,
    pub gpu_class: String,
    pub mig_profile: String,
    pub window_start_ms: i64,
}

impl BillingKey {
    /// The billing key a usage key adds to, for billing windows of `billing_window_ms`.
    pub fn of(usage: &UsageKey, billing_window_ms: i64) -> Self {
        Self {
            tenant: usage.owner.tenant.clone(),
            lease: usage.owner.lease.clone(),
            metric: usage.metric,
            gpu_class: usage.gpu_class.clone(),
            mig_profile: usage.mig_profile.clone(),
            window_start_ms: usage.window_start_ms.div_euclid(billing_window_ms)
                * billing_window_ms,
        }
    }

    /// The key of a billing record read back from the billing topic; `None` for an item this
    /// version does not bill.
    pub fn from_record(record: &meterflow_schemas::BillingRecord) -> Option<Self> {
        let (metric, gpu_class, mig_profile) = match record.item.split(':').collect::<Vec<_>>()[..]
        {
            ["gpu", class, mig] => (Aggregate::GpuSeconds, class, mig),
            ["cpu"] => (Aggregate::CpuCoreSeconds, "", ""),
            ["memory"] => (Aggregate::MemoryByteSeconds, "", ""),
            ["energy"] => (Aggregate::EnergyJoules, "", ""),
            ["host_energy"] => (Aggregate::HostEnergyJoules, "", ""),
            ["cpu_reserved"] => (Aggregate::CpuRequestSeconds, "", ""),
            ["memory_reserved"] => (Aggregate::MemoryRequestByteSeconds, "", ""),
            _ => return None,
        };
        Some(Self {
            tenant: record.tenant.clone(),
            lease: record.lease.clone(),
            metric,
            gpu_class: gpu_class.to_string(),
            mig_profile: mig_profile.to_string(),
            window_start_ms: record.window_start_ms,
        })
    }

    /// What is billed, as the billing record names it: `gpu:<class>:<mig_profile>`, `cpu`,
    /// `memory`, `energy`, `host_energy`, `cpu_reserved`, `memory_reserved`.
    pub fn item(&self) -> String {
        match self.metric {
            Aggregate::GpuSeconds => format!("gpu:{}:{}", self.gpu_class, self.mig_profile),
            Aggregate::CpuCoreSeconds => "cpu".to_string(),
            Aggregate::MemoryByteSeconds => "memory".to_string(),
            Aggregate::EnergyJoules => "energy".to_string(),
            Aggregate::HostEnergyJoules => "host_energy".to_string(),
            Aggregate::CpuRequestSeconds => "cpu_reserved".to_string(),
            Aggregate::MemoryRequestByteSeconds => "memory_reserved".to_string(),
            other => other.name().to_string(),
        }
    }
}

/// Why a sample was refused; it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

fn reject<T>(reason: &'static str, detail: String) -> Result<T, Rejection> {
    Err(Rejection { reason, detail })
}

/// The longest identity value a sample may carry, in bytes (a Kubernetes object name is at
/// most 253; a container id 64 hex digits). Longer ones go to the dead-letter topic: they
/// would be kept in every aggregate's key and every output record.
pub const MAX_LABEL_BYTES: usize = 256;

/// The most one allocation series may hold: 2^20 GPUs, 2^30 millicores (a million cores), 2^44
/// bytes (16 TiB). Amounts are multiplied by up to a window's milliseconds; beyond these a
/// month's total would leave `i64`.
const MAX_HELD: [(Aggregate, i64); 5] = [
    (Aggregate::GpuSeconds, 1 << 20),
    (Aggregate::CpuRequestSeconds, 1 << 30),
    (Aggregate::MemoryRequestByteSeconds, 1 << 44),
    (Aggregate::CpuLimitSeconds, 1 << 30),
    (Aggregate::MemoryLimitByteSeconds, 1 << 44),
];

/// An allocation sample's value as the integer amount held: whole GPUs, millicores (a
/// Kubernetes CPU quantity is never finer), or whole bytes.
fn held_count(metric: Aggregate, value: f64) -> Result<i64, (&'static str, String)> {
    let units = value * metric.reading_units();
    let count = units.round();
    let most = MAX_HELD
        .iter()
        .find(|(m, _)| *m == metric)
        .map_or(0, |(_, most)| *most);
    let (reason, what) = match metric {
        Aggregate::GpuSeconds => ("bad_gpu_count", "a whole number of GPUs"),
        Aggregate::CpuRequestSeconds => ("bad_cpu_request", "a whole number of millicores"),
        Aggregate::CpuLimitSeconds => ("bad_cpu_limit", "a whole number of millicores"),
        Aggregate::MemoryLimitByteSeconds => ("bad_memory_limit", "a whole number of bytes"),
        _ => ("bad_memory_request", "a whole number of bytes"),
    };
    // A millicore count sent as cores (0.1 × 1000 = 100.00000000000001) is whole to within
    // the double's precision; anything further off is not a quantity the agent writes.
    if value < 0.0 || (units - count).abs() > 1e-6 * count.abs().max(1.0) || count > most as f64 {
        return Err((
            reason,
            format!(
                "an allocation of {} holds {what} from 0 to {most}, not {value}",
                metric.sample_metric()
            ),
        ));
    }
    Ok(count as i64)
}

/// Validates a sample and turns it into an observation; `Ok(None)` for metrics this version
/// of the processor does not aggregate yet.
pub fn observe(s: &Sample) -> Result<Option<Observation>, Rejection> {
    Ok(observe_ref(s)?.map(ObservationRef::to_owned))
}

/// [`observe`], borrowing the sample's strings.
pub fn observe_ref<'s>(s: &'s Sample) -> Result<Option<ObservationRef<'s>>, Rejection> {
    let id = &s.series;
    let labels = [
        ("tenant", &id.tenant),
        ("lease", &id.lease),
        ("service", &id.service),
        ("replica", &id.replica),
        ("node", &id.node),
        ("provider", &id.provider),
        ("container_id", &id.container_id),
        ("gpu_uuid", &id.gpu_uuid),
        ("gpu_model", &id.gpu_model),
        ("gpu_class", &id.gpu_class),
        ("mig_profile", &id.mig_profile),
        ("metric", &s.metric),
    ];
    if let Some((name, value)) = labels.iter().find(|(_, v)| v.len() > MAX_LABEL_BYTES) {
        return reject(
            "label_too_long",
            format!(
                "{name} is {} bytes, over the limit of {MAX_LABEL_BYTES}",
                value.len()
            ),
        );
    }
    if !s.value.is_finite() {
        return reject(
            "non_finite_value",
            format!("{} = {} is not a finite number", s.metric, s.value),
        );
    }
    if s.timestamp_ms < 0 {
        return reject(
            "before_epoch",
            format!("timestamp {} ms is before 1970", s.timestamp_ms),
        );
    }
    if s.kind == SampleKind::Unknown {
        return reject(
            "unknown_kind",
            format!(
                "{} is of a kind added after this processor's schema: upgrade the processor",
                s.metric
            ),
        );
    }
    let Some(metric) = Aggregate::of_metric(s.kind, &s.metric) else {
        return Ok(None);
    };
    match metric.kind() {
        Kind::Allocation => {
            let Some(started_at_ms) = s.started_at_ms else {
                return reject(
                    "missing_start",
                    format!("an allocation ({}) needs started_at_ms", s.metric),
                );
            };
            if started_at_ms < 0 {
                return reject(
                    "before_epoch",
                    format!("started_at_ms {started_at_ms} is before 1970"),
                );
            }
            if let Some(f) = s.finished_at_ms
                && f < started_at_ms
            {
                return reject(
                    "bad_interval",
                    format!("finished_at_ms {f} is before started_at_ms {started_at_ms}"),
                );
            }
            let count = match held_count(metric, s.value) {
                Ok(count) => count,
                Err((reason, detail)) => return reject(reason, detail),
            };
            let gpu = |v: &'s str| if metric.per_gpu() { v } else { "" };
            Ok(Some(ObservationRef::Allocation(
                AllocationKeyRef {
                    tenant: &s.series.tenant,
                    lease: &s.series.lease,
                    service: &s.series.service,
                    metric,
                    gpu_class: gpu(&s.series.gpu_class),
                    mig_profile: gpu(&s.series.mig_profile),
                    node: &s.series.node,
                    container_id: &s.series.container_id,
                    gpu_uuid: gpu(&s.series.gpu_uuid),
                },
                AllocationObs {
                    started_at_ms,
                    finished_at_ms: s.finished_at_ms,
                    observed_at_ms: s.timestamp_ms,
                    count,
                },
            )))
        }
        kind @ (Kind::Counter | Kind::Gauge) => {
            if s.value < 0.0 {
                let what = if kind == Kind::Counter {
                    "negative_counter"
                } else {
                    "negative_gauge"
                };
                return reject(what, format!("{} = {} is negative", s.metric, s.value));
            }
            let ratio = [
                Aggregate::GpuUtilizationSeconds,
                Aggregate::GpuCopyUtilizationSeconds,
            ];
            if ratio.contains(&metric) && s.value > 1.0 {
                return reject(
                    "ratio_out_of_range",
                    format!("{} = {} is not a ratio in 0..1", s.metric, s.value),
                );
            }
            let units = (s.value * metric.reading_units()).round();
            // Gauges are multiplied by up to a window's milliseconds: keep them far from i64's
            // end (2^52 bytes is 4 PiB).
            if units >= (1u64 << 52) as f64 {
                return reject("value_too_large", format!("{} = {}", s.metric, s.value));
            }
            let gpu = |v: &'s str| if metric.per_gpu() { v } else { "" };
            Ok(Some(ObservationRef::Reading(
                ReadingKeyRef {
                    tenant: &s.series.tenant,
                    lease: &s.series.lease,
                    service: &s.series.service,
                    node: &s.series.node,
                    container_id: &s.series.container_id,
                    metric,
                    gpu_uuid: &s.series.gpu_uuid,
                    gpu_class: gpu(&s.series.gpu_class),
                    mig_profile: gpu(&s.series.mig_profile),
                },
                ReadingObs {
                    timestamp_ms: s.timestamp_ms,
                    units: units as i64,
                },
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_schemas::SeriesId;

    fn sample(kind: SampleKind, metric: &str, value: f64) -> Sample {
        Sample {
            series: SeriesId::default(),
            kind,
            metric: metric.into(),
            value,
            timestamp_ms: 1_000,
            started_at_ms: Some(0),
            finished_at_ms: None,
        }
    }

    #[test]
    fn a_series_identity_reads_back_and_never_joins_two_keys() {
        // Every aggregate's byte names it.
        for a in Aggregate::ALL {
            assert_eq!(Aggregate::ALL[a as usize], a);
        }
        let long = "x".repeat(MAX_LABEL_BYTES);
        let reading = ReadingKey {
            owner: Owner {
                tenant: "acme".into(),
                lease: long.clone(),
                service: "".into(),
            },
            node: "node-1".into(),
            container_id: "containerd://0f3c".into(),
            metric: Aggregate::HostEnergyJoules,
            gpu_uuid: "GPU-1b2c".into(),
            gpu_class: "H100".into(),
            mig_profile: "1g.10gb".into(),
        };
        let allocation = AllocationKey {
            owner: reading.owner.clone(),
            metric: Aggregate::MemoryRequestByteSeconds,
            gpu_class: "".into(),
            mig_profile: "".into(),
            node: "node-1".into(),
            container_id: "c".into(),
            gpu_uuid: long,
        };
        let mut id = Vec::new();
        reading.write_identity(&mut id);
        assert_eq!(ReadingKey::from_identity(&id), Some(reading.clone()));
        assert_eq!(ReadingKey::from_identity(&id[..id.len() - 1]), None);
        allocation.write_identity(&mut id);
        assert_eq!(AllocationKey::from_identity(&id), Some(allocation));
        // The same characters cut between fields elsewhere are another series.
        let mut other = reading.clone();
        (other.node, other.container_id) = ("node-1c".into(), "ontainerd://0f3c".into());
        let mut other_id = Vec::new();
        other.write_identity(&mut other_id);
        reading.write_identity(&mut id);
        assert_ne!(id, other_id);
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        let r = |s: Sample| observe(&s).expect_err("rejected").reason;
        assert_eq!(
            r(sample(
                SampleKind::Counter,
                "cpu_usage_seconds_total",
                f64::NAN
            )),
            "non_finite_value"
        );
        assert_eq!(
            r(sample(SampleKind::Gauge, "x", f64::INFINITY)),
            "non_finite_value"
        );
        assert_eq!(
            r(sample(SampleKind::Counter, "cpu_usage_seconds_total", -1.0)),
            "negative_counter"
        );
        assert_eq!(
            r(sample(SampleKind::Allocation, "gpu", 0.5)),
            "bad_gpu_count"
        );
        // A kind a newer agent writes and this processor's schema reads as UNKNOWN.
        assert_eq!(r(sample(SampleKind::Unknown, "gpu", 1.0)), "unknown_kind");
        let mut s = sample(SampleKind::Allocation, "gpu", 1.0);
        s.started_at_ms = None;
        assert_eq!(r(s.clone()), "missing_start");
        s.started_at_ms = Some(10);
        s.finished_at_ms = Some(5);
        assert_eq!(r(s), "bad_interval");
        assert_eq!(
            r(sample(SampleKind::Gauge, "memory_working_set_bytes", -1.0)),
            "negative_gauge"
        );
        assert_eq!(
            r(sample(SampleKind::Gauge, "gpu_utilization", 1.5)),
            "ratio_out_of_range"
        );
        assert_eq!(
            r(sample(
                SampleKind::Gauge,
                "gpu_memory_copy_utilization",
                1.5
            )),
            "ratio_out_of_range"
        );
        assert_eq!(
            r(sample(SampleKind::Gauge, "memory_working_set_bytes", 1e300)),
            "value_too_large"
        );
        let mut s = sample(SampleKind::Gauge, "memory_working_set_bytes", 1.0);
        s.series.tenant = "t".repeat(MAX_LABEL_BYTES);
        assert!(observe(&s).is_ok(), "at the limit");
        s.series.lease = "l".repeat(1 << 20);
        let e = observe(&s).expect_err("a megabyte lease");
        assert_eq!(e.reason, "label_too_long");
        assert!(e.detail.contains("lease is 1048576 bytes"), "{}", e.detail);
        let mut s = sample(SampleKind::Allocation, "gpu", 1.0);
        s.started_at_ms = Some(-1);
        assert_eq!(r(s), "before_epoch");
    }

    #[test]
    fn requests_and_limits_are_held_in_millicores_and_bytes_and_bad_amounts_refused() {
        let held = |metric: &str, value: f64| {
            let s = sample(SampleKind::Allocation, metric, value);
            match observe(&s) {
                Ok(Some(Observation::Allocation(k, v))) => Ok((k.metric, v.count)),
                Ok(other) => panic!("{other:?}"),
                Err(r) => Err(r.reason),
            }
        };
        assert_eq!(
            held("cpu_request_cores", 1.5),
            Ok((Aggregate::CpuRequestSeconds, 1_500))
        );
        // A millicore count sent as cores is whole to the double's precision.
        assert_eq!(
            held("cpu_request_cores", 0.1),
            Ok((Aggregate::CpuRequestSeconds, 100))
        );
        assert_eq!(
            held("memory_request_bytes", 6.0 * (1u64 << 30) as f64),
            Ok((Aggregate::MemoryRequestByteSeconds, 6 << 30))
        );
        assert_eq!(held("cpu_request_cores", 0.0005), Err("bad_cpu_request"));
        assert_eq!(held("cpu_request_cores", -1.0), Err("bad_cpu_request"));
        assert_eq!(held("memory_request_bytes", 0.5), Err("bad_memory_request"));
        assert_eq!(
            held("memory_request_bytes", 1e15),
            Err("bad_memory_request")
        );
        assert_eq!(held("gpu", 2.0e6), Err("bad_gpu_count"));
        // Limits alike, refused under their own names.
        assert_eq!(
            held("cpu_limit_cores", 0.25),
            Ok((Aggregate::CpuLimitSeconds, 250))
        );
        assert_eq!(
            held("memory_limit_bytes", 512.0 * (1u64 << 20) as f64),
            Ok((Aggregate::MemoryLimitByteSeconds, 512 << 20))
        );
        assert_eq!(held("cpu_limit_cores", 0.0005), Err("bad_cpu_limit"));
        assert_eq!(held("memory_limit_bytes", 1e15), Err("bad_memory_limit"));
        // A request's series carries no GPU identity, whatever the sample says.
        let mut s = sample(SampleKind::Allocation, "cpu_request_cores", 2.0);
        s.series.gpu_uuid = "GPU-1".into();
        s.series.gpu_class = "h100".into();
        let Ok(Some(Observation::Allocation(k, _))) = observe(&s) else {
            panic!("an allocation");
        };
        assert_eq!((k.gpu_uuid.as_str(), k.gpu_class.as_str()), ("", ""));
    }

    #[test]
    fn every_aggregate_has_a_metric_and_a_distinct_name() {
        use std::collections::BTreeSet;
        let names: BTreeSet<_> = Aggregate::ALL.iter().map(|a| a.name()).collect();
        assert_eq!(names.len(), Aggregate::ALL.len());
        let kinds = [
            SampleKind::Allocation,
            SampleKind::Counter,
            SampleKind::Gauge,
        ];
        let metrics = [
            "gpu",
            "cpu_usage_seconds_total",
            "energy_joules_total",
            "network_receive_bytes_total",
            "network_transmit_bytes_total",
            "fs_read_bytes_total",
            "fs_write_bytes_total",
            "memory_working_set_bytes",
            "gpu_memory_used_bytes",
            "gpu_utilization",
            "host_energy_joules_total",
            "cpu_request_cores",
            "memory_request_bytes",
            "cpu_limit_cores",
            "memory_limit_bytes",
            "cpu_throttled_seconds_total",
            "memory_rss_bytes",
            "memory_oom_kills_total",
            "network_receive_errors_total",
            "network_transmit_errors_total",
            "filesystem_usage_bytes",
            "filesystem_capacity_bytes",
            "filesystem_inodes_used",
            "gpu_memory_total_bytes",
            "gpu_memory_copy_utilization",
            "gpu_temperature_celsius",
            "gpu_sm_clock_mhz",
        ];
        let found: BTreeSet<_> = kinds
            .iter()
            .flat_map(|k| metrics.iter().filter_map(|m| Aggregate::of_metric(*k, m)))
            .collect();
        // Every aggregate but the unfinished-GPU flag comes from a sample metric.
        assert_eq!(found.len(), Aggregate::ALL.len() - 1);
        assert_eq!(Aggregate::of_metric(SampleKind::Gauge, "gpu"), None);
    }

    /// A volume's bytes are kept in kilobytes: the amount's scale is -3, and a reading's
    /// rounding is half a kilobyte at most.
    #[test]
    fn volume_bytes_are_read_to_the_kilobyte() {
        let o = observe(&sample(
            SampleKind::Gauge,
            "filesystem_capacity_bytes",
            107_374_182_400.0,
        ))
        .expect("valid")
        .expect("aggregated");
        let Observation::Reading(key, obs) = o else {
            panic!("a gauge")
        };
        assert_eq!(key.metric, Aggregate::FilesystemCapacityByteSeconds);
        assert_eq!(obs.units, 107_374_182);
        assert_eq!(key.metric.scale(), -3);
        assert_eq!(key.metric.reading_scale(), -3);
        // Inodes are whole.
        assert_eq!(Aggregate::FilesystemInodeSeconds.reading_units(), 1.0);
    }

    #[test]
    fn counters_become_integer_microseconds() {
        let o = observe(&sample(
            SampleKind::Counter,
            "cpu_usage_seconds_total",
            1.000_001,
        ))
        .expect("valid")
        .expect("aggregated");
        let Observation::Reading(_, obs) = o else {
            panic!("a counter")
        };
        assert_eq!(obs.units, 1_000_001);
    }

    const MIN: i64 = 60_000;

    fn obs(start: i64, finish: Option<i64>, seen: i64, count: i64) -> AllocationObs {
        AllocationObs {
            started_at_ms: start,
            finished_at_ms: finish,
            observed_at_ms: seen,
            count,
        }
    }

    #[test]
    fn a_long_allocation_observed_again_changes_only_its_last_pieces() {
        // Held for 30 days; seen 15 s later: only the piece of the last window grows.
        let day = 24 * 60 * MIN;
        let old = obs(0, None, 30 * day - 30_000, 1).interval();
        let new = obs(0, None, 30 * day - 15_000, 1).interval();
        let (removed, added) = held_changes(old, new, MIN);
        let last = 30 * day - MIN;
        assert_eq!(
            (removed, added),
            (
                vec![Interval {
                    start_ms: last,
                    end_ms: last + 30_000,
                    count: 1
                }],
                vec![Interval {
                    start_ms: last,
                    end_ms: last + 45_000,
                    count: 1
                }]
            )
        );
        // Crossing into the next window adds a piece there too.
        let next = obs(0, None, 30 * day + 5_000, 1).interval();
        let (removed, added) = held_changes(new, next, MIN);
        assert_eq!(removed.len(), 1);
        assert_eq!(added.len(), 2);
        assert_eq!(
            added.iter().map(|p| p.end_ms - p.start_ms).sum::<i64>(),
            65_000
        );
    }

    proptest::proptest! {
        /// Whatever order a series' observations come in, the pieces fed (added minus removed)
        /// are exactly the final interval's pieces, and they add up to its length.
        #[test]
        fn pieces_fed_are_the_final_interval(
            seen in proptest::collection::vec(
                (0i64..50, proptest::option::of(0i64..400_000), 1i64..400_000, 1i64..3),
                1..12,
            ),
        ) {
            let mut fed: std::collections::BTreeMap<Interval, i64> = Default::default();
            let mut state: Option<AllocationObs> = None;
            for (start, finish, seen, count) in seen {
                let o = obs(start * 1_000, finish, seen, count);
                let merged = state.map_or(o, |s| s.merge(o));
                let (removed, added) =
                    held_changes(state.and_then(|s| s.interval()), merged.interval(), MIN);
                for p in removed {
                    *fed.entry(p).or_default() -= 1;
                }
                for p in added {
                    *fed.entry(p).or_default() += 1;
                }
                state = Some(merged);
            }
            fed.retain(|_, n| *n != 0);
            let last = state.expect("one observation at least").interval();
            let expected: std::collections::BTreeMap<Interval, i64> = last
                .map(|iv| iv.pieces(MIN, i64::MIN).map(|p| (p, 1)).collect())
                .unwrap_or_default();
            proptest::prop_assert_eq!(&fed, &expected);
            let total: i64 = fed.keys().map(|p| (p.end_ms - p.start_ms) * p.count).sum();
            proptest::prop_assert_eq!(
                total,
                last.map_or(0, |iv| (iv.end_ms - iv.start_ms) * iv.count)
            );
        }
    }
}
