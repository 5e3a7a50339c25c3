//! The embedded Kafka-protocol broker: `tansu-broker` run inside this process.
//!
//! Storage is `memory://` (gone when the process exits; tansu keeps every record in it, no
//! retention applies) or `sqlite://FILE` (survives a restart; retention and compaction applied
//! every `maintenance_interval`, a query parameter of the URL, 10 minutes by default). The
//! broker speaks the Kafka protocol on its listen address, so every other part of Meterflow
//! reaches it with rdkafka exactly as it would reach a Kafka cluster. It has no transactions
//! (EndTxn); Meterflow's exactly-once does not need them.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::task::JoinHandle;
use tracing::info;
use url::Url;

/// Where the broker listens and keeps its data.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// `memory` or `sqlite://FILE`.
    pub storage: String,
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// The address clients connect to (`host:port`).
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// The `bootstrap.servers` string for this broker.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the broker (its memory storage, if any, is gone).
    pub fn stop(self) {
        self.task.abort();
    }
}

/// The storage URL tansu understands for a `--storage` value.
pub fn storage_url(storage: &str) -> Result<Url> {
    let url = if storage == "memory" {
        "memory://meterflow/"
    } else {
        storage
    };
    let parsed = Url::parse(url)
        .with_context(|| format!("--storage {storage:?} is not `memory` or `sqlite://FILE`"))?;
    match parsed.scheme() {
        // tansu opens the file under its working directory whatever the URL says: an absolute
        // path (`sqlite:///var/lib/x.db`) would quietly land in `./var/lib/x.db`.
        "sqlite" if parsed.host_str().is_none_or(str::is_empty) => bail!(
            "--storage {storage:?}: the embedded broker opens its SQLite file relative to its working directory; give sqlite://FILE (e.g. sqlite://broker.db) and start it in the directory that should hold it"
        ),
        "memory" | "sqlite" => Ok(parsed),
        other => bail!(
            "--storage scheme {other:?} is not supported by the embedded broker: use `memory` or `sqlite://FILE`"
        ),
    }
}

/// Starts the broker and returns once it accepts connections.
pub async fn start(config: BrokerConfig) -> Result<EmbeddedBroker> {
    start_behind(config, None).await
}

/// As [`start`], telling clients to connect to `advertised` instead of the listen address
/// (a proxy in front of the broker, as the fault tests put one).
pub async fn start_behind(
    config: BrokerConfig,
    advertised: Option<SocketAddr>,
) -> Result<EmbeddedBroker> {
    let storage = storage_url(&config.storage)?;
    let addr = if config.listen.port() == 0 {
        // tansu binds the port it is given; find a free one first.
        let probe = TcpListener::bind(config.listen).context("no free port for the broker")?;
        probe.local_addr()?
    } else {
        config.listen
    };
    let listener = Url::parse(&format!("tcp://{addr}"))?;
    let advertised = Url::parse(&format!("tcp://{}", advertised.unwrap_or(addr)))?;
    let mut broker = tansu_broker::broker::Broker::<
        tansu_broker::coordinator::group::administrator::Controller<
            tansu_storage::StorageContainer,
        >,
        tansu_storage::StorageContainer,
    >::builder()
    .node_id(tansu_broker::NODE_ID)
    .cluster_id("meterflow")
    .incarnation_id(uuid::Uuid::from_u128(
        u128::from(std::process::id()) << 64 | addr.port() as u128,
    ))
    .advertised_listener(advertised)
    .storage(storage.clone())
    .listener(listener)
    .silent(true)
    .build()
    .await
    .map_err(|e| anyhow::anyhow!("{e:?}"))
    .with_context(|| format!("cannot start the embedded broker with storage {storage}"))?;
    let task = tokio::spawn(async move {
        if let Err(e) = broker.serve(tokio::time::Instant::now()).await {
            tracing::error!(error = ?e, "embedded broker stopped");
        }
    });
    // Wait until the listener accepts connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if task.is_finished() || Instant::now() > deadline {
            task.abort();
            bail!(
                "the embedded broker did not start listening on {addr} (is the port in use? pick another with --listen)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!(%addr, %storage, "embedded broker listening");
    Ok(EmbeddedBroker { addr, task })
}
