//! The node agent: collects samples on a node and delivers them to Kafka.
//!
//! Output: Avro [`meterflow_schemas::SampleBatch`] records on `meterflow.samples`, key = node,
//! one batch per node per tick, each with a per-agent monotonic sequence number.
//!
//! - [`simulator`]: a deterministic, seeded fleet (nodes, GPU classes, MIG slices, containers
//!   that start, stop and restart) for the demo, tests and benchmarks; pure, no I/O.
//! - [`publisher`]: the idempotent Kafka producer that delivers batches in order.
//! - [`agent`]: the run loop that ticks a source and publishes what it yields.
//! - [`cgroup`]: per-container CPU, memory and block-I/O readings from cgroup v2.
//! - [`spool`]: the durable RocksDB spool every batch goes through before it is sent.
//! - [`metrics`]: the agent's own metrics and health answer.

pub mod agent;
pub mod cgroup;
pub mod metrics;
pub mod publisher;
pub mod simulator;
pub mod spool;

pub use agent::{AgentError, SimulatedAgentConfig, SpoolConfig, run_simulated};
pub use publisher::{PublishError, Publisher};
pub use simulator::{Fleet, FleetConfig};
