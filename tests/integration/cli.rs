//! The CLI as a user meets it: `meterflow schemas` against a stand-in Schema Registry on
//! loopback (its REST API: compatibility checks, then registrations), and shell completions.

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

async fn serve(registry: Shared) -> String {
    let app = axum::Router::new()
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
        8,
        "a header and seven versions: {list}"
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
        ] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let out = meterflow(&["completions", "tcsh"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: bash"));
}
