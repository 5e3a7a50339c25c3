//! What Meterflow reads from outside before anything else looks at it: the parsers and checks
//! at its edges, in one crate without RocksDB or librdkafka so that they can be fuzzed alone
//! (`fuzz/`, `scripts/fuzz.sh`).
//!
//! - [`auth`]: bearer tokens (JWT): which keys, algorithms, expiry and audience are accepted,
//!   and what a token's claims reach.
//! - [`leases`]: the `leases` claim of an Akash lease owner's token (AEP-64): which leases,
//!   providers and scopes it reaches.
//! - [`owner_keys`]: lease owners' account keys, which their own `ES256K` tokens are checked
//!   with.
//! - [`params`]: the sink API's path identifiers (tenants, leases) and query parameters (times,
//!   durations).
//! - [`exposition`]: the Prometheus text exposition format the agent scrapes (dcgm-exporter,
//!   Kepler, cAdvisor).
//! - [`quantity`]: Kubernetes resource quantities (`500m`, `4Gi`) of the pod specs the agent
//!   bills requested cores and memory from.

pub mod auth;
pub mod exposition;
pub mod leases;
pub mod owner_keys;
pub mod params;
pub mod quantity;
