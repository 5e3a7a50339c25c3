//! Who reaches what: every route of the sink, with no token, an expired token, a wrongly
//! signed one, an unsigned (`alg: none`) one, another tenant's, a tenant token without the
//! `metrics` scope, the right tenant's, and operator tokens signed with HS256 and with the
//! Ed25519 key.

use std::time::Duration;

use meterflow_ingest::Publisher;
use meterflow_sink::auth::SigningKey;

use crate::common::{ED25519_PRIVATE, Feed, Pipeline, SECRET, get_as, poll_json, token_with};

/// Each route as each caller: a line for each answer whose status is not the one expected (the
/// `N` statuses of a route are the callers', in order). A 401 must say what to do and leak
/// nothing of the tenant's data.
async fn wrong_answers<const N: usize>(
    pipeline: &Pipeline,
    routes: &[(impl AsRef<str>, [u16; N])],
    callers: &[(&str, String); N],
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (route, expected) in routes {
        let route = route.as_ref();
        for ((caller, token), want) in callers.iter().zip(expected) {
            let (status, body) = get_as(&pipeline.url(route), token).await;
            if status != *want {
                wrong.push(format!(
                    "{route} as {caller}: {status}, expected {want}: {body}"
                ));
            }
            if status == 401 {
                assert!(body.contains("meterflow token"), "{body}");
                assert!(!body.contains("gpu_seconds"), "{body}");
            }
        }
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_kind_of_caller_as_it_should() {
    let pipeline = Pipeline::start(1, 1).await;
    // The pipeline scenario's data, so that lease routes have a lease to answer for.
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    for b in &crate::pipeline::batches() {
        publisher.publish(b).await.expect("batch delivered");
    }
    poll_json(
        &pipeline.url("/v1/leases/100.1.1/live"),
        &crate::common::token(""),
        Duration::from_secs(60),
        |v| v["metrics"]["memory_working_set_bytes"]["gauge"].is_number(),
    )
    .await;
    let hs = SigningKey::Hs256(SECRET.to_vec());
    let unsigned = {
        // The right tenant's claims, `alg: none`, no signature.
        let real = token_with(&hs, "acme", "metrics", 600);
        let claims = real.split('.').nth(1).expect("a JWT has three parts");
        // {"alg":"none","typ":"JWT"}
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.")
    };
    let callers: [(&str, String); 9] = [
        ("none", String::new()),
        ("expired", token_with(&hs, "acme", "metrics", -3_600)),
        (
            "wrongly signed",
            token_with(
                &SigningKey::Hs256(b"not the sink's secret, but 32+ bytes".to_vec()),
                "acme",
                "metrics",
                600,
            ),
        ),
        ("alg none", unsigned),
        ("other tenant", token_with(&hs, "globex", "metrics", 600)),
        ("no metrics scope", token_with(&hs, "acme", "billing", 600)),
        ("tenant", token_with(&hs, "acme", "metrics", 600)),
        ("operator", token_with(&hs, "", "operator", 600)),
        (
            "operator ed25519",
            token_with(
                &SigningKey::Pem(ED25519_PRIVATE.to_vec()),
                "",
                "operator",
                600,
            ),
        ),
    ];
    // Expected status per caller, in the order above.
    let routes: [(&str, [u16; 9]); 19] = [
        ("/openapi.json", [200; 9]),
        // AEP-43's route: a token without the metrics scope is told so (403).
        (
            "/lease/100/1/1/metrics?metric=all&start=1795392000&end=1795395600",
            [401, 401, 401, 401, 404, 403, 200, 200, 200],
        ),
        (
            "/v1/leases/100.1.1/metrics",
            [401, 401, 401, 401, 404, 404, 200, 200, 200],
        ),
        (
            "/v1/leases/100.1.1/live",
            [401, 401, 401, 401, 404, 404, 200, 200, 200],
        ),
        // A lease no one has: the same 404 a lease of another tenant gets.
        (
            "/v1/leases/100.9.9/live",
            [401, 401, 401, 401, 404, 404, 404, 404, 404],
        ),
        (
            "/v1/tenants/acme/usage",
            [401, 401, 401, 401, 404, 404, 200, 200, 200],
        ),
        (
            "/v1/tenants/acme/burn-rate",
            [401, 401, 401, 401, 404, 404, 200, 200, 200],
        ),
        (
            "/v1/tenants/acme/alerts",
            [401, 401, 401, 401, 404, 404, 200, 200, 200],
        ),
        (
            "/v1/fleet/usage",
            [401, 401, 401, 401, 403, 403, 403, 200, 200],
        ),
        (
            "/v1/fleet/alerts",
            [401, 401, 401, 401, 403, 403, 403, 200, 200],
        ),
        // A feed's first event stands for its body.
        (
            "/v1/feeds/tenants/acme",
            [401, 401, 401, 401, 404, 404, 200, 200, 200],
        ),
        (
            "/v1/feeds/leases/100.1.1",
            [401, 401, 401, 401, 404, 404, 200, 200, 200],
        ),
        // A ticket carries what the bearer reaches: any valid token gets one.
        (
            "/v1/feeds/ticket",
            [401, 401, 401, 401, 200, 200, 200, 200, 200],
        ),
        (
            "/v1/fleet/hourly",
            [401, 401, 401, 401, 403, 403, 403, 200, 200],
        ),
        ("/v1/status", [401, 401, 401, 401, 200, 200, 200, 200, 200]),
        ("/metrics", [200; 9]),
        ("/healthz", [200; 9]),
        ("/readyz", [200; 9]),
        // The page holds no data; it fetches with the token the user gives it.
        ("/", [200; 9]),
    ];
    // The matrix covers every route the sink serves.
    for path in meterflow_sink::api::paths() {
        let concrete = path
            .replace("{tenant}", "acme")
            .replace("{lease}", "100.1.1")
            .replace("{dseq}/{gseq}/{oseq}", "100/1/1");
        assert!(
            routes
                .iter()
                .any(|(r, _)| r.split('?').next() == Some(concrete.as_str())),
            "route {path} is not in the authorization matrix"
        );
    }
    // Ready first, so /readyz answers 200 to everyone.
    for _ in 0..100 {
        if get_as(&pipeline.url("/readyz"), "").await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wrong = wrong_answers(&pipeline, &routes, &callers).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // A 401 names the scheme, as RFC 6750 asks.
    let r = reqwest::get(pipeline.url("/v1/status"))
        .await
        .expect("sink answers");
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let pipeline = Pipeline::start_limited(
        1,
        1,
        meterflow_sink::limits::Limits {
            requests_per_s: 0.5,
            burst: 5.0,
            ..Default::default()
        },
    )
    .await;
    let acme = crate::common::token("acme");
    let url = pipeline.url("/v1/tenants/acme/usage");
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get_as(&url, &acme).await.0);
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429]);
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&acme)
        .send()
        .await
        .expect("sink answers");
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=2).contains(&retry), "{retry}");
    // Another tenant's bucket is its own.
    let globex = crate::common::token("globex");
    let (status, _) = get_as(&pipeline.url("/v1/tenants/globex/usage"), &globex).await;
    assert_eq!(status, 200);
    pipeline.stop().await;
}

/// A pipeline with the sink's `limits` and the pipeline scenario stored. The burn-rate route
/// has no series to count: it is waited on for the whole scenario.
async fn scenario(limits: meterflow_sink::limits::Limits) -> Pipeline {
    let pipeline = Pipeline::start_limited(1, 1, limits).await;
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    for b in &crate::pipeline::batches() {
        publisher.publish(b).await.expect("batch delivered");
    }
    poll_json(
        &pipeline.url("/v1/tenants/acme/burn-rate"),
        &crate::common::token("acme"),
        Duration::from_secs(60),
        |v| v["period"]["to_date"].as_f64() == Some(0.173_697),
    )
    .await;
    pipeline
}

/// A feed is a query that stays open (AEP-43: 20 concurrent queries per tenant): a tenant
/// holding its most gets 429 with Retry-After for another, of either kind, until one closes;
/// another tenant's places are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holding_its_most_feeds_gets_429_until_one_closes() {
    let pipeline = scenario(meterflow_sink::limits::Limits {
        max_open_feeds: 2,
        ..Default::default()
    })
    .await;
    let acme = crate::common::token("acme");
    let tenant_feed = pipeline.url("/v1/feeds/tenants/acme");
    let lease_feed = pipeline.url("/v1/feeds/leases/100.1.1");
    let ask = |url: String| {
        let acme = acme.clone();
        async move {
            reqwest::Client::new()
                .get(&url)
                .bearer_auth(&acme)
                .send()
                .await
                .expect("sink answers")
        }
    };
    let first = Feed::open(&tenant_feed, &acme, None).await;
    let second = Feed::open(&lease_feed, &acme, None).await;
    for url in [&tenant_feed, &lease_feed] {
        let r = ask(url.clone()).await;
        assert_eq!(r.status(), 429, "{url}");
        // The tests' sinks keep feeds alive every second: a gone client's place is free by then.
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let body = r.text().await.expect("body");
        assert!(body.contains("acme has 2 feeds open"), "{body}");
    }
    let globex = crate::common::token("globex");
    let _theirs = Feed::open(&pipeline.url("/v1/feeds/tenants/globex"), &globex, None).await;
    // One closed: its place is free once the sink notices, at the latest when its next
    // keep-alive finds no one to write to.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = ask(tenant_feed.clone()).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the closed feed's place never came free"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(second);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reading_too_many_series_gets_429_with_retry_after() {
    let pipeline = scenario(meterflow_sink::limits::Limits {
        series_per_s: 0.5,
        series_burst: 3.0,
        ..Default::default()
    })
    .await;
    let acme = crate::common::token("acme");
    // Grouped by lease, acme's hour has two series: the first answer takes 2 of 3, the second
    // needs 2 with 1 left, and waits 2 s at 0.5 series per second.
    let url =
        pipeline.url("/v1/tenants/acme/usage?from=2026-11-23T00:00:00Z&to=2026-11-23T01:00:00Z");
    let (status, body) = get_as(&url, &acme).await;
    assert_eq!(status, 200, "{body}");
    let rows: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(rows["rows"].as_array().map(Vec::len), Some(2), "{rows}");
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&acme)
        .send()
        .await
        .expect("sink answers");
    assert_eq!(r.status(), 429);
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(retry.as_deref(), Some("2"));
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("2 series"),
        "{body}"
    );
    // Other tenants are not affected, and the refusal is counted by limit.
    let (status, _) = get_as(
        &pipeline.url("/v1/tenants/globex/usage"),
        &crate::common::token("globex"),
    )
    .await;
    assert_eq!(status, 200);
    let metrics = crate::common::get_text(&pipeline.url("/metrics")).await;
    assert!(
        metrics.contains("meterflow_sink_limited_total{limit=\"series\"} 1"),
        "{metrics}"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_series_cap_is_refused_whatever_the_bucket_holds() {
    // A bucket far larger than any answer, and a cap of one series per answer.
    let pipeline = scenario(meterflow_sink::limits::Limits {
        series_burst: 1e9,
        max_series_per_query: 1,
        ..Default::default()
    })
    .await;
    let acme = crate::common::token("acme");
    let hour = "from=2026-11-23T00:00:00Z&to=2026-11-23T01:00:00Z";
    // Grouped by lease: two series, one over the cap; summed: one.
    let (status, body) = get_as(
        &pipeline.url(&format!("/v1/tenants/acme/usage?{hour}&group_by=lease")),
        &acme,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        // Summing stopped at the second lease: the rest would be read for nothing.
        body.contains("at least 2 series") && body.contains("at most 1") && body.contains("narrow"),
        "{body}"
    );
    let (status, body) = get_as(
        &pipeline.url(&format!("/v1/tenants/acme/usage?{hour}&group_by=none")),
        &acme,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    pipeline.stop().await;
}

/// A sink started with `--jwt-audience` takes the tokens `meterflow token --audience` mints for
/// it and refuses the same operator's token minted for no audience or for another service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_given_an_audience_accepts_only_tokens_for_it() {
    use crate::common::{KillOnDrop, free_addr};
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret written");
    let mint = |audience: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"));
        cmd.arg("token")
            .arg("--secret-file")
            .arg(&secret)
            .arg("--operator");
        if let Some(a) = audience {
            cmd.args(["--audience", a]);
        }
        let out = cmd.output().expect("meterflow token runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    };
    let (ours, theirs, plain) = (mint(Some("meterflow")), mint(Some("grafana")), mint(None));
    let broker = crate::common::memory_broker().await;
    let listen = free_addr();
    let _sink = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .arg("sink")
            .args(["--brokers", &broker.bootstrap()])
            .args(["--listen", &listen.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--jwt-secret-file")
            .arg(&secret)
            .args(["--jwt-audience", "meterflow"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the sink starts"),
    );
    let url = format!("http://{listen}/v1/status");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://{listen}/healthz"))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sink did not listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get_as(&url, &ours).await.0, 200, "a token for this sink");
    assert_eq!(
        get_as(&url, &theirs).await.0,
        401,
        "a token for another service"
    );
    assert_eq!(get_as(&url, &plain).await.0, 401, "a token for no audience");
    broker.stop();
}

/// A lease owner's token (AEP-64) signed with the sink's key: `iss`, `iat`, `version`, and
/// `leases` as given.
fn owners_token(iss: &str, leases: serde_json::Value) -> String {
    use meterflow_sink::auth::{Claims, mint, now_s};
    mint(
        &SigningKey::Hs256(crate::common::SECRET.to_vec()),
        &Claims {
            exp: now_s() + 900,
            iss: Some(iss.into()),
            iat: Some(now_s()),
            version: Some("v1".into()),
            leases: Some(serde_json::from_value(leases).expect("a leases claim")),
            ..Claims::default()
        },
    )
    .expect("a token is minted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_owners_token_reaches_the_leases_and_services_its_leases_claim_names() {
    let pipeline = Pipeline::start(1, 1).await;
    // The pipeline scenario, its tenant `acme` an Akash account (the one whose key the sink
    // is given): leases 100.1.1 and 100.1.2 (service `svc`) are the owner's, 200.1.1 another
    // tenant's.
    let owner = crate::common::owner_account();
    let owner = owner.as_str();
    let publisher = Publisher::new(&pipeline.broker.bootstrap()).expect("producer");
    for mut b in crate::pipeline::batches() {
        for s in &mut b.samples {
            if s.series.tenant == "acme" {
                s.series.tenant = owner.into();
            }
        }
        publisher.publish(&b).await.expect("batch delivered");
    }
    let provider = meterflow_ingest::simulator::PROVIDER;
    let at_provider = |deployments: serde_json::Value| {
        serde_json::json!({"access": "granular", "permissions": [
            {"provider": provider, "access": "granular", "deployments": deployments}]})
    };
    let own = |iss: &str| {
        crate::common::owner_signed(&serde_json::json!({"iss": iss,
            "iat": meterflow_sink::auth::now_s(), "exp": meterflow_sink::auth::now_s() + 900,
            "version": "v1", "leases": {"access": "full"}}))
    };
    let callers: [(&str, String); 10] = [
        (
            "full",
            owners_token(owner, serde_json::json!({"access": "full"})),
        ),
        (
            "scoped metrics",
            owners_token(
                owner,
                serde_json::json!({"access": "scoped", "scope": ["logs", "metrics"]}),
            ),
        ),
        (
            "scoped logs",
            owners_token(
                owner,
                serde_json::json!({"access": "scoped", "scope": ["logs"]}),
            ),
        ),
        (
            "lease 100.1.2",
            owners_token(
                owner,
                at_provider(
                    serde_json::json!([{"dseq": 100, "gseq": 1, "oseq": 2, "scope": ["metrics"]}]),
                ),
            ),
        ),
        (
            "deployment 100, svc",
            owners_token(
                owner,
                at_provider(
                    serde_json::json!([{"dseq": 100, "scope": ["metrics"], "services": ["svc"]}]),
                ),
            ),
        ),
        (
            "deployment 100, web",
            owners_token(
                owner,
                at_provider(
                    serde_json::json!([{"dseq": 100, "scope": ["metrics"], "services": ["web"]}]),
                ),
            ),
        ),
        (
            "another provider",
            owners_token(
                owner,
                serde_json::json!({"access": "granular", "permissions": [
                    {"provider": "akash1another0000000000000000000000000000000", "access": "full"}]}),
            ),
        ),
        (
            "another owner",
            owners_token(
                "akash1someoneelse000000000000000000000000000",
                serde_json::json!({"access": "full"}),
            ),
        ),
        // Signed by the owner's own account key (ES256K), as an owner's client signs.
        ("own key", own(owner)),
        // The owner's key signing for another account: not that account's key.
        (
            "own key, another issuer",
            own("akash1someoneelse000000000000000000000000000"),
        ),
    ];
    let range = "metric=all&start=1795392000&end=1795395600";
    let lease = |l: &str| format!("/lease/{l}/metrics?{range}");
    // Waited for: the owner's lease has its series.
    poll_json(
        &pipeline.url(&lease("100/1/1")),
        &callers[0].1,
        Duration::from_secs(60),
        |v| v["series"].as_array().is_some_and(|s| !s.is_empty()),
    )
    .await;
    let tenant_usage = format!("/v1/tenants/{owner}/usage");
    // Expected status per caller, in the order above. A token that reaches no metrics at this
    // provider is told so (403); a lease it does not reach is not found, as another tenant's
    // (404); a Meterflow route a token reaches only some services of answers 403.
    let routes: [(String, [u16; 10]); 6] = [
        (
            lease("100/1/1"),
            [200, 200, 403, 404, 200, 200, 403, 404, 200, 401],
        ),
        (
            lease("100/1/2"),
            [200, 200, 403, 200, 200, 200, 403, 404, 200, 401],
        ),
        (
            lease("200/1/1"),
            [404, 404, 403, 404, 404, 404, 403, 404, 404, 401],
        ),
        (
            "/v1/leases/100.1.1/metrics".into(),
            [200, 200, 404, 404, 403, 403, 404, 404, 200, 401],
        ),
        (
            tenant_usage,
            [200, 200, 404, 404, 404, 404, 404, 404, 200, 401],
        ),
        (
            "/v1/fleet/usage".into(),
            [403, 403, 403, 403, 403, 403, 403, 403, 403, 401],
        ),
    ];
    let wrong = wrong_answers(&pipeline, &routes, &callers).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The services a token names are the services answered: `svc` is the lease's one.
    let services = |token: &str, query: &str| {
        let url = pipeline.url(&format!("{}{query}", lease("100/1/1")));
        let token = token.to_string();
        async move {
            let (status, body) = get_as(&url, &token).await;
            assert_eq!(status, 200, "{body}");
            let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let mut names: Vec<String> = answer["series"]
                .as_array()
                .expect("series")
                .iter()
                .map(|s| {
                    s["labels"]["service"]
                        .as_str()
                        .expect("a service")
                        .to_string()
                })
                .collect();
            names.dedup();
            names
        }
    };
    assert_eq!(services(&callers[0].1, "").await, ["svc"]);
    assert_eq!(services(&callers[4].1, "").await, ["svc"]);
    assert_eq!(
        services(&callers[5].1, "").await,
        Vec::<String>::new(),
        "a token for service web reads nothing of svc"
    );
    // Asking for a service the token does not name is refused, and says which it names.
    let (status, body) = get_as(
        &pipeline.url(&format!("{}&service=svc", lease("100/1/1"))),
        &callers[5].1,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("it reaches web"), "{body}");
    // The answer names the owner as the lease's owner.
    let answer = poll_json(
        &pipeline.url(&lease("100/1/1")),
        &callers[1].1,
        Duration::from_secs(5),
        |v| v["lease"]["owner"].is_string(),
    )
    .await;
    assert_eq!(answer["lease"]["owner"], owner);
    pipeline.stop().await;
}
