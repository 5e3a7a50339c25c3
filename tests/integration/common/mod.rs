//! Starts the parts of the pipeline for a test, so each test reads as a scenario.

use std::time::{Duration, Instant};

use meterflow::broker::EmbeddedBroker;
use meterflow::topics::{self, TopicsConfig};
use meterflow_processor::ProcessorConfig;
use meterflow_sink::auth::{Auth, Claims, SigningKey, mint, now_s};
use meterflow_sink::limits::Limits;
use meterflow_sink::{RunningSink, SinkConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// Broker, topics, sink and processor, all running; stopped on drop of `shutdown`'s holder.
pub struct Pipeline {
    pub broker: EmbeddedBroker,
    pub sink: RunningSink,
    pub shutdown: CancellationToken,
    /// Stops the sink alone (a child of `shutdown`).
    sink_shutdown: CancellationToken,
    processor: Option<std::thread::JoinHandle<Result<(), meterflow_processor::ProcessorError>>>,
    data: tempfile::TempDir,
    limits: Limits,
    /// Stops the processor and the sink when a failing test unwinds without [`Pipeline::stop`]:
    /// otherwise the runtime, dropped, waits for them forever and the failure is a hang.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

/// The HS256 secret of the tests' sinks.
pub const SECRET: &[u8] = b"meterflow integration test secret, 32+ bytes";

/// The Ed25519 key pair the sinks also trust (`tests/fixtures`).
pub const ED25519_PRIVATE: &[u8] = include_bytes!("../../fixtures/ed25519-private.pem");
pub const ED25519_PUBLIC: &[u8] = include_bytes!("../../fixtures/ed25519-public.pem");

pub fn sink_config(brokers: String, data: &tempfile::TempDir, limits: Limits) -> SinkConfig {
    SinkConfig {
        limits,
        // Short, so that a test sees a keep-alive without waiting long.
        keep_alive: Duration::from_secs(1),
        brokers,
        listen: "127.0.0.1:0".parse().expect("literal"),
        data_dir: data.path().join("sink"),
        auth: Auth::new(vec![
            Auth::hs256(SECRET),
            Auth::public_key_pem(ED25519_PUBLIC, "fixture").expect("the fixture key"),
        ])
        .with_owner_keys(owner_keys(data.path())),
        provider: meterflow_ingest::simulator::PROVIDER.to_string(),
    }
}

/// The account key of a lease owner (AEP-64), the one whose key the sink is given.
pub fn owner_key() -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("a secp256k1 key")
}

/// [`owner_key`]'s account, as the chain derives it.
pub fn owner_account() -> String {
    let public = owner_key().verifying_key().to_encoded_point(true);
    meterflow_sink::owner_keys::account("akash", public.as_bytes())
}

/// The sink's lease owners' key file, written in `dir` as a provider writes it (the key in
/// base64, as `akash query auth account` shows it), and read.
fn owner_keys(dir: &std::path::Path) -> meterflow_sink::owner_keys::OwnerKeys {
    use base64::Engine;
    let public = owner_key().verifying_key().to_encoded_point(true);
    let key = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
    let path = dir.join("owners.keys");
    std::fs::write(
        &path,
        format!("# lease owners\n{} {key}\n", owner_account()),
    )
    .expect("key file written");
    meterflow_sink::owner_keys::OwnerKeys::open(&path).expect("the key file reads")
}

/// A token `claims` signed by the owner's own key (`alg: ES256K`), as an owner's client makes
/// it.
pub fn owner_signed(claims: &serde_json::Value) -> String {
    use base64::Engine;
    use k256::ecdsa::signature::Signer;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"ES256K","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let signature: k256::ecdsa::Signature = owner_key().sign(input.as_bytes());
    format!("{input}.{}", b64(&signature.to_bytes()))
}

/// A token for `tenant` with `scope`, valid for `ttl_s` seconds from now (negative: expired).
pub fn token_with(key: &SigningKey, tenant: &str, scope: &str, ttl_s: i64) -> String {
    mint(
        key,
        &Claims {
            sub: "integration-test".into(),
            tenant: tenant.into(),
            scope: scope.into(),
            exp: now_s().saturating_add_signed(ttl_s),
            ..Claims::default()
        },
    )
    .expect("a token is minted")
}

/// A valid HS256 token for `tenant` (scope `metrics`), or an operator's for `""`.
pub fn token(tenant: &str) -> String {
    let scope = if tenant.is_empty() {
        "operator"
    } else {
        "metrics"
    };
    token_with(&SigningKey::Hs256(SECRET.to_vec()), tenant, scope, 600)
}

impl Pipeline {
    /// Starts everything with `partitions` per topic and `workers` processor threads.
    pub async fn start(partitions: i32, workers: usize) -> Self {
        Self::start_limited(partitions, workers, Limits::default()).await
    }

    /// [`Pipeline::start`] with the sink's request-rate `limits`.
    pub async fn start_limited(partitions: i32, workers: usize, limits: Limits) -> Self {
        let broker = memory_broker().await;
        let brokers = broker.bootstrap();
        topics::ensure(
            &brokers,
            &TopicsConfig {
                partitions,
                replication: 1,
                retention: None,
            },
        )
        .await
        .expect("topics are created");
        let data = tempfile::tempdir().expect("temp dir");
        let shutdown = CancellationToken::new();
        let sink_shutdown = shutdown.child_token();
        let sink = meterflow_sink::start(
            sink_config(brokers.clone(), &data, limits),
            sink_shutdown.clone(),
        )
        .await
        .expect("sink starts");
        let cfg = ProcessorConfig {
            workers,
            // A budget the pipeline scenario's tenant `acme` crosses half of.
            budgets: meterflow_processor::budgets::Budgets::parse(
                "[tenants.acme]\nmonthly = 0.30\n",
                "test budgets",
            )
            .expect("test budgets parse"),
            ..ProcessorConfig::new(brokers)
        };
        let token = shutdown.clone();
        let processor = std::thread::spawn(move || meterflow_processor::run(cfg, token));
        Self {
            broker,
            sink,
            sink_shutdown,
            processor: Some(processor),
            data,
            limits,
            _stop_on_drop: shutdown.clone().drop_guard(),
            shutdown,
        }
    }

    /// Stops the sink and starts a new one on the same RocksDB directory (a new port).
    pub async fn restart_sink(&mut self) {
        self.sink_shutdown.cancel();
        let old = std::mem::replace(&mut self.sink.task, tokio::spawn(async { Ok(()) }));
        old.await.expect("sink task").expect("sink stopped cleanly");
        self.sink_shutdown = self.shutdown.child_token();
        self.sink = meterflow_sink::start(
            sink_config(self.broker.bootstrap(), &self.data, self.limits),
            self.sink_shutdown.clone(),
        )
        .await
        .expect("sink restarts");
    }

    /// `http://addr` of the sink.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sink.addr)
    }

    /// Stops the processor and the sink, and checks that both stopped cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(p) = self.processor.take() {
            let joined = tokio::task::spawn_blocking(move || p.join())
                .await
                .expect("join task");
            joined
                .expect("processor did not panic")
                .expect("processor stopped cleanly");
        }
        let sink = self.sink.task;
        sink.await
            .expect("sink task")
            .expect("sink stopped cleanly");
        self.broker.stop();
    }
}

/// GETs `url` with the bearer `token` until `done` accepts the JSON answer, or fails with the
/// last answer.
pub async fn poll_json(
    url: &str,
    token: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(url).bearer_auth(token).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            if done(&v) {
                return v;
            }
            last = v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no expected answer from {url} within {timeout:?}; last answer: {last:#}");
}

/// GETs `url` (with the bearer `token` unless empty) and returns the status and the body.
pub async fn get_as(url: &str, token: &str) -> (u16, String) {
    let mut request = reqwest::Client::new().get(url);
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    let r = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e} ({e:?})"));
    let status = r.status().as_u16();
    let is_feed = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_feed {
        // A feed does not end: its first frame stands for the body.
        let mut feed = Feed {
            response: r,
            buffer: String::new(),
        };
        let first = feed.next_frame(Duration::from_secs(30)).await;
        return (status, first.unwrap_or_default());
    }
    let body = r
        .text()
        .await
        .unwrap_or_else(|e| panic!("body of {url}: {e}"));
    (status, body)
}

/// A Server-Sent Events feed being read.
pub struct Feed {
    response: reqwest::Response,
    buffer: String,
}

/// One frame of a feed: an event (`event`, `id`, `data` fields) or a comment.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub event: String,
    pub id: String,
    pub data: String,
    pub comment: String,
}

impl Frame {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

impl Feed {
    /// Opens `url` with `token` (none when empty; and `Last-Event-ID` when given); panics unless
    /// it answers 200 with an event stream.
    pub async fn open(url: &str, token: &str, last_event_id: Option<&str>) -> Self {
        let mut request = reqwest::Client::new().get(url);
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e} ({e:?})"));
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream"),
            "{url}"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next raw frame (the text up to a blank line), or `None` when none came in time or
    /// the stream ended.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame = self.buffer[..end].to_string();
                self.buffer.drain(..end + 2);
                return Some(frame);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// The next frame, parsed.
    pub async fn next(&mut self, timeout: Duration) -> Option<Frame> {
        let raw = self.next_frame(timeout).await?;
        let mut frame = Frame::default();
        for line in raw.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "" => frame.comment.push_str(value),
                "event" => frame.event = value.to_string(),
                "id" => frame.id = value.to_string(),
                "data" => {
                    if !frame.data.is_empty() {
                        frame.data.push('\n');
                    }
                    frame.data.push_str(value);
                }
                _ => {}
            }
        }
        Some(frame)
    }

    /// Frames until one is an event for which `done` holds; panics when none comes in time.
    pub async fn event_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Frame) -> bool,
    ) -> (Frame, Vec<Frame>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.next(left).await else {
                panic!("no such event within {timeout:?}; frames seen: {seen:#?}");
            };
            if !frame.event.is_empty() && done(&frame) {
                return (frame, seen);
            }
            seen.push(frame);
        }
    }
}

/// GETs `url` and returns the body as text.
pub async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("body of {url}: {e}"))
}

/// The value of the series `series` (name and labels as exposed) in a Prometheus exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Sends SIGTERM to `child` (a clean stop; `Child::kill` is SIGKILL).
pub fn terminate(child: &std::process::Child) {
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success(), "SIGTERM to {}", child.id());
}

/// Creates the pipeline's topics with `partitions` each, one replica.
pub async fn ensure_topics(brokers: &str, partitions: i32) {
    topics::ensure(
        brokers,
        &TopicsConfig {
            partitions,
            replication: 1,
            retention: None,
        },
    )
    .await
    .expect("the topics are created");
}

/// A loopback address with a port free now (for a component the test starts to listen on).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// The embedded broker in memory on a free loopback port.
pub async fn memory_broker() -> meterflow::broker::EmbeddedBroker {
    meterflow::broker::start(meterflow::broker::BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("literal"),
        storage: "memory".into(),
    })
    .await
    .expect("embedded broker starts")
}

/// Every message of `topic`'s `partitions` from their beginning, read with `config` (a plain
/// or a TLS client), until none arrives for 3 s: `(partition, key, payload)`.
pub fn read_all(
    mut config: ClientConfig,
    topic: &str,
    partitions: i32,
) -> Vec<(i32, Option<Vec<u8>>, Vec<u8>)> {
    config.set("group.id", "meterflow-test-read-all");
    let consumer = from_beginning(config, topic, partitions);
    let mut out = Vec::new();
    while let Some(m) = consumer.poll(Duration::from_secs(3)) {
        let m = m.expect("a message");
        out.push((
            m.partition(),
            m.key().map(<[u8]>::to_vec),
            m.payload().unwrap_or_default().to_vec(),
        ));
    }
    out
}

/// A consumer made from `config` (no offsets committed), assigned every one of `topic`'s
/// `partitions` from its beginning.
fn from_beginning(mut config: ClientConfig, topic: &str, partitions: i32) -> BaseConsumer {
    let consumer: BaseConsumer = config
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// How many records `topic` holds, as the broker tells `client`: the sum of its `partitions`'
/// ends.
pub fn log_end(client: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
    (0..partitions)
        .map(|p| {
            client
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("partition ends")
                .1
        })
        .sum()
}

/// A TCP proxy on loopback the test controls: [`Proxy::cut`] closes every connection through
/// it and refuses new ones until [`Proxy::restore`].
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards connections to `listener` on to `upstream`.
    pub fn start(listener: tokio::net::TcpListener, upstream: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let addr = listener.local_addr().expect("the proxy's address");
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (open, connections) = (open.clone(), connections.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees its connection closed
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    connections.lock().expect("connections").push(task);
                }
            }
        });
        Proxy {
            addr,
            open,
            connections,
            accept,
        }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().expect("connections").drain(..) {
            task.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A child process killed when the test lets go of it, even on a failed assertion (a child
/// left running holds the test's stderr, and a piped `cargo test` waits on it).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads every message of `topic` that is there now (all partitions, from the beginning).
pub fn read_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expect_at_least: usize,
) -> Vec<Vec<u8>> {
    read_topic_at(brokers, topic, partitions, expect_at_least)
        .into_iter()
        .map(|(_, _, payload)| payload)
        .collect()
}

/// As [`read_topic`], with each message's partition and offset.
pub fn read_topic_at(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expect_at_least: usize,
) -> Vec<(i32, i64, Vec<u8>)> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", "meterflow-test-reader")
        .set("enable.partition.eof", "true");
    let consumer = from_beginning(config, topic, partitions);
    // Read until every partition has reported its end in a fetch response (and nothing came
    // after it), then half a second more with nothing new. The ends are the fetches', not the
    // broker's offset listing: the embedded broker lists a partition's end as the base offset
    // of its newest batch plus one, short of the log's end by the rest of that batch (a
    // partition of 2,118 records was listed as ending at 1,042), and a read that stopped there
    // lost billing records in a test that then failed one run in three.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut at_end = vec![false; partitions as usize];
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                at_end[m.partition() as usize] = false;
                out.push((
                    m.partition(),
                    m.offset(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
            }
            Some(Err(KafkaError::PartitionEOF(p))) => at_end[p as usize] = true,
            // A topic a component is still creating has no partitions yet: read on.
            Some(Err(_)) | None => {}
        }
        if out.len() >= expect_at_least
            && at_end.iter().all(|e| *e)
            && quiet_since.elapsed() > Duration::from_millis(500)
        {
            break;
        }
    }
    out
}

/// Starts the `meterflow processor` binary on `brokers` with its state in `state` and the
/// given extra flags; its log level is `MF_TEST_LOG` (default `warn`).
pub fn spawn_processor<S: AsRef<std::ffi::OsStr>>(
    brokers: &str,
    state: &std::path::Path,
    flags: &[S],
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(["processor", "--brokers", brokers, "--state-dir"])
        .arg(state)
        .args(flags)
        .env(
            "MF_LOG",
            std::env::var("MF_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the meterflow binary starts")
}

/// 2026-01-01T00:00:00Z: the event time the fleet scenarios start at, well in the past.
pub const T0: i64 = 1_767_225_600_000;
/// The simulated agents' collection interval in event time.
pub const TICK_MS: i64 = 15_000;

/// GPU-ms per (tenant, lease, class, MIG profile): what a fleet scenario must be billed.
pub type GpuTruth = std::collections::BTreeMap<(String, String, String, String), i64>;

/// Publishes `ticks` collections of a simulated fleet of `nodes` (from `seed`) from [`T0`],
/// one tick's batches in flight together and `pause` of wall time between ticks; then, when
/// `close` is set, a batch of an agent `clock` twenty minutes past the end, so that every
/// billing window of the run closes. Returns the fleet's ground truth.
pub async fn publish_fleet(
    brokers: &str,
    nodes: usize,
    seed: u64,
    ticks: i64,
    pause: Duration,
    close: bool,
) -> GpuTruth {
    use meterflow_ingest::{Fleet, FleetConfig, Publisher};
    let publisher = std::sync::Arc::new(Publisher::new(brokers).expect("publisher"));
    let mut fleet = Fleet::new(
        FleetConfig {
            nodes,
            seed,
            ..FleetConfig::default()
        },
        T0,
    );
    for tick in 1..=ticks {
        let mut sends = tokio::task::JoinSet::new();
        for batch in fleet.tick(T0 + tick * TICK_MS) {
            let publisher = publisher.clone();
            sends.spawn(async move { publisher.publish(&batch).await.expect("published") });
        }
        sends.join_all().await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    if close {
        let clock = meterflow_schemas::SampleBatch {
            node: "clock".into(),
            agent_id: "clock".into(),
            sequence: 1,
            collected_at_ms: T0 + ticks * TICK_MS + 20 * 60_000,
            agent_version: "test".into(),
            samples: vec![],
        };
        publisher.publish(&clock).await.expect("published");
    }
    gpu_truth(&fleet)
}

/// What a fleet scenario must be billed, from the simulator's physical record of each run
/// (never from its samples): GPU-ms per (tenant, lease, class, MIG profile), each run counted
/// from its start to its exit (or to the last tick while it runs) as the kubelet's clock shows
/// them, truncated to the whole second. Each key is also within 1 s per run start and exit of
/// the physical milliseconds: the bound a one-second source sets.
pub fn gpu_truth(fleet: &meterflow_ingest::Fleet) -> GpuTruth {
    let second = |ms: i64| ms - ms.rem_euclid(1_000);
    let mut truth = GpuTruth::new();
    let mut boundaries: std::collections::BTreeMap<_, i64> = Default::default();
    for c in fleet.containers() {
        // The scenarios run containers longer than a tick: the kubelet lists every run.
        assert!(c.listed, "a run the kubelet never listed: {c:?}");
        let until = if c.finished {
            second(c.until_ms)
        } else {
            c.until_ms
        };
        for g in &c.gpus {
            let key = (
                c.tenant.clone(),
                c.lease.clone(),
                g.class.clone(),
                g.mig_profile.clone(),
            );
            *truth.entry(key.clone()).or_default() += until - second(c.started_at_ms);
            *boundaries.entry(key).or_default() += 2;
        }
    }
    truth.retain(|_, ms| *ms > 0);
    for (key, physical) in fleet.gpu_milliseconds() {
        let shown = truth.get(key).copied().unwrap_or(0);
        assert!(
            (shown - physical).abs() <= 1_000 * boundaries[key],
            "{key:?}: {shown} ms at whole seconds, {physical} ms physically"
        );
    }
    truth
}

/// Reserved cores and memory per (tenant, lease, billing item) a fleet scenario must be billed:
/// `cpu_reserved` in millicore-ms, `memory_reserved` in byte-seconds.
pub type ReservedTruth = std::collections::BTreeMap<(String, String, &'static str), i64>;

/// What a fleet scenario must be billed for what its containers' specs request, from the
/// simulator's physical record of each run and its spec's requests (never from its samples):
/// each run at the kubelet's whole seconds, as in [`gpu_truth`].
pub fn reserved_truth(fleet: &meterflow_ingest::Fleet) -> ReservedTruth {
    let second = |ms: i64| ms - ms.rem_euclid(1_000);
    let mut truth = ReservedTruth::new();
    for c in fleet.containers() {
        let until = if c.finished {
            second(c.until_ms)
        } else {
            c.until_ms
        };
        let ms = until - second(c.started_at_ms);
        let who = |item| (c.tenant.clone(), c.lease.clone(), item);
        let millicores = c
            .requests
            .cpu_millicores
            .expect("the simulator requests cores");
        let bytes = c
            .requests
            .memory_bytes
            .expect("the simulator requests memory");
        *truth.entry(who("cpu_reserved")).or_default() += millicores * ms;
        // Whole seconds: the byte-seconds are whole.
        assert_eq!(ms % 1_000, 0, "{c:?}");
        *truth.entry(who("memory_reserved")).or_default() += bytes * (ms / 1_000);
    }
    truth.retain(|_, v| *v > 0);
    truth
}

/// `GET path` on `addr` over a plain TCP stream (for a component's health and metrics): the
/// status and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    Some((status, answer.split_once("\r\n\r\n")?.1.to_string()))
}
