//! The HTTP surface of a replica (axum): the REST API (tasks, agents and fleet, with
//! bearer-token auth, body and time limits, JSON errors, `/healthz`, `/readyz`, `/metrics` and
//! an OpenAPI document generated from the route table and the Rust types) and the web
//! [`console`] at `/`, under the same limits.
//!
//! It contains no SQL: it calls `queue`, `agents`, `governor` and `db`.

pub mod console;
mod extract;
mod openapi;
pub mod server;

pub use extract::{ApiJson, ApiPath, ApiQuery};

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::agents::{AgentOwnConfig, AgentSettings, AgentSpec, Agents};
use crate::bounds;
use crate::config::{ApiToken, Config, Scope};
use crate::executor::Runtime;
use crate::queue::{NewTask, Queue, Status, TaskFilter};

/// What the handlers share.
pub struct ApiState {
    pub queue: Queue,
    pub agents: Option<Agents>,
    pub pool: PgPool,
    pub tokens: Vec<ApiToken>,
    /// Kinds a task may be enqueued with (the replica's handlers), and their payload checks.
    pub registry: crate::worker::Registry,
    pub config: Config,
    /// Cancelled when the replica starts draining: `/readyz` then answers 503 so that no
    /// new traffic comes, while `/healthz` and the rest keep serving until the drain ends.
    pub draining: tokio_util::sync::CancellationToken,
}

/// What a 503 asks the client to wait before it retries, in seconds.
const RETRY_AFTER_S: u64 = 1;

/// An error as the API answers it: `{ "error": "...", "detail": ... }`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    detail: Value,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: impl Into<String>, detail: Value) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            detail,
        }
    }
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> ApiError {
        let reason = reason.into();
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid {field}: {reason}"),
            json!({ "field": field, "reason": reason }),
        )
    }
    /// A database error: 503 with `Retry-After` when a retry may succeed (the pool had no
    /// connection free within its wait, the database is unreachable, shutting down or out of
    /// resources), 500 otherwise. Either way the cause goes to the log only.
    fn db(e: sqlx::Error) -> ApiError {
        if !crate::db::is_transient(&e) {
            return ApiError::internal(e);
        }
        tracing::warn!(error = %e, "API request failed on the database; answered 503");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is busy or out of reach; retry",
            json!({ "retry_after_s": RETRY_AFTER_S }),
        )
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        // The cause goes to the log, never to the client.
        tracing::error!(error = %e, "API request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
            Value::Null,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({ "error": self.error, "detail": self.detail })),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(RETRY_AFTER_S),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"harness\""),
            );
        }
        r
    }
}

impl From<crate::queue::Error> for ApiError {
    fn from(e: crate::queue::Error) -> ApiError {
        use crate::queue::Error as E;
        match e {
            E::NotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                format!("task {id} not found"),
                Value::Null,
            ),
            E::Invalid { field, reason } => ApiError::invalid(field, reason),
            E::WrongState {
                id,
                status,
                action,
                allowed,
            } => ApiError::new(
                StatusCode::CONFLICT,
                format!("task {id} is {status}; {action} needs {allowed}"),
                json!({ "status": status }),
            ),
            E::Db(e) => ApiError::db(e),
        }
    }
}

impl From<crate::agents::Error> for ApiError {
    fn from(e: crate::agents::Error) -> ApiError {
        use crate::agents::Error as E;
        match e {
            E::Invalid { field, reason } => ApiError::invalid(field, reason),
            E::Duplicate(name) => ApiError::new(
                StatusCode::CONFLICT,
                format!("an agent named {name:?} already exists"),
                Value::Null,
            ),
            E::NotFound(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no agent {name}"),
                Value::Null,
            ),
            E::Queue(e) => e.into(),
            E::Db(e) => ApiError::db(e),
        }
    }
}

type Shared = State<Arc<ApiState>>;
type ApiResult<T> = Result<T, ApiError>;

/// Bearer-token check for `/api`: read tokens may only read. The caller's scope goes into
/// the request's extensions (admin when no tokens are configured).
async fn auth(State(st): Shared, mut req: Request, next: Next) -> Response {
    if st.tokens.is_empty() {
        req.extensions_mut().insert(Scope::Admin);
        return next.run(req).await;
    }
    // The scheme is case-insensitive (RFC 9110): `bearer x` and `BEARER x` are `Bearer x`.
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token",
            Value::Null,
        )
        .into_response();
    };
    // Every token is compared, in constant time, so timing says nothing about which matched.
    let mut scope = None;
    for t in &st.tokens {
        if bool::from(t.token.expose().as_bytes().ct_eq(presented.as_bytes())) {
            scope = Some(t.scope);
        }
    }
    let Some(scope) = scope else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unknown token", Value::Null)
            .into_response();
    };
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !reads && scope != Scope::Admin {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this token may only read",
            json!({"scope": "read"}),
        )
        .into_response();
    }
    req.extensions_mut().insert(scope);
    next.run(req).await
}

// ---- secrets in answers ------------------------------------------------------------------

/// What an `env` value reads as where it is not shown.
pub const REDACTED: &str = "[redacted]";

/// Replaces the values of the `env` map at `pointer` in `v` (if any) by [`REDACTED`]; the
/// names stay, so a reader sees which variables are set.
pub(crate) fn redact_env_at(v: &mut Value, pointer: &str) {
    if let Some(Value::Object(env)) = v.pointer_mut(pointer) {
        for value in env.values_mut() {
            *value = json!(REDACTED);
        }
    }
}

/// Whether a config key names a secret: `password`, `api_key`, `slackToken`, `private_key`…
pub(crate) fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace(['-', '_'], "");
    [
        "secret",
        "token",
        "password",
        "passwd",
        "credential",
        "authorization",
    ]
    .iter()
    .any(|w| k.contains(w))
        || k.ends_with("key")
        || k == "auth"
}

/// Replaces, at any depth of `v`, the values of keys that name a secret by [`REDACTED`].
pub(crate) fn redact_secrets(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, value) in map.iter_mut() {
                if secret_key(k) {
                    *value = json!(REDACTED);
                } else {
                    redact_secrets(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_secrets),
        _ => {}
    }
}

/// An agent as the caller may see it: its `config.env` values (API keys, typically) are
/// shown only to admins asking for this one agent; a read token sees its own config's
/// secret-looking values (`password`, `api_key`, …) redacted.
fn agent_json(
    agent: &crate::agents::Agent,
    scope: Scope,
    single: bool,
    quarantines: &[crate::fleet::quarantines::Quarantine],
) -> Value {
    let mut v = serde_json::to_value(agent).expect("agent serialises");
    if !(single && scope == Scope::Admin) {
        redact_env_at(&mut v, "/settings/env");
    }
    if scope != Scope::Admin
        && let Some(config) = v.get_mut("config")
    {
        redact_secrets(config);
    }
    v["next_fire_at"] = json!(agent.next_fire());
    v["quarantine"] = json!(quarantines.iter().find(|q| q.agent_id == Some(agent.id)));
    v
}

/// A task as the caller may see it: the `env` of a command's payload, like an agent's.
fn task_json(task: &crate::queue::Task, scope: Scope, single: bool) -> Value {
    let mut v = serde_json::to_value(task).expect("task serialises");
    if !(single && scope == Scope::Admin) {
        redact_env_at(&mut v, "/payload/env");
    }
    v
}

fn tasks_json(tasks: &[crate::queue::Task], scope: Scope) -> Value {
    Value::Array(tasks.iter().map(|t| task_json(t, scope, false)).collect())
}

/// A NUL (`%00`) in the path or query can name nothing stored (PostgreSQL cannot store one):
/// answered 422 before any handler sees it.
async fn reject_nul_in_uri(req: Request, next: Next) -> Response {
    let uri = req.uri();
    let has = |s: &str| {
        s.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%00"))
    };
    for (field, part) in [("path", Some(uri.path())), ("query", uri.query())] {
        if part.is_some_and(has) {
            return ApiError::invalid(field, "holds a NUL character (%00), which is not allowed")
                .into_response();
        }
    }
    next.run(req).await
}

/// The whole HTTP surface of a replica.
pub fn router(state: Arc<ApiState>) -> Router {
    build(state, true)
}

/// `/healthz`, `/readyz` and `/metrics` only: a worker-only replica (`serve --no-api`).
pub fn health_router(state: Arc<ApiState>) -> Router {
    build(state, false)
}

fn build(state: Arc<ApiState>, with_api: bool) -> Router {
    let api = Router::new()
        .route("/tasks", get(list_tasks).post(create_task))
        .route("/tasks/stats/summary", get(stats))
        .route("/tasks/agent/{agent_id}", get(agent_tasks))
        .route("/tasks/{task_id}", get(get_task).delete(delete_task))
        .route("/tasks/{task_id}/retry", post(retry_task))
        .route("/tasks/{task_id}/cancel", post(cancel_task))
        .route("/tasks/{task_id}/logs", get(task_logs))
        .route("/agents", get(list_agents).post(create_agent))
        .route(
            "/agents/{id}",
            get(get_agent).patch(update_agent).delete(delete_agent),
        )
        .route("/agents/{id}/run", post(run_agent))
        .route(
            "/agents/{id}/handoff",
            get(get_handoff).delete(clear_handoff),
        )
        .route("/queues", get(list_queues))
        .route("/queues/{name}/pause", post(pause_queue))
        .route("/queues/{name}/resume", post(resume_queue))
        .route("/limits", get(list_limits))
        .route(
            "/limits/{scope}/{target}",
            axum::routing::put(set_limit).delete(remove_limit),
        )
        .route("/fleet", get(fleet))
        .route("/fleet/resume", post(resume_all))
        .route("/fleet/{replica_id}/resume", post(resume_one))
        .route("/openapi.json", get(openapi_json))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let cfg = &state.config.api;
    // What counts against the request limit: the API and the metrics, once a request's body
    // has arrived (see `read_body`). The health checks never wait behind it.
    let metrics_route = if cfg.metrics_auth && !state.tokens.is_empty() {
        get(metrics).route_layer(middleware::from_fn_with_state(state.clone(), auth))
    } else {
        get(metrics)
    };
    let limited = if with_api {
        Router::new()
            .nest("/api", api)
            .merge(console::routes(state.clone()))
    } else {
        Router::new()
    };
    let limited = limited
        .route("/metrics", metrics_route)
        .layer(middleware::from_fn_with_state(state.clone(), time_limit))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            cfg.max_concurrent_requests,
        ));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .merge(limited)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route", Value::Null) })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
                Value::Null,
            )
        })
        .layer(DefaultBodyLimit::max(cfg.max_body_kb as usize * 1024))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn(reject_nul_in_uri))
        .with_state(state)
}

/// Reads the whole body before anything else happens, within `api.body_timeout_s` (408) and
/// `api.max_body_kb` (413), so a client that sends half a body holds a connection for a while
/// but never a place in the request limit.
async fn read_body(State(st): Shared, req: Request, next: Next) -> Response {
    let cfg = &st.config.api;
    let phase = req.extensions().get::<server::ConnPhase>().cloned();
    let (parts, body) = req.into_parts();
    let limit = cfg.max_body_kb as usize * 1024;
    let read = axum::body::to_bytes(body, limit);
    let bytes = match tokio::time::timeout(Duration::from_secs(cfg.body_timeout_s), read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return if too_large {
                body_too_large(cfg.max_body_kb)
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "the body could not be read",
                    Value::Null,
                )
                .into_response()
            };
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within api.body_timeout_s ({} s)",
                    cfg.body_timeout_s
                ),
                json!({ "setting": "api.body_timeout_s" }),
            )
            .into_response();
        }
    };
    if let Some(p) = phase {
        p.set(server::Phase::Handling);
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn body_too_large(max_kb: u64) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than api.max_body_kb ({max_kb} KiB)"),
        json!({ "setting": "api.max_body_kb", "max_kb": max_kb }),
    )
    .into_response()
}

/// Answers 408 (as JSON) when handling takes longer than `api.request_timeout_s`.
async fn time_limit(State(st): Shared, req: Request, next: Next) -> Response {
    let limit = st.config.api.request_timeout_s;
    match tokio::time::timeout(Duration::from_secs(limit), next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request took longer than api.request_timeout_s ({limit} s)"),
            json!({ "setting": "api.request_timeout_s" }),
        )
        .into_response(),
    }
}

/// Serves `router` on `listener` until `shutdown` within `limits` (see [`server`]), then
/// lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: server::ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, router, limits, shutdown).await
}

async fn readyz(State(st): Shared) -> Response {
    if st.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "error": "the replica is stopping"})),
        )
            .into_response();
    }
    let check = async {
        crate::db::ping(&st.pool).await.map_err(|e| e.to_string())?;
        match crate::db::migrations_current(&st.pool).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("migrations are not current; run harness migrate".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    // Never hangs: a database that does not answer in 2 s is down.
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => Json(json!({"status": "ready"})).into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": "database not ready", "detail": e})),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": "database did not answer within 2 s"})),
        )
            .into_response(),
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
        .into_response()
}

async fn openapi_json(State(st): Shared) -> Json<Value> {
    Json(openapi::document(&st.registry.kinds()))
}

// ---- tasks ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    pub kind: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default, deserialize_with = "extract::whole::i32")]
    pub priority: i32,
    /// Seconds from now before the task may run.
    pub delay_s: Option<f64>,
    /// Not before this time (RFC 3339).
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, deserialize_with = "extract::whole::option_u32")]
    pub max_retries: Option<u32>,
    pub timeout_s: Option<f64>,
    /// Also accepted as the `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The queue it waits in (default: its agent's, else `default`).
    pub queue: Option<String>,
    /// What limits of scope `key` count it under.
    pub concurrency_key: Option<String>,
}

async fn create_task(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateTask>,
) -> ApiResult<Response> {
    if let Err(e) = st.registry.validate(&body.kind, &body.payload) {
        let field = if st.registry.get(&body.kind).is_some() {
            "payload"
        } else {
            "kind"
        };
        return Err(ApiError::invalid(field, e));
    }
    let key = idempotency_key(&headers, body.idempotency_key.as_deref())?;
    let mut task = NewTask::new(body.kind, body.payload).priority(body.priority);
    if let Some(agent) =
        crate::agents::agent_of_payload(&st.pool, &task.kind, &task.payload).await?
    {
        task = task.agent_id(agent);
        // An agent's run waits in the agent's queue unless told otherwise.
        task = task.queue(crate::agents::queue_of(&st.pool, agent).await?);
    }
    if let Some(q) = body.queue {
        task = task.queue(q);
    }
    if let Some(k) = body.concurrency_key {
        task = task.concurrency_key(k);
    }
    if let Some(d) = body.delay_s {
        task = task.delay(seconds("delay_s", d, (Duration::ZERO, bounds::MAX_DELAY))?);
    }
    if let Some(t) = body.run_at {
        task = task.run_at(t);
    }
    if let Some(n) = body.max_retries {
        task = task.max_retries(n);
    }
    if let Some(t) = body.timeout_s {
        task = task.timeout(seconds("timeout_s", t, bounds::TASK_TIMEOUT)?);
    }
    if let Some(k) = key {
        task = task.idempotency_key(k);
    }
    let (kind, payload) = (task.kind.clone(), task.payload.clone());
    let e = st.queue.enqueue(task).await?;
    let t = st.queue.get(e.id).await?;
    // A key names one request: the same key with another kind or payload is a mistake the
    // client must hear about, not a silent answer about some other task.
    if e.deduplicated && (t.kind != kind || t.payload != payload) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "idempotency key already used by task {} with a different kind or payload",
                t.id
            ),
            json!({ "field": "idempotency_key", "id": t.id, "kind": t.kind }),
        ));
    }
    let status = if e.deduplicated {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(task_json(&t, scope, true))).into_response())
}

/// The request's idempotency key: the `Idempotency-Key` header wins over the body's field
/// when both are given, but the field is checked either way (a request that breaks the rules
/// is refused whatever else it carries).
fn idempotency_key(headers: &HeaderMap, field: Option<&str>) -> ApiResult<Option<String>> {
    if let Some(k) = field
        && (k.is_empty()
            || k.chars().count() > crate::queue::MAX_KEY_LEN
            || crate::db::text::has_nul(k))
    {
        return Err(ApiError::invalid(
            "idempotency_key",
            format!(
                "must be 1 to {} characters, without NUL",
                crate::queue::MAX_KEY_LEN
            ),
        ));
    }
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(field.map(str::to_string));
    };
    v.to_str()
        .ok()
        .filter(|k| k.chars().all(|c| c.is_ascii_graphic() || c == ' '))
        .map(|k| Some(k.to_string()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid Idempotency-Key header: only printable ASCII is allowed",
                json!({ "field": "Idempotency-Key" }),
            )
        })
}

/// Seconds given as a JSON number, as a `Duration` within the bounds the queue checks (the
/// conversion itself would panic on a negative or enormous number).
fn seconds(field: &str, v: f64, (lo, hi): (Duration, Duration)) -> ApiResult<Duration> {
    if v.is_finite() && v >= lo.as_secs_f64() && v <= hi.as_secs_f64() {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "must be {} to {} seconds",
                lo.as_secs_f64(),
                hi.as_secs_f64()
            ),
        ))
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub agent_id: Option<i64>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

fn page(limit: Option<i64>, offset: Option<i64>) -> ApiResult<(i64, i64)> {
    let limit = limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is out of range; allowed 1 to 100"),
        ));
    }
    let offset = offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::invalid("offset", "must be 0 or more"));
    }
    Ok((limit, offset))
}

async fn list_tasks(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    let (limit, offset) = page(q.limit, q.offset)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "status",
                format!(
                    "{s:?}; allowed: {}",
                    Status::ALL.map(Status::as_str).join(", ")
                ),
            )
        })?),
    };
    let f = TaskFilter {
        status,
        kind: q.kind,
        agent_id: q.agent_id,
        before: None,
        after: None,
        limit,
        offset,
    };
    Ok(Json(tasks_json(&st.queue.list(&f).await?, scope)))
}

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

async fn agent_tasks(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiPath(agent_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Value>> {
    let (limit, offset) = page(q.limit, q.offset)?;
    let f = TaskFilter {
        agent_id: Some(agent_id),
        before: None,
        after: None,
        limit,
        offset,
        ..TaskFilter::default()
    };
    Ok(Json(tasks_json(&st.queue.list(&f).await?, scope)))
}

async fn get_task(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<Value>> {
    Ok(Json(task_json(
        &st.queue.get_with_progress(id).await?,
        scope,
        true,
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Stream the output as Server-Sent Events until the task ends.
    pub follow: Option<bool>,
    /// Only chunks after this one (`attempt:seq`, as `next` or an event's id says).
    pub after: Option<String>,
}

/// The most chunks one answer holds (`next` says where to go on).
const LOG_PAGE: i64 = 1000;

fn parse_cursor(field: &str, raw: &str) -> ApiResult<(i32, i32)> {
    raw.split_once(':')
        .and_then(|(a, s)| Some((a.trim().parse().ok()?, s.trim().parse().ok()?)))
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("{raw:?} is not a position; give attempt:seq, e.g. 1:17"),
            )
        })
}

/// A task's output: JSON, or with `follow=true` Server-Sent Events (`output` and
/// `progress` events with the chunk as data and `attempt:seq` as id, then one `end` event
/// with the task's final status). A reconnecting client's `Last-Event-ID` resumes.
async fn task_logs(
    State(st): Shared,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<LogsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let task = st.queue.get(id).await?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let after = match q.after.as_deref().or(resume.as_deref()) {
        Some(raw) => Some(parse_cursor("after", raw)?),
        None => None,
    };
    if q.follow == Some(true) {
        return Ok(follow_logs(st.queue.clone(), st.draining.clone(), id, after).into_response());
    }
    let chunks = st.queue.logs(id, after, LOG_PAGE).await?;
    let next = (chunks.len() as i64 == LOG_PAGE)
        .then(|| chunks.last().map(|c| format!("{}:{}", c.attempt, c.seq)))
        .flatten();
    Ok(Json(crate::queue::logs::TaskLogs {
        task_id: id,
        status: task.status,
        attempt: task.attempt,
        progress: st.queue.progress(id).await?,
        chunks,
        next,
    })
    .into_response())
}

/// The events of a followed task: its output as it is stored, then its end. A draining
/// replica ends the stream with an `end` event that says so (the client reconnects
/// elsewhere with its Last-Event-ID).
pub(crate) fn follow_logs(
    queue: Queue,
    draining: tokio_util::sync::CancellationToken,
    id: i64,
    after: Option<(i32, i32)>,
) -> axum::response::sse::Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>>
{
    use crate::executor::output::Stream as Out;
    use crate::queue::logs::{FollowStep, Follower};
    let follower = Follower::new(queue, id, after);
    let steps = futures::stream::unfold(Some(follower), move |state| {
        let draining = draining.clone();
        async move {
            let mut f = state?;
            let step = tokio::select! {
                s = f.next() => s,
                _ = draining.cancelled() => {
                    let end = Event::default().event("end").data(
                        json!({"reason": "the replica is shutting down; reconnect with Last-Event-ID"})
                            .to_string(),
                    );
                    return Some((vec![end], None));
                }
            };
            Some(match step {
                Ok(FollowStep::Chunks(chunks)) => {
                    let events = chunks
                        .iter()
                        .map(|c| {
                            Event::default()
                                .event(if c.stream == Out::Progress {
                                    "progress"
                                } else {
                                    "output"
                                })
                                .id(format!("{}:{}", c.attempt, c.seq))
                                .data(serde_json::to_string(c).expect("chunk serialises"))
                        })
                        .collect();
                    (events, Some(f))
                }
                Ok(FollowStep::End(task)) => {
                    let end = Event::default().event("end").data(
                        json!({"status": task.status, "attempt": task.attempt, "error": task.error})
                            .to_string(),
                    );
                    (vec![end], None)
                }
                Err(e) => {
                    let error = Event::default()
                        .event("error")
                        .data(json!({"error": e.to_string()}).to_string());
                    (vec![error], None)
                }
            })
        }
    });
    use futures::StreamExt;
    let events = steps.flat_map(|v| futures::stream::iter(v.into_iter().map(Ok)));
    axum::response::sse::Sse::new(events).keep_alive(axum::response::sse::KeepAlive::default())
}

async fn delete_task(State(st): Shared, ApiPath(id): ApiPath<i64>) -> ApiResult<StatusCode> {
    st.queue.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn retry_task(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let t = st.queue.retry(id).await?;
    Ok((StatusCode::CREATED, Json(task_json(&t, scope, true))).into_response())
}

async fn cancel_task(State(st): Shared, ApiPath(id): ApiPath<i64>) -> ApiResult<Json<Value>> {
    let status = st.queue.cancel(id).await?;
    Ok(Json(
        json!({ "id": id, "status": status, "cancel_requested": status == Status::Running }),
    ))
}

async fn stats(State(st): Shared) -> ApiResult<Json<Value>> {
    let s = st.queue.stats().await?;
    // Every status, so the counts add up to `total`.
    let mut v = json!({ "total": s.total, "success_rate": s.success_rate });
    for status in Status::ALL {
        v[status.as_str()] = json!(s.count(status));
    }
    Ok(Json(v))
}

// ---- agents --------------------------------------------------------------------------

fn agents(st: &ApiState) -> ApiResult<&Agents> {
    st.agents.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this replica does not run agents",
            Value::Null,
        )
    })
}

/// The quarantines in force.
async fn quarantines(st: &ApiState) -> ApiResult<Vec<crate::fleet::quarantines::Quarantine>> {
    crate::fleet::quarantines::active(&st.pool)
        .await
        .map_err(ApiError::db)
}

/// An agent by numeric id or by name.
async fn find_agent(a: &Agents, key: &str) -> ApiResult<crate::agents::Agent> {
    Ok(match key.parse::<i64>() {
        Ok(id) => a.get_by_id(id).await?,
        Err(_) => a.get(key).await?,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAgent {
    pub name: String,
    /// Python source defining `class Agent` (or give `command`).
    pub code: Option<String>,
    /// A program and its arguments (or give `code`).
    pub command: Option<Vec<String>>,
    /// Any of schedule, timezone, timeout, max_retries, memory_mb, cpu_percent, env, overlap,
    /// network, requirements.
    pub settings: Option<serde_json::Map<String, Value>>,
    /// The agent's own config (what `Agent(config)` receives). Without `settings`, a config
    /// made only of settings fields is read as the settings (the spelling before `settings`
    /// existed; deprecated).
    pub config: Option<AgentOwnConfig>,
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

fn runtime_of(code: Option<String>, command: Option<Vec<String>>) -> ApiResult<Option<Runtime>> {
    match (code, command) {
        (Some(_), Some(_)) => Err(ApiError::invalid("code", "give code or command, not both")),
        (Some(code), None) => Ok(Some(Runtime::Python { code })),
        (None, Some(argv)) => Ok(Some(Runtime::Command { argv })),
        (None, None) => Ok(None),
    }
}

/// `base` with the fields of `patch` applied; unknown fields and wrong types name the field,
/// under `group` (the name the caller used).
fn merge_settings(
    base: &AgentSettings,
    patch: serde_json::Map<String, Value>,
    group: &str,
) -> ApiResult<AgentSettings> {
    let mut v = serde_json::to_value(base).expect("settings serialise");
    for (k, val) in patch {
        // 5.0 is a whole number as JSON Schema reads it: the integer fields take it as 5.
        v[&k] = extract::whole::normalize(val);
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let (field, reason) = extract::field_error(&path, &e.into_inner().to_string());
        ApiError::invalid(&format!("{group}.{field}"), reason)
    })
}

/// The settings patch and the agent's own config of a request body. Without `settings`, a
/// non-empty `config` whose every field is a settings field is the settings under their
/// former name: then the third value is true (the response says it is deprecated).
fn split_agent_body(
    settings: Option<serde_json::Map<String, Value>>,
    config: Option<AgentOwnConfig>,
    defaults: &AgentSettings,
) -> (
    Option<serde_json::Map<String, Value>>,
    Option<AgentOwnConfig>,
    bool,
) {
    match (settings, config) {
        (None, Some(c)) if !c.is_empty() => {
            let known = serde_json::to_value(defaults).expect("settings serialise");
            if c.keys().all(|k| known.get(k).is_some()) {
                (Some(c), None, true)
            } else {
                (None, Some(c), false)
            }
        }
        (s, c) => (s, c, false),
    }
}

/// An agent refused for one of its settings names the field under the caller's `group`
/// (`settings.timeout`, or `config.timeout` in the deprecated spelling).
fn settings_error(e: crate::agents::Error, group: &str, settings: &AgentSettings) -> ApiError {
    match e {
        crate::agents::Error::Invalid { field, reason }
            if serde_json::to_value(settings)
                .expect("settings serialise")
                .get(field)
                .is_some() =>
        {
            ApiError::invalid(&format!("{group}.{field}"), reason)
        }
        e => e.into(),
    }
}

/// Marks a response whose request named the settings `config` (RFC 9745 `Deprecation`).
fn deprecated_config(mut response: Response, legacy: bool) -> Response {
    if legacy {
        tracing::warn!(
            "an agent's settings sent as `config` (deprecated; send them as `settings`)"
        );
        let headers = response.headers_mut();
        headers.insert("deprecation", axum::http::HeaderValue::from_static("true"));
        headers.insert(
            axum::http::header::WARNING,
            axum::http::HeaderValue::from_static(
                "299 - \"the agent's settings were sent as config; send them as settings \
                 (config is now the agent's own config)\"",
            ),
        );
    }
    response
}

async fn create_agent(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiJson(body): ApiJson<CreateAgent>,
) -> ApiResult<Response> {
    let a = agents(&st)?;
    let runtime = runtime_of(body.code, body.command)?
        .ok_or_else(|| ApiError::invalid("code", "give the agent's code or a command"))?;
    let defaults = AgentSettings::defaults(&st.config);
    let (patch, config, legacy) = split_agent_body(body.settings, body.config, &defaults);
    let group = if legacy { "config" } else { "settings" };
    let settings = merge_settings(&defaults, patch.unwrap_or_default(), group)?;
    let mut agent = a
        .create(AgentSpec {
            name: body.name,
            runtime,
            settings: settings.clone(),
            config: config.unwrap_or_default(),
        })
        .await
        .map_err(|e| settings_error(e, group, &settings))?;
    if !body.active {
        agent = a.set_active(&agent.name, false).await?;
    }
    let q = quarantines(&st).await?;
    let response = (
        StatusCode::CREATED,
        Json(agent_json(&agent, scope, true, &q)),
    )
        .into_response();
    Ok(deprecated_config(response, legacy))
}

async fn list_agents(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
) -> ApiResult<Json<Value>> {
    let list = agents(&st)?.list().await?;
    let q = quarantines(&st).await?;
    Ok(Json(Value::Array(
        list.iter()
            .map(|a| agent_json(a, scope, false, &q))
            .collect(),
    )))
}

async fn get_agent(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let agent = find_agent(agents(&st)?, &id).await?;
    let q = quarantines(&st).await?;
    Ok(Json(agent_json(&agent, scope, true, &q)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgent {
    pub code: Option<String>,
    pub command: Option<Vec<String>>,
    /// Only the fields given change.
    pub settings: Option<serde_json::Map<String, Value>>,
    /// Replaces the agent's own config (see [`CreateAgent`] for the former spelling).
    pub config: Option<AgentOwnConfig>,
    pub active: Option<bool>,
}

async fn update_agent(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateAgent>,
) -> ApiResult<Response> {
    let a = agents(&st)?;
    let current = find_agent(a, &id).await?;
    let runtime = runtime_of(body.code, body.command)?.unwrap_or_else(|| current.runtime.clone());
    let (patch, config, legacy) = split_agent_body(body.settings, body.config, &current.settings);
    let group = if legacy { "config" } else { "settings" };
    let settings = merge_settings(&current.settings, patch.unwrap_or_default(), group)?;
    let config = config.unwrap_or_else(|| current.config.clone());
    let mut agent = a
        .update(&current.name, runtime, settings.clone(), config)
        .await
        .map_err(|e| settings_error(e, group, &settings))?;
    if let Some(active) = body.active {
        agent = a.set_active(&agent.name, active).await?;
        if active {
            a.lift_quarantine(&agent).await?;
        }
    }
    Ok(deprecated_config(
        Json(agent_json(&agent, scope, true, &quarantines(&st).await?)).into_response(),
        legacy,
    ))
}

async fn delete_agent(State(st): Shared, ApiPath(id): ApiPath<String>) -> ApiResult<StatusCode> {
    let a = agents(&st)?;
    let agent = find_agent(a, &id).await?;
    a.remove(&agent.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAgent {
    #[serde(default)]
    pub input: Value,
}

async fn run_agent(
    State(st): Shared,
    Extension(scope): Extension<Scope>,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let a = agents(&st)?;
    let agent = find_agent(a, &id).await?;
    // The body is optional: no body runs the agent with no input.
    let input = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        extract::parse_json::<RunAgent>(&body)?.input
    };
    let e = st.queue.enqueue(a.new_run(&agent, input)).await?;
    let t = st.queue.get(e.id).await?;
    Ok((StatusCode::CREATED, Json(task_json(&t, scope, true))).into_response())
}

async fn get_handoff(State(st): Shared, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Value>> {
    let a = agents(&st)?;
    let agent = find_agent(a, &id).await?;
    let h = a
        .handoffs()
        .load_artifact(agent.id)
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "agent {} has no handoff yet (or it was cleared)",
                    agent.name
                ),
                Value::Null,
            )
        })?;
    Ok(Json(serde_json::to_value(h).expect("artifact serialises")))
}

async fn clear_handoff(State(st): Shared, ApiPath(id): ApiPath<String>) -> ApiResult<StatusCode> {
    let a = agents(&st)?;
    let agent = find_agent(a, &id).await?;
    a.handoffs()
        .clear_artifact(agent.id)
        .await
        .map_err(ApiError::db)?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- queues --------------------------------------------------------------------------

async fn list_queues(State(st): Shared) -> ApiResult<Json<Value>> {
    let max_age = Duration::from_secs(st.config.persistence.rescue_after_s);
    let queues = crate::fleet::serving::queues(&st.pool, max_age).await?;
    Ok(Json(json!({ "queues": queues })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseQueue {
    /// Why, shown with the queue.
    #[serde(default)]
    pub reason: String,
}

async fn pause_queue(
    State(st): Shared,
    ApiPath(name): ApiPath<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    // The body is optional: no body pauses with no reason.
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        extract::parse_json::<PauseQueue>(&body)?.reason
    };
    let changed = crate::queue::queues::pause(&st.pool, &name, &reason).await?;
    Ok(Json(
        json!({ "name": name, "paused": true, "changed": changed }),
    ))
}

async fn resume_queue(State(st): Shared, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Value>> {
    let changed = crate::queue::queues::resume(&st.pool, &name).await?;
    Ok(Json(
        json!({ "name": name, "paused": false, "changed": changed }),
    ))
}

// ---- limits --------------------------------------------------------------------------

async fn list_limits(State(st): Shared) -> ApiResult<Json<Value>> {
    let limits = crate::queue::limits::list(&st.pool).await?;
    Ok(Json(json!({ "limits": limits })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetLimit {
    #[serde(default, deserialize_with = "extract::whole::option_u32")]
    pub concurrency: Option<u32>,
    /// `20/s`, `60/min`, `1000/h`, `5/30s`.
    pub rate: Option<String>,
}

/// The scope and target of a limit's path; an agent is named by its name or id.
async fn limit_target(
    st: &ApiState,
    scope: &str,
    target: &str,
) -> ApiResult<(crate::queue::limits::Scope, String)> {
    use crate::queue::limits::Scope;
    let scope = Scope::parse(scope)
        .ok_or_else(|| ApiError::invalid("scope", "must be queue, kind, agent or key"))?;
    if scope != Scope::Agent {
        return Ok((scope, target.to_string()));
    }
    let id = match crate::agents::id_of(&st.pool, target).await {
        Ok(id) => Some(id),
        // Not a name: an id, if an agent has it.
        Err(crate::agents::Error::NotFound(_)) => match target.parse::<i64>() {
            Ok(id) => crate::agents::names_of(&st.pool, &[id])
                .await?
                .contains_key(&id)
                .then_some(id),
            Err(_) => None,
        },
        Err(e) => return Err(e.into()),
    };
    match id {
        Some(id) => Ok((scope, id.to_string())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no agent {target:?}"),
            Value::Null,
        )),
    }
}

async fn set_limit(
    State(st): Shared,
    ApiPath((scope, target)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<SetLimit>,
) -> ApiResult<Json<Value>> {
    let (scope, target) = limit_target(&st, &scope, &target).await?;
    let (rate, per_ms) = match body.rate {
        Some(r) => {
            let (n, ms) =
                crate::queue::limits::parse_rate(&r).map_err(|e| ApiError::invalid("rate", e))?;
            (Some(n), Some(ms))
        }
        None => (None, None),
    };
    let concurrency = body
        .concurrency
        .map(i32::try_from)
        .transpose()
        .map_err(|_| ApiError::invalid("concurrency", "must be 1 to 1000000"))?;
    let limit = crate::queue::limits::Limit {
        scope,
        target,
        concurrency,
        rate,
        per_ms,
    };
    crate::queue::limits::set(&st.pool, &limit).await?;
    Ok(Json(serde_json::to_value(&limit).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            Value::Null,
        )
    })?))
}

async fn remove_limit(
    State(st): Shared,
    ApiPath((scope, target)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let (scope, target) = limit_target(&st, &scope, &target).await?;
    if crate::queue::limits::remove(&st.pool, scope, &target).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no limit on {}:{target}", scope.as_str()),
            Value::Null,
        ))
    }
}

// ---- fleet ---------------------------------------------------------------------------

async fn fleet(State(st): Shared) -> ApiResult<Json<Value>> {
    let max_age = Duration::from_secs(st.config.persistence.rescue_after_s);
    let replicas = crate::fleet::replicas::list(&st.pool, max_age).await?;
    let leader = replicas.iter().find(|r| r.is_leader).map(|r| r.id.clone());
    let quarantines = quarantines(&st).await?;
    Ok(Json(
        json!({ "replicas": replicas, "leader": leader, "quarantines": quarantines }),
    ))
}

async fn resume_one(
    State(st): Shared,
    ApiPath(replica): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let n = crate::fleet::replicas::request_resume(&st.pool, Some(&replica))
        .await
        .map_err(ApiError::db)?;
    if n == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no replica {replica:?}"),
            Value::Null,
        ));
    }
    Ok(Json(json!({ "resumed": [replica] })))
}

async fn resume_all(State(st): Shared) -> ApiResult<Json<Value>> {
    let n = crate::fleet::replicas::request_resume(&st.pool, None)
        .await
        .map_err(ApiError::db)?;
    let lifted = crate::fleet::quarantines::lift(&st.pool, None)
        .await
        .map_err(ApiError::db)?;
    Ok(Json(json!({ "resumed": n, "quarantines_lifted": lifted })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_config_values_are_redacted_at_any_depth_and_the_rest_kept() {
        let mut v = json!({
            "api_key": "sk-1", "slackToken": "xoxb", "db": {"password": "p", "host": "h"},
            "feeds": [{"url": "u", "private-key": "k"}], "author": "me", "auth": "basic",
            "limit": 3, "clientSecret": "s", "db_credentials": {"user": "u"}
        });
        redact_secrets(&mut v);
        assert_eq!(
            v,
            json!({
                "api_key": REDACTED, "slackToken": REDACTED,
                "db": {"password": REDACTED, "host": "h"},
                "feeds": [{"url": "u", "private-key": REDACTED}], "author": "me",
                "auth": REDACTED, "limit": 3, "clientSecret": REDACTED,
                "db_credentials": REDACTED
            })
        );
    }
}
