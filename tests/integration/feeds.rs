//! The Server-Sent Events feeds: a tenant's burn rate as it changes, a lease's utilization for
//! autoscalers, keep-alives while idle, resumption with `Last-Event-ID`, and the tickets a
//! browser opens them with.

use std::time::Duration;

use meterflow_ingest::Publisher;

use crate::common::{Feed, Pipeline, get_as, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_feed_follows_the_burn_rate_keeps_alive_and_resumes() {
    let pipeline = Pipeline::start(1, 1).await;
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    let batches = crate::pipeline::batches();
    let acme = token("acme");
    let url = pipeline.url("/v1/tenants/acme/burn-rate");
    let feed_url = pipeline.url("/v1/feeds/tenants/acme?over=1m");

    // Subscribed before any data: the first event is the answer now (nothing spent).
    let mut feed = Feed::open(&feed_url, &acme, None).await;
    let (first, _) = feed
        .event_until(Duration::from_secs(30), |f| f.event == "burn-rate")
        .await;
    assert_eq!(first.json()["tenant"], "acme");
    assert_eq!(first.json()["period"]["to_date"].as_f64(), Some(0.0));

    // The scenario arrives; the feed follows until the final answer, each event new.
    for b in &batches {
        publisher.publish(b).await.expect("batch delivered");
    }
    let (last, between) = feed
        .event_until(Duration::from_secs(90), |f| {
            f.json()["period"]["to_date"].as_f64() == Some(0.173_697)
                && f.json()["as_of"] == "2026-11-23T00:03:00.000Z"
                // The budget alert (its own topic, its own consumer) has arrived too.
                && f.json()["alerts"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    let mut ids: Vec<&str> = std::iter::once(first.id.as_str())
        .chain(
            between
                .iter()
                .filter(|f| !f.event.is_empty())
                .map(|f| f.id.as_str()),
        )
        .chain(std::iter::once(last.id.as_str()))
        .collect();
    let events = ids.len();
    ids.dedup();
    assert_eq!(
        ids.len(),
        events,
        "an event repeats the one before: {ids:?}"
    );
    // What the feed says is what the route says.
    let (status, body) = get_as(&format!("{url}?over=1m"), &acme).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json"),
        last.json()
    );

    // Idle: keep-alive comments (the test sink sends one a second), no events.
    let quiet = feed
        .next(Duration::from_secs(5))
        .await
        .expect("a keep-alive");
    assert_eq!(
        (quiet.event.as_str(), quiet.comment.as_str()),
        ("", "keep-alive")
    );
    drop(feed);

    // Resuming at the last event: nothing to send but keep-alives.
    let mut resumed = Feed::open(&feed_url, &acme, Some(&last.id)).await;
    let next = resumed.next(Duration::from_secs(5)).await.expect("a frame");
    assert_eq!(next.comment, "keep-alive", "{next:?}");
    assert!(next.event.is_empty(), "{next:?}");
    // Resuming from an older event: the current answer at once.
    let mut behind = Feed::open(&feed_url, &acme, Some(&first.id)).await;
    let caught_up = behind.next(Duration::from_secs(5)).await.expect("an event");
    assert_eq!(
        (caught_up.event.as_str(), caught_up.id.as_str()),
        ("burn-rate", last.id.as_str())
    );

    // The lease feed: the live values of the lease, for autoscalers.
    let mut lease = Feed::open(&pipeline.url("/v1/feeds/leases/100.1.1"), &acme, None).await;
    let (live, _) = lease
        .event_until(Duration::from_secs(30), |f| f.event == "utilization")
        .await;
    let live = live.json();
    assert_eq!(
        (live["lease"].as_str(), live["tenant"].as_str()),
        (Some("100.1.1"), Some("acme"))
    );
    assert_eq!(
        live["metrics"]["memory_working_set_bytes"]["gauge"].as_f64(),
        Some(3.0 * (1u64 << 30) as f64)
    );
    // Another tenant's lease is not found, as on every lease route; a bad `over` is a 400.
    let (status, _) = get_as(&pipeline.url("/v1/feeds/leases/100.1.1"), &token("globex")).await;
    assert_eq!(status, 404);
    let (status, body) = get_as(&pipeline.url("/v1/feeds/tenants/acme?over=2d"), &acme).await;
    assert_eq!(status, 400, "{body}");

    // The sink counts its feeds and their events.
    let metrics = crate::common::get_text(&pipeline.url("/metrics")).await;
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        value("meterflow_sink_feeds_open{kind=\"lease\"}"),
        1.0,
        "{metrics}"
    );
    assert!(
        value("meterflow_sink_feed_events_total{kind=\"tenant\"}") >= 3.0,
        "{metrics}"
    );
    drop((resumed, behind, lease));
    // Open feeds end with the sink: stopping does not wait for their clients.
    let mut open = Feed::open(&feed_url, &acme, None).await;
    open.next(Duration::from_secs(5))
        .await
        .expect("the first event");
    tokio::time::timeout(Duration::from_secs(30), pipeline.stop())
        .await
        .expect("the pipeline stops with a feed open");
    assert!(
        open.next(Duration::from_secs(5)).await.is_none(),
        "the feed ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_opens_a_feed_with_a_ticket_and_no_other_route_takes_one() {
    let pipeline = Pipeline::start(1, 1).await;
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    for b in &crate::pipeline::batches() {
        publisher.publish(b).await.expect("batch delivered");
    }
    let acme = token("acme");
    // The lease is stored (its feed answers 404 before).
    crate::common::poll_json(
        &pipeline.url("/v1/leases/100.1.1/live"),
        &acme,
        Duration::from_secs(60),
        |v| v["metrics"]["memory_working_set_bytes"]["gauge"].is_number(),
    )
    .await;
    let (status, body) = get_as(&pipeline.url("/v1/feeds/ticket"), &acme).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let ticket = answer["ticket"].as_str().expect("a ticket").to_string();
    assert_eq!(answer["expires_in"], 60);
    assert_ne!(ticket, acme, "a ticket is not the bearer token");

    // No header, the ticket in the URL, as an EventSource opens it: both of acme's feeds.
    let mut feed = Feed::open(
        &pipeline.url(&format!("/v1/feeds/tenants/acme?ticket={ticket}")),
        "",
        None,
    )
    .await;
    let (event, _) = feed
        .event_until(Duration::from_secs(30), |f| f.event == "burn-rate")
        .await;
    assert_eq!(event.json()["tenant"], "acme");
    let mut lease = Feed::open(
        &pipeline.url(&format!("/v1/feeds/leases/100.1.1?ticket={ticket}")),
        "",
        None,
    )
    .await;
    lease
        .event_until(Duration::from_secs(30), |f| f.event == "utilization")
        .await;

    // It reaches what the bearer reaches, no more; it opens nothing but feeds; and only this
    // sink's own ticket key takes it.
    let (status, _) = get_as(
        &pipeline.url(&format!("/v1/feeds/tenants/globex?ticket={ticket}")),
        "",
    )
    .await;
    assert_eq!(status, 404);
    for route in ["/v1/tenants/acme/burn-rate", "/v1/status"] {
        let (status, body) = get_as(&pipeline.url(&format!("{route}?ticket={ticket}")), "").await;
        assert_eq!(status, 401, "{route} with a ticket: {body}");
        let (status, body) = get_as(&pipeline.url(route), &ticket).await;
        assert_eq!(status, 401, "{route} with a ticket as the bearer: {body}");
    }
    let (status, body) = get_as(
        &pipeline.url("/v1/feeds/tenants/acme?ticket=not.a.ticket"),
        "",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("feed ticket is not valid"), "{body}");
    // A bearer token is not a ticket either: the sink's token keys do not sign tickets.
    let (status, _) = get_as(
        &pipeline.url(&format!("/v1/feeds/tenants/acme?ticket={acme}")),
        "",
    )
    .await;
    assert_eq!(status, 401);
    drop((feed, lease));
    pipeline.stop().await;
}
