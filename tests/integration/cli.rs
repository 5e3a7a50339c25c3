//! The CLI as a user meets it: `meterflow schemas` against a stand-in Schema Registry on
//! loopback (its REST API: compatibility checks, registrations, lookups), records carrying the
//! registry's ids on the wire, and shell completions.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

/// What the stand-in registry saw and holds.
#[derive(Default)]
struct Registry {
    /// Subjects and their registered schemas, in order.
    subjects: Vec<(String, String)>,
    /// Answer `is_compatible: false` to every check.
    refuse: bool,
}

type Shared = Arc<Mutex<Registry>>;

async fn compatibility(
    State(registry): State<Shared>,
    Path(subject): Path<String>,
    body: String,
) -> impl IntoResponse {
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["schemaType"], "AVRO");
    let r = registry.lock().expect("registry");
    if !r.subjects.iter().any(|(s, _)| *s == subject) {
        return (
            StatusCode::NOT_FOUND,
            r#"{"error_code":40401,"message":"Subject not found"}"#.to_string(),
        );
    }
    (
        StatusCode::OK,
        format!("{{\"is_compatible\":{}}}", !r.refuse),
    )
}

async fn register(
    State(registry): State<Shared>,
    Path(subject): Path<String>,
    body: String,
) -> impl IntoResponse {
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    let schema = body["schema"].as_str().expect("a schema").to_string();
    // A registry parses what it is given.
    apache_avro::Schema::parse_str(&schema).expect("a valid Avro schema");
    let mut r = registry.lock().expect("registry");
    r.subjects.push((subject, schema));
    format!("{{\"id\":{}}}", 100 + r.subjects.len())
}

/// `POST /subjects/{subject}`: the id of a schema registered under the subject.
async fn lookup(
    State(registry): State<Shared>,
    Path(subject): Path<String>,
    body: String,
) -> impl IntoResponse {
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    let schema = body["schema"].as_str().expect("a schema");
    let r = registry.lock().expect("registry");
    match r
        .subjects
        .iter()
        .position(|(s, text)| *s == subject && text == schema)
    {
        Some(i) => (
            StatusCode::OK,
            format!(
                "{{\"subject\":\"{subject}\",\"id\":{},\"version\":1}}",
                101 + i
            ),
        ),
        None => (
            StatusCode::NOT_FOUND,
            r#"{"error_code":40403,"message":"Schema not found"}"#.to_string(),
        ),
    }
}

async fn serve(registry: Shared) -> String {
    let app = axum::Router::new()
        .route("/subjects/{subject}", axum::routing::post(lookup))
        .route(
            "/compatibility/subjects/{subject}/versions/latest",
            axum::routing::post(compatibility),
        )
        .route(
            "/subjects/{subject}/versions",
            axum::routing::post(register),
        )
        .with_state(registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn meterflow(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    // Off the runtime's threads: the stand-in registry answers on them meanwhile.
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args(&args)
            .output()
            .expect("meterflow runs")
    })
    .await
    .expect("joined")
}

/// A registry that takes the connection and never answers (a hung proxy, a paused pod): the
/// command gives up after its request timeout with an error that says so, instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_never_answers_is_an_error_not_a_hang() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    // Killed after a minute, should it hang: a failure, not a stuck test run.
    let registry = format!("http://{addr}");
    let (out, took) = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args(["schemas", "register", "--registry", &registry])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("meterflow runs");
        while child.try_wait().expect("status").is_none() {
            if started.elapsed() > std::time::Duration::from_secs(60) {
                let _ = child.kill();
                panic!("`meterflow schemas register` still waits after a minute");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (child.wait_with_output().expect("output"), started.elapsed())
    })
    .await
    .expect("joined");
    holder.abort();
    // The fault happened: the command connected and was kept waiting.
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot reach the schema registry at http://{addr}, or it did not answer within 10 s"
        )),
        "{stderr}"
    );
    assert!(
        took >= std::time::Duration::from_secs(9),
        "gave up after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_listed_checked_and_registered_oldest_first() {
    let list = meterflow(&["schemas", "list"]).await;
    assert!(list.status.success());
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "2",
                    "meterflow.samples-value",
                    "schemas/avro/sample_batch.avsc"
                ]),
        "{list}"
    );
    assert_eq!(
        list.lines().count(),
        9,
        "a header and eight versions: {list}"
    );

    let print = meterflow(&["schemas", "print", "usage_update.v1"]).await;
    assert_eq!(
        String::from_utf8_lossy(&print.stdout),
        include_str!("../../schemas/avro/usage_update.v1.avsc")
    );
    let unknown = meterflow(&["schemas", "print", "invoice"]).await;
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .contains("no schema `invoice`; known: sample_batch.v1")
    );

    let check = meterflow(&["schemas", "check"]).await;
    assert!(check.status.success());
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.contains(
            "meterflow.usage-value: usage_update.avsc reads usage_update.v1.avsc (backward)"
        ),
        "{check}"
    );

    let registry: Shared = Arc::default();
    let url = serve(registry.clone()).await;
    let out = meterflow(&["schemas", "register", "--registry", &url]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("meterflow.samples-value: sample_batch.v1.avsc registered as id 101"),
        "{stdout}"
    );
    assert!(
        stdout.contains("meterflow.samples-value: sample_batch.avsc registered as id 102"),
        "{stdout}"
    );
    let subjects: Vec<String> = registry
        .lock()
        .expect("registry")
        .subjects
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(
        subjects,
        [
            "meterflow.samples-value",
            "meterflow.samples-value",
            "meterflow.usage-value",
            "meterflow.usage-value",
            "meterflow.usage-io.meterflow.UsageRollup",
            "meterflow.billing-value",
            "meterflow.alerts-value",
            "meterflow.deadletter-value",
        ]
    );
    // The older version went first: the registry holds the history.
    assert_eq!(
        registry.lock().expect("registry").subjects[0].1,
        include_str!("../../schemas/avro/sample_batch.v1.avsc")
    );

    // A registry that finds a version incompatible stops the command, naming the subject.
    registry.lock().expect("registry").refuse = true;
    let out = meterflow(&["schemas", "register", "--registry", &url]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the registry refuses sample_batch.v1.avsc under meterflow.samples-value"),
        "{stderr}"
    );

    let out = meterflow(&["schemas", "register", "--registry", "http://127.0.0.1:1"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot reach the schema registry at http://127.0.0.1:1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = meterflow(&["completions", shell]).await;
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for sub in [
            "demo",
            "agent",
            "processor",
            "sink",
            "lease-metrics",
            "schemas",
            "token",
            "replay",
            "config",
        ] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let out = meterflow(&["completions", "tcsh"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: bash"));
}

/// With `--schema-registry`, the agent writes the registry's id of its schema in every
/// record's header and the processor reads those records (no dead letters) and writes its own
/// outputs with the registry's ids; before the schemas are registered, a component refuses to
/// start, saying how to register them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_registry_ids_on_the_wire() {
    use meterflow_schemas::{Record, SampleBatch, UsageUpdate, topics};

    use crate::common::{KillOnDrop, read_topic, spawn_processor, terminate};

    let registry = serve(Shared::default()).await;
    let broker = crate::common::memory_broker().await;
    let brokers = broker.bootstrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let agent_args = [
        "--schema-registry",
        &registry,
        "agent",
        "--brokers",
        &brokers,
        "--partitions",
        "2",
        "--interval",
        "100ms",
        "--spool-dir",
        spool.to_str().expect("utf-8"),
    ];
    let refused = meterflow(&agent_args).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("sample_batch.v1.avsc is not registered under meterflow.samples-value")
            && stderr.contains("meterflow schemas register --registry"),
        "{stderr}"
    );
    assert!(
        meterflow(&["schemas", "register", "--registry", &registry])
            .await
            .status
            .success()
    );

    let agent = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args(agent_args)
            .env("MF_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("agent starts"),
    );
    let samples = tokio::task::spawn_blocking({
        let brokers = brokers.clone();
        move || read_topic(&brokers, topics::SAMPLES, 2, 5)
    })
    .await
    .expect("read");
    terminate(&agent.0);
    assert!(samples.len() >= 5, "{} batches", samples.len());
    // Registered oldest first: sample_batch.v1 got 101, sample_batch (v2) 102.
    for bytes in &samples {
        assert_eq!(
            bytes[..5],
            [0, 0, 0, 0, 102],
            "the registry's id in the header"
        );
        // With Meterflow's own id (2) in its place, the same bytes are a sample batch.
        let mut own = bytes.clone();
        own[1..5].copy_from_slice(&2u32.to_be_bytes());
        SampleBatch::decode(&own).expect("a sample batch");
    }

    let state = dir.path().join("state");
    let status = tokio::task::spawn_blocking({
        let brokers = brokers.clone();
        let registry = registry.clone();
        move || {
            let flags = [
                "--exit-when-caught-up",
                "--partitions",
                "2",
                "--schema-registry",
                &registry,
            ];
            spawn_processor(&brokers, &state, &flags)
                .wait()
                .expect("processor exits")
        }
    })
    .await
    .expect("joined");
    assert!(status.success(), "{status}");
    let (usage, dead) = tokio::task::spawn_blocking(move || {
        (
            read_topic(&brokers, topics::USAGE, 2, 1),
            read_topic(&brokers, topics::DEADLETTER, 2, 0),
        )
    })
    .await
    .expect("read");
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    assert!(!usage.is_empty());
    let mut rollups = 0;
    for bytes in &usage {
        // usage_update (v2) was registered fourth, usage_rollup fifth: the processor writes
        // base windows with the one, hour, day and month roll-ups with the other.
        let (registry_id, own_id) = match bytes[4] {
            104 => (104, 7u32),
            105 => (105, 8u32),
            other => panic!("usage record with registry id {other}"),
        };
        let mut own = bytes.clone();
        own[1..5].copy_from_slice(&own_id.to_be_bytes());
        let u = UsageUpdate::decode(&own).expect("a usage update");
        assert_eq!(u.resolution.is_empty(), registry_id == 104, "{u:?}");
        rollups += usize::from(registry_id == 105);
    }
    assert!(
        rollups > 0,
        "no roll-up among {} usage records",
        usage.len()
    );
    broker.stop();
}
