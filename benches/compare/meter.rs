//! The Meterflow side: the agent's spool and producer, the embedded broker, the processor and
//! the sink as separate processes (the `meterflow` binary), read back over the HTTP API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meterflow_ingest::Publisher;
use meterflow_ingest::spool::Spool;
use meterflow_schemas::{BillingRecord, Record, Sample, SampleBatch, SampleKind, SeriesId, topics};
use meterflow_sink::auth::{Claims, SigningKey, mint};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

use crate::proc::{Child, free_port};
use crate::scenario::{Delivery, HOUR_MS, NodeTick, Scenario, gpu_hour_micros};

const SECRET: &[u8] = b"compare-harness-secret-0123456789";

pub struct Meterflow {
    bin: PathBuf,
    dir: PathBuf,
    pub broker: Child,
    pub processor: Option<Child>,
    pub sink: Option<Child>,
    pub brokers: String,
    metrics_url: String,
    pub sink_url: String,
    http: reqwest::Client,
    operator: String,
}

/// What one tenant's hour added up to in the API.
#[derive(Debug, Default, Clone)]
pub struct Cell {
    pub gpu_ms: BTreeMap<(String, String), i64>,
    pub energy_mj: i64,
    pub cpu_us: i64,
    pub memory_byte_ms: f64,
}

/// What Meterflow's billing stream charged for GPU time, per (tenant, hour): each record's
/// cost turned back into whole-GPU time at the class's price written out in the scenario
/// (so a MIG slice's time counts at the fraction the processor priced it at), and the most
/// that rounding each record's cost to a micro can move it (half a micro each).
pub struct BilledGpu {
    pub gpu_ms: BTreeMap<(String, i64), f64>,
    pub rounding_ms: f64,
    pub records: usize,
    /// GPU records that adjust a charge already sent (revision 1 on).
    pub adjustments: usize,
}

fn token(tenant: &str, scope: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    mint(
        &SigningKey::Hs256(SECRET.to_vec()),
        &Claims {
            sub: "compare".into(),
            tenant: tenant.into(),
            scope: scope.into(),
            exp,
            ..Claims::default()
        },
    )
    .expect("a token is minted")
}

impl Meterflow {
    /// Starts the embedded broker (memory storage) with the pipeline's topics.
    pub async fn start_broker(bin: &Path, dir: &Path) -> Result<Self> {
        let port = free_port()?;
        let broker = Child::spawn(
            "broker",
            bin,
            &[
                "broker".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--partitions".into(),
                "2".into(),
            ],
            dir,
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !broker.log_text().contains("listening on") {
            if Instant::now() > deadline {
                bail!("the broker did not start in 60 s; {}", broker.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::fs::write(dir.join("jwt-secret"), SECRET)?;
        Ok(Self {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            broker,
            processor: None,
            sink: None,
            brokers: format!("127.0.0.1:{port}"),
            metrics_url: String::new(),
            sink_url: String::new(),
            http: reqwest::Client::new(),
            operator: token("", "operator"),
        })
    }

    /// Delivers the scenario as each node's agent would: every batch into the node's RocksDB
    /// spool, then sent in order with the agent's idempotent producer unless the exchange
    /// fails this tick (dropped, or held back while late), duplicates sent twice. Returns the
    /// number of messages written to the samples topic.
    pub async fn publish(&self, scenario: &mut Scenario) -> Result<u64> {
        let publisher = Arc::new(Publisher::new(&self.brokers)?);
        let mut spools = (0..scenario.nodes)
            .map(|n| Spool::open(&self.dir.join(format!("spool-{n}")), 1 << 34))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sent = 0u64;
        let last_tick = scenario.ticks.len();
        // One more exchange after the last tick: the agents run on, and send what they hold.
        let mut flush: Vec<NodeTick> = (0..scenario.nodes)
            .map(|node| NodeTick {
                node,
                batch: None,
                boards: Vec::new(),
                delivery: Delivery::OnTime,
            })
            .collect();
        let rows = scenario.ticks.iter_mut().chain(std::iter::once(&mut flush));
        for (i, row) in rows.enumerate() {
            let k = i as i64 + 1;
            debug_assert!(i <= last_tick);
            let mut again: Vec<usize> = Vec::new();
            let mut sending: Vec<usize> = Vec::new();
            for t in row.iter_mut() {
                if let Some(batch) = t.batch.as_mut() {
                    spools[t.node].push(batch)?;
                }
                match t.delivery {
                    Delivery::Dropped => {}
                    Delivery::LateUntil(until) if until > k => {}
                    Delivery::Duplicated => {
                        again.push(t.node);
                        sending.push(t.node);
                    }
                    _ => sending.push(t.node),
                }
            }
            // Rounds of one batch per node, all nodes at once, until every spool that may send
            // is empty; the duplicates go once more.
            let mut last: BTreeMap<usize, SampleBatch> = BTreeMap::new();
            loop {
                let mut round = tokio::task::JoinSet::new();
                for &n in &sending {
                    if let Some((position, batch)) = spools[n].front()? {
                        let p = publisher.clone();
                        round.spawn(async move {
                            let r = p.publish(&batch).await;
                            (n, position, batch, r)
                        });
                    }
                }
                if round.is_empty() {
                    break;
                }
                for (n, position, batch, r) in round.join_all().await {
                    r.with_context(|| format!("publishing node {n}'s batch"))?;
                    spools[n].remove(position)?;
                    last.insert(n, batch);
                    sent += 1;
                }
            }
            for n in again {
                if let Some(batch) = last.get(&n) {
                    publisher.publish(batch).await?;
                    sent += 1;
                }
            }
        }
        Ok(sent)
    }

    /// Starts the processor (one worker) and the sink.
    /// A processor (one worker) with its own state directory; its metrics page's URL.
    fn spawn_processor(&self, name: &str, extra: &[&str]) -> Result<(Child, String)> {
        let metrics_port = free_port()?;
        let mut args: Vec<String> = vec![
            "processor".into(),
            "--brokers".into(),
            self.brokers.clone(),
            "--workers".into(),
            "1".into(),
            "--partitions".into(),
            "2".into(),
            "--state-dir".into(),
            self.dir.join(format!("{name}-state")).display().to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = Child::spawn(name, &self.bin, &args, &self.dir)?;
        Ok((child, format!("http://127.0.0.1:{metrics_port}/metrics")))
    }

    /// The processor reading the whole samples topic again from the beginning with a state of
    /// its own, the sink stopped (nothing else busy): seconds from its first message read to
    /// its `messages`-th, and its CPU-seconds. Its outputs repeat the first processor's (the
    /// same ids), after every answer was read.
    pub async fn backlog_run(&mut self, messages: u64) -> Result<(f64, f64)> {
        self.sink = None;
        let (mut child, url) = self.spawn_processor("processor-backlog", &[])?;
        let started = Instant::now();
        let mut first_read: Option<Instant> = None;
        loop {
            child.check_alive()?;
            match crate::proc::processor_input(&self.http, &url).await {
                Some(n) if n >= messages => break,
                Some(n) if n > 0 && first_read.is_none() => first_read = Some(Instant::now()),
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("the backlog processor did not read the samples in 30 min");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = first_read
            .unwrap_or(started)
            .elapsed()
            .as_secs_f64()
            .max(1e-3);
        Ok((seconds, child.cpu_seconds()))
    }

    pub async fn start_pipeline(&mut self) -> Result<()> {
        let (processor, metrics_url) = self.spawn_processor("processor", &[])?;
        let sink_port = free_port()?;
        let sink = Child::spawn(
            "sink",
            &self.bin,
            &[
                "sink".into(),
                "--brokers".into(),
                self.brokers.clone(),
                "--partitions".into(),
                "2".into(),
                "--listen".into(),
                format!("127.0.0.1:{sink_port}"),
                "--data-dir".into(),
                self.dir.join("sink-data").display().to_string(),
                "--jwt-secret-file".into(),
                self.dir.join("jwt-secret").display().to_string(),
                // The harness measures, it does not attack: no request limits in its way.
                "--rate-limit".into(),
                "1000000".into(),
                "--rate-burst".into(),
                "1000000".into(),
                "--series-limit".into(),
                "100000000".into(),
                "--series-burst".into(),
                "100000000".into(),
            ],
            &self.dir,
        )?;
        self.metrics_url = metrics_url;
        self.sink_url = format!("http://127.0.0.1:{sink_port}");
        self.processor = Some(processor);
        self.sink = Some(sink);
        Ok(())
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.broker.check_alive()?;
        for c in [&mut self.processor, &mut self.sink].into_iter().flatten() {
            c.check_alive()?;
        }
        Ok(())
    }

    /// Messages the processor has read from the samples topic.
    pub async fn processor_input(&self) -> Option<u64> {
        crate::proc::processor_input(&self.http, &self.metrics_url).await
    }

    async fn get(&self, path: &str, token: &str) -> Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.sink_url))
            .bearer_auth(token)
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {path} answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn ready(&self) -> bool {
        matches!(self.http.get(format!("{}/readyz", self.sink_url)).send().await, Ok(r) if r.status().is_success())
    }

    /// Every tenant's hours, from `GET /v1/tenants/{tenant}/usage?window=hour`.
    pub async fn usage(&self, scenario: &Scenario) -> Result<BTreeMap<(String, i64), Cell>> {
        let mut out = BTreeMap::new();
        for tenant in &scenario.tenants {
            let v = self
                .get(
                    &format!(
                        "/v1/tenants/{tenant}/usage?from={}&to={}&window=hour&group_by=gpu_class,mig_profile",
                        scenario.t0,
                        scenario.end_ms()
                    ),
                    &self.operator,
                )
                .await?;
            for row in v["rows"].as_array().into_iter().flatten() {
                let hour = rfc3339_ms(row["window_start"].as_str().unwrap_or_default())?;
                let cell: &mut Cell = out.entry((tenant.clone(), hour)).or_default();
                for g in row["gpu"].as_array().into_iter().flatten() {
                    let key = (
                        g["gpu_class"].as_str().unwrap_or_default().to_string(),
                        g["mig_profile"].as_str().unwrap_or_default().to_string(),
                    );
                    *cell.gpu_ms.entry(key).or_default() +=
                        (g["gpu_seconds"].as_f64().unwrap_or(0.0) * 1e3).round() as i64;
                }
                let f = |m: &str| row[m].as_f64().unwrap_or(0.0);
                cell.energy_mj += (f("energy_joules") * 1e3).round() as i64;
                cell.cpu_us += (f("cpu_core_seconds") * 1e6).round() as i64;
                cell.memory_byte_ms += f("memory_byte_seconds") * 1e3;
            }
        }
        Ok(out)
    }

    /// Per node and hour, the most GPUs allocated, from `GET /v1/fleet/hourly`.
    pub async fn fleet(&self, scenario: &Scenario) -> Result<BTreeMap<(String, i64), i64>> {
        let v = self
            .get(
                &format!(
                    "/v1/fleet/hourly?from={}&to={}",
                    scenario.t0,
                    scenario.end_ms()
                ),
                &self.operator,
            )
            .await?;
        let mut out = BTreeMap::new();
        for h in v["hours"].as_array().into_iter().flatten() {
            let hour = rfc3339_ms(h["hour"].as_str().unwrap_or_default())?;
            for n in h["nodes"].as_array().into_iter().flatten() {
                out.insert(
                    (n["node"].as_str().unwrap_or_default().to_string(), hour),
                    n["max_gpus_allocated"].as_i64().unwrap_or(0),
                );
            }
        }
        Ok(out)
    }

    /// One tenant's 30 days, hour by hour, as the dashboard asks for them; returns the rows.
    pub async fn thirty_days(&self, tenant: &str, now_ms: i64) -> Result<usize> {
        let v = self
            .get(
                &format!(
                    "/v1/tenants/{tenant}/usage?from={}&to={now_ms}&window=hour&group_by=gpu_class,mig_profile",
                    now_ms - 30 * 24 * HOUR_MS
                ),
                &self.operator,
            )
            .await?;
        Ok(v["rows"].as_array().map_or(0, Vec::len))
    }

    /// Sends `probes` live batches, one at a time, each starting a new lease at the wall
    /// clock's now, and times each until the API shows it. Milliseconds, one per probe.
    pub async fn freshness(&self, probes: usize) -> Result<Vec<f64>> {
        let publisher = Publisher::new(&self.brokers)?;
        let token = token("probe", "metrics");
        let mut out = Vec::with_capacity(probes);
        // Probe 0 warms the producer's connection up and is not timed.
        for i in 0..=probes {
            let now = meterflow_ingest::agent::now_ms();
            let lease = format!("probe-{i}");
            let batch = SampleBatch {
                node: "probe-node".into(),
                agent_id: "probe-agent".into(),
                sequence: i as i64 + 1,
                collected_at_ms: now,
                agent_version: "compare".into(),
                samples: vec![Sample {
                    series: SeriesId {
                        tenant: "probe".into(),
                        lease: lease.clone(),
                        service: "svc".into(),
                        replica: "0".into(),
                        node: "probe-node".into(),
                        provider: "compare".into(),
                        container_id: format!("probe-{i}"),
                        gpu_uuid: format!("GPU-probe-{i}"),
                        gpu_model: "NVIDIA H100 80GB HBM3".into(),
                        gpu_class: "h100".into(),
                        mig_profile: String::new(),
                    },
                    kind: SampleKind::Allocation,
                    metric: "gpu".into(),
                    value: 1.0,
                    timestamp_ms: now,
                    started_at_ms: Some(now - 1_000),
                    finished_at_ms: None,
                }],
            };
            let sent = Instant::now();
            publisher.publish(&batch).await?;
            let path = format!(
                "/v1/tenants/probe/usage?from={}&to={}&window=total&group_by=lease",
                now - HOUR_MS,
                now + 60_000
            );
            loop {
                let v = self.get(&path, &token).await?;
                let seen = v["rows"].as_array().into_iter().flatten().any(|r| {
                    r["lease"] == lease.as_str() && r["gpu_seconds"].as_f64().unwrap_or(0.0) > 0.0
                });
                if seen {
                    if i > 0 {
                        out.push(sent.elapsed().as_secs_f64() * 1e3);
                    }
                    break;
                }
                if sent.elapsed() > Duration::from_secs(60) {
                    bail!("probe {i} not visible in the API after 60 s");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(out)
    }

    /// Reads `meterflow.billing` from the beginning until two reads a second apart agree and
    /// every tenant-hour in `expect` has a charge; gives up after two minutes.
    pub async fn billed_gpu(
        &self,
        scenario: &Scenario,
        expect: &[(String, i64)],
    ) -> Result<BilledGpu> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last: Option<BTreeMap<(String, i64), f64>> = None;
        loop {
            let brokers = self.brokers.clone();
            let bytes =
                tokio::task::spawn_blocking(move || read_all(&brokers, topics::BILLING)).await??;
            let mut billed = BilledGpu {
                gpu_ms: BTreeMap::new(),
                rounding_ms: 0.0,
                records: 0,
                adjustments: 0,
            };
            // A billing system drops a record whose id it has seen (the topic may hold one
            // twice: a second processor reads the samples again at the end of the run).
            let mut ids = std::collections::HashSet::new();
            for b in &bytes {
                let r = BillingRecord::decode(b).context("a billing record")?;
                if !ids.insert(r.id.clone()) {
                    continue;
                }
                let Some(class) = r
                    .item
                    .strip_prefix("gpu:")
                    .and_then(|i| i.split(':').next())
                else {
                    continue;
                };
                let hour = r.window_start_ms;
                if !scenario.tenants.contains(&r.tenant)
                    || hour < scenario.t0
                    || hour >= scenario.end_ms()
                {
                    continue;
                }
                let per_ms = gpu_hour_micros(class)
                    .with_context(|| format!("billed GPU class {class} is not the scenario's"))?
                    / HOUR_MS as f64;
                *billed.gpu_ms.entry((r.tenant.clone(), hour)).or_default() +=
                    r.cost_micros as f64 / per_ms;
                billed.rounding_ms += 0.5 / per_ms;
                billed.records += 1;
                if r.revision > 0 {
                    billed.adjustments += 1;
                }
            }
            let complete = expect.iter().all(|k| billed.gpu_ms.contains_key(k));
            if complete && last.as_ref() == Some(&billed.gpu_ms) {
                return Ok(billed);
            }
            if Instant::now() > deadline {
                bail!(
                    "meterflow.billing did not charge every tenant-hour of the scenario in 2 min ({} records)",
                    billed.records
                );
            }
            last = Some(billed.gpu_ms);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Every message of `topic` now there (every partition, from the beginning).
fn read_all(brokers: &str, topic: &str) -> Result<Vec<Vec<u8>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "meterflow-compare-billing")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    // Every partition, even one listed as empty: its listed end may fall short.
    let mut ends = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.push(high);
        tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
    }
    let mut out = Vec::new();
    consumer.assign(&tpl)?;
    let mut next: Vec<i64> = vec![0; partitions as usize];
    let deadline = Instant::now() + Duration::from_secs(60);
    // To the ends the broker reported, then on until a second passes with nothing new: the
    // embedded broker's reported end can fall short of what its partition holds.
    let mut quiet_since = Instant::now();
    while next.iter().zip(&ends).any(|(n, e)| n < e)
        || quiet_since.elapsed() < Duration::from_secs(1)
    {
        if Instant::now() > deadline {
            bail!("{topic} not read to its end in 60 s");
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            quiet_since = Instant::now();
            next[m.partition() as usize] = m.offset() + 1;
            out.push(m.payload().unwrap_or_default().to_vec());
        }
    }
    Ok(out)
}

/// `2026-11-23T10:00:00Z` → milliseconds since the epoch.
pub fn rfc3339_ms(s: &str) -> Result<i64> {
    let t = humantime::parse_rfc3339(s).with_context(|| format!("a timestamp: {s:?}"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}
