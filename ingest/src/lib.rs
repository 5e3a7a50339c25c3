//! The node agent: collects samples on a node and delivers them to Kafka.
//!
//! Output: Avro [`meterflow_schemas::SampleBatch`] records on `meterflow.samples`, key = node,
//! one batch per node per tick, each with a per-agent monotonic sequence number.
//!
//! - [`config`]: the `[agent]` table of the config file (`--config`): sources on and off, allow-lists,
//!   attribution rules; errors that name the key.
//! - [`sources`]: one module per source behind one trait — `cgroup`, `nvml`, `kubelet`,
//!   `pod_resources`, `prometheus_scrape`, and the `simulator` (a deterministic, seeded fleet
//!   for the demo, tests and benchmarks; pure, no I/O).
//! - [`attribution`]: pod namespace, owner, labels → tenant, lease, service, replica; presets
//!   for Akash and namespace-as-tenant; GPU price classes.
//! - [`node`]: the node collector — reads the sources, attributes readings and GPU
//!   allocations to containers, makes the node's batch; sources fail and recover alone.
//! - [`totals`]: running totals (a GPU board's energy, a pod's network) turned into counters of
//!   each holder's share, so no one is billed what the board or the pod counted before them.
//! - [`agent`]: the run loop that ticks a collector and publishes what it yields, in order.
//! - [`spool`]: the durable RocksDB spool every batch goes through before it is sent.
//! - [`publisher`]: the idempotent Kafka producer that delivers batches in order.
//! - [`metrics`]: the agent's own metrics and health answer.

pub mod agent;
pub mod attribution;
pub mod config;
pub mod metrics;
pub mod node;
pub mod publisher;
pub mod sources;
pub mod spool;
pub mod totals;

pub use sources::{cgroup, simulator};

/// An error with every cause under it (`error sending request: … : Connection refused`):
/// reqwest's and hyper's own messages leave the cause out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

pub use agent::{AgentError, RunConfig, SimulatedAgentConfig, SpoolConfig, run, run_simulated};
pub use config::AgentConfig;
pub use publisher::{PublishError, Publisher};
pub use simulator::{
    BoardReading, ContainerTruth, Fleet, FleetConfig, GPU_WATTS, HeldGpu, IDLE_WATTS, memory_bytes,
};
