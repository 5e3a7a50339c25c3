//! The dashboard in a real browser: headless Chromium loads `/` from a running sink with a
//! token in the URL's fragment, runs the page's script against the API, and what it shows is
//! checked in the rendered DOM; a screenshot of each view is saved for people to look at. Then
//! a person's way through it, driven over the DevTools protocol (`cdp.rs`): a click in the
//! token field, the token typed, Enter, and the lease chart's metric changed with the keyboard.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meterflow_ingest::Publisher;
use serde_json::Value;

use crate::cdp::{Browser, HEADLESS};

use crate::common::{Pipeline, poll_json, token};

/// The browser: `$CHROMIUM`, or Debian's `chromium` (installed by `scripts/setup.sh`).
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Some(dir) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .find(|dir| dir.join(name).is_file())
        {
            return dir.join(name);
        }
    }
    panic!(
        "no Chromium found: the dashboard test needs a headless browser. `make test` installs \
         Debian's chromium (scripts/setup.sh); or set CHROMIUM=/path/to/chrome"
    );
}

/// Runs headless Chromium on `url` with `action` (`--dump-dom` or `--screenshot=FILE`);
/// returns its standard output.
fn browse(profile: &Path, action: &str, url: &str) -> String {
    let mut child = Command::new(chromium())
        .args(HEADLESS)
        // Run the page's timers and fetches to completion (virtual time waits for the network).
        .arg("--virtual-time-budget=15000")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(action)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match child.try_wait().expect("chromium status") {
            Some(status) => {
                let out = child.wait_with_output().expect("chromium output");
                assert!(status.success(), "chromium {action} {url}: {status}");
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("chromium {action} {url} did not finish in 90 s");
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The text inside the element with this id (up to the first tag inside it).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page: {dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').map_or(rest.len(), |i| i + 1);
    let end = rest[start..].find('<').map_or(rest.len(), |i| start + i);
    &rest[start..end]
}

/// The element with this id, whole (up to its closing tag).
fn element<'a>(dom: &'a str, id: &str, tag: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page: {dom}"));
    let end = dom[at..]
        .find(&format!("</{tag}>"))
        .unwrap_or_else(|| panic!("#{id} is not closed"));
    &dom[at..at + end]
}

/// Saves a screenshot of `url`; returns where, after checking it is a PNG.
fn screenshot(profile: &Path, url: &str, name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&path);
    browse(profile, &format!("--screenshot={}", path.display()), url);
    let png = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        path.display()
    );
    println!("dashboard screenshot: {}", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_tenant_its_spend_and_the_operator_its_fleet_in_a_browser() {
    let pipeline = Pipeline::start(1, 1).await;
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    for b in &crate::pipeline::batches() {
        publisher.publish(b).await.expect("batch delivered");
    }
    let acme = token("acme");
    poll_json(
        &pipeline.url("/v1/tenants/acme/burn-rate"),
        &acme,
        Duration::from_secs(90),
        |v| v["period"]["to_date"].as_f64() == Some(0.173_697),
    )
    .await;
    // The scenario's budget alert (50 % of acme's 0.30) has reached the sink.
    poll_json(
        &pipeline.url("/v1/tenants/acme/alerts"),
        &acme,
        Duration::from_secs(30),
        |v| v["alerts"].as_array().is_some_and(|a| a.len() == 1),
    )
    .await;
    let operator = token("");
    // Everything the processor wrote is stored, as the sink's lag gauge (measured every 2 s)
    // says, before the operator's page shows it.
    poll_json(
        &pipeline.url("/v1/status"),
        &operator,
        Duration::from_secs(30),
        |v| v["lag"]["records"].as_i64() == Some(0),
    )
    .await;
    poll_json(
        &pipeline.url("/v1/fleet/hourly?from=2026-11-23T00:00:00Z&to=2026-11-23T01:00:00Z"),
        &operator,
        Duration::from_secs(30),
        |v| v["hours"][0]["active_nodes"].as_i64() == Some(1),
    )
    .await;

    let profile = tempfile::tempdir().expect("browser profile");
    // `once`: the page ends its live feed after the first event, or headless Chromium (which
    // waits for every open request before it dumps the page) would wait for ever.
    let tenant_url = pipeline.url(&format!("/#token={acme}&once"));
    let operator_url = pipeline.url(&format!("/#token={operator}"));
    let (tenant_dom, operator_dom, tenant_png, operator_png) =
        tokio::task::spawn_blocking(move || {
            let dir = profile.path();
            (
                browse(dir, "--dump-dom", &tenant_url),
                browse(dir, "--dump-dom", &operator_url),
                screenshot(dir, &tenant_url, "dashboard-tenant.png"),
                screenshot(dir, &operator_url, "dashboard-operator.png"),
            )
        })
        .await
        .expect("browser task");

    // The tenant: who, the month's spend, the day's bar, the per-lease breakdown.
    let dom = &tenant_dom;
    assert_eq!(text_of(dom, "error"), "", "the page reported an error");
    assert_eq!(text_of(dom, "who"), "Tenant acme");
    assert_eq!(text_of(dom, "to_date"), "0.17");
    assert_eq!(text_of(dom, "as_of"), "2026-11-23T00:03:00.000Z");
    // It follows the tenant feed (opened with a ticket: EventSource sends no header).
    assert_eq!(text_of(dom, "live"), "live");
    let daily = element(dom, "daily", "svg");
    // November has 30 days; the day the data reached is marked.
    assert_eq!(daily.matches("<rect").count(), 30, "{daily}");
    assert_eq!(daily.matches("class=\"today\"").count(), 1, "{daily}");
    assert!(
        daily.contains("<title>2026-11-23: 0.173697</title>"),
        "{daily}"
    );
    // The budget alert, where the tenant sees it first (raised at the processor's clock).
    let alerts = element(dom, "alerts", "ul");
    assert!(
        alerts.contains("50 % of the budget reached, ") && alerts.contains(" of 0.30"),
        "{alerts}"
    );
    assert!(
        !dom.contains("id=\"alerts_box\" hidden"),
        "the alerts are shown"
    );
    let leases = element(dom, "leases", "tbody");
    // 241 and 120 GPU-seconds: 0.07 and 0.03 GPU-hours.
    assert!(
        leases.contains("<td>100.1.1</td><td>0.07</td><td>0.02</td>"),
        "{leases}"
    );
    assert!(leases.contains("<td>100.1.2</td><td>0.03</td>"), "{leases}");
    // The first lease's CPU over the last 24 hours, per 15 minutes, from AEP-43's route: the
    // step from 00:00 holds its 75 core-seconds, over the 180 s the data reaches (00:03).
    let chart = element(dom, "lease_chart", "svg");
    assert!(
        chart.contains("<title>2026-11-23T00:00:00.000Z: 0.4166666666666667</title>"),
        "{chart}"
    );
    assert!(chart.matches("<rect").count() >= 96, "{chart}");
    assert!(
        !dom.contains("id=\"tenant\" hidden"),
        "the tenant view is shown"
    );

    // The operator: the fleet's hours.
    let dom = &operator_dom;
    assert_eq!(text_of(dom, "error"), "", "the page reported an error");
    assert_eq!(text_of(dom, "who"), "Operator view");
    let fleet = element(dom, "fleet", "tbody");
    assert!(
        fleet.contains("<td>2026-11-23T00:00:00.000Z</td><td>1</td>"),
        "{fleet}"
    );
    // The pipeline's health: everything the processor wrote is stored; the scenario's data
    // (2026-11-23) is days older than this clock.
    assert_eq!(text_of(dom, "sink_lag"), "0");
    assert!(
        text_of(dom, "data_age").ends_with(" h"),
        "{}",
        text_of(dom, "data_age")
    );
    // The month by tenant and by GPU class: acme's 361 GPU-seconds (0.10 h), globex's 2.5;
    // the H100s' 241 (0.07 h) and the 1g.10gb slice's 120 (0.03 h).
    let tenants = element(dom, "fleet_tenants", "tbody");
    assert!(
        tenants.contains("<td>acme</td><td>0.10</td><td>0.02</td><td>0.17</td>")
            && tenants.contains("<td>globex</td><td>0.00</td>"),
        "{tenants}"
    );
    let classes = element(dom, "fleet_classes", "tbody");
    assert!(
        classes.contains("<td>h100</td><td>whole GPU</td><td>0.07</td>")
            && classes.contains("<td>a100</td><td>1g.10gb</td><td>0.03</td>"),
        "{classes}"
    );
    // The month's budget alerts, every tenant's.
    let fleet_alerts = element(dom, "fleet_alerts", "tbody");
    assert!(
        fleet_alerts.contains("<td>acme</td><td>50 %</td>"),
        "{fleet_alerts}"
    );
    // 24 hourly bars ending at the data's hour; the last holds the 4 GPUs.
    let chart = element(dom, "fleet_chart", "svg");
    assert_eq!(chart.matches("<rect").count(), 24, "{chart}");
    assert!(
        chart.contains("<title>2026-11-23T00:00:00.000Z: 4</title>"),
        "{chart}"
    );
    assert!(tenant_png.exists() && operator_png.exists());

    // Then as a person uses it: the page opened without a token, the token typed into its
    // field after a click and Enter pressed, the chart's metric changed with the keyboard.
    let base = pipeline.url("/");
    let (cpu_step, memory_step, png) = tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().expect("browser profile");
        let mut page = Browser::start(&chromium(), profile.path());
        page.navigate(&base);
        page.wait_for(
            "document.getElementById('token') !== null && document.readyState",
            Duration::from_secs(30),
            |v| v == "complete",
        );
        assert_eq!(
            page.eval("document.getElementById('tenant').hidden"),
            true,
            "nothing is shown before a token"
        );
        page.click("#token");
        page.type_text(&acme);
        page.press("Enter", 13);
        let spent = "document.getElementById('to_date').textContent";
        page.wait_for(spent, Duration::from_secs(60), |v| v == "0.17");
        assert_eq!(
            page.eval("document.getElementById('who').textContent"),
            "Tenant acme"
        );
        let step = "[...document.querySelectorAll('#lease_chart title')].map((t) => t.textContent).find((t) => t.startsWith('2026-11-23T00:00:00.000Z: ')) ?? null";
        let cpu_step = page.wait_for(step, Duration::from_secs(30), Value::is_string);
        page.click("#metric_pick");
        page.press("Escape", 27);
        page.press("ArrowDown", 40);
        page.wait_for(
            "document.getElementById('lease_chart_note').textContent",
            Duration::from_secs(30),
            |v| v.as_str().is_some_and(|n| n.starts_with("memory working set, GiB")),
        );
        let memory_step = page.wait_for(step, Duration::from_secs(30), |v| {
            v.is_string() && *v != cpu_step
        });
        (cpu_step, memory_step, page.screenshot())
    })
    .await
    .expect("browser task");
    // The lease's CPU first, as above; then its working set over the same step, by the SPEC's
    // gauge rule (a reading held until the next within `max_staleness`, 30 s; a container's
    // unread time holds its mean over its read time): c1 read 1 GiB at 15 s, 2 GiB at 35 s
    // and 75 s, 3 GiB at 130 s. Only 15 → 35 s is read (20 GiB-seconds, a mean of 1 GiB); the
    // gaps after it are 40 and 55 s. The readings span 15 → 130 s: 115 s at 1 GiB over the
    // 180 s the data reaches.
    assert_eq!(cpu_step, "2026-11-23T00:00:00.000Z: 0.4166666666666667");
    let gib: f64 = memory_step
        .as_str()
        .and_then(|t| t.rsplit(": ").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a level: {memory_step}"));
    assert!(
        (gib - 115.0 / 180.0).abs() < 1e-9,
        "the working set's level over the step: {gib} GiB"
    );
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-tenant-clicked.png");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    std::fs::write(&path, &png).expect("screenshot written");
    println!("dashboard screenshot: {}", path.display());
    pipeline.stop().await;
}
