//! `meterflow demo`: the whole pipeline in one process, on a simulated fleet.
//!
//! Starts the embedded broker, creates the topics, then the sink, the processor and a
//! simulated agent, prints where to look, and runs until Ctrl-C or `--exit-after`. Its state
//! lives in a temporary directory removed at exit, the broker's too: SQLite storage whose
//! topics keep `--retention` (the usage topic compacted), so a demo left running for days
//! stays bounded (tansu's memory storage keeps every record for the life of the process).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use meterflow_ingest::{FleetConfig, SimulatedAgentConfig};
use meterflow_processor::ProcessorConfig;
use meterflow_sink::SinkConfig;
use meterflow_sink::auth::{Auth, Claims, SigningKey, mint, now_s};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerConfig};
use crate::topics::{self, TopicsConfig};

/// Options of `meterflow demo`.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// HTTP address of the sink.
    pub listen: SocketAddr,
    /// Stop after this long (exit status 0); run until Ctrl-C when absent.
    pub exit_after: Option<Duration>,
    /// Simulated nodes.
    pub nodes: usize,
    /// Seed of the simulation.
    pub seed: u64,
    /// Time between two agent ticks.
    pub interval: Duration,
    /// Processor worker threads.
    pub workers: usize,
    /// How long the broker keeps a record of every topic but the compacted usage topic.
    pub retention: Duration,
}

/// Runs the demo.
pub async fn run(config: DemoConfig) -> Result<()> {
    let shutdown = CancellationToken::new();
    let data_dir = std::env::temp_dir().join(format!("meterflow-demo-{}", std::process::id()));
    let result = run_in(&config, &data_dir, shutdown.clone()).await;
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

async fn run_in(config: &DemoConfig, data_dir: &Path, shutdown: CancellationToken) -> Result<()> {
    // tansu opens `sqlite://FILE` under its working directory (an absolute path too): the demo
    // runs in its own directory, where nothing else is relative.
    std::fs::create_dir_all(data_dir)
        .and_then(|()| std::env::set_current_dir(data_dir))
        .with_context(|| format!("cannot make and enter {}", data_dir.display()))?;
    let broker = broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        // Retention and compaction are applied at each maintenance, once a minute.
        storage: "sqlite://broker.db?maintenance_interval=1m".into(),
    })
    .await?;
    let brokers = broker.bootstrap();
    topics::ensure(
        &brokers,
        &TopicsConfig {
            retention: Some(config.retention),
            ..TopicsConfig::default()
        },
    )
    .await?;

    // A secret of this run only: the tokens printed below die with the demo.
    let mut secret = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?,
        &mut secret,
    )
    .context("cannot read a random secret from /dev/urandom")?;
    let sink = meterflow_sink::start(
        SinkConfig {
            brokers: brokers.clone(),
            listen: config.listen,
            data_dir: data_dir.join("sink"),
            auth: Auth::new(vec![Auth::hs256(&secret)]),
            limits: Default::default(),
            keep_alive: std::time::Duration::from_secs(15),
            provider: meterflow_ingest::simulator::PROVIDER.to_string(),
        },
        shutdown.clone(),
    )
    .await?;

    let processor = {
        let cfg = ProcessorConfig {
            workers: config.workers,
            // SPEC: max_staleness is twice the collection interval.
            max_staleness_ms: 2 * config.interval.as_millis() as i64,
            ..ProcessorConfig::new(brokers.clone())
        };
        let token = shutdown.clone();
        std::thread::Builder::new()
            .name("processor".into())
            .spawn(move || {
                let result = meterflow_processor::run(cfg, token.clone());
                token.cancel();
                result
            })
            .context("cannot start the processor thread")?
    };

    let fleet = FleetConfig {
        nodes: config.nodes,
        seed: config.seed,
        ..FleetConfig::default()
    };
    let agent = tokio::spawn(meterflow_ingest::run_simulated(
        SimulatedAgentConfig {
            brokers: brokers.clone(),
            fleet: fleet.clone(),
            interval: config.interval,
            // The demo's broker goes with it: nothing to keep across runs.
            spool: None,
        },
        shutdown.clone(),
    ));

    let url = format!("http://{}", sink.addr);
    let tenant = meterflow_ingest::Fleet::new(fleet, 0)
        .tenants()
        .into_iter()
        .next()
        .unwrap_or_default();
    let token = |tenant: &str, scope: &str| {
        mint(
            &SigningKey::Hs256(secret.to_vec()),
            &Claims {
                sub: "demo".into(),
                tenant: tenant.into(),
                scope: scope.into(),
                exp: now_s() + 7 * 24 * 3600,
                ..Claims::default()
            },
        )
    };
    let (tenant_token, operator_token) = (token(&tenant, "metrics")?, token("", "operator")?);
    println!("Meterflow demo is running.");
    println!("  dashboard ({tenant}): {url}/#token={tenant_token}");
    println!("  dashboard (operator): {url}/#token={operator_token}");
    println!("  tenant usage:  {url}/v1/tenants/{tenant}/usage?window=total");
    println!("  burn rate:     {url}/v1/tenants/{tenant}/burn-rate");
    println!("  fleet:         {url}/v1/fleet/hourly (operator token)");
    println!("  status:        {url}/v1/status");
    println!("  metrics:       {url}/metrics");
    println!("  tenant token:   {tenant_token}");
    println!("  operator token: {operator_token}");
    println!("  e.g. curl -H \"Authorization: Bearer $TOKEN\" {url}/v1/tenants/{tenant}/burn-rate");
    println!(
        "  Kafka broker:  {brokers} (embedded, SQLite in {}, records kept {})",
        data_dir.display(),
        humantime::format_duration(config.retention)
    );
    println!(
        "Simulating {} nodes (seed {}), one batch per node every {}.",
        config.nodes,
        config.seed,
        humantime::format_duration(config.interval)
    );
    match config.exit_after {
        Some(d) => println!("Stopping after {}.", humantime::format_duration(d)),
        None => println!("Press Ctrl-C to stop."),
    }

    let stopped_early = tokio::select! {
        _ = async {
            match config.exit_after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        } => false,
        // SIGTERM too (`kill`, `docker stop`, systemd): stopped the same way as Ctrl-C, so its
        // temporary directory is removed.
        _ = stop_signal() => false,
        _ = shutdown.cancelled() => true,
    };
    shutdown.cancel();

    let agent_result = agent.await.map_err(|e| anyhow!("agent task: {e}"))?;
    let sink_result = sink.task.await.map_err(|e| anyhow!("sink task: {e}"))?;
    let processor_result = tokio::task::spawn_blocking(move || processor.join())
        .await
        .map_err(|e| anyhow!("processor thread: {e}"))?
        .map_err(|_| anyhow!("the processor thread panicked"))?;
    broker.stop();
    agent_result.context("the simulated agent failed")?;
    sink_result.context("the sink failed")?;
    processor_result.context("the processor failed")?;
    if stopped_early {
        return Err(anyhow!(
            "a component stopped the demo early; see the log above"
        ));
    }
    println!("Meterflow demo stopped.");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
