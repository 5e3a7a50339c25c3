//! Meterflow's command-line program: wires the pipeline's crates into one binary.
//!
//! ```text
//! agent (meterflow-ingest) ─▶ Kafka meterflow.samples ─▶ processor (meterflow-processor)
//!     ─▶ meterflow.usage ─▶ sink (meterflow-sink) ─▶ HTTP API
//! ```
//!
//! - [`broker`]: the embedded Kafka-protocol broker (the `tansu-broker` crate) for the demo and
//!   the tests; production points `--brokers` at a Kafka cluster instead. Behind the default
//!   feature `embedded-broker`, which a production build leaves out (`--no-default-features`).
//! - [`topics`]: creates the pipeline's topics with rdkafka's admin client.
//! - [`demo`]: broker, simulated agent, processor and sink in one process.
//! - [`config`]: one TOML file for every component, with `MF_*` environment overrides.
//! - [`client`]: `meterflow lease-metrics`, a client of the sink's API.
//! - [`replay`]: `meterflow replay`, the processor once over the samples topic from offsets.
//! - [`registry`]: `meterflow schemas`: list, print, check and register the Avro schemas.
//! - [`parse_duration`]: human durations (`500ms`, `15s`, `2m`) for flags.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod client;
pub mod config;
#[cfg(feature = "embedded-broker")]
pub mod demo;
pub mod registry;
pub mod replay;
pub mod topics;

/// Parses a human duration such as `500ms`, `15s` or `2m` (for clap).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms, 15s or 2m: {e}"))
}
