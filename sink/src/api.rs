//! The HTTP API (SPEC: HTTP API), served with axum.
//!
//! The routes are the table in `routes()`; `/openapi.json` documents them (a test keeps the two
//! equal). Every `/v1` route checks the caller's bearer token first (see [`crate::auth`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use meterflow_guard::leases::Grant;
use meterflow_schemas::{Alert, UsageUpdate, topics};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::auth::{Auth, Claims};
use crate::metrics::Metrics;
use crate::store::{CellRef, HOUR_MS, Hourly, LEASE_CELL_MS, Store, is_usage};
use crate::time::{format_rfc3339, month_name, month_start, next_month_start, parse_time};
use meterflow_guard::params::{self, over_ms, parse_duration_ms, time_range};

mod aep43;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub metrics: Metrics,
    /// Clock, so tests can pin "now".
    pub now_ms: fn() -> i64,
    /// How bearer tokens are checked.
    pub auth: Auth,
    /// Request-rate limits per tenant.
    pub limiter: Arc<crate::limits::RateLimiter>,
    /// Series-cardinality limits per tenant: series read per second.
    pub series_limiter: Arc<crate::limits::RateLimiter>,
    /// Bumped after every write to the store: what the feeds wait on.
    pub updates: tokio::sync::watch::Receiver<u64>,
    /// How often an idle feed sends a keep-alive comment.
    pub keep_alive: std::time::Duration,
    /// Cancelled when the sink stops: open feeds end with it.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The provider this sink serves: the `provider` of AEP-43's lease metrics answers.
    pub provider: String,
    /// The most series one answer may hold.
    pub max_series_per_query: usize,
    /// The feeds each caller holds open, and how many it may.
    pub open_feeds: Arc<crate::limits::OpenFeeds>,
    /// The key of feed tickets (a browser's way into a feed).
    pub tickets: crate::tickets::Tickets,
}

/// The answer to a caller who may not have what it asked for.
type Denied = Box<Response>;

/// What a route needs of the caller's token.
enum Need<'a> {
    /// Any valid token.
    Any,
    /// A token that reaches this tenant's data (its own `metrics` token, or an operator's).
    Tenant(&'a str),
    /// The `metrics` scope (AEP-43's lease metrics route), or `operator`; 403 otherwise.
    Metrics,
    /// The `operator` scope.
    Operator,
}

/// The caller's claims when its token is valid and enough for `need`; otherwise the answer:
/// 401 without a valid token, 404 for another tenant's data (whether it exists is not told),
/// 403 for a tenant token on an operator route.
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    route: &str,
    need: Need<'_>,
) -> Result<Claims, Denied> {
    let claims = authenticate(state, headers, None, route)?;
    permit(state, route, claims, need)
}

/// The claims of the caller's bearer token, or of its feed `ticket` where a feed takes one
/// (see [`crate::tickets`]); 401 otherwise.
fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    ticket: Option<&str>,
    route: &str,
) -> Result<Claims, Denied> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let claims = match ticket {
        Some(ticket) => state.tickets.check(ticket),
        None => token.and_then(|t| state.auth.check(t)),
    };
    let Some(claims) = claims else {
        count(state, route, StatusCode::UNAUTHORIZED);
        let message = if ticket.is_some() {
            "the feed ticket is not valid: expired (a ticket opens a feed within a minute), from another sink, or malformed"
        } else if token.is_some() {
            "the bearer token is not valid: expired, not signed with a key this sink trusts, or malformed"
        } else {
            "this route needs a bearer token"
        };
        return Err(Box::new(
            (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({
                "error": message,
                "hint": "send Authorization: Bearer <token>; `meterflow token` mints one from the sink's key; a browser opens a feed with a fresh ticket from /v1/feeds/ticket",
            })),
        )
            .into_response(),
        ));
    };
    Ok(claims)
}

/// `claims` when the caller is within its request rate and the claims are enough for `need`;
/// otherwise the answer (429, 404, 403), as [`authorize`] says.
fn permit(state: &AppState, route: &str, claims: Claims, need: Need<'_>) -> Result<Claims, Denied> {
    if let Err(wait) = state
        .limiter
        .take(&caller(&claims), 1, std::time::Instant::now())
    {
        return Err(Box::new(too_many(
            state,
            route,
            "requests",
            wait,
            "too many requests for this tenant".into(),
            "the sink's --rate-limit sets the rate",
        )));
    }
    match need {
        Need::Any => Ok(claims),
        Need::Tenant(tenant) if claims.reaches(tenant, &state.provider) => Ok(claims),
        Need::Tenant(tenant) => Err(Box::new(error(
            state,
            route,
            StatusCode::NOT_FOUND,
            format!("no tenant {tenant:?} for this token"),
            "a tenant token reaches its own tenant only",
        ))),
        Need::Metrics if claims.reads_metrics(&state.provider) => Ok(claims),
        Need::Metrics => Err(Box::new(error(
            state,
            route,
            StatusCode::FORBIDDEN,
            "this route needs the metrics scope".into(),
            "ask the provider for a token with scope \"metrics\"; a lease owner's token (AEP-64) needs \"metrics\" in its leases claim's scope for this provider",
        ))),
        Need::Operator if claims.has_scope("operator") => Ok(claims),
        Need::Operator => Err(Box::new(error(
            state,
            route,
            StatusCode::FORBIDDEN,
            "this route needs the operator scope".into(),
            "ask the operator for a token with scope \"operator\"",
        ))),
    }
}

/// Whose buckets a request draws from: the tenant's for a tenant token, the subject's for an
/// operator's.
fn caller(claims: &Claims) -> String {
    match claims.own_tenant() {
        "" => format!("sub:{}", claims.sub),
        tenant => format!("tenant:{tenant}"),
    }
}

/// 429 with `Retry-After`, counted by which limit it was.
fn too_many(
    state: &AppState,
    route: &str,
    limit: &str,
    wait: std::time::Duration,
    message: String,
    setting: &str,
) -> Response {
    count(state, route, StatusCode::TOO_MANY_REQUESTS);
    state.metrics.limited.with_label_values(&[limit]).inc();
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, seconds.to_string())],
        Json(json!({
            "error": message,
            "hint": format!("retry after {seconds} s; {setting}"),
        })),
    )
        .into_response()
}

/// Takes an answer's series from the caller's series bucket (SPEC: series-cardinality limits):
/// a caller may read `--series-limit` series per second, `--series-burst` at once, and no
/// answer holds more than `--max-series-per-query` (400).
/// 400 for an answer of `series` (a count, or "at least" one) series, more than one query may
/// hold.
fn over_cap(state: &AppState, route: &str, series: String) -> Denied {
    let max = state.max_series_per_query;
    Box::new(error(
        state,
        route,
        StatusCode::BAD_REQUEST,
        format!("this answer would hold {series} series; one query answers at most {max}"),
        "narrow it: fewer leases, services or metrics, a coarser group_by, or a shorter range",
    ))
}

fn take_series(
    state: &AppState,
    route: &str,
    claims: &Claims,
    series: usize,
) -> Result<(), Denied> {
    if series > state.max_series_per_query {
        return Err(over_cap(state, route, series.to_string()));
    }
    state
        .series_limiter
        .take(&caller(claims), series as u64, std::time::Instant::now())
        .map_err(|wait| {
            Box::new(too_many(
                state,
                route,
                "series",
                wait,
                format!("this answer has {series} series, more than this tenant may read now"),
                "narrow group_by or the range, or raise the sink's --series-limit",
            ))
        })
}

/// Every route and its handler: the router is built from this table, and the OpenAPI
/// document is checked against it.
fn routes() -> Vec<(&'static str, axum::routing::MethodRouter<AppState>)> {
    vec![
        ("/", get(index)),
        ("/v1/tenants/{tenant}/usage", get(tenant_usage)),
        ("/v1/tenants/{tenant}/burn-rate", get(burn_rate)),
        ("/v1/tenants/{tenant}/alerts", get(tenant_alerts)),
        ("/v1/leases/{lease}/metrics", get(lease_metrics)),
        ("/v1/leases/{lease}/live", get(lease_live)),
        (
            "/lease/{dseq}/{gseq}/{oseq}/metrics",
            get(aep43::lease_metrics),
        ),
        ("/v1/fleet/hourly", get(fleet_hourly)),
        ("/v1/fleet/alerts", get(fleet_alerts)),
        ("/v1/fleet/usage", get(fleet_usage)),
        ("/v1/feeds/tenants/{tenant}", get(tenant_feed)),
        ("/v1/feeds/leases/{lease}", get(lease_feed)),
        ("/v1/feeds/ticket", get(feed_ticket)),
        ("/v1/status", get(status)),
        ("/metrics", get(metrics)),
        ("/healthz", get(|| async { "ok\n" })),
        ("/readyz", get(readyz)),
        ("/openapi.json", get(openapi)),
    ]
}

/// The paths the router serves.
pub fn paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _)| path).collect()
}

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The router with every route, each answer timed by route.
pub fn router(state: AppState) -> Router {
    for path in paths() {
        state.metrics.request_seconds.with_label_values(&[path]);
    }
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router.route(path, handler)
        })
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), timed))
        .with_state(state)
}

/// Observes how long a route took to answer (for a feed: until its headers were sent).
async fn timed(
    State(state): State<AppState>,
    route: Option<MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    state
        .metrics
        .request_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A handler's query parameters; a query string that does not fit them (a parameter twice,
/// a value of the wrong kind) is a 400 in the API's JSON error shape, counted by route, not
/// axum's plain-text rejection.
struct Params<T>(T);

impl<T: serde::de::DeserializeOwned> FromRequestParts<AppState> for Params<T> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(params)) => Ok(Params(params)),
            Err(rejection) => {
                let route = parts
                    .extensions
                    .get::<MatchedPath>()
                    .map_or("unmatched", MatchedPath::as_str)
                    .to_string();
                Err(error(
                    state,
                    &route,
                    StatusCode::BAD_REQUEST,
                    rejection.body_text(),
                    "give each query parameter once, as the API reference describes it",
                ))
            }
        }
    }
}

/// A JSON error: what was wrong and what to do.
fn error(
    state: &AppState,
    route: &str,
    status: StatusCode,
    message: String,
    hint: &str,
) -> Response {
    count(state, route, status);
    (status, Json(json!({ "error": message, "hint": hint }))).into_response()
}

fn count(state: &AppState, route: &str, status: StatusCode) {
    state
        .metrics
        .requests
        .with_label_values(&[route, status.as_str()])
        .inc();
}

/// A store failure: 500, and where to look.
fn internal(state: &AppState, route: &str, e: crate::store::StoreError) -> Response {
    error(
        state,
        route,
        StatusCode::INTERNAL_SERVER_ERROR,
        e.to_string(),
        "see the sink's log",
    )
}

/// A tenant or lease name from a path, checked by [`params::identifier`]; 400 otherwise.
fn check_name(state: &AppState, route: &str, what: &str, value: &str) -> Result<(), Denied> {
    params::identifier(what, value).map_err(|message| {
        Box::new(error(
            state,
            route,
            StatusCode::BAD_REQUEST,
            message,
            "use it exactly as the agent reports it",
        ))
    })
}

/// Query of `GET /v1/tenants/{tenant}/usage`.
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    /// Start (inclusive): RFC 3339 or milliseconds since the epoch. Default: start of this month.
    pub from: Option<String>,
    /// End (exclusive). Default: now.
    pub to: Option<String>,
    /// Bucket: minute, hour, day, month or total. Default: hour.
    pub window: Option<String>,
    /// Comma-separated: lease, service, gpu_class, mig_profile; `none` for one row per bucket.
    /// Default: lease.
    pub group_by: Option<String>,
    /// `rows` (a row per bucket and group) or `series` (per group, an array of each metric's
    /// values over the buckets: a tenth of the bytes for a month of hours per lease).
    /// Default: rows.
    pub format: Option<String>,
}

const GROUPS: [&str; 4] = ["lease", "service", "gpu_class", "mig_profile"];

/// The names of one answer, each allocated once however many cells repeat it.
#[derive(Default)]
struct Names(std::collections::HashSet<Arc<str>>);

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return known.clone();
        }
        let new: Arc<str> = name.into();
        self.0.insert(new.clone());
        new
    }
}

/// What one metric added up to.
struct Sum {
    metric: Arc<str>,
    amount: i128,
    scale: i32,
    /// Milliseconds observed and present, summed over windows and series.
    observed_ms: i128,
    present_ms: i128,
}

/// The sums of one row of an answer. Few metrics and GPU classes per row: vectors searched
/// by name, so adding a record allocates only the first time a name is seen.
#[derive(Default)]
struct Sums {
    metrics: Vec<Sum>,
    /// (gpu_class, mig_profile, GPU milliseconds)
    gpu_ms: Vec<(Arc<str>, Arc<str>, i128)>,
}

impl Sums {
    fn add(&mut self, names: &mut Names, u: &UsageUpdate) {
        self.add_parts(
            names,
            (&u.metric, &u.gpu_class, &u.mig_profile),
            u.amount,
            u.scale,
            (u.coverage_ms, u.present_ms),
        );
    }

    fn add_cell(&mut self, names: &mut Names, c: &CellRef<'_>) {
        self.add_parts(
            names,
            (c.metric, c.gpu_class, c.mig_profile),
            c.amount,
            c.scale,
            (c.coverage_ms, c.present_ms),
        );
    }

    fn add_parts(
        &mut self,
        names: &mut Names,
        (metric, gpu_class, mig_profile): (&str, &str, &str),
        amount: i64,
        scale: i32,
        (observed_ms, present_ms): (i64, i64),
    ) {
        let at = match self.metrics.iter().position(|s| &*s.metric == metric) {
            Some(at) => at,
            None => {
                self.metrics.push(Sum {
                    metric: names.get(metric),
                    amount: 0,
                    scale,
                    observed_ms: 0,
                    present_ms: 0,
                });
                self.metrics.len() - 1
            }
        };
        let sum = &mut self.metrics[at];
        sum.amount += i128::from(amount);
        sum.observed_ms += i128::from(observed_ms);
        sum.present_ms += i128::from(present_ms);
        if metric == "gpu_seconds" {
            match self
                .gpu_ms
                .iter_mut()
                .find(|(c, m, _)| &**c == gpu_class && &**m == mig_profile)
            {
                Some((_, _, ms)) => *ms += i128::from(amount),
                None => self.gpu_ms.push((
                    names.get(gpu_class),
                    names.get(mig_profile),
                    i128::from(amount),
                )),
            }
        }
    }

    /// A metric's amount in its unit (0 when absent).
    fn value(&self, metric: &str) -> f64 {
        self.metrics
            .iter()
            .find(|s| &*s.metric == metric)
            .map_or(0.0, |s| s.amount as f64 / 10f64.powi(s.scale))
    }

    /// Observed over present time: 1 for exact aggregates, below 1 where a gauge had gaps;
    /// `None` when the metric was never present.
    fn coverage(&self, metric: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|s| &*s.metric == metric && s.present_ms > 0)
            .map(|s| s.observed_ms as f64 / s.present_ms as f64)
    }

    /// Writes the row's fields: every metric (`gpu_seconds` and `cpu_core_seconds` always),
    /// `gpu` (GPU-seconds per class and MIG profile) and `coverage` per metric.
    fn serialize_fields<M: serde::ser::SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        for metric in ["gpu_seconds", "cpu_core_seconds"] {
            if !self.metrics.iter().any(|s| &*s.metric == metric) {
                map.serialize_entry(metric, &0.0)?;
            }
        }
        for s in &self.metrics {
            map.serialize_entry(&*s.metric, &(s.amount as f64 / 10f64.powi(s.scale)))?;
        }
        let mut gpu: Vec<&(Arc<str>, Arc<str>, i128)> = self.gpu_ms.iter().collect();
        gpu.sort();
        let gpu: Vec<Value> = gpu
            .into_iter()
            .map(|(class, mig, ms)| json!({"gpu_class": &**class, "mig_profile": &**mig, "gpu_seconds": *ms as f64 / 1000.0}))
            .collect();
        map.serialize_entry("gpu", &gpu)?;
        let coverage: BTreeMap<&str, f64> = self
            .metrics
            .iter()
            .filter_map(|s| Some((&*s.metric, self.coverage(&s.metric)?)))
            .collect();
        map.serialize_entry("coverage", &coverage)
    }
}

/// The fields of [`Sums`] as a JSON object.
struct Fields<'a>(&'a Sums);

impl serde::Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        self.0.serialize_fields(&mut map)?;
        map.end()
    }
}

/// One row of a usage answer: its bucket, its group, its sums; serialized straight to the
/// answer's bytes (a month of hours per lease is tens of thousands of rows).
struct Row<'a> {
    start: i64,
    end: i64,
    group_by: &'a [&'a str],
    key: &'a [String],
    sums: &'a Sums,
}

impl serde::Serialize for Row<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("window_start", &format_rfc3339(self.start))?;
        map.serialize_entry("window_end", &format_rfc3339(self.end))?;
        for (g, v) in self.group_by.iter().zip(self.key) {
            map.serialize_entry(g, v)?;
        }
        self.sums.serialize_fields(&mut map)?;
        map.end()
    }
}

/// The answer of `GET /v1/tenants/{tenant}/usage`.
#[derive(serde::Serialize)]
struct UsageAnswer<'a> {
    /// Empty (and left out) in the fleet's answer.
    #[serde(skip_serializing_if = "str::is_empty")]
    tenant: &'a str,
    from: String,
    to: String,
    window: &'a str,
    group_by: &'a [&'a str],
    rows: Vec<Row<'a>>,
    totals: Fields<'a>,
}

/// A tenant's usage over `[from, to)`: the whole hours as its hour cells of `view` (when
/// `by_cells`), each passed to `cell` until it says to stop, and the partial hours at either
/// end (or all of it) as base windows ([`is_usage`] records), returned. Summed, the two are
/// what the records alone sum to, to the millisecond.
fn usage_parts(
    store: &Store,
    tenant: &str,
    (view, by_cells): (Hourly, bool),
    (from, to): (i64, i64),
    cell: impl FnMut(&CellRef<'_>) -> ControlFlow<()>,
) -> Result<Vec<UsageUpdate>, crate::store::StoreError> {
    let (first_hour, last_hour) = (
        (from + HOUR_MS - 1).div_euclid(HOUR_MS) * HOUR_MS,
        to.div_euclid(HOUR_MS) * HOUR_MS,
    );
    let base_ranges = if by_cells && first_hour < last_hour {
        store.each_hourly(view, tenant, first_hour, last_hour, cell)?;
        vec![(from, first_hour), (last_hour, to)]
    } else {
        vec![(from, to)]
    };
    let mut updates = Vec::new();
    for (start, end) in base_ranges.into_iter().filter(|(s, e)| s < e) {
        updates.extend(
            store
                .usage(tenant, start, end)?
                .into_iter()
                .filter(is_usage),
        );
    }
    Ok(updates)
}

/// The rows of a usage answer while they are summed: one per bucket and group. Cells come in
/// key order, so most share the previous one's group and bucket: those are found without
/// hashing, and none allocates once its group, bucket and names were seen.
struct Tally<'q> {
    group_by: &'q [&'q str],
    /// The most groups an answer may hold: summing stops at the first one past it.
    max_groups: usize,
    names: Names,
    /// A group's values joined by NUL → its id; id → its values.
    ids: HashMap<String, u32>,
    groups: Vec<Vec<String>>,
    /// The group of the latest cell: its joined values and id.
    scratch: String,
    last_group: Option<(String, u32)>,
    /// (bucket start, bucket end, group id, sums), and (bucket start, group id) → its row.
    rows: Vec<(i64, i64, u32, Sums)>,
    at: HashMap<(i64, u32), usize>,
    last_row: Option<(i64, u32, usize)>,
    totals: Sums,
}

impl<'q> Tally<'q> {
    fn new(group_by: &'q [&'q str], max_groups: usize) -> Self {
        Self {
            group_by,
            max_groups,
            names: Names::default(),
            ids: HashMap::new(),
            groups: Vec::new(),
            scratch: String::new(),
            last_group: None,
            rows: Vec::new(),
            at: HashMap::new(),
            last_row: None,
            totals: Sums::default(),
        }
    }

    /// The id of the group of `values` (lease, service, gpu_class, mig_profile).
    fn group(&mut self, values: [&str; 4]) -> u32 {
        self.scratch.clear();
        for g in self.group_by {
            let at = GROUPS.iter().position(|known| known == g).unwrap_or(3);
            self.scratch.push_str(values[at]);
            self.scratch.push('\0');
        }
        if let Some((joined, id)) = &self.last_group
            && *joined == self.scratch
        {
            return *id;
        }
        let id = match self.ids.get(self.scratch.as_str()) {
            Some(id) => *id,
            None => {
                let id = self.groups.len() as u32;
                self.groups.push(
                    self.group_by
                        .iter()
                        .map(|g| {
                            let at = GROUPS.iter().position(|known| known == g).unwrap_or(3);
                            values[at].to_string()
                        })
                        .collect(),
                );
                self.ids.insert(self.scratch.clone(), id);
                id
            }
        };
        match &mut self.last_group {
            Some((joined, last)) => {
                joined.clone_from(&self.scratch);
                *last = id;
            }
            None => self.last_group = Some((self.scratch.clone(), id)),
        }
        id
    }

    /// The index of the row of `bucket` and `group`, added when new.
    fn row(&mut self, (start, end): (i64, i64), group: u32) -> usize {
        if let Some((s, g, at)) = self.last_row
            && s == start
            && g == group
        {
            return at;
        }
        let rows = &mut self.rows;
        let at = *self.at.entry((start, group)).or_insert_with(|| {
            rows.push((start, end, group, Sums::default()));
            rows.len() - 1
        });
        self.last_row = Some((start, group, at));
        at
    }

    fn add(&mut self, bucket: (i64, i64), u: &UsageUpdate) {
        let group = self.group([&u.lease, &u.service, &u.gpu_class, &u.mig_profile]);
        let at = self.row(bucket, group);
        self.rows[at].3.add(&mut self.names, u);
        self.totals.add(&mut self.names, u);
    }

    /// Adds a cell; says to stop once the answer has more groups than it may hold (it will be
    /// refused: reading the rest would be work for nothing).
    fn add_cell(&mut self, bucket: (i64, i64), c: &CellRef<'_>) -> ControlFlow<()> {
        let group = self.group([c.lease, c.service, c.gpu_class, c.mig_profile]);
        if self.over() {
            return ControlFlow::Break(());
        }
        let at = self.row(bucket, group);
        self.rows[at].3.add_cell(&mut self.names, c);
        self.totals.add_cell(&mut self.names, c);
        ControlFlow::Continue(())
    }

    /// Whether summing stopped at a group past the most an answer may hold.
    fn over(&self) -> bool {
        self.groups.len() > self.max_groups
    }

    /// The rows in answer order (bucket start and end, then group values).
    fn finish(self) -> Summed {
        let mut order: Vec<usize> = (0..self.groups.len()).collect();
        order.sort_by(|a, b| self.groups[*a].cmp(&self.groups[*b]));
        let mut rank = vec![0; order.len()];
        for (r, id) in order.iter().enumerate() {
            rank[*id] = r;
        }
        let mut groups: Vec<Option<Vec<String>>> = self.groups.into_iter().map(Some).collect();
        let groups: Vec<Vec<String>> = order
            .iter()
            .map(|id| groups[*id].take().unwrap_or_default())
            .collect();
        let mut rows: Vec<SummedRow> = self
            .rows
            .into_iter()
            .map(|(start, end, id, sums)| SummedRow {
                start,
                end,
                group: rank[id as usize],
                sums,
            })
            .collect();
        rows.sort_unstable_by_key(|r| (r.start, r.end, r.group));
        Summed {
            groups,
            rows,
            totals: self.totals,
        }
    }
}

/// A usage answer's sums: the groups' values in order, the rows in order, the totals.
struct Summed {
    groups: Vec<Vec<String>>,
    rows: Vec<SummedRow>,
    totals: Sums,
}

/// One bucket of one group (an index into [`Summed::groups`]).
struct SummedRow {
    start: i64,
    end: i64,
    group: usize,
    sums: Sums,
}

async fn tenant_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Params(q): Params<UsageQuery>,
) -> Response {
    const ROUTE: &str = "/v1/tenants/{tenant}/usage";
    let claims = match authorize(&state, &headers, ROUTE, Need::Tenant(&tenant)) {
        Ok(claims) => claims,
        Err(denied) => return *denied,
    };
    let bad = |msg: String, hint: &str| error(&state, ROUTE, StatusCode::BAD_REQUEST, msg, hint);
    if let Err(denied) = check_name(&state, ROUTE, "tenant", &tenant) {
        return *denied;
    }
    let now = (state.now_ms)();
    let (from, to) = match time_range(&q.from, &q.to, month_start(now), now) {
        Ok(range) => range,
        Err((message, hint)) => return bad(message, hint),
    };
    let window = q.window.as_deref().unwrap_or("hour");
    let bucket: Box<dyn Fn(i64) -> (i64, i64)> = match window {
        "minute" => Box::new(|t| fixed(t, 60_000)),
        "hour" => Box::new(|t| fixed(t, 3_600_000)),
        "day" => Box::new(|t| fixed(t, 86_400_000)),
        "month" => Box::new(|t| (month_start(t), next_month_start(t))),
        "total" => Box::new(move |_| (from, to)),
        other => {
            return bad(
                format!("window={other:?} is not one of minute, hour, day, month, total"),
                "pick one of those",
            );
        }
    };
    let group_by: Vec<&str> = match q.group_by.as_deref().unwrap_or("lease") {
        "" | "none" => Vec::new(),
        list => list.split(',').map(str::trim).collect(),
    };
    if let Some(g) = group_by.iter().find(|g| !GROUPS.contains(g)) {
        return bad(
            format!("group_by={g:?} is not one of {}", GROUPS.join(", ")),
            "or use group_by=none",
        );
    }
    let as_series = match q.format.as_deref().unwrap_or("rows") {
        "rows" => false,
        "series" => true,
        other => {
            return bad(
                format!("format={other:?} is not rows or series"),
                "use format=rows (a row per bucket and group) or format=series (arrays per group)",
            );
        }
    };

    // Whole hours come from the tenant's hour cells when the buckets are hours or longer (per
    // lease and service when the grouping needs them); the partial hours at either end, and
    // minutes, from the base windows.
    let by_cells = window != "minute";
    let view = if group_by.iter().any(|g| matches!(*g, "lease" | "service")) {
        Hourly::Lease
    } else {
        Hourly::Tenant
    };
    let mut tally = Tally::new(&group_by, state.max_series_per_query);
    let updates = match usage_parts(&state.store, &tenant, (view, by_cells), (from, to), |c| {
        tally.add_cell(bucket(c.start_ms), c)
    }) {
        Ok(updates) => updates,
        Err(e) => return internal(&state, ROUTE, e),
    };
    if tally.over() {
        return *over_cap(&state, ROUTE, format!("at least {}", tally.groups.len()));
    }
    for u in &updates {
        tally.add(bucket(u.window_start_ms), u);
    }
    let summed = tally.finish();
    if let Err(denied) = take_series(&state, ROUTE, &claims, summed.groups.len()) {
        return *denied;
    }
    if as_series {
        count(&state, ROUTE, StatusCode::OK);
        return Json(series_answer(
            (&tenant, from, to, window, &group_by),
            &summed,
        ))
        .into_response();
    }
    let answer = UsageAnswer {
        tenant: &tenant,
        from: format_rfc3339(from),
        to: format_rfc3339(to),
        window,
        group_by: &group_by,
        rows: summed
            .rows
            .iter()
            .map(|r| Row {
                start: r.start,
                end: r.end,
                group_by: &group_by,
                key: &summed.groups[r.group],
                sums: &r.sums,
            })
            .collect(),
        totals: Fields(&summed.totals),
    };
    count(&state, ROUTE, StatusCode::OK);
    Json(answer).into_response()
}

/// One group's series in a `format=series` usage answer: its group's values, and per metric
/// its amount in each bucket (`null` where the group had no record of it there).
#[derive(serde::Serialize)]
struct GroupSeries<'a> {
    group: BTreeMap<&'a str, &'a str>,
    values: BTreeMap<&'a str, Vec<Option<f64>>>,
}

/// The usage answer with `format=series`: the buckets' starts once, then per group an array of
/// each metric's values over them; `totals` as in the rows answer (with coverage).
#[derive(serde::Serialize)]
struct SeriesAnswer<'a> {
    tenant: &'a str,
    from: String,
    to: String,
    window: &'a str,
    group_by: &'a [&'a str],
    buckets: Vec<String>,
    series: Vec<GroupSeries<'a>>,
    totals: Fields<'a>,
}

/// `summed` as a [`SeriesAnswer`].
fn series_answer<'a>(
    (tenant, from, to, window, group_by): (&'a str, i64, i64, &'a str, &'a [&'a str]),
    summed: &'a Summed,
) -> SeriesAnswer<'a> {
    let Summed {
        groups,
        rows,
        totals,
    } = summed;
    let mut starts: Vec<i64> = rows.iter().map(|r| r.start).collect();
    starts.dedup();
    let mut values: Vec<BTreeMap<&str, Vec<Option<f64>>>> = vec![BTreeMap::new(); groups.len()];
    let mut at = 0;
    for r in rows {
        // Rows are in bucket order: a row's bucket is the current one or a later one.
        while starts[at] != r.start {
            at += 1;
        }
        for sum in &r.sums.metrics {
            values[r.group]
                .entry(&*sum.metric)
                .or_insert_with(|| vec![None; starts.len()])[at] =
                Some(sum.amount as f64 / 10f64.powi(sum.scale));
        }
    }
    SeriesAnswer {
        tenant,
        from: format_rfc3339(from),
        to: format_rfc3339(to),
        window,
        group_by,
        buckets: starts.iter().map(|s| format_rfc3339(*s)).collect(),
        series: groups
            .iter()
            .zip(values)
            .map(|(key, values)| GroupSeries {
                group: group_by
                    .iter()
                    .copied()
                    .zip(key.iter().map(String::as_str))
                    .collect(),
                values,
            })
            .collect(),
        totals: Fields(totals),
    }
}

/// The items of a comma-separated query value, trimmed, empty ones left out.
fn comma_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .collect()
}

/// Query of `GET /v1/tenants/{tenant}/burn-rate`.
#[derive(Debug, Deserialize)]
pub struct BurnRateQuery {
    /// How far back the rate looks from the watermark: `90s`, `5m`, `1h`, or milliseconds.
    /// Default 5m; from 1 minute to 24 hours.
    pub over: Option<String>,
}

fn money(micros: i128) -> f64 {
    micros as f64 / 1e6
}

/// Cost per hour now (over the last `over` of complete base windows before the watermark), per
/// lease and service and in total; the month's cost to date, what is billed of it and what is pending, its projection to the month's end at
/// the current rate, and the budget used.
async fn burn_rate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Params(q): Params<BurnRateQuery>,
) -> Response {
    const ROUTE: &str = "/v1/tenants/{tenant}/burn-rate";
    if let Err(denied) = authorize(&state, &headers, ROUTE, Need::Tenant(&tenant)) {
        return *denied;
    }
    let bad = |msg: String, hint: &str| error(&state, ROUTE, StatusCode::BAD_REQUEST, msg, hint);
    if let Err(denied) = check_name(&state, ROUTE, "tenant", &tenant) {
        return *denied;
    }
    let over_ms = match over_ms(q.over.as_deref()) {
        Ok(ms) => ms,
        Err(message) => return bad(message, "write it as 90s, 5m, 1h or milliseconds"),
    };
    match burn_rate_json(&state, &tenant, over_ms) {
        Ok((answer, _)) => {
            count(&state, ROUTE, StatusCode::OK);
            Json(answer).into_response()
        }
        Err(e) => internal(&state, ROUTE, e),
    }
}

/// The burn-rate answer of `tenant` over the last `over_ms` before the watermark.
fn burn_rate_json(
    state: &AppState,
    tenant: &str,
    over_ms: i64,
) -> Result<(Value, i64), crate::store::StoreError> {
    const HOUR: f64 = 3_600_000.0;
    // "Now" is as far as the data has come, not the wall clock: a stalled pipeline shows an
    // old `as_of`, never a rate of zero.
    let as_of = state
        .store
        .watermark_ms()?
        .unwrap_or_else(|| (state.now_ms)());
    let (month, month_end) = (month_start(as_of - 1), next_month_start(as_of - 1));
    // The rate is taken over complete base windows: the one ending at the watermark is still
    // filling (the processor writes a window as its data comes), and a rate that counted it
    // would climb through each window and drop at its end.
    let mut recent = state.store.usage(tenant, as_of - over_ms, as_of)?;
    let base = recent
        .iter()
        .filter(|u| crate::store::is_window_cost(u))
        .map(|u| u.window_end_ms - u.window_start_ms)
        .max()
        .unwrap_or(60_000)
        .max(1);
    let rate_end = (as_of - 1).div_euclid(base) * base;
    // At least one whole window, or a rate over windows longer than `over` would find none.
    let rate_start = rate_end - over_ms.max(base);
    recent.extend(state.store.usage(tenant, rate_start, as_of - over_ms)?);
    let mut by_lease: BTreeMap<(String, String), i128> = BTreeMap::new();
    for u in recent.iter().filter(|u| {
        crate::store::is_window_cost(u) && (rate_start..rate_end).contains(&u.window_start_ms)
    }) {
        *by_lease
            .entry((u.lease.clone(), u.service.clone()))
            .or_default() += i128::from(u.amount);
    }
    let per_hour = |micros: i128| money(micros) * HOUR / (rate_end - rate_start) as f64;
    let total_recent: i128 = by_lease.values().sum();
    let to_date = i128::from(state.store.month_cost(tenant, month)?);
    let period = state.store.usage(tenant, month, month + 1)?;
    let of_period = |metric: &str| {
        period
            .iter()
            .find(|u| u.metric == metric && u.lease.is_empty())
            .map(|u| i128::from(u.amount))
    };
    // Billed: what `meterflow.billing` carries for the month's windows. Pending: the rest of
    // the month priced per billing window, windows not closed yet (and changes to closed ones
    // not yet billed as adjustments).
    let billed = i128::from(state.store.billed(tenant, month)?);
    let priced = of_period("period_cost").unwrap_or(0);
    let rate = per_hour(total_recent);
    let projection = money(to_date) + rate * (month_end - as_of) as f64 / HOUR;
    let budget = of_period("budget").map(|b| {
        json!({
            "monthly": money(b),
            "used": if b > 0 { money(to_date) / money(b) } else { 0.0 },
            "projected_used": if b > 0 { projection / money(b) } else { 0.0 },
        })
    });
    let leases: Vec<Value> = by_lease
        .iter()
        .map(|((lease, service), micros)| {
            json!({"lease": lease, "service": service, "burn_rate": per_hour(*micros)})
        })
        .collect();
    // The month's budget alerts, as the processor raised them: what the feed pushes and the
    // dashboard shows.
    let alerts = alerts_in(&state.store.alerts(tenant)?, Some(&month_name(month)));
    let answer = json!({
        "tenant": tenant,
        "as_of": format_rfc3339(as_of),
        "over_seconds": over_ms / 1000,
        "burn_rate": rate,
        "rate_window": {"start": format_rfc3339(rate_start), "end": format_rfc3339(rate_end)},
        "leases": leases,
        "period": {
            "start": format_rfc3339(month),
            "end": format_rfc3339(month_end),
            "to_date": money(to_date),
            "billed": money(billed),
            "pending": money(priced - billed),
            "projection": projection,
        },
        "budget": budget,
        "alerts": alerts,
        // The price book's, from the billing stream (null until a window is billed).
        "currency": state.store.currency()?,
    });
    Ok((answer, as_of))
}

/// Query of `GET /v1/tenants/{tenant}/alerts` and `GET /v1/fleet/alerts`.
#[derive(Debug, Deserialize)]
pub struct AlertsQuery {
    /// `YYYY-MM`: that calendar month's alerts only. Default: every one.
    pub period: Option<String>,
}

/// An alert as the API answers it.
fn alert_json(a: &Alert) -> Value {
    json!({
        "id": a.id,
        "tenant": a.tenant,
        "kind": a.kind,
        "period": a.period,
        "threshold_percent": a.threshold_percent,
        "budget": money(i128::from(a.budget_micros)),
        "spent": money(i128::from(a.spent_micros)),
        "raised_at": format_rfc3339(a.raised_at_ms),
        "message": a.message,
    })
}

/// The alerts of calendar month `period` (`YYYY-MM`; every one when `None`), as the API answers
/// them.
fn alerts_in(alerts: &[Alert], period: Option<&str>) -> Vec<Value> {
    alerts
        .iter()
        .filter(|a| period.is_none_or(|p| a.period == p))
        .map(alert_json)
        .collect()
}

/// `period` checked (`YYYY-MM`), or the 400 that says how to write it.
fn alert_period<'a>(
    state: &AppState,
    route: &str,
    q: &'a AlertsQuery,
) -> Result<Option<&'a str>, Denied> {
    match q.period.as_deref() {
        None => Ok(None),
        Some(p)
            if p.len() == 7
                && p.as_bytes()[4] == b'-'
                && p.bytes()
                    .enumerate()
                    .all(|(i, b)| i == 4 || b.is_ascii_digit())
                && matches!(
                    &p[5..],
                    "01" | "02"
                        | "03"
                        | "04"
                        | "05"
                        | "06"
                        | "07"
                        | "08"
                        | "09"
                        | "10"
                        | "11"
                        | "12"
                ) =>
        {
            Ok(Some(p))
        }
        Some(p) => Err(Box::new(error(
            state,
            route,
            StatusCode::BAD_REQUEST,
            format!("period={p:?} is not a calendar month"),
            "write it as YYYY-MM (2026-11)",
        ))),
    }
}

/// A tenant's budget alerts (each threshold once per month, as the processor raised it),
/// oldest first.
async fn tenant_alerts(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Params(q): Params<AlertsQuery>,
) -> Response {
    const ROUTE: &str = "/v1/tenants/{tenant}/alerts";
    if let Err(denied) = authorize(&state, &headers, ROUTE, Need::Tenant(&tenant)) {
        return *denied;
    }
    if let Err(denied) = check_name(&state, ROUTE, "tenant", &tenant) {
        return *denied;
    }
    let period = match alert_period(&state, ROUTE, &q) {
        Ok(period) => period,
        Err(denied) => return *denied,
    };
    match state.store.alerts(&tenant) {
        Ok(alerts) => {
            count(&state, ROUTE, StatusCode::OK);
            Json(json!({"tenant": tenant, "alerts": alerts_in(&alerts, period)})).into_response()
        }
        Err(e) => internal(&state, ROUTE, e),
    }
}

/// Query of `GET /v1/fleet/usage`.
#[derive(Debug, Deserialize)]
pub struct FleetUsageQuery {
    /// Start (inclusive): RFC 3339 or milliseconds since the epoch. Default: start of this month.
    pub from: Option<String>,
    /// End (exclusive). Default: now.
    pub to: Option<String>,
    /// Comma-separated: tenant, gpu_class, mig_profile; `none` for one row. Default: tenant.
    pub group_by: Option<String>,
}

const FLEET_GROUPS: [&str; 3] = ["tenant", "gpu_class", "mig_profile"];

/// Every tenant's usage and cost over a range, summed per tenant, GPU class or MIG profile:
/// what the fleet was used for, and by whom (operator). Whole hours come from each tenant's
/// hour cells, the partial hours at either end from its base windows, as for a tenant's usage.
async fn fleet_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Params(q): Params<FleetUsageQuery>,
) -> Response {
    const ROUTE: &str = "/v1/fleet/usage";
    let claims = match authorize(&state, &headers, ROUTE, Need::Operator) {
        Ok(claims) => claims,
        Err(denied) => return *denied,
    };
    let bad = |msg: String, hint: &str| error(&state, ROUTE, StatusCode::BAD_REQUEST, msg, hint);
    let now = (state.now_ms)();
    let (from, to) = match time_range(&q.from, &q.to, month_start(now), now) {
        Ok(range) => range,
        Err((message, hint)) => return bad(message, hint),
    };
    let group_by: Vec<&str> = match q.group_by.as_deref().unwrap_or("tenant") {
        "" | "none" => Vec::new(),
        list => list.split(',').map(str::trim).collect(),
    };
    if let Some(g) = group_by.iter().find(|g| !FLEET_GROUPS.contains(g)) {
        return bad(
            format!("group_by={g:?} is not one of {}", FLEET_GROUPS.join(", ")),
            "or use group_by=none",
        );
    }
    let tenants = match state.store.tenants() {
        Ok(t) => t,
        Err(e) => return internal(&state, ROUTE, e),
    };
    let key = |tenant: &str, class: &str, mig: &str| -> Vec<String> {
        group_by
            .iter()
            .map(|g| match *g {
                "tenant" => tenant,
                "gpu_class" => class,
                _ => mig,
            })
            .map(str::to_string)
            .collect()
    };
    let mut rows: BTreeMap<Vec<String>, Sums> = BTreeMap::new();
    let mut totals = Sums::default();
    let mut names = Names::default();
    for tenant in &tenants {
        let updates = match usage_parts(
            &state.store,
            tenant,
            (Hourly::Tenant, true),
            (from, to),
            |c| {
                rows.entry(key(tenant, c.gpu_class, c.mig_profile))
                    .or_default()
                    .add_cell(&mut names, c);
                totals.add_cell(&mut names, c);
                ControlFlow::Continue(())
            },
        ) {
            Ok(updates) => updates,
            Err(e) => return internal(&state, ROUTE, e),
        };
        for u in &updates {
            rows.entry(key(tenant, &u.gpu_class, &u.mig_profile))
                .or_default()
                .add(&mut names, u);
            totals.add(&mut names, u);
        }
    }
    if let Err(denied) = take_series(&state, ROUTE, &claims, rows.len()) {
        return *denied;
    }
    let answer = UsageAnswer {
        tenant: "",
        from: format_rfc3339(from),
        to: format_rfc3339(to),
        window: "total",
        group_by: &group_by,
        rows: rows
            .iter()
            .map(|(key, sums)| Row {
                start: from,
                end: to,
                group_by: &group_by,
                key,
                sums,
            })
            .collect(),
        totals: Fields(&totals),
    };
    count(&state, ROUTE, StatusCode::OK);
    Json(answer).into_response()
}

/// Every tenant's budget alerts, oldest first: the operator's view.
async fn fleet_alerts(
    State(state): State<AppState>,
    headers: HeaderMap,
    Params(q): Params<AlertsQuery>,
) -> Response {
    const ROUTE: &str = "/v1/fleet/alerts";
    if let Err(denied) = authorize(&state, &headers, ROUTE, Need::Operator) {
        return *denied;
    }
    let period = match alert_period(&state, ROUTE, &q) {
        Ok(period) => period,
        Err(denied) => return *denied,
    };
    match state.store.all_alerts() {
        Ok(alerts) => {
            count(&state, ROUTE, StatusCode::OK);
            Json(json!({"alerts": alerts_in(&alerts, period)})).into_response()
        }
        Err(e) => internal(&state, ROUTE, e),
    }
}

/// Query of `GET /v1/feeds/leases/{lease}`: [`LeaseQuery`]'s, and a feed ticket.
#[derive(Debug, Deserialize)]
pub struct LeaseFeedQuery {
    pub tenant: Option<String>,
    /// A ticket from `/v1/feeds/ticket`, for a browser's `EventSource` (no header).
    pub ticket: Option<String>,
}

/// A feed ticket: what a browser opens a feed with, since `EventSource` sends no
/// `Authorization` header (see [`crate::tickets`]).
async fn feed_ticket(State(state): State<AppState>, headers: HeaderMap) -> Response {
    const ROUTE: &str = "/v1/feeds/ticket";
    let claims = match authorize(&state, &headers, ROUTE, Need::Any) {
        Ok(claims) => claims,
        Err(denied) => return *denied,
    };
    let now_s = ((state.now_ms)() / 1_000).max(0) as u64;
    let Some(ticket) = state.tickets.mint(&claims, now_s) else {
        return error(
            &state,
            ROUTE,
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot sign a ticket".into(),
            "see the sink's log",
        );
    };
    count(&state, ROUTE, StatusCode::OK);
    Json(json!({
        "ticket": ticket,
        "expires_in": crate::tickets::TICKET_TTL_S,
        "hint": "open /v1/feeds/tenants/{tenant} or /v1/feeds/leases/{lease} with ?ticket=<ticket> within a minute; the feed then stays open",
    }))
    .into_response()
}

/// Query of the lease routes: the tenant, for an operator when a lease id is used by several.
#[derive(Debug, Deserialize)]
pub struct LeaseQuery {
    pub tenant: Option<String>,
}

/// Query of `GET /v1/leases/{lease}/metrics`.
#[derive(Debug, Deserialize)]
pub struct LeaseMetricsQuery {
    /// Start (inclusive): RFC 3339 or epoch ms. Default: one hour before `end`.
    pub start: Option<String>,
    /// End (exclusive). Default: now.
    pub end: Option<String>,
    /// Step: `15s`, `1m`, `15m`, … or ms. Default: the finest the resolution table allows.
    pub step: Option<String>,
    /// Comma-separated aggregates (`gpu_seconds`, `cpu_core_seconds`, …). Default: all.
    pub metric: Option<String>,
    pub tenant: Option<String>,
}

/// The finest step for a range (SPEC: 15 s for ranges up to an hour … 15 m up to 30 days);
/// `None` past 30 days.
pub fn finest_step_ms(range_ms: i64) -> Option<i64> {
    const S: i64 = 1_000;
    const H: i64 = 3_600 * S;
    [
        (H, 15 * S),
        (6 * H, 60 * S),
        (24 * H, 5 * 60 * S),
        (7 * 24 * H, 10 * 60 * S),
        (30 * 24 * H, 15 * 60 * S),
    ]
    .into_iter()
    .find(|(range, _)| range_ms <= *range)
    .map(|(_, step)| step)
}

/// The tenant whose lease `lease` the caller asks for, or the answer: what [`authorize`] says
/// of the token for `need`, 404 when the caller reaches no tenant with that lease (the same
/// answer whether it exists or not), 400 when an operator must say which of several tenants
/// (with the query parameter `param`), 403 when the token reaches only some of the lease's
/// services (a lease owner's, AEP-64: only the lease metrics route filters by service).
fn lease_owner(
    state: &AppState,
    headers: &HeaderMap,
    route: &str,
    need: Need<'_>,
    which: (&str, Option<&str>, &str),
) -> Result<(String, Claims), Denied> {
    let claims = authorize(state, headers, route, need)?;
    owner_of(state, route, claims, which)
}

/// [`lease_owner`] for a caller whose claims are known.
fn owner_of(
    state: &AppState,
    route: &str,
    claims: Claims,
    which: (&str, Option<&str>, &str),
) -> Result<(String, Claims), Denied> {
    match owner_and_grant(state, route, claims, which)? {
        (_, _, Grant::Services(services)) => Err(Box::new(error(
            state,
            route,
            StatusCode::FORBIDDEN,
            format!(
                "this token reaches only the services {} of lease {:?}",
                services.join(", "),
                which.0
            ),
            "ask /lease/{dseq}/{gseq}/{oseq}/metrics, which answers the services a token reaches, or for a token that reaches the whole lease",
        ))),
        (tenant, claims, _) => Ok((tenant, claims)),
    }
}

/// [`owner_of`], and what the token reaches of the lease: the whole lease, or some of its
/// services.
fn owner_and_grant(
    state: &AppState,
    route: &str,
    claims: Claims,
    (lease, tenant, param): (&str, Option<&str>, &str),
) -> Result<(String, Claims, Grant), Denied> {
    check_name(state, route, "lease", lease)?;
    let tenants = state
        .store
        .lease_tenants(lease)
        .map_err(|e| Box::new(internal(state, route, e)))?;
    let reachable: Vec<(&String, Grant)> = tenants
        .iter()
        .filter(|t| tenant.is_none_or(|want| want == t.as_str()))
        .map(|t| (t, claims.reaches_lease(t, lease, &state.provider)))
        .filter(|(_, grant)| *grant != Grant::Nothing)
        .collect();
    match reachable.as_slice() {
        [(one, grant)] => Ok(((*one).clone(), claims, grant.clone())),
        [] => Err(Box::new(error(
            state,
            route,
            StatusCode::NOT_FOUND,
            format!("no lease {lease:?} for this token"),
            "a tenant token reaches its own tenant's leases only",
        ))),
        several => Err(Box::new(error(
            state,
            route,
            StatusCode::BAD_REQUEST,
            format!(
                "lease {lease:?} exists for {} tenants: {}",
                several.len(),
                several
                    .iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &format!("add ?{param}=NAME"),
        ))),
    }
}

/// One lease's aggregates as time series: per step, the sum of the base windows starting in
/// it, with coverage.
async fn lease_metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(lease): Path<String>,
    Params(q): Params<LeaseMetricsQuery>,
) -> Response {
    const ROUTE: &str = "/v1/leases/{lease}/metrics";
    let (tenant, claims) = match lease_owner(
        &state,
        &headers,
        ROUTE,
        Need::Any,
        (&lease, q.tenant.as_deref(), "tenant"),
    ) {
        Ok(owner) => owner,
        Err(denied) => return *denied,
    };
    let bad = |msg: String, hint: &str| error(&state, ROUTE, StatusCode::BAD_REQUEST, msg, hint);
    let now = (state.now_ms)();
    let end_default = q.end.as_deref().and_then(parse_time).unwrap_or(now);
    let (start, end) = match time_range(&q.start, &q.end, end_default - 3_600_000, now) {
        Ok(range) => range,
        Err((message, hint)) => return bad(message, hint),
    };
    let Some(finest) = finest_step_ms(end - start) else {
        return bad(
            format!(
                "the range is {} days; at most 30",
                (end - start) / 86_400_000
            ),
            "narrow it, or use /v1/tenants/{tenant}/usage?window=day",
        );
    };
    // Series come in base windows: no step is finer than one.
    let base = match state.store.lease_window_ms(&tenant, &lease, start, end) {
        Ok(base) => base.unwrap_or(0),
        Err(e) => return internal(&state, ROUTE, e),
    };
    let allowed = finest.max(base);
    let step = match q.step.as_deref() {
        None => allowed,
        Some(text) => match parse_duration_ms(text) {
            Some(step) if step >= allowed && step % allowed.max(1) == 0 => step,
            Some(_) => {
                return bad(
                    format!(
                        "step={text} is finer than this range allows, or not a multiple of it; the allowed step is {}s",
                        allowed / 1000
                    ),
                    "use that step or a multiple of it",
                );
            }
            None => {
                return bad(
                    format!("step={text:?} is not a duration"),
                    "write it as 15s, 1m, 15m or milliseconds",
                );
            }
        },
    };
    let wanted: Option<Vec<&str>> = q.metric.as_deref().map(comma_list);
    // metric → step start → sums
    let mut series: BTreeMap<String, BTreeMap<i64, Sums>> = BTreeMap::new();
    let mut names = Names::default();
    // A window counts in the step its start is in: where the steps' edges and the range's are
    // edges of the lease's 5-minute cells, the cells (their windows summed) count the same.
    let mut add = |window: &CellRef<'_>| {
        let metric = window.metric;
        if metric.starts_with("live.") || wanted.as_ref().is_some_and(|w| !w.contains(&metric)) {
            return;
        }
        let at = start + (window.start_ms - start).div_euclid(step) * step;
        let steps = match series.get_mut(metric) {
            Some(steps) => steps,
            None => series.entry(metric.to_string()).or_default(),
        };
        steps.entry(at).or_default().add_parts(
            &mut names,
            (window.metric, window.gpu_class, window.mig_profile),
            window.amount,
            window.scale,
            (window.coverage_ms, window.present_ms),
        );
    };
    let read = if [start, end, step].iter().all(|t| t % LEASE_CELL_MS == 0) {
        state
            .store
            .each_lease_cell(&tenant, &lease, start, end, |c| add(c))
    } else {
        state
            .store
            .lease_usage(&tenant, &lease, start, end)
            .map(|updates| {
                for u in &updates {
                    add(&u.into());
                }
            })
    };
    if let Err(e) = read {
        return internal(&state, ROUTE, e);
    }
    if let Err(denied) = take_series(&state, ROUTE, &claims, series.len()) {
        return *denied;
    }
    let series: Vec<Value> = series
        .into_iter()
        .map(|(metric, points)| {
            let points: Vec<Value> = points
                .into_iter()
                .map(|(at, sums)| {
                    json!({
                        "t": format_rfc3339(at),
                        "value": sums.value(&metric),
                        "coverage": sums.coverage(&metric),
                    })
                })
                .collect();
            json!({"metric": metric, "points": points})
        })
        .collect();
    count(&state, ROUTE, StatusCode::OK);
    Json(json!({
        "lease": lease,
        "tenant": tenant,
        "start": format_rfc3339(start),
        "end": format_rfc3339(end),
        "step_seconds": step / 1000,
        "series": series,
    }))
    .into_response()
}

/// The lease's live values: per metric the gauge (latest), diff (change over the last
/// interval) and rate (per second), summed over its services and nodes, and per service.
async fn lease_live(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(lease): Path<String>,
    Params(q): Params<LeaseQuery>,
) -> Response {
    const ROUTE: &str = "/v1/leases/{lease}/live";
    let (tenant, _) = match lease_owner(
        &state,
        &headers,
        ROUTE,
        Need::Any,
        (&lease, q.tenant.as_deref(), "tenant"),
    ) {
        Ok(owner) => owner,
        Err(denied) => return *denied,
    };
    match live_json(&state, &tenant, &lease) {
        Ok((answer, _)) => {
            count(&state, ROUTE, StatusCode::OK);
            Json(answer).into_response()
        }
        Err(e) => internal(&state, ROUTE, e),
    }
}

/// A lease's live answer, and the time of its newest reading.
fn live_json(
    state: &AppState,
    tenant: &str,
    lease: &str,
) -> Result<(Value, Option<i64>), crate::store::StoreError> {
    // Live values carry window start 0 and end at their newest reading.
    let updates = state.store.lease_usage(tenant, lease, 0, 1)?;
    // metric → kind → (sum, per service)
    type Kinds = BTreeMap<String, (f64, BTreeMap<String, f64>)>;
    let mut metrics: BTreeMap<String, Kinds> = BTreeMap::new();
    let mut at = None::<i64>;
    for u in &updates {
        let Some(rest) = u.metric.strip_prefix("live.") else {
            continue;
        };
        let Some((metric, kind)) = rest.rsplit_once('.') else {
            continue;
        };
        let value = u.amount as f64 / 10f64.powi(u.scale);
        let e = metrics
            .entry(metric.to_string())
            .or_default()
            .entry(kind.to_string())
            .or_default();
        e.0 += value;
        *e.1.entry(u.service.clone()).or_default() += value;
        at = Some(at.unwrap_or(i64::MIN).max(u.window_end_ms));
    }
    let metrics: Map<String, Value> = metrics
        .into_iter()
        .map(|(metric, kinds)| {
            let mut out = Map::new();
            let mut services: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
            for (kind, (total, by_service)) in kinds {
                out.insert(kind.clone(), json!(total));
                for (service, v) in by_service {
                    services
                        .entry(service)
                        .or_default()
                        .insert(kind.clone(), json!(v));
                }
            }
            out.insert("services".into(), json!(services));
            (metric, Value::Object(out))
        })
        .collect();
    Ok((
        json!({
            "lease": lease,
            "tenant": tenant,
            "at": at.map(format_rfc3339),
            "metrics": metrics,
        }),
        at,
    ))
}

/// Query of `GET /v1/feeds/tenants/{tenant}`.
#[derive(Debug, Deserialize)]
pub struct TenantFeedQuery {
    /// As for the burn-rate route: how far back the rate looks. Default 5m.
    pub over: Option<String>,
    /// A ticket from `/v1/feeds/ticket`, for a browser's `EventSource` (no header).
    pub ticket: Option<String>,
}

/// A tenant's burn rate and budget as Server-Sent Events: the burn-rate answer now, then again
/// each time it changes (event `burn-rate`). Event ids name the answer (`as_of` in ms and a
/// hash of its content): a client that reconnects with `Last-Event-ID` gets the current answer
/// only when it differs from the last one it saw.
async fn tenant_feed(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Params(q): Params<TenantFeedQuery>,
) -> Response {
    const ROUTE: &str = "/v1/feeds/tenants/{tenant}";
    let claims = match authenticate(&state, &headers, q.ticket.as_deref(), ROUTE)
        .and_then(|claims| permit(&state, ROUTE, claims, Need::Tenant(&tenant)))
    {
        Ok(claims) => claims,
        Err(denied) => return *denied,
    };
    if let Err(denied) = check_name(&state, ROUTE, "tenant", &tenant) {
        return *denied;
    }
    let over_ms = match over_ms(q.over.as_deref()) {
        Ok(ms) => ms,
        Err(message) => {
            let hint = "write it as 90s, 5m, 1h or milliseconds";
            return error(&state, ROUTE, StatusCode::BAD_REQUEST, message, hint);
        }
    };
    let held = match hold_feed(&state, ROUTE, &claims) {
        Ok(held) => held,
        Err(denied) => return *denied,
    };
    count(&state, ROUTE, StatusCode::OK);
    feed(
        &state,
        &headers,
        ("tenant", held),
        "burn-rate",
        move |state| burn_rate_json(state, &tenant, over_ms).map(Some),
    )
}

/// A lease's live values as Server-Sent Events, for autoscalers: the live answer now, then
/// each time a newer reading arrives (event `utilization`); ids and `Last-Event-ID` as for the
/// tenant feed.
async fn lease_feed(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(lease): Path<String>,
    Params(q): Params<LeaseFeedQuery>,
) -> Response {
    const ROUTE: &str = "/v1/feeds/leases/{lease}";
    let owner = authenticate(&state, &headers, q.ticket.as_deref(), ROUTE)
        .and_then(|claims| permit(&state, ROUTE, claims, Need::Any))
        .and_then(|claims| {
            owner_of(
                &state,
                ROUTE,
                claims,
                (&lease, q.tenant.as_deref(), "tenant"),
            )
        });
    let (tenant, claims) = match owner {
        Ok(owner) => owner,
        Err(denied) => return *denied,
    };
    let held = match hold_feed(&state, ROUTE, &claims) {
        Ok(held) => held,
        Err(denied) => return *denied,
    };
    count(&state, ROUTE, StatusCode::OK);
    feed(
        &state,
        &headers,
        ("lease", held),
        "utilization",
        move |state| {
            // Nothing to say until the lease has a reading.
            live_json(state, &tenant, &lease).map(|(answer, at)| at.map(|at| (answer, at)))
        },
    )
}

/// The shortest time between two looks of a feed at the store.
const FEED_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// An event id that names an answer: its time and a hash (FNV-1a) of its content.
fn event_id(at_ms: i64, body: &str) -> String {
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{at_ms}-{hash:016x}")
}

/// A place for one more feed of the caller (`--max-open-feeds`), or 429: a feed is a query
/// that stays open, and AEP-43 allows a tenant 20 at once. Retry-After is the keep-alive
/// interval: a feed whose client went is noticed, and its place freed, when its next
/// keep-alive cannot be written.
fn hold_feed(
    state: &AppState,
    route: &str,
    claims: &Claims,
) -> Result<crate::limits::FeedPermit, Denied> {
    let who = caller(claims);
    state.open_feeds.open(&who).ok_or_else(|| {
        let retry = state.keep_alive.as_secs().max(1);
        let mut answer = error(
            state,
            route,
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{who} has {} feeds open, the most one caller may hold",
                state.open_feeds.max()
            ),
            "close one first (each browser tab or autoscaler connection holds one), or follow several leases through the tenant feed",
        );
        if let Ok(value) = header::HeaderValue::from_str(&retry.to_string()) {
            answer.headers_mut().insert(header::RETRY_AFTER, value);
        }
        Box::new(answer)
    })
}

/// Counts a feed while it is open, and holds its caller's place (given back when dropped).
struct OpenFeed {
    gauge: prometheus::IntGauge,
    _held: crate::limits::FeedPermit,
}

impl OpenFeed {
    fn new(gauge: prometheus::IntGauge, held: crate::limits::FeedPermit) -> Self {
        gauge.inc();
        Self { gauge, _held: held }
    }
}

impl Drop for OpenFeed {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A Server-Sent Events answer: `answer` now and after every store write, sent when its id
/// differs from the last one sent (or the client's `Last-Event-ID`); keep-alive comments while
/// idle; the stream ends when the sink stops.
fn feed<F>(
    state: &AppState,
    headers: &HeaderMap,
    (kind, held): (&'static str, crate::limits::FeedPermit),
    event: &'static str,
    answer: F,
) -> Response
where
    F: Fn(&AppState) -> Result<Option<(Value, i64)>, crate::store::StoreError> + Send + 'static,
{
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut updates = state.updates.clone();
    // The first turn answers at once.
    updates.mark_changed();
    let open = OpenFeed::new(state.metrics.feeds_open.with_label_values(&[kind]), held);
    let start = (
        state.clone(),
        updates,
        last_id,
        answer,
        open,
        tokio::time::Instant::now(),
    );
    let events = futures_util::stream::unfold(
        start,
        move |(state, mut updates, mut last_id, answer, open, mut next_at)| async move {
            loop {
                tokio::select! {
                    _ = state.shutdown.cancelled() => return None,
                    changed = updates.changed() => changed.ok()?,
                }
                // A busy sink writes many times a second: a feed looks at most every
                // FEED_MIN_INTERVAL, and then at everything written meanwhile.
                tokio::select! {
                    _ = state.shutdown.cancelled() => return None,
                    _ = tokio::time::sleep_until(next_at) => {}
                }
                next_at = tokio::time::Instant::now() + FEED_MIN_INTERVAL;
                let (value, at) = match answer(&state) {
                    Ok(Some(next)) => next,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, kind, "feed could not read the store");
                        continue;
                    }
                };
                let body = value.to_string();
                let id = event_id(at, &body);
                if last_id.as_deref() == Some(id.as_str()) {
                    continue;
                }
                state.metrics.feed_events.with_label_values(&[kind]).inc();
                let sent = Event::default().event(event).id(id.clone()).data(body);
                last_id = Some(id);
                return Some((
                    Ok::<Event, std::convert::Infallible>(sent),
                    (state, updates, last_id, answer, open, next_at),
                ));
            }
        },
    );
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(state.keep_alive)
                .text("keep-alive"),
        )
        .into_response()
}

/// Query of `GET /v1/fleet/hourly`.
#[derive(Debug, Deserialize)]
pub struct RangeQuery {
    /// Start (inclusive): RFC 3339 or milliseconds since the epoch. Default: 24 hours ago.
    pub from: Option<String>,
    /// End (exclusive). Default: now.
    pub to: Option<String>,
}

/// Per hour: active nodes and the sum of the per-node maxima of GPUs allocated, then each node.
async fn fleet_hourly(
    State(state): State<AppState>,
    headers: HeaderMap,
    Params(q): Params<RangeQuery>,
) -> Response {
    const ROUTE: &str = "/v1/fleet/hourly";
    let claims = match authorize(&state, &headers, ROUTE, Need::Operator) {
        Ok(claims) => claims,
        Err(denied) => return *denied,
    };
    const HOUR: i64 = 3_600_000;
    let now = (state.now_ms)();
    let (from, to) = match time_range(&q.from, &q.to, now - 24 * HOUR, now) {
        Ok(range) => range,
        Err((message, hint)) => {
            return error(&state, ROUTE, StatusCode::BAD_REQUEST, message, hint);
        }
    };
    // Node records are stored under the empty tenant. The fleet's per hour are their sums,
    // added up here (the processor sends each node's from the worker its samples reach; fleet
    // records an older processor sent are left aside).
    let updates = match state.store.usage("", from.div_euclid(HOUR) * HOUR, to) {
        Ok(u) => u,
        Err(e) => return internal(&state, ROUTE, e),
    };
    // hour → node → metric → amount
    let mut hours: BTreeMap<i64, BTreeMap<String, BTreeMap<String, i64>>> = BTreeMap::new();
    for u in updates.into_iter().filter(|u| !u.node.is_empty()) {
        let nodes = hours.entry(u.window_start_ms).or_default();
        nodes.entry(u.node).or_default().insert(u.metric, u.amount);
    }
    // A series per node, and the fleet's.
    let nodes: std::collections::BTreeSet<&String> =
        hours.values().flat_map(|nodes| nodes.keys()).collect();
    if let Err(denied) = take_series(&state, ROUTE, &claims, nodes.len() + 1) {
        return *denied;
    }
    let rows: Vec<Value> = hours
        .iter()
        .map(|(hour, nodes)| {
            let get = |m: &BTreeMap<String, i64>, k: &str| m.get(k).copied().unwrap_or(0);
            let active_nodes = nodes.values().filter(|m| get(m, "node_active") > 0).count();
            let max_gpus: i64 = nodes.values().map(|m| get(m, "max_gpus_allocated")).sum();
            let nodes: Vec<Value> = nodes
                .iter()
                .map(|(node, m)| {
                    json!({
                        "node": node,
                        "active": get(m, "node_active") > 0,
                        "max_gpus_allocated": get(m, "max_gpus_allocated"),
                    })
                })
                .collect();
            json!({
                "hour": format_rfc3339(*hour),
                "active_nodes": active_nodes,
                "max_gpus_allocated": max_gpus,
                "nodes": nodes,
            })
        })
        .collect();
    count(&state, ROUTE, StatusCode::OK);
    Json(json!({
        "from": format_rfc3339(from),
        "to": format_rfc3339(to),
        "hours": rows,
    }))
    .into_response()
}

fn fixed(t: i64, len: i64) -> (i64, i64) {
    let start = t.div_euclid(len) * len;
    (start, start + len)
}

/// Version, features and how far the data reaches; for an operator also how far behind the
/// sink is and what it consumed (a tenant sees neither: AEP-43 keeps lag and internal ids from
/// tenants).
async fn status(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let claims = match authorize(&state, &headers, "/v1/status", Need::Any) {
        Ok(claims) => claims,
        Err(denied) => return *denied,
    };
    let watermark = state.store.watermark_ms().ok().flatten();
    // AEP-43's discovery of the lease metrics route: the finest step is the base window (or
    // the AEP's 15 s, whichever is coarser); nothing is deleted, so no retention limit.
    let min_step_s = state
        .store
        .base_window_ms()
        .ok()
        .flatten()
        .map(|ms| (ms / 1_000).max(15));
    let mut answer = json!({
        "service": "meterflow-sink",
        "version": env!("CARGO_PKG_VERSION"),
        "features": ["usage", "burn-rate", "metrics", "live", "fleet", "feeds", "aep-43"],
        "metrics": {
            "enabled": true,
            "route": "/lease/{dseq}/{gseq}/{oseq}/metrics",
            "retention_days": null,
            "min_step": min_step_s.map(|s| format!("{s}s")),
            "gpu_metrics": true,
        },
        "watermark": watermark.map(format_rfc3339),
        "watermark_ms": watermark,
    });
    if claims.has_scope("operator") {
        let offsets = state.store.offsets(topics::USAGE).unwrap_or_default();
        // How far behind: records not yet stored, and the data's age by the wall clock (never
        // negative: a watermark ahead of this clock, an agent's clock running fast, is age 0).
        answer["lag"] = json!({
            "records": Some(state.metrics.consumer_lag.get()).filter(|l| *l >= 0),
            "seconds": watermark.map(|w| ((state.now_ms)() - w).max(0) as f64 / 1000.0),
        });
        answer["consumed_offsets"] = json!({ topics::USAGE: offsets });
    }
    count(&state, "/v1/status", StatusCode::OK);
    Json(answer).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode_to_string(&state.metrics.registry.gather()) {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.metrics.ready.get() == 1 {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not yet consuming meterflow.usage\n",
        )
            .into_response()
    }
}

async fn index(State(state): State<AppState>) -> Response {
    // The page holds no data: what it shows, it fetches with the token it is given.
    count(&state, "/", StatusCode::OK);
    Html(INDEX_HTML).into_response()
}

/// The landing page: asks for a token (or takes one from the URL's `#token=` fragment, which
/// the browser never sends to the server) and shows what it reaches.
const INDEX_HTML: &str = include_str!("index.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_routes_served() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("the OpenAPI document is JSON");
        let documented: std::collections::BTreeSet<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        let served: std::collections::BTreeSet<&str> = paths().into_iter().collect();
        assert_eq!(documented, served);
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn the_resolution_table_widens_the_step_with_the_range() {
        const M: i64 = 60_000;
        assert_eq!(finest_step_ms(60 * M), Some(15_000));
        assert_eq!(finest_step_ms(60 * M + 1), Some(M));
        assert_eq!(finest_step_ms(30 * 24 * 60 * M), Some(15 * M));
        assert_eq!(finest_step_ms(30 * 24 * 60 * M + 1), None);
    }

    fn cell<'a>(hour: i64, lease: &'a str, metric: &'a str, amount: i64) -> CellRef<'a> {
        CellRef {
            start_ms: hour * HOUR_MS,
            lease,
            service: "web",
            metric,
            gpu_class: if metric == "gpu_seconds" { "a100" } else { "" },
            mig_profile: "",
            amount,
            scale: 3,
            coverage_ms: HOUR_MS,
            present_ms: HOUR_MS,
        }
    }

    #[test]
    fn a_tally_orders_rows_by_bucket_then_group_whatever_order_cells_come_in() {
        let group_by = ["lease"];
        let mut tally = Tally::new(&group_by, usize::MAX);
        // Lease b is seen before lease a; hours 0 and 1 fall in day 0, hour 24 in day 1.
        for c in [
            cell(0, "b", "gpu_seconds", 1_000),
            cell(0, "b", "cpu_core_seconds", 2_000),
            cell(1, "a", "gpu_seconds", 3_000),
            cell(1, "b", "gpu_seconds", 4_000),
            cell(24, "a", "cpu_core_seconds", 5_000),
        ] {
            let _ = tally.add_cell(fixed(c.start_ms, 86_400_000), &c);
        }
        let summed = tally.finish();
        assert_eq!(
            summed.groups,
            [vec!["a".to_string()], vec!["b".to_string()]]
        );
        let rows: Vec<(i64, &str, f64, f64)> = summed
            .rows
            .iter()
            .map(|r| {
                (
                    r.start / 86_400_000,
                    summed.groups[r.group][0].as_str(),
                    r.sums.value("gpu_seconds"),
                    r.sums.value("cpu_core_seconds"),
                )
            })
            .collect();
        // Day 0: a has 3 GPU-seconds; b has 1 + 4 GPU-seconds and 2 core-seconds. Day 1: a 5.
        assert_eq!(
            rows,
            [(0, "a", 3.0, 0.0), (0, "b", 5.0, 2.0), (1, "a", 0.0, 5.0)]
        );
        assert_eq!(summed.totals.value("gpu_seconds"), 8.0);
        assert_eq!(summed.totals.value("cpu_core_seconds"), 7.0);
        assert_eq!(summed.totals.gpu_ms, [("a100".into(), "".into(), 8_000)]);
    }
}
