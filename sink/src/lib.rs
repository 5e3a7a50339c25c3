//! The sink: materializes what the processor emits and serves it over HTTP.
//!
//! Input: [`meterflow_schemas::UsageUpdate`] from `meterflow.usage`. State: RocksDB in the data
//! directory (views, and the consumed offsets written atomically with them). Output: the JSON
//! HTTP API of the SPEC on the listen address.
//!
//! - [`store`]: the RocksDB views; idempotent updates, offsets in the same write batch.
//! - [`consumer`]: Kafka → store, resuming from the stored offsets.
//! - [`api`]: the axum routes.
//! - [`auth`]: bearer tokens (JWT) and what each reaches (from `meterflow-guard`).
//! - [`limits`]: per-tenant request-rate limits.
//! - [`metrics`]: the sink's own Prometheus metrics.
//! - [`time`]: RFC 3339 and calendar months without a calendar dependency.

pub mod api;
pub mod consumer;
pub mod limits;
pub mod metrics;
pub mod store;
pub mod tickets;
pub use meterflow_guard::auth;
pub use meterflow_guard::leases;
pub use meterflow_guard::owner_keys;
pub use meterflow_schemas::time;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use store::Store;

/// Configuration of the sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// HTTP listen address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Directory of the RocksDB view store.
    pub data_dir: PathBuf,
    /// How bearer tokens are checked.
    pub auth: auth::Auth,
    /// Request-rate and series-cardinality limits per tenant.
    pub limits: limits::Limits,
    /// How often an idle Server-Sent Events feed sends a keep-alive comment.
    pub keep_alive: std::time::Duration,
    /// The provider this sink serves (an Akash provider's address): the `provider` of
    /// AEP-43's lease metrics answers; empty when not set.
    pub provider: String,
}

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Consume(#[from] consumer::ConsumeError),
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? pick another with --listen)"
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error("cannot draw the feed tickets' key from /dev/urandom: {0}")]
    TicketKey(std::io::Error),
}

/// A started sink: where it listens, and the task that ends when it stops.
pub struct RunningSink {
    pub addr: SocketAddr,
    pub task: JoinHandle<Result<(), SinkError>>,
}

/// Opens the store, binds the listener and starts consuming and serving.
pub async fn start(
    config: SinkConfig,
    shutdown: CancellationToken,
) -> Result<RunningSink, SinkError> {
    let store = Arc::new(Store::open(&config.data_dir)?);
    let metrics = metrics::Metrics::new();
    let updated = Arc::new(tokio::sync::watch::Sender::new(0u64));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| SinkError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(SinkError::Serve)?;
    let state = api::AppState {
        store: store.clone(),
        metrics: metrics.clone(),
        now_ms: || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        },
        auth: config.auth.clone(),
        limiter: Arc::new(limits::RateLimiter::requests(&config.limits)),
        series_limiter: Arc::new(limits::RateLimiter::series(&config.limits)),
        updates: updated.subscribe(),
        keep_alive: config.keep_alive,
        shutdown: shutdown.clone(),
        provider: config.provider.clone(),
        max_series_per_query: config.limits.max_series_per_query,
        open_feeds: limits::OpenFeeds::new(config.limits.max_open_feeds.max(1)),
        tickets: tickets::Tickets::new().map_err(SinkError::TicketKey)?,
    };
    let consuming = {
        let shutdown = shutdown.clone();
        let brokers = config.brokers.clone();
        tokio::spawn(async move {
            let consumed =
                consumer::consume(brokers, store, metrics, updated, shutdown.clone()).await;
            if let Err(e) = &consumed {
                // Serving views that no longer advance would mislead: stop the whole sink.
                tracing::error!(error = %e, "sink consumer failed; stopping the sink");
                shutdown.cancel();
            }
            consumed
        })
    };
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, api::router(state))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .map_err(SinkError::Serve);
        // The consumer stops with the same token; a consumer failure is the sink's failure.
        shutdown.cancel();
        let consumed = consuming.await.unwrap_or(Ok(()));
        served?;
        consumed?;
        Ok(())
    });
    info!(%addr, "sink listening");
    Ok(RunningSink { addr, task })
}

/// Runs the sink until `shutdown` is cancelled.
pub async fn run(config: SinkConfig, shutdown: CancellationToken) -> Result<(), SinkError> {
    let running = start(config, shutdown).await?;
    running.task.await.unwrap_or(Ok(()))
}
