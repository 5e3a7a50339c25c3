//! The OpenAPI document against a running sink: schemathesis (PyPI; `make test` installs it)
//! generates requests from the document served at `/openapi.json` — examples, the coverage of
//! each parameter's edges, and random ones — and checks every answer: no server error, a
//! status code, content type and headers the document lists for the route, and a body of the
//! documented schema. The sink holds the pipeline scenario's data (tenant acme, leases 100.1.1
//! and 100.1.2, the document's examples), so answers with rows are checked, not only errors.
//! The feeds (Server-Sent Events, never ending) are left out; `feeds.rs` tests them.

use std::path::PathBuf;

use crate::common::{get_text, metric_value, token};

/// The schemathesis CLI: `MF_SCHEMATHESIS`, the one `scripts/setup.sh` installs, or `st` on
/// the PATH.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("MF_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let installed = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/meterflow/tools/bin/st"))
        .filter(|p| p.exists());
    installed.unwrap_or_else(|| PathBuf::from("st"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_the_document_does_not_describe() {
    // Limits no run of schemathesis reaches: every answer is the route's, not a 429.
    let unlimited = meterflow_sink::limits::Limits {
        requests_per_s: 1e6,
        burst: 1e6,
        series_per_s: 1e9,
        series_burst: 1e9,
        max_series_per_query: usize::MAX,
        max_open_feeds: usize::MAX,
    };
    let (pipeline, _) = crate::deploy::components_after_work(unlimited).await;
    let url = pipeline.url("/openapi.json");
    let operator = token("");
    let st = schemathesis();
    // schemathesis keeps a cache of earlier failures (`.schemathesis/`) in its working
    // directory and replays them first: each run starts from nothing, outside the checkout.
    let cwd = tempfile::tempdir().expect("tempdir");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&st)
            .current_dir(cwd.path())
            .args(["run", &url])
            .args(["--header", &format!("Authorization: Bearer {operator}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_headers_conformance,response_schema_conformance",
            ])
            .args(["--exclude-path-regex", "^/v1/feeds/"])
            .args(["--max-examples", "40", "--seed", "7", "--request-timeout", "10"])
            .args(["--no-color"])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{} does not run ({e}): `make test` installs schemathesis (scripts/setup.sh), or set MF_SCHEMATHESIS",
                    st.display()
                )
            })
    })
    .await
    .expect("schemathesis ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found answers the document does not describe:\n{stdout}\n{stderr}"
    );
    // It tested every route but the feeds, their ticket and the document itself (14 of 18), and every
    // case it generated passed.
    assert!(
        stdout.contains("Tested: 14"),
        "schemathesis did not test the 14 routes:\n{stdout}"
    );
    let cases = stdout
        .lines()
        .find_map(|l| {
            let (generated, passed) = l.trim().split_once(" generated, ")?;
            Some((
                generated.parse::<u64>().ok()?,
                passed.strip_suffix(" passed")?.parse::<u64>().ok()?,
            ))
        })
        .unwrap_or_else(|| panic!("no count of test cases:\n{stdout}"));
    assert!(cases.0 >= 100 && cases.0 == cases.1, "{cases:?}:\n{stdout}");
    // Answers with data were among them: each data route answered 200 (acme's usage and
    // burn rate, lease 100.1.1's metrics and live values, the fleet).
    let exposition = get_text(&pipeline.url("/metrics")).await;
    for route in [
        "/v1/tenants/{tenant}/usage",
        "/v1/tenants/{tenant}/burn-rate",
        "/v1/leases/{lease}/metrics",
        "/v1/leases/{lease}/live",
        "/v1/fleet/hourly",
    ] {
        let ok = metric_value(
            &exposition,
            &format!("meterflow_sink_http_requests_total{{route=\"{route}\",status=\"200\"}}"),
        );
        assert!(
            ok.is_some_and(|n| n >= 1.0),
            "{route}: no 200 among the answers checked"
        );
    }
    println!("{stdout}");
    pipeline.stop().await;
}
