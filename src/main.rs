//! `meterflow`: one binary for every part of the pipeline. Each subcommand parses its flags
//! and calls one library `run` function.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
#[cfg(feature = "embedded-broker")]
use meterflow::{broker, demo};
use meterflow::{config, parse_duration, registry, replay, topics};
use tokio_util::sync::CancellationToken;

/// jemalloc, for every allocation of the process (its `malloc` replaces the C library's, so
/// RocksDB's and librdkafka's go there too): glibc's arenas kept the processor's freed memory
/// and its resident size kept rising where the state it holds did not (benches/SOAK.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "meterflow",
    version,
    about = "Exact, incremental metering of GPU clouds"
)]
struct Cli {
    /// One TOML file configuring every component: top-level `brokers`, `partitions`,
    /// `replication`; a table per component with its flags (`[processor] state_dir = ...`);
    /// `[agent]` for the node agent's sources. Flags and `MF_*` variables override it; see
    /// `meterflow.example.toml` and `meterflow config COMPONENT`.
    #[arg(long, global = true, env = config::CONFIG_ENV)]
    config: Option<PathBuf>,
    /// A Confluent Schema Registry (e.g. http://schema-registry:8081): records carry its
    /// schema ids, looked up at start-up, instead of Meterflow's own. Give every component the
    /// same one; register the schemas first with `meterflow schemas register`.
    #[arg(long, global = true, env = "MF_SCHEMA_REGISTRY")]
    schema_registry: Option<String>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Everything in one process: embedded broker, simulated fleet, processor and sink.
    #[cfg(feature = "embedded-broker")]
    Demo(DemoArgs),
    /// The embedded Kafka-protocol broker (tansu) on its own.
    #[cfg(feature = "embedded-broker")]
    Broker(BrokerArgs),
    /// The node agent: this node's sources from the `[agent]` table of `--config`, or a
    /// simulated fleet from the flags.
    Agent(AgentArgs),
    /// The processor: timely + differential-dataflow workers from samples to usage.
    Processor(ProcessorArgs),
    /// Reprocesses the samples topic from the given offsets into a new state directory, with a
    /// progress bar, and stops once it has read what the topic held at its start. Outputs are
    /// the processor's (ids from content, billing only what is not yet billed); afterwards
    /// `meterflow processor --state-dir DIR` continues from the state it built.
    Replay(ReplayArgs),
    /// The sink: usage views in RocksDB, served over HTTP.
    Sink(SinkArgs),
    /// Prints one lease's usage as a table, from the sink's API.
    LeaseMetrics {
        #[command(flatten)]
        request: meterflow::client::LeaseMetricsRequest,
        /// Print the sink's JSON answer instead of a table (the same as --output json).
        #[arg(long)]
        json: bool,
        /// `table` or `json`.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// The Avro schemas: list them, print one, check compatibility between versions,
    /// register them in a Confluent Schema Registry.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Prints a shell completion script: `meterflow completions bash > /etc/bash_completion.d/meterflow`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Prints what a component would run with: each flag's value and where it came from
    /// (command line, environment, config file, default).
    Config {
        /// The component: agent, processor, sink, demo, broker, replay, lease-metrics, token.
        component: String,
        /// The component's flags, as they would be given to it (`config processor -w 4`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        flags: Vec<String>,
    },
    /// Mints a bearer token for the sink's API from the sink's key.
    Token(TokenArgs),
}

// The flags of `meterflow demo` (its help is on the subcommand).
#[cfg(feature = "embedded-broker")]
#[derive(clap::Args)]
struct DemoArgs {
    /// HTTP address of the sink (dashboard and API).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Stop after this long and exit 0 (e.g. 40s); without it, run until Ctrl-C.
    #[arg(long, value_parser = parse_duration_or_seconds)]
    exit_after: Option<Duration>,
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Seed of the simulation: the same seed gives the same fleet.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time between two agent ticks.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// Processor worker threads.
    #[arg(long, short = 'w', default_value_t = 1)]
    workers: usize,
    /// How long the demo's broker keeps samples, billing records, alerts and dead letters
    /// (the usage topic is compacted): what bounds its disk over a long run.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    retention: Duration,
}

// The flags of `meterflow broker` (its help is on the subcommand).
#[cfg(feature = "embedded-broker")]
#[derive(clap::Args)]
struct BrokerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// `memory` (lost at exit, never trimmed) or `sqlite://FILE` (kept; FILE relative to
    /// the working directory; `?maintenance_interval=1m` applies retention and compaction
    /// that often, every 10 minutes without it).
    #[arg(long, default_value = "memory")]
    storage: String,
    #[command(flatten)]
    topics: TopicArgs,
}

// The flags of `meterflow agent` (its help is on the subcommand).
#[derive(clap::Args)]
struct AgentArgs {
    /// Kafka bootstrap servers (overrides the `[agent]` table's `brokers`).
    #[arg(long)]
    brokers: Option<String>,
    /// Number of simulated nodes (simulated fleet only, as are the next four).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Seed of the simulation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time between two ticks (SPEC: collection interval).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    interval: Duration,
    /// Directory of the durable spool: every batch is stored here before it is sent and
    /// removed once the broker acknowledged it; one directory per agent.
    #[arg(long, default_value = "meterflow-agent-spool")]
    spool_dir: PathBuf,
    /// Most bytes of batches the spool holds while the broker is away; past it, the oldest
    /// batches are dropped, counted and logged.
    #[arg(long, default_value_t = 256 << 20)]
    spool_max_bytes: u64,
    /// Serve the agent's metrics at http://ADDR/metrics and its health (sources, spool
    /// depth, spool error, send lag) at http://ADDR/healthz, and the same at
    /// http://ADDR/readyz with a 503 while the spool cannot write (overrides the
    /// `[agent]` table's `metrics_listen`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    topics: TopicArgs,
}

// The flags of `meterflow processor` (its help is on the subcommand).
#[derive(clap::Args)]
struct ProcessorArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Worker threads (per process).
    #[arg(long, short = 'w', default_value_t = 1)]
    workers: usize,
    /// Processes of the timely cluster (each runs `-w` workers; all use the same flags but
    /// `--process` and `--state-dir`).
    #[arg(long, short = 'n', default_value_t = 1)]
    processes: usize,
    /// This process's index in the cluster, 0 to `--processes` - 1.
    #[arg(long, short = 'p', default_value_t = 0)]
    process: usize,
    /// File with one `host:port` per process, in process order (timely's host file);
    /// required with more than one process.
    #[arg(long)]
    hostfile: Option<PathBuf>,
    /// Stop, with a checkpoint, once the input has been read up to where it ended at start-up.
    #[arg(long)]
    exit_when_caught_up: bool,
    /// Serve the processor's counters (dead letters by reason, batches, duplicates,
    /// billing records, alerts, checkpoints) at http://ADDR/metrics, `ok` at
    /// http://ADDR/healthz while it runs, and at http://ADDR/readyz `ready`, or a 503 with
    /// the reason while checkpoints cannot be written (a full state directory).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Directory of the RocksDB checkpoint (input offsets and state). A restart resumes from
    /// it; one directory per processor process.
    #[arg(long, default_value = "meterflow-processor-state")]
    state_dir: PathBuf,
    #[command(flatten)]
    processing: Processing,
    /// At start-up, how long the billing topic must hold still before the processor trusts
    /// that a killed predecessor's last records have landed.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    restart_grace: Duration,
    #[command(flatten)]
    topics: TopicArgs,
}

// The flags of `meterflow replay` (its help is on the subcommand).
#[derive(clap::Args)]
struct ReplayArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Worker threads.
    #[arg(long, short = 'w', default_value_t = 1)]
    workers: usize,
    /// Where the rebuilt state goes: a directory that does not exist or is empty.
    #[arg(long, default_value = "meterflow-replay-state")]
    state_dir: PathBuf,
    /// Where to start: `beginning`, or `PARTITION:OFFSET` pairs, comma-separated
    /// (`0:1500,3:0`); partitions not named start at their beginning.
    #[arg(long, default_value = "beginning", value_parser = replay::parse_offsets)]
    from: replay::Offsets,
    /// Serve the processor's counters at http://ADDR/metrics while it runs.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    processing: Processing,
    #[command(flatten)]
    topics: TopicArgs,
}

// The flags of `meterflow sink` (its help is on the subcommand).
#[derive(clap::Args)]
struct SinkArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the RocksDB view store.
    #[arg(long, default_value = "meterflow-sink-data")]
    data_dir: PathBuf,
    /// File holding the HS256 secret bearer tokens are signed with (32 bytes or more).
    #[arg(long, env = "MF_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// PEM file of a public key (Ed25519 for EdDSA tokens, RSA for RS256); repeat for
    /// several.
    #[arg(long)]
    jwt_public_key: Vec<PathBuf>,
    /// Accept only tokens whose `aud` claim names this audience (an identity provider's
    /// tokens for several services); without it `aud` is not checked.
    #[arg(long)]
    jwt_audience: Option<String>,
    /// File of lease owners' account public keys, one a line (base64, as `akash query auth
    /// account` shows it): their own AEP-64 tokens (ES256K) are accepted, signed with them.
    /// Read again when it changes.
    #[arg(long, value_name = "FILE")]
    lease_owner_keys: Option<PathBuf>,
    /// Requests per second each tenant (or operator) may make, sustained.
    #[arg(long, default_value_t = 20.0)]
    rate_limit: f64,
    /// Requests each tenant may make at once after a quiet period.
    #[arg(long, default_value_t = 100.0)]
    rate_burst: f64,
    /// Series each tenant may read per second, sustained, summed over answers: a usage
    /// answer grouped by lease has a series per lease, a lease's metrics one per metric.
    #[arg(long, default_value_t = 2_000.0)]
    series_limit: f64,
    /// Series each tenant may read at once after a quiet period; an answer with more waits
    /// (429, Retry-After) until the bucket is full again.
    #[arg(long, default_value_t = 20_000.0)]
    series_burst: f64,
    /// The most series one answer may hold (AEP-43's 5,000): a larger one is refused (400) with
    /// a hint to narrow it.
    #[arg(long, default_value_t = 5_000)]
    max_series_per_query: usize,
    /// The most Server-Sent Events feeds one tenant (or operator) may hold open at once
    /// (AEP-43's 20 concurrent queries): another is refused (429) until one closes.
    #[arg(long, default_value_t = 20)]
    max_open_feeds: usize,
    /// How often an idle Server-Sent Events feed sends a keep-alive comment.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    keep_alive: Duration,
    /// The provider this sink serves (an Akash provider's address, akash1...): the
    /// `provider` label of the AEP-43 lease metrics route's answers.
    #[arg(long, default_value = "")]
    provider: String,
    #[command(flatten)]
    topics: TopicArgs,
}

// The flags of `meterflow token` (its help is on the subcommand).
#[derive(clap::Args)]
struct TokenArgs {
    /// The HS256 secret file the sink is given with --jwt-secret-file.
    #[arg(
        long,
        env = "MF_JWT_SECRET_FILE",
        conflicts_with = "private_key",
        required_unless_present = "private_key"
    )]
    secret_file: Option<PathBuf>,
    /// A PEM private key (Ed25519 or RSA) whose public key the sink is given.
    #[arg(long)]
    private_key: Option<PathBuf>,
    /// The tenant whose data the token reaches (scope `metrics`).
    #[arg(
        long,
        conflicts_with_all = ["operator", "lease_owner"],
        required_unless_present_any = ["operator", "lease_owner"]
    )]
    tenant: Option<String>,
    /// An operator token: the fleet and every tenant (scope `operator`).
    #[arg(long, conflicts_with = "lease_owner")]
    operator: bool,
    /// A lease owner's token as AEP-64 has them (`iss` this Akash account, `iat`, `version`
    /// v1, a `leases` claim): what an owner's client signs, here signed with the sink's key.
    #[arg(long, value_name = "ACCOUNT")]
    lease_owner: Option<String>,
    /// With --lease-owner: the `leases` claim, in JSON, e.g.
    /// '{"access":"granular","permissions":[{"provider":"akash1…","access":"granular","deployments":[{"dseq":1000,"scope":["metrics"]}]}]}'.
    /// Without it: `{"access":"full"}`.
    #[arg(long)]
    leases: Option<String>,
    /// Who the token is for (the `sub` claim).
    #[arg(long, default_value = "meterflow-cli")]
    sub: String,
    /// How long the token is valid: 24h by default, 15m for a lease owner's (AEP-64's
    /// recommended longest).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// The `aud` claim, for a sink started with --jwt-audience.
    #[arg(long)]
    audience: Option<String>,
}

#[derive(Subcommand)]
enum SchemasAction {
    /// Every schema version: wire id, registry subject, file.
    List,
    /// One schema's `.avsc` text (e.g. `sample_batch`, `usage_update.v1`).
    Print {
        /// The schema's file name, with or without `.avsc`.
        name: String,
    },
    /// Checks that each newer version reads records of the older ones.
    Check,
    /// Registers every version, oldest first, after asking the registry whether each is
    /// compatible with its latest.
    Register {
        /// The registry's URL (e.g. http://schema-registry:8081).
        #[arg(long, env = "MF_SCHEMA_REGISTRY")]
        registry: String,
    },
}

/// How samples become usage and billing: shared by the processor and the replay, which must
/// agree (a replay with other windows or prices computes other numbers).
#[derive(clap::Args)]
struct Processing {
    /// Roll-ups of the base windows to keep: a comma-separated list of hour, day, month, or
    /// `none`. Each level costs about as much processing as the base windows.
    #[arg(long, default_value = "hour,day,month", value_parser = parse_rollups)]
    rollups: Rollups,
    /// Length of the base window.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    window: Duration,
    /// Length of a billing window (a multiple of the base window).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    billing_window: Duration,
    /// How far behind its agent's latest sample a sample is still accepted; older ones go
    /// to the dead-letter topic as `too_late`.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    lateness: Duration,
    /// How far ahead of this processor's clock a batch or a sample may be stamped; further
    /// ones go to the dead-letter topic as `far_future`, naming their agent, and move no
    /// watermark: an agent whose clock runs fast cannot close every tenant's billing windows.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    max_clock_skew: Duration,
    /// How long a calendar month's billing period stays open after its end (by the billing
    /// frontier); later, a sample of that month from any agent, a new one included, goes to the
    /// dead-letter topic as `closed_period` instead of being billed.
    #[arg(long, default_value = "3d", value_parser = parse_duration)]
    period_grace: Duration,
    /// The longest gap across which a gauge reading (memory, VRAM, utilization) is held;
    /// a longer gap is reported as not observed, never filled. Twice the agents' interval.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    max_staleness: Duration,
    /// Least time between two checkpoints of a worker.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    checkpoint_interval: Duration,
    /// Most input messages a worker feeds in one epoch (an epoch also ends once a million
    /// samples are in).
    #[arg(long, default_value_t = 1000)]
    max_batch: usize,
    /// Most input messages a worker feeds in one epoch while it reads a backlog (after a
    /// restart or an outage: its partitions up to where they ended when it started), if more
    /// than --max-batch. Larger epochs send fewer intermediate values of each aggregate; each
    /// holds its samples' changes in memory until the epoch ends.
    #[arg(long, default_value_t = 10_000)]
    max_catch_up_batch: usize,
    /// Most new series one tenant may open per hour (of its samples' time) on one worker;
    /// samples that would open more go to the dead-letter topic as `series_limit`, so a label
    /// explosion in one tenant neither grows the state without bound nor touches the others.
    #[arg(long, default_value_t = 100_000)]
    max_new_series_per_tenant_hour: usize,
    /// A series silent this long behind its worker's newest data leaves memory after the next
    /// checkpoint (the state directory keeps it and brings it back if it reports again, so
    /// totals do not depend on it); without it, the lateness plus an hour.
    #[arg(long, value_parser = parse_duration)]
    retire_idle_after: Option<Duration>,
    /// Price book (TOML) for the billing records; without it, the demo prices.
    #[arg(long)]
    price_book: Option<PathBuf>,
    /// Budgets per tenant (TOML: `[tenants.NAME] monthly = 1000.0, thresholds = [50, 90,
    /// 100]`); crossing a threshold raises one alert per period on meterflow.alerts.
    #[arg(long)]
    budgets: Option<PathBuf>,
}

impl Processing {
    /// The processor's configuration with these settings.
    fn config(self, brokers: String) -> Result<meterflow_processor::ProcessorConfig> {
        let prices = match self.price_book {
            Some(path) => meterflow_processor::PriceBook::load(&path)?,
            None => meterflow_processor::PriceBook::default(),
        };
        let budgets = match self.budgets {
            Some(path) => meterflow_processor::budgets::Budgets::load(&path)?,
            None => meterflow_processor::budgets::Budgets::default(),
        };
        Ok(meterflow_processor::ProcessorConfig {
            budgets,
            rollups: self.rollups.0,
            window_ms: self.window.as_millis() as i64,
            billing_window_ms: self.billing_window.as_millis() as i64,
            allowed_lateness_ms: self.lateness.as_millis() as i64,
            max_future_ms: self.max_clock_skew.as_millis() as i64,
            period_grace_ms: self.period_grace.as_millis() as i64,
            max_staleness_ms: self.max_staleness.as_millis() as i64,
            checkpoint_interval: self.checkpoint_interval,
            max_batch: self.max_batch.max(1),
            max_catch_up_batch: self.max_catch_up_batch,
            max_new_series_per_tenant_hour: self.max_new_series_per_tenant_hour,
            retire_idle_after_ms: self.retire_idle_after.map(|d| d.as_millis() as i64),
            prices,
            ..meterflow_processor::ProcessorConfig::new(brokers)
        })
    }
}

/// How topics are created when missing.
#[derive(clap::Args)]
struct TopicArgs {
    /// Partitions of each topic created at start-up (existing topics are left alone).
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Replication factor of each topic created at start-up.
    #[arg(long, default_value_t = 1)]
    replication: i32,
    /// How long each topic created at start-up keeps a record (e.g. 7d; the usage topic is
    /// compacted instead); without it, the cluster's default retention.
    #[arg(long, value_parser = parse_duration)]
    retention: Option<Duration>,
}

impl TopicArgs {
    fn config(&self) -> topics::TopicsConfig {
        topics::TopicsConfig {
            partitions: self.partitions,
            replication: self.replication,
            retention: self.retention,
        }
    }
}

/// `40` means 40 seconds; `40s`, `2m` and `500ms` work too.
#[cfg(feature = "embedded-broker")]
fn parse_duration_or_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => parse_duration(s),
    }
}

/// The embedded broker's crates: their logs follow `MF_BROKER_LOG` (default `warn`), not
/// `MF_LOG`, unless `MF_LOG` names one of them itself.
const BROKER_CRATES: [&str; 7] = [
    "tansu_auth",
    "tansu_broker",
    "tansu_model",
    "tansu_sans_io",
    "tansu_schema",
    "tansu_service",
    "tansu_storage",
];

/// The log filter: `MF_LOG` (default: info for Meterflow, warn for the rest), with the
/// embedded broker at `MF_BROKER_LOG`. `MF_LOG_FORMAT=json` writes one JSON object per line
/// (`timestamp`, `level`, `target`, `fields`) for a log pipeline; text otherwise.
fn log_filter(mf_log: Option<&str>, broker_log: Option<&str>) -> String {
    let mut spec = mf_log
        .unwrap_or("warn,meterflow=info,meterflow_ingest=info,meterflow_processor=info,meterflow_sink=info")
        .to_string();
    if !spec.contains("tansu") {
        let level = broker_log.unwrap_or("warn");
        for krate in BROKER_CRATES {
            spec.push_str(&format!(",{krate}={level}"));
        }
    }
    spec
}

fn init_logging() {
    let spec = log_filter(
        std::env::var("MF_LOG").ok().as_deref(),
        std::env::var("MF_BROKER_LOG").ok().as_deref(),
    );
    let filter = tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("MF_LOG={spec:?} is not a log filter ({e}); using the default");
        tracing_subscriber::EnvFilter::new(log_filter(None, None))
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Colours only for a person at a terminal, never into a file or a log pipeline.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match std::env::var("MF_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().with_current_span(false).init(),
        Ok("text") | Err(_) => logs.with_ansi(ansi).init(),
        Ok(other) => {
            logs.with_ansi(ansi).init();
            tracing::warn!("MF_LOG_FORMAT={other:?} is neither `text` nor `json`; logging text");
        }
    }
}

/// Cancels the token on Ctrl-C or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
}

/// What every long-running component does first: create missing topics, stop on a signal.
/// Serves the agent's `/metrics`, `/healthz` (always 200, with the details) and `/readyz` (the
/// same, 503 while the spool cannot write) on `addr`.
async fn serve_agent_metrics(addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the agent's metrics"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async { meterflow_ingest::metrics::render() }),
        )
        .route(
            "/healthz",
            axum::routing::get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    meterflow_ingest::metrics::health(),
                )
            }),
        )
        .route(
            "/readyz",
            axum::routing::get(|| async {
                // 503 while the spool cannot write (a full disk): new batches are only in
                // memory. Not a liveness failure: a restart would lose them.
                let status = match meterflow_ingest::metrics::spool_error() {
                    Some(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    None => axum::http::StatusCode::OK,
                };
                (
                    status,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    meterflow_ingest::metrics::health(),
                )
            }),
        );
    tracing::info!(%addr, "agent metrics at /metrics, health at /healthz");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}

/// Serves the processor's counters at `/metrics`, liveness at `/healthz` and readiness (503
/// while checkpoints fail) at `/readyz`.
async fn serve_processor_metrics(addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics-listen"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async { meterflow_processor::metrics::render() }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(|| async {
                // 503 while checkpoints cannot be written (a full state directory); processing
                // goes on, so it is not a liveness failure.
                match meterflow_processor::metrics::unhealthy() {
                    Some(why) => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("{why}\n"),
                    ),
                    None => (axum::http::StatusCode::OK, "ready\n".to_string()),
                }
            }),
        );
    tracing::info!(%addr, "processor metrics at /metrics, liveness at /healthz, readiness at /readyz");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}

/// `meterflow config agent` with an `[agent]` table: the values the agent runs with, and the
/// same checks it makes at start (an error here is the error the agent would stop with).
fn describe_agent_table(agent: &meterflow_ingest::AgentConfig) -> Result<()> {
    println!(
        "# [agent]: this node ({}), sources: {}",
        agent.node_name(),
        agent.enabled_sources().join(", ")
    );
    let line = |key: &str, value: String| println!("{key} = {value}  # config [agent]");
    if let Some(b) = &agent.brokers {
        println!("brokers = {b:?}  # config [agent], unless a flag or MF_BROKERS says otherwise");
    }
    line("provider", format!("{:?}", agent.provider));
    line(
        "interval",
        format!(
            "{:?}",
            humantime::format_duration(agent.interval).to_string()
        ),
    );
    if let Some(addr) = agent.metrics_listen {
        line("metrics_listen", format!("\"{addr}\""));
    }
    line(
        "spool.dir",
        format!("{:?}", agent.spool.dir.display().to_string()),
    );
    line("spool.max_bytes", agent.spool.max_bytes.to_string());
    let a = &agent.attribution;
    line("attribution.preset", format!("{:?}", a.preset));
    for (key, template) in [
        ("tenant", &a.tenant),
        ("lease", &a.lease),
        ("service", &a.service),
        ("replica", &a.replica),
    ] {
        if let Some(t) = template {
            line(&format!("attribution.{key}"), format!("{t:?}"));
        }
    }
    let k = &agent.sources.kubelet;
    if k.enabled {
        line("sources.kubelet.pods_url", format!("{:?}", k.pods_url));
        for (key, url) in [
            ("namespaces_url", &k.namespaces_url),
            ("resource_slices_url", &k.resource_slices_url),
        ] {
            if let Some(url) = url {
                line(&format!("sources.kubelet.{key}"), format!("{url:?}"));
            }
        }
    }
    agent
        .collector()
        .context("the agent would refuse this [agent] table")?;
    println!("# the agent accepts this table");
    Ok(())
}

/// Creates the topics, retrying every 10 s while no broker answers; until then the agent's
/// health says why (`broker_error`).
fn ensure_topics_in_background(
    brokers: String,
    config: topics::TopicsConfig,
    shutdown: CancellationToken,
) {
    meterflow_ingest::metrics::set_broker_error(Some(format!(
        "no broker at {brokers} has answered yet (topics not created or checked)"
    )));
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            match topics::ensure(&brokers, &config).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(%brokers, "the brokers answer: topics are there");
                    }
                    meterflow_ingest::metrics::set_broker_error(None);
                    return;
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    if !failing {
                        tracing::warn!(error = %why, "cannot create or check the topics yet; collecting into the spool meanwhile, retrying every 10 s");
                    }
                    failing = true;
                    meterflow_ingest::metrics::set_broker_error(Some(why));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    });
}

async fn prepare(brokers: &str, topics: &TopicArgs, shutdown: &CancellationToken) -> Result<()> {
    topics::ensure(brokers, &topics.config()).await?;
    cancel_on_signal(shutdown.clone());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    init_logging();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let file = match config::config_path(&args) {
        Some(path) => Some(config::ConfigFile::load(&path, &Cli::command())?),
        None => None,
    };
    if let Some(f) = &file {
        meterflow_schemas::kafka::set_file_properties(f.kafka.clone());
    }
    let command = config::apply(Cli::command(), file.as_ref());
    let matches = command.clone().get_matches_from(&args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Some(url), true) = (&cli.schema_registry, cli.command.moves_records()) {
        use_registry(url).await?;
    }
    let shutdown = CancellationToken::new();
    match cli.command {
        #[cfg(feature = "embedded-broker")]
        Command::Demo(a) => a.run().await,
        #[cfg(feature = "embedded-broker")]
        Command::Broker(a) => a.run(shutdown).await,
        Command::Agent(a) => {
            let flags = matches.subcommand_matches("agent").expect("the agent's");
            a.run(file.and_then(|f| f.agent), flags, shutdown).await
        }
        Command::Processor(a) => a.run(shutdown).await,
        Command::Replay(a) => a.run(shutdown).await,
        Command::Sink(a) => a.run(shutdown).await,
        Command::Schemas { action } => schemas(action).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meterflow",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::LeaseMetrics {
            request,
            json,
            output,
        } => {
            let answer = meterflow::client::fetch_lease_metrics(&request).await?;
            if json || output == "json" {
                println!("{answer:#}");
            } else if request.dseq.is_some() {
                print!("{}", meterflow::client::aep_table(&answer));
            } else {
                print!("{}", meterflow::client::table(&answer));
            }
            Ok(())
        }
        Command::Token(a) => a.run(),
        Command::Config { component, flags } => describe_component(
            &command,
            &component,
            &flags,
            cli.config.as_deref(),
            file.as_ref(),
        ),
    }
}

impl Command {
    /// Whether the command reads or writes the pipeline's records (and so needs the schema
    /// registry's ids when there is one).
    fn moves_records(&self) -> bool {
        match self {
            #[cfg(feature = "embedded-broker")]
            Command::Demo(_) | Command::Broker(_) => true,
            Command::Agent(_) | Command::Processor(_) | Command::Replay(_) | Command::Sink(_) => {
                true
            }
            Command::LeaseMetrics { .. }
            | Command::Schemas { .. }
            | Command::Completions { .. }
            | Command::Config { .. }
            | Command::Token(_) => false,
        }
    }
}

/// Records carry the registry's schema ids from here on.
async fn use_registry(url: &str) -> Result<()> {
    let ids = registry::lookup_ids(url).await?;
    for (own, mine, theirs) in ids.shadowed() {
        tracing::warn!(
            "records written before the registry with Meterflow's id {own} ({mine:?}) will be read as the registry's {theirs:?}"
        );
    }
    meterflow_schemas::use_registry_ids(ids).map_err(anyhow::Error::msg)?;
    tracing::info!(registry = %url, "records carry the schema registry's ids");
    Ok(())
}

#[cfg(feature = "embedded-broker")]
impl DemoArgs {
    async fn run(self) -> Result<()> {
        demo::run(demo::DemoConfig {
            listen: self.listen,
            exit_after: self.exit_after,
            nodes: self.nodes,
            seed: self.seed,
            interval: self.interval,
            workers: self.workers,
            retention: self.retention,
        })
        .await
    }
}

#[cfg(feature = "embedded-broker")]
impl BrokerArgs {
    async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if self.topics.retention.is_some()
            && broker::storage_url(&self.storage)?.scheme() == "memory"
        {
            anyhow::bail!(
                "--retention needs --storage sqlite://FILE: the embedded broker's memory storage keeps every record for the life of the process"
            );
        }
        let b = broker::start(broker::BrokerConfig {
            listen: self.listen,
            storage: self.storage,
        })
        .await?;
        prepare(&b.bootstrap(), &self.topics, &shutdown).await?;
        println!("embedded Kafka broker listening on {}", b.addr);
        shutdown.cancelled().await;
        b.stop();
        Ok(())
    }
}

impl AgentArgs {
    /// Runs this node's sources (`file`, the config's `[agent]` table) or a simulated fleet;
    /// `flags` tells which flags were given (the simulated fleet's are refused with a table).
    async fn run(
        self,
        file: Option<meterflow_ingest::AgentConfig>,
        flags: &clap::ArgMatches,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let given = |id: &str| {
            matches!(
                flags.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        };
        if file.is_some() {
            let simulated = ["nodes", "seed", "interval", "spool_dir", "spool_max_bytes"];
            if let Some(id) = simulated.into_iter().find(|id| given(id)) {
                anyhow::bail!(
                    "--{} is for a simulated fleet; the config's [agent] table runs this node's sources (set `interval` and `[agent.spool]` there)",
                    id.replace('_', "-")
                );
            }
        }
        // The [agent] table's own `brokers` beats the file's top level, not a flag.
        let own = file.as_ref().and_then(|f| f.brokers.clone());
        let brokers = if given("brokers") {
            self.brokers
        } else {
            own.or(self.brokers)
        }
        .unwrap_or_else(|| "127.0.0.1:9092".into());
        if let Some(addr) = self
            .metrics_listen
            .or(file.as_ref().and_then(|f| f.metrics_listen))
        {
            serve_agent_metrics(addr).await?;
        }
        // An agent collects and spools from its first tick, broker or not: the topics are
        // created (or found) once a broker answers.
        cancel_on_signal(shutdown.clone());
        ensure_topics_in_background(brokers.clone(), self.topics.config(), shutdown.clone());
        let Some(file) = file else {
            let config = meterflow_ingest::SimulatedAgentConfig {
                brokers,
                fleet: meterflow_ingest::FleetConfig {
                    nodes: self.nodes,
                    seed: self.seed,
                    ..Default::default()
                },
                interval: self.interval,
                spool: Some(meterflow_ingest::SpoolConfig {
                    dir: self.spool_dir,
                    max_bytes: self.spool_max_bytes,
                }),
            };
            return meterflow_ingest::run_simulated(config, shutdown)
                .await
                .context("agent failed");
        };
        let run = meterflow_ingest::RunConfig {
            brokers,
            interval: file.interval,
            spool: Some(meterflow_ingest::SpoolConfig {
                dir: file.spool.dir.clone(),
                max_bytes: file.spool.max_bytes,
            }),
        };
        let sim = &file.sources.simulator;
        if sim.enabled {
            let fleet = meterflow_ingest::Fleet::new(
                meterflow_ingest::FleetConfig {
                    nodes: sim.nodes,
                    seed: sim.seed,
                    ..Default::default()
                },
                meterflow_ingest::agent::now_ms(),
            );
            meterflow_ingest::run(run, fleet, shutdown).await
        } else {
            let collector = file.collector()?;
            tracing::info!(node = %file.node_name(), "node agent started");
            meterflow_ingest::run(run, collector, shutdown).await
        }
        .context("agent failed")
    }
}

impl ProcessorArgs {
    async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let cluster = cluster(self.processes, self.process, self.hostfile.as_deref())?;
        if let Some(addr) = self.metrics_listen {
            serve_processor_metrics(addr).await?;
        }
        prepare(&self.brokers, &self.topics, &shutdown).await?;
        let config = meterflow_processor::ProcessorConfig {
            cluster,
            exit_when_caught_up: self.exit_when_caught_up,
            workers: self.workers,
            state_dir: Some(self.state_dir),
            restart_grace: self.restart_grace,
            ..self.processing.config(self.brokers)?
        };
        tokio::task::spawn_blocking(move || meterflow_processor::run(config, shutdown))
            .await
            .context("processor thread")?
            .context("processor failed")
    }
}

impl ReplayArgs {
    async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if let Some(addr) = self.metrics_listen {
            serve_processor_metrics(addr).await?;
        }
        prepare(&self.brokers, &self.topics, &shutdown).await?;
        let config = meterflow_processor::ProcessorConfig {
            workers: self.workers,
            ..self.processing.config(self.brokers)?
        };
        replay::run(config, &self.state_dir, &self.from, shutdown).await
    }
}

impl SinkArgs {
    /// The sink's limits, checked.
    fn limits(&self) -> Result<meterflow_sink::limits::Limits> {
        let (rate, burst) = (self.rate_limit, self.rate_burst);
        if !(rate > 0.0 && burst >= 1.0) {
            anyhow::bail!(
                "--rate-limit must be above 0 and --rate-burst at least 1 (got {rate} and {burst})"
            );
        }
        let (series, series_burst) = (self.series_limit, self.series_burst);
        if !(series > 0.0 && series_burst >= 1.0) {
            anyhow::bail!(
                "--series-limit must be above 0 and --series-burst at least 1 (got {series} and {series_burst})"
            );
        }
        Ok(meterflow_sink::limits::Limits {
            requests_per_s: rate,
            burst,
            series_per_s: series,
            series_burst,
            max_series_per_query: self.max_series_per_query.max(1),
            max_open_feeds: self.max_open_feeds.max(1),
        })
    }

    /// The keys bearer tokens are checked with.
    fn auth(&self) -> Result<meterflow_sink::auth::Auth> {
        use meterflow_sink::auth::Auth;
        let mut keys = Vec::new();
        if let Some(path) = &self.jwt_secret_file {
            keys.push(Auth::hs256(&Auth::secret_file(path)?));
        }
        for path in &self.jwt_public_key {
            keys.push(Auth::public_key_file(path)?);
        }
        if keys.is_empty() {
            anyhow::bail!(
                "the sink needs a key to check bearer tokens: give --jwt-secret-file FILE \
                 (32 random bytes or more, e.g. `head -c 32 /dev/urandom | base64 > FILE`) \
                 or --jwt-public-key PEM; then mint tokens with `meterflow token`"
            );
        }
        let auth = Auth::new(keys).with_audience(self.jwt_audience.as_deref());
        Ok(match &self.lease_owner_keys {
            Some(path) => {
                let owners = meterflow_sink::owner_keys::OwnerKeys::open(path)?;
                tracing::info!(owners = owners.len(), file = %path.display(), "lease owners' keys read");
                if self.provider.is_empty() {
                    tracing::warn!(
                        "--lease-owner-keys without --provider: an owner's granular token names the providers it reaches and reaches nothing here; give --provider akash1<this provider>"
                    );
                }
                auth.with_owner_keys(owners)
            }
            None => auth,
        })
    }

    async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let limits = self.limits()?;
        if self.keep_alive.is_zero() {
            anyhow::bail!("--keep-alive must be longer than 0 (e.g. 15s)");
        }
        let auth = self.auth()?;
        prepare(&self.brokers, &self.topics, &shutdown).await?;
        let running = meterflow_sink::start(
            meterflow_sink::SinkConfig {
                brokers: self.brokers,
                listen: self.listen,
                data_dir: self.data_dir,
                auth,
                limits,
                keep_alive: self.keep_alive,
                provider: self.provider,
            },
            shutdown,
        )
        .await?;
        println!("sink listening on http://{}", running.addr);
        running
            .task
            .await
            .context("sink task")?
            .context("sink failed")
    }
}

impl TokenArgs {
    fn run(self) -> Result<()> {
        use meterflow_sink::auth::{Auth, Claims, SigningKey, mint_for, now_s};
        let key = match (self.secret_file, self.private_key) {
            (Some(path), _) => SigningKey::Hs256(Auth::secret_file(&path)?),
            (None, Some(path)) => SigningKey::Pem(
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
            ),
            (None, None) => anyhow::bail!("give --secret-file or --private-key"),
        };
        anyhow::ensure!(
            self.leases.is_none() || self.lease_owner.is_some(),
            "--leases is a lease owner's claim: give --lease-owner ACCOUNT with it"
        );
        let claims = match self.lease_owner {
            Some(owner) => {
                anyhow::ensure!(
                    meterflow_sink::leases::is_account(&owner),
                    "--lease-owner {owner:?} is not an Akash account (akash1 and 38 more letters and digits)"
                );
                let leases = self.leases.as_deref().unwrap_or(r#"{"access":"full"}"#);
                let leases = serde_json::from_str(leases)
                    .with_context(|| format!("--leases {leases:?} is not a leases claim"))?;
                let ttl = self.ttl.unwrap_or(Duration::from_secs(15 * 60));
                Claims {
                    exp: now_s() + ttl.as_secs(),
                    iss: Some(owner),
                    iat: Some(now_s()),
                    version: Some("v1".into()),
                    leases: Some(leases),
                    ..Claims::default()
                }
            }
            None => Claims {
                sub: self.sub,
                scope: if self.operator { "operator" } else { "metrics" }.into(),
                tenant: self.tenant.unwrap_or_default(),
                exp: now_s() + self.ttl.unwrap_or(Duration::from_secs(24 * 3600)).as_secs(),
                ..Claims::default()
            },
        };
        if let Some(leases) = &claims.leases {
            leases
                .validate()
                .map_err(|why| anyhow::anyhow!("--leases: {why}"))?;
        }
        println!("{}", mint_for(&key, &claims, self.audience.as_deref())?);
        Ok(())
    }
}

/// `meterflow schemas ...`.
async fn schemas(action: SchemasAction) -> Result<()> {
    match action {
        SchemasAction::List => print!("{}", registry::table()),
        SchemasAction::Print { name } => print!("{}", registry::source(&name)?),
        SchemasAction::Check => {
            for line in registry::check()? {
                println!("{line}");
            }
        }
        SchemasAction::Register { registry: url } => {
            for (subject, file, id) in registry::register(&url).await? {
                println!("{subject}: {file} registered as id {id}");
            }
        }
    }
    Ok(())
}

/// `meterflow config COMPONENT FLAGS...`: what the component would run with, from
/// `command` (the CLI with the config file's values applied).
fn describe_component(
    command: &clap::Command,
    component: &str,
    flags: &[String],
    path: Option<&std::path::Path>,
    file: Option<&config::ConfigFile>,
) -> Result<()> {
    let Some(sub) = command.find_subcommand(component) else {
        anyhow::bail!(
            "no component `{component}`; one of: agent, processor, sink, demo, broker, replay, lease-metrics, token"
        );
    };
    let resolved = sub
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(std::iter::once(&component.to_string()).chain(flags))?;
    if let Some(path) = path {
        println!("# meterflow {component} with {}", path.display());
    }
    if component == "agent"
        && let Some(agent) = file.and_then(|f| f.agent.as_ref())
    {
        // The [agent] table runs this node's sources: the simulated fleet's flags do
        // not apply, so they are not shown.
        return describe_agent_table(agent);
    }
    for line in config::describe(sub, &resolved, file) {
        println!("{line}");
    }
    if component == "agent" {
        println!("# no [agent] table: a simulated fleet from the flags above");
    }
    Ok(())
}

/// The timely cluster of `--processes`, `--process` and `--hostfile`; `None` for one process.
fn cluster(
    processes: usize,
    process: usize,
    hostfile: Option<&std::path::Path>,
) -> anyhow::Result<Option<(usize, Vec<String>)>> {
    if processes <= 1 {
        return Ok(None);
    }
    anyhow::ensure!(
        process < processes,
        "--process {process} is not below --processes {processes}: number processes from 0"
    );
    let path = hostfile.ok_or_else(|| {
        anyhow::anyhow!(
            "--processes {processes} needs --hostfile FILE with one host:port per process"
        )
    })?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the host file {}", path.display()))?;
    let addresses: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    anyhow::ensure!(
        addresses.len() == processes,
        "the host file {} lists {} addresses for --processes {processes}",
        path.display(),
        addresses.len()
    );
    Ok(Some((process, addresses)))
}

/// The `--rollups` list.
#[derive(Debug, Clone)]
struct Rollups(Vec<meterflow_processor::dataflow::Resolution>);

fn parse_rollups(s: &str) -> Result<Rollups, String> {
    use meterflow_processor::dataflow::Resolution;
    if s == "none" {
        return Ok(Rollups(Vec::new()));
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let r = Resolution::ALL
            .into_iter()
            .find(|r| r.name() == part)
            .ok_or_else(|| format!("{part:?} is not one of hour, day, month (or use none)"))?;
        out.push(r);
    }
    // Each level is counted from the one before: finest first, each once.
    out.sort();
    out.dedup();
    Ok(Rollups(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_brokers_logs_stay_quiet_unless_asked_for() {
        let info = log_filter(Some("info"), None);
        assert!(info.starts_with("info,"), "{info}");
        assert!(info.contains(",tansu_broker=warn"), "{info}");
        assert!(log_filter(Some("info"), Some("debug")).contains(",tansu_storage=debug"));
        assert_eq!(
            log_filter(Some("info,tansu_broker=trace"), None),
            "info,tansu_broker=trace"
        );
        for spec in [log_filter(None, None), info] {
            assert!(
                tracing_subscriber::EnvFilter::try_new(&spec).is_ok(),
                "{spec}"
            );
        }
    }

    /// `--help` explains every flag and every subcommand, and clap accepts the whole
    /// definition (its own debug checks: no clashing names, defaults that parse).
    #[test]
    fn every_flag_and_subcommand_has_help() {
        let mut cli = Cli::command();
        cli.build();
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&cli, "meterflow", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
        cli.debug_assert();
    }
}
