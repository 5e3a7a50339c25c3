//! The Prometheus comparison (`compare --quick`, a smaller fleet and fewer probes) as a
//! check: under every injected fault, reading the nodes as their real sources show them,
//! Meterflow's GPU-hours, billed GPU-hours and energy stay within what those sources cannot
//! show of the physical truth (the scenario's bounds), while the same node in a real
//! Prometheus, read with the usual PromQL, loses what failed scrapes hid. Needs the `prometheus` binary (`make test` installs
//! Debian's package; the harness installs it itself when run as root).

use std::process::Command;

use serde_json::Value;

#[test]
fn meterflow_stays_within_the_sources_bound_under_the_faults() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("scores.json");
    let out = Command::new(env!("CARGO_BIN_EXE_compare"))
        .args(["--quick", "--nodes", "4", "--hours", "2", "--probes", "3"])
        .args(["--queries", "2", "--results", "-", "--json"])
        .arg(&json)
        .output()
        .expect("compare runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "compare failed:\n{text}");
    let scores: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&json).expect("scores written")).expect("JSON");
    let bounded: Vec<&Value> = scores.iter().filter(|q| q["bound"].is_number()).collect();
    assert!(
        bounded.len() >= 5,
        "GPU-hours by kind, billed and energy are checked: {scores:?}"
    );
    for q in &scores {
        let (m, p) = (&q["meterflow"], &q["prometheus"]);
        assert!(q["truth"].as_f64().expect("truth") > 0.0, "{q}");
        assert!(
            p["sum"].as_f64().expect("sum") > 0.0,
            "Prometheus answered: {q}"
        );
        // Within what the node's sources cannot show, computed from the physical runs.
        if let Some(bound) = q["bound"].as_f64() {
            let error = m["abs_error"].as_f64().expect("error");
            assert!(
                error <= bound * (1.0 + 1e-9),
                "Meterflow within the sources' bound: {q}"
            );
        }
    }
    // The scrape-based GPU-hours lose what the failed scrapes and the outage hid.
    let gpu = scores
        .iter()
        .find(|q| q["quantity"] == "GPU-hours h100")
        .expect("H100 GPU-hours");
    assert!(
        gpu["prometheus"]["abs_error"].as_f64().expect("error") > 0.0,
        "Prometheus is not exact under dropped scrapes: {gpu}"
    );
    assert!(
        text.contains("freshness"),
        "the cost and speed table is printed:\n{text}"
    );
}
