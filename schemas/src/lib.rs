//! Meterflow's record formats.
//!
//! The `.avsc` files under `schemas/avro/` are the source of truth; this crate holds their Rust
//! types and the one codec every stage uses. It knows nothing of Kafka beyond the topic names and
//! the client properties every component shares.
//!
//! - [`types`]: [`SampleBatch`] (agent → `meterflow.samples`), [`UsageUpdate`]
//!   (processor → `meterflow.usage`), [`BillingRecord`], [`Alert`], [`DeadLetter`].
//! - [`codec`]: Avro datums framed as the Confluent wire format (magic byte 0, a 4-byte schema
//!   id, the datum), so a reader always knows which writer schema to resolve from; a record
//!   written with an older schema version is read into the current type.
//! - [`kafka`]: client properties for an existing cluster (SASL, TLS) from `[kafka]` and
//!   `MF_KAFKA_*`, which every component's Kafka clients start from.
//! - [`id`]: stable content hashes, used for deterministic output record ids.
//! - [`process_metrics`]: what every component's `/metrics` says of the process itself.
//! - [`time`]: UTC timestamps (RFC 3339) and calendar months, shared by the processor's billing
//!   periods and the sink's buckets.

pub mod codec;
pub mod disk;
pub mod id;
pub mod kafka;
pub mod process_metrics;
pub mod time;
pub mod types;

pub use codec::{DecodeError, EncodeError, Record, RegistryIds, SchemaId, use_registry_ids};
pub use types::{
    Alert, BillingKind, BillingRecord, DeadLetter, Sample, SampleBatch, SampleKind, SeriesId,
    UsageUpdate,
};

/// The metric names the processor aggregates (a sample's `metric`), by kind. Sources map what
/// they read (cgroup files, NVML, exporters) onto these; any other name is carried but not
/// aggregated.
pub mod metrics {
    /// Allocation: GPUs held by a container (value = number of GPUs or MIG instances).
    pub const GPU: &str = "gpu";
    /// Allocation: CPU cores a container run requested (its spec's `resources.requests.cpu`,
    /// value in cores, to the millicore), reserved from its start to its finish.
    pub const CPU_REQUEST: &str = "cpu_request_cores";
    /// Allocation: memory a container run requested (`resources.requests.memory`, in bytes),
    /// reserved from its start to its finish.
    pub const MEMORY_REQUEST: &str = "memory_request_bytes";
    /// Counter: CPU time in seconds (cgroup `cpu.stat` `usage_usec` / 1e6).
    pub const CPU_SECONDS: &str = "cpu_usage_seconds_total";
    /// Counter: GPU energy in joules, each holder's share of its board's (NVML total energy or
    /// DCGM's, board-level; see the agent's running totals).
    pub const ENERGY_JOULES: &str = "energy_joules_total";
    /// Counter: a container's host energy in joules (CPU package, DRAM and the rest, as Kepler
    /// estimates them; its GPU's left out).
    pub const HOST_ENERGY_JOULES: &str = "host_energy_joules_total";
    /// Counter: bytes received by the container's network namespace.
    pub const NETWORK_RECEIVE_BYTES: &str = "network_receive_bytes_total";
    /// Counter: bytes sent by the container's network namespace.
    pub const NETWORK_TRANSMIT_BYTES: &str = "network_transmit_bytes_total";
    /// Counter: bytes read from block devices (cgroup `io.stat` `rbytes`).
    pub const STORAGE_READ_BYTES: &str = "fs_read_bytes_total";
    /// Counter: bytes written to block devices (cgroup `io.stat` `wbytes`).
    pub const STORAGE_WRITE_BYTES: &str = "fs_write_bytes_total";
    /// Gauge: memory working set in bytes.
    pub const MEMORY_BYTES: &str = "memory_working_set_bytes";
    /// Gauge: GPU memory used in bytes, per GPU or MIG instance.
    pub const VRAM_BYTES: &str = "gpu_memory_used_bytes";
    /// Gauge: GPU engine-active ratio, 0..1, per GPU or MIG instance.
    pub const GPU_UTILIZATION: &str = "gpu_utilization";
    /// Allocation: the CPU limit of a container run (its spec's `resources.limits.cpu`, in
    /// cores, to the millicore), from its start to its finish; none for a container without one.
    pub const CPU_LIMIT: &str = "cpu_limit_cores";
    /// Allocation: the memory limit of a container run (`resources.limits.memory`, in bytes).
    pub const MEMORY_LIMIT: &str = "memory_limit_bytes";
    /// Counter: time the container's CPU quota held it back, in seconds (cgroup `cpu.stat`
    /// `throttled_usec` / 1e6).
    pub const CPU_THROTTLED_SECONDS: &str = "cpu_throttled_seconds_total";
    /// Gauge: anonymous memory in bytes (cgroup `memory.stat` `anon`: what cAdvisor and the
    /// kubelet report as RSS on cgroup v2).
    pub const MEMORY_RSS: &str = "memory_rss_bytes";
    /// Counter: processes of the pod the OOM killer killed (the pod cgroup's `memory.events`
    /// `oom_kill`, which counts its containers' kills and outlives them).
    pub const OOM_KILLS: &str = "memory_oom_kills_total";
    /// Counter: receive errors of the pod's network namespace (`/proc/PID/net/dev` `errs`).
    pub const NETWORK_RECEIVE_ERRORS: &str = "network_receive_errors_total";
    /// Counter: transmit errors of the pod's network namespace.
    pub const NETWORK_TRANSMIT_ERRORS: &str = "network_transmit_errors_total";
    /// Gauge: GPU memory in bytes, used or not, per GPU or MIG instance.
    pub const VRAM_TOTAL: &str = "gpu_memory_total_bytes";
    /// Gauge: the memory copy engine's busy ratio, 0..1, per GPU (NVML's memory utilization,
    /// dcgm's `DCGM_FI_DEV_MEM_COPY_UTIL` / 100).
    pub const GPU_COPY_UTILIZATION: &str = "gpu_memory_copy_utilization";
    /// Gauge: a GPU's temperature in degrees Celsius (whole GPUs; a split GPU's is its board's).
    pub const GPU_TEMPERATURE: &str = "gpu_temperature_celsius";
    /// Gauge: a GPU's streaming-multiprocessor clock in MHz.
    pub const GPU_SM_CLOCK: &str = "gpu_sm_clock_mhz";
    /// Gauge: bytes used on the pod's persistent volumes (the kubelet's stats summary,
    /// `usedBytes` of each volume with a `pvcRef`, summed).
    pub const FILESYSTEM_USAGE: &str = "filesystem_usage_bytes";
    /// Gauge: the capacity in bytes of the pod's persistent volumes.
    pub const FILESYSTEM_CAPACITY: &str = "filesystem_capacity_bytes";
    /// Gauge: inodes used on the pod's persistent volumes.
    pub const FILESYSTEM_INODES_USED: &str = "filesystem_inodes_used";
}

/// Names of the Kafka topics the pipeline reads and writes.
pub mod topics {
    /// Agent → processor: [`crate::SampleBatch`], key = node.
    pub const SAMPLES: &str = "meterflow.samples";
    /// Processor → sink: [`crate::UsageUpdate`], compacted, key = SHA-256 of tenant and record
    /// id.
    pub const USAGE: &str = "meterflow.usage";
    /// Processor → billing: [`crate::BillingRecord`].
    pub const BILLING: &str = "meterflow.billing";
    /// Processor → sink and operators: [`crate::Alert`].
    pub const ALERTS: &str = "meterflow.alerts";
    /// Anything the pipeline could not use: [`crate::DeadLetter`].
    pub const DEADLETTER: &str = "meterflow.deadletter";
    /// Every topic, in the order they are created.
    pub const ALL: [&str; 5] = [SAMPLES, USAGE, BILLING, ALERTS, DEADLETTER];

    /// How many offsets before a stored position a resuming reader starts fetching, skipping
    /// what it already has. Some Kafka-protocol brokers (tansu 0.6, the embedded broker) answer
    /// a fetch from inside a record batch with the *next* batch, which would silently skip the
    /// rest of the batch the position falls in; librdkafka's producers never put more than
    /// `batch.num.messages` (default 10,000) records in one batch, so starting this far back
    /// always includes that batch's first record.
    pub const RESUME_REWIND: i64 = 10_000;

    /// Where a reader resuming at `next` (the first offset it has not read) starts fetching.
    pub fn resume_from(next: i64, low: i64) -> i64 {
        next.saturating_sub(RESUME_REWIND).max(low)
    }
}
