//! The Prometheus comparison (`compare --quick`, a smaller fleet and fewer probes) as a
//! check: under every injected fault, reading the nodes as their real sources show them, each
//! system stays within the bound its way of reading the nodes allows, computed from the
//! physical runs: Meterflow within what the sources cannot show (whole-second kubelet times,
//! runs never listed, a board's energy outside its holder's readings), a Prometheus server
//! within a 15-s sampler's bound plus what its failed scrapes hid, a Prometheus agent (WAL,
//! remote write) within the sampler's bound alone, after its server was really down and it
//! really retried; a Prometheus server reading kube-state-metrics within the kubelet's whole
//! seconds plus what the API server's stale views of late or partitioned nodes hid; Meterflow's billed GPU-hours read from its billing stream, corrected by
//! adjustments after a partition healed past the hour's billing. Needs the `prometheus` binary (`make test` installs Debian's package; the
//! harness installs it itself when run as root).

use std::process::Command;

use serde_json::Value;

#[test]
fn each_system_stays_within_its_bound_under_the_faults() {
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
    let doc: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("scores written")).expect("JSON");
    // The agent's delivery fault happened: its server was down for half the writes and it
    // had to send samples again.
    let agent = &doc["agent"];
    assert!(
        agent["writes_while_server_down"].as_u64().expect("writes") > 0
            && agent["samples_retried"].as_f64().expect("retried") > 0.0,
        "the Prometheus agent met a delivery fault and retried: {agent}"
    );
    // The partition healed after the hour before it was billed: the charges were corrected
    // by adjustments on the billing stream (and the billed GPU-hours below include them).
    let billing = &doc["meterflow_billing"];
    assert!(
        billing["adjustments"].as_u64().expect("adjustments") > 0,
        "the partition's batches arrived after their hour was billed: {billing}"
    );
    // The driver reload landed between two readings: a board's energy counter, as every
    // collector reads it, went down.
    assert!(
        doc["faults"]["board_counter_resets_seen"]
            .as_u64()
            .expect("resets")
            >= 1,
        "a GPU board's energy counter restarted from zero between two readings: {}",
        doc["faults"]
    );
    let scores = doc["quantities"].as_array().expect("quantities");
    let bounded = |side: &str| {
        scores
            .iter()
            .filter(|q| q[side]["bound"].is_number())
            .count()
    };
    assert!(
        bounded("meterflow") >= 5
            && bounded("prometheus") >= 4
            && bounded("prometheus_agent") >= 4
            && bounded("prometheus_ksm") >= 4,
        "GPU-hours by kind, billed (and Meterflow's energy) are checked: {scores:?}"
    );
    // Every server's hourly GPU-hours came from its recorded rule, evaluated by promtool's
    // backfiller: the server's and kube-state-metrics' equal the rule's expression as a
    // subquery at the scrapes' steps (the agent's server differs where the node outage's
    // series fade at the lookback's edge, which the rule group's offset moves by a step).
    let rules = &doc["recording_rules"];
    for server in ["prometheus", "prometheus_agent", "prometheus_ksm"] {
        assert!(
            rules[server]["cells"].as_u64().expect("cells") > 0,
            "{server} read its recorded rule: {rules}"
        );
    }
    for server in ["prometheus", "prometheus_ksm"] {
        assert_eq!(
            rules[server]["differing_from_subquery"].as_u64(),
            Some(0),
            "{server}'s recorded rule is its expression at every scrape: {rules}"
        );
    }
    for q in scores {
        assert!(q["truth"].as_f64().expect("truth") > 0.0, "{q}");
        // kube-state-metrics reads GPU time alone.
        for side in [
            "meterflow",
            "prometheus",
            "prometheus_agent",
            "prometheus_ksm",
        ] {
            let s = &q[side];
            if side == "prometheus_ksm" && s.is_null() {
                continue;
            }
            assert!(
                s["sum"].as_f64().expect("sum") > 0.0,
                "{side} answered: {q}"
            );
            // Within what its way of reading the nodes cannot show, from the physical runs.
            if let Some(bound) = s["bound"].as_f64() {
                let error = s["abs_error"].as_f64().expect("error");
                assert!(
                    error <= bound * (1.0 + 1e-9),
                    "{side} within its bound: {q}"
                );
            }
        }
    }
    assert!(
        text.contains("freshness"),
        "the cost and speed table is printed:\n{text}"
    );
}
